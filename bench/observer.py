"""A bare subscriber on the package topics, counting what the hub publishes during a rollout.

A package of C chunks fanned out as designed is C publishes; every re-publish is a device that
missed a chunk and asked again. Reading them costs the simulator one more copy of each chunk.
"""

import time
from collections import Counter

from agent.protocol.topics import Topics
from bench.bare import Account, BareClients

KEEPALIVE_S = 60


class ChunkObserver:
    """Counts chunk publishes (by topic) and when they happened. Build it on the fleet's loop."""

    def __init__(self, *, host: str, port: int, account: Account, topic_root: str) -> None:
        self.publishes: Counter[str] = Counter()
        self.times: list[float] = []
        self._filter = f"{Topics(topic_root).root}/pkg/+/c/+"
        self._clients = BareClients(
            host=host, port=port, accounts=[account], keepalive_s=KEEPALIVE_S, on_message=self._seen
        )

    def _seen(self, index: int, topic: str, payload: bytes | bytearray) -> None:
        self.publishes[topic] += 1
        self.times.append(time.monotonic())

    async def start(self, timeout_s: float) -> None:
        await self._clients.connect_all(timeout_s=timeout_s)
        await self._clients.subscribe_all(self._filter, qos=0, timeout_s=timeout_s)

    def stop(self) -> None:
        self._clients.abort_all()

    @property
    def total(self) -> int:
        return sum(self.publishes.values())

    @property
    def distinct(self) -> int:
        return len(self.publishes)
