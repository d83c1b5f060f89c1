"""The embedded Mosquitto broker: its password hashes, configuration, ACL and supervisor.

This package imports only ``agent.protocol`` of the project, like the rest of the hub.
"""

from hub.broker.config import render_acl, render_config
from hub.broker.passwords import BrokerUser, hash_password, render_passwords, verify_password
from hub.broker.supervisor import (
    DEFAULT_HUB_USERNAME,
    BrokerError,
    EmbeddedBroker,
    MosquittoNotFoundError,
    find_mosquitto,
)

__all__ = [
    "DEFAULT_HUB_USERNAME",
    "BrokerError",
    "BrokerUser",
    "EmbeddedBroker",
    "MosquittoNotFoundError",
    "find_mosquitto",
    "hash_password",
    "render_acl",
    "render_config",
    "render_passwords",
    "verify_password",
]
