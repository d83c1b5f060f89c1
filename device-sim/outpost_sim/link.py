"""The network under a simulated device: an ``MqttLink`` with a shaped, faulty link layer.

Everything above the link is the real agent. Below it, messages to the device wait for the
link's latency and queue behind each other at its bandwidth; package chunks may arrive with a
byte flipped; the link can be cut (``drop``) or kept down for a window. The socket to the broker
stays real, so the broker sees exactly what a fleet on bad links would make it see.
"""

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from agent.aio import wait_set
from agent.mqtt import MqttLink
from outpost_sim.profiles import LinkProfile


@dataclass
class LinkStats:
    """What the link layer did to one device, across the agent's restarts."""

    drops: int = 0
    offline_windows: int = 0
    corrupted_chunks: int = 0
    delayed_messages: int = 0
    bytes_received: int = 0


@dataclass
class LinkConditions:
    """How one device's link behaves; shared by every incarnation of its agent."""

    profile: LinkProfile = field(default_factory=LinkProfile)
    corrupt_probability: float = 0.0
    corrupt_limit: int | None = None
    rng: random.Random = field(default_factory=random.Random)
    offline_until: float = 0.0  # time.monotonic() before which no connect is attempted
    # Set when the network is back before ``offline_until`` (``SimulatedLink.come_back``).
    back_online: asyncio.Event = field(default_factory=asyncio.Event)
    stats: LinkStats = field(default_factory=LinkStats)


class SimulatedLink(MqttLink):
    def __init__(self, *, conditions: LinkConditions, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conditions = conditions
        self._busy_until = 0.0  # when the downstream link finishes the message before

    async def wait_for_network(self) -> None:
        # The network is down until then, or until someone brings it back early.
        conditions = self.conditions
        while (left := conditions.offline_until - time.monotonic()) > 0:
            conditions.back_online.clear()
            await wait_set(conditions.back_online, None if math.isinf(left) else left)

    def go_offline(self, for_s: float | None = None) -> None:
        """Cut the link now and keep it down for ``for_s`` seconds (None: until ``come_back``)."""
        until = math.inf if for_s is None else time.monotonic() + for_s
        self.conditions.offline_until = max(self.conditions.offline_until, until)
        self.conditions.stats.offline_windows += 1
        super().drop()  # counted as the window, not as a drop

    def come_back(self) -> None:
        """End the offline window now: the link connects again (after its backoff)."""
        self.conditions.offline_until = 0.0
        self.conditions.back_online.set()

    def drop(self) -> bool:
        cut = super().drop()
        self.conditions.stats.drops += cut  # a drop that cut a live connection
        return cut

    def receive(self, topic: str, payload: bytes) -> None:
        conditions = self.conditions
        conditions.stats.bytes_received += len(payload)
        corrupt = conditions.corrupt_probability and "/pkg/" in topic and payload
        limit = conditions.corrupt_limit
        corrupt = corrupt and (limit is None or conditions.stats.corrupted_chunks < limit)
        if corrupt and conditions.rng.random() < conditions.corrupt_probability:
            flipped = bytearray(payload)
            flipped[conditions.rng.randrange(len(flipped))] ^= 0xFF
            payload = bytes(flipped)
            conditions.stats.corrupted_chunks += 1
        profile = conditions.profile
        if not profile.shaped:
            super().receive(topic, payload)
            return
        now = time.monotonic()
        transfer_s = len(payload) * 8 / (profile.kbps * 1000) if profile.kbps else 0.0
        self._busy_until = max(now, self._busy_until) + transfer_s
        deliver_at = self._busy_until + profile.latency_ms / 1000
        conditions.stats.delayed_messages += 1
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + (deliver_at - now), self._deliver, topic, payload)

    def _deliver(self, topic: str, payload: bytes) -> None:
        # A message still on the wire when the link went down is lost with it.
        if self.connected:
            super().receive(topic, payload)
