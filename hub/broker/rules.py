"""Which topics a device may use: the one set of rules behind both the embedded Mosquitto's ACL
file and the HTTP authorization endpoint that external brokers (EMQX) ask.

A device publishes only to its own device-to-hub channels and reads only its own hub-to-device
channels and the package topics. Everything else is denied: another device's topics, the
``$SYS`` and ``$share`` trees, wildcards beyond what a grant covers, and topics outside the
root. The same rules judge a device's Will, because a broker publishes a Will in the device's
name (THREATS B7, E2).

Pure code: no I/O, nothing of the hub but the topic contract.
"""

from dataclasses import dataclass
from enum import StrEnum

from agent.protocol.topics import DEVICE_TO_HUB, HUB_TO_DEVICE, Topics, is_valid_device_id

# Where a grant names the device; Mosquitto's ACL writes it as %u (the user name).
DEVICE = "{device}"
MOSQUITTO_USERNAME = "%u"
# An MQTT topic or filter is at most 65,535 bytes; anything near that from a device is an attack.
MAX_TOPIC_BYTES = 1024


class Access(StrEnum):
    READ = "read"  # receive: subscribe, and deliveries
    WRITE = "write"  # publish, including the Will


@dataclass(frozen=True)
class Grant:
    """One topic filter a device may read or write; ``{device}`` stands for its id."""

    access: Access
    filter: str

    def for_device(self, device_id: str) -> str:
        return self.filter.replace(DEVICE, device_id)


def check_root(topic_root: str) -> str:
    """The root as the contract's ``Topics`` takes it, refusing what Mosquitto's ACL would
    read as a substitution (``%``) or a system topic (``$``)."""
    root = Topics(topic_root).root
    if "%" in root or root.startswith("$") or any(c in root for c in "\0\n\r"):
        raise ValueError(f"topic root {root!r} cannot be used in a broker ACL")
    return root


def device_grants(topic_root: str) -> list[Grant]:
    """Every grant a device has: write its up channels, read its down channels and packages."""
    root = check_root(topic_root)
    writes = [Grant(Access.WRITE, f"{root}/d/{DEVICE}/{c}") for c in sorted(DEVICE_TO_HUB)]
    reads = [Grant(Access.READ, f"{root}/d/{DEVICE}/{c}") for c in sorted(HUB_TO_DEVICE)]
    return [*writes, *reads, Grant(Access.READ, f"{root}/pkg/#")]


def mosquitto_lines(topic_root: str) -> list[str]:
    """The grants as Mosquitto ``pattern`` lines, which apply to every user by its name."""
    return [
        f"pattern {g.access} {g.filter.replace(DEVICE, MOSQUITTO_USERNAME)}"
        for g in device_grants(topic_root)
    ]


def _plain(text: str) -> bool:
    """A topic or filter that is not empty, not oversized, not a system or shared-subscription
    topic and carries no NUL (MQTT forbids it; brokers differ in what they do with it)."""
    return (
        bool(text)
        and len(text.encode("utf-8", "surrogatepass")) <= MAX_TOPIC_BYTES
        and not text.startswith("$")
        and "\0" not in text
    )


def _valid_filter(levels: list[str]) -> bool:
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                return False
        elif "#" in level or ("+" in level and level != "+"):
            return False
    return True


def _matches(grant: list[str], topic: list[str]) -> bool:
    """Whether the grant's filter matches one concrete topic (MQTT 3.1.1 section 4.7)."""
    for i, level in enumerate(grant):
        if level == "#":
            return True
        if i >= len(topic) or (level != "+" and level != topic[i]):
            return False
    return len(grant) == len(topic)


def _covers(grant: list[str], wanted: list[str]) -> bool:
    """Whether every topic the ``wanted`` filter matches is matched by the grant's filter."""
    for i, level in enumerate(grant):
        if level == "#":
            return True
        if i >= len(wanted):
            return False
        if wanted[i] == "#":
            return False  # the filter reaches deeper than this grant
        if level != "+" and level != wanted[i]:
            return False
    return len(grant) == len(wanted)


def _may_touch(topic_root: str, device_id: str, topic: str, access: Access) -> bool:
    """Whether ``device_id`` holds a grant of ``access`` for the plain topic ``topic``."""
    if not is_valid_device_id(device_id) or not _plain(topic) or any(c in topic for c in "+#"):
        return False
    levels = topic.split("/")
    return any(
        _matches(g.for_device(device_id).split("/"), levels)
        for g in device_grants(topic_root)
        if g.access is access
    )


def may_publish(topic_root: str, device_id: str, topic: str) -> bool:
    """Whether ``device_id`` may publish (or leave as its Will) a message on ``topic``."""
    return _may_touch(topic_root, device_id, topic, Access.WRITE)


def may_subscribe(topic_root: str, device_id: str, topic_filter: str) -> bool:
    """Whether ``device_id`` may subscribe to ``topic_filter``: only when every topic it could
    match is one the device may read, so ``#`` or ``root/d/+/cmd`` is refused outright."""
    if not is_valid_device_id(device_id) or not _plain(topic_filter):
        return False
    levels = topic_filter.split("/")
    if not _valid_filter(levels):
        return False
    return any(
        _covers(g.for_device(device_id).split("/"), levels)
        for g in device_grants(topic_root)
        if g.access is Access.READ
    )


def may_receive(topic_root: str, device_id: str, topic: str) -> bool:
    """Whether a message on ``topic`` may be delivered to ``device_id``."""
    return _may_touch(topic_root, device_id, topic, Access.READ)
