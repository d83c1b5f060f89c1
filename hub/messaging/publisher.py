"""The one thing services need from MQTT: publish bytes to a topic.

The paho client implements it in production; tests use ``RecordingPublisher``.
"""

import threading
from dataclasses import dataclass, field
from typing import Protocol


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Hand a message to the broker client; raises MessagingUnavailable if it cannot."""
        ...


@dataclass(frozen=True)
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class RecordingPublisher:
    """Keeps every message, for tests and for a hub run without a broker."""

    messages: list[Published] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        with self._lock:
            self.messages.append(Published(topic, payload, qos, retain))

    def on(self, topic: str) -> list[Published]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]
