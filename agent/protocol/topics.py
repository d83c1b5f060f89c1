"""MQTT topic names under a configurable root, and their parser.

`{root}/d/{device_id}/{channel}` carries per-device traffic; the device id is also the broker
user name, so a broker ACL can pin each device to its own topics.
`{root}/pkg/{digest}/c/{index}` carries package chunks, published once and fanned out.
"""

import re
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_ROOT = "outpost"

# Device ids are also broker user names and topic levels: no MQTT wildcards, no separators.
DEVICE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
DIGEST_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class Channel(StrEnum):
    """The per-device topics of the contract (see docs/adr/0001-contract.md)."""

    DESIRED = "desired"  # hub -> device, retained, signed desired state
    CMD = "cmd"  # hub -> device, signed one-off commands
    STATE = "state"  # device -> hub, retained, reported state
    STATUS = "status"  # device -> hub, retained, last will
    EVT = "evt"  # device -> hub, deployment progress events
    TM = "tm"  # device -> hub, telemetry batch
    DC = "dc"  # device -> hub, data-collection batch
    REQ = "req"  # device -> hub, requests (desired state again, missing chunks), command results
    ACK = "ack"  # hub -> device, what the hub has stored


HUB_TO_DEVICE = frozenset({Channel.DESIRED, Channel.CMD, Channel.ACK})
DEVICE_TO_HUB = frozenset(set(Channel) - HUB_TO_DEVICE)


class TopicError(ValueError):
    """A topic that is not part of the contract."""


def is_valid_device_id(device_id: str) -> bool:
    return DEVICE_ID_PATTERN.fullmatch(device_id) is not None


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    device_id: str
    channel: Channel


@dataclass(frozen=True, slots=True)
class ChunkTopic:
    digest: str
    index: int


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic builder and parser for one topic root."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if not self.root or any(c in self.root for c in "+#") or self.root.endswith("/"):
            raise TopicError(f"invalid topic root {self.root!r}")

    def device(self, device_id: str, channel: Channel) -> str:
        if not is_valid_device_id(device_id):
            raise TopicError(f"invalid device id {device_id!r}")
        return f"{self.root}/d/{device_id}/{channel}"

    def device_wildcard(self, channel: Channel) -> str:
        """All devices' topics of one channel, for the hub's subscriptions."""
        return f"{self.root}/d/+/{channel}"

    def chunk(self, digest: str, index: int) -> str:
        if DIGEST_PATTERN.fullmatch(digest) is None:
            raise TopicError(f"invalid package digest {digest!r}")
        if index < 0:
            raise TopicError(f"invalid chunk index {index}")
        return f"{self.root}/pkg/{digest}/c/{index}"

    def package_wildcard(self, digest: str) -> str:
        if DIGEST_PATTERN.fullmatch(digest) is None:
            raise TopicError(f"invalid package digest {digest!r}")
        return f"{self.root}/pkg/{digest}/c/+"

    def parse_device(self, topic: str) -> DeviceTopic:
        parts = topic.split("/")
        prefix = self.root.split("/")
        n = len(prefix)
        if len(parts) != n + 3 or parts[:n] != prefix or parts[n] != "d":
            raise TopicError(f"not a device topic: {topic!r}")
        device_id, channel = parts[n + 1], parts[n + 2]
        if not is_valid_device_id(device_id):
            raise TopicError(f"invalid device id in topic {topic!r}")
        try:
            return DeviceTopic(device_id, Channel(channel))
        except ValueError:
            raise TopicError(f"unknown channel in topic {topic!r}") from None

    def parse_chunk(self, topic: str) -> ChunkTopic:
        parts = topic.split("/")
        prefix = self.root.split("/")
        n = len(prefix)
        if (
            len(parts) != n + 4
            or parts[:n] != prefix
            or parts[n] != "pkg"
            or parts[n + 2] != "c"
            or DIGEST_PATTERN.fullmatch(parts[n + 1]) is None
            or not parts[n + 3].isdigit()
        ):
            raise TopicError(f"not a chunk topic: {topic!r}")
        return ChunkTopic(parts[n + 1], int(parts[n + 3]))
