"""The fleet simulator: many real agents (``agent.core.Agent``) in one process, on one event loop.

Each simulated device runs the real protocol, download, verification, install and inference
code with its own state directory; only the hardware is simulated. It imports ``agent``, never
``hub``, so it exercises the contract exactly as a device does.

Scenario files in ``device-sim/scenarios/`` script a run; a staged rollout (canary, waves, soak,
failure threshold) followed wave by wave through the hub's API:
``outpost-sim run device-sim/scenarios/staged-rollout.yaml``.
"""
