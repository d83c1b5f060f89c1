"""The fleet simulator: many real agents (``agent.core.Agent``) in one process, on one event loop.

Each simulated device runs the real protocol, download, verification, install and inference
code with its own state directory; only the hardware is simulated. It imports ``agent``, never
``hub``, so it exercises the contract exactly as a device does.
"""
