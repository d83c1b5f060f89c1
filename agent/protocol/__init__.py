"""The contract between hub, agent and simulator: topics, messages, manifests, signed documents.

This package imports nothing else of the project, so the hub and the simulator can depend on it
without pulling in the agent's adapters.
"""

PROTOCOL_VERSION = 1
