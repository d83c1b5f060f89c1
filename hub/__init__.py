"""The Outpost hub: model registry, signer, device enrolment, deployments and the MQTT side.

The hub imports nothing of ``agent`` except ``agent.protocol``, the contract it shares with devices.
"""
