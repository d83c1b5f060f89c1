"""The rollout's floor: one message fanned out by the broker to N bare paho subscribers, each
hashing what it got (sha256), timed from the publish until the last one has hashed it.

That is the least any rollout over this broker can take: one publish, the broker's fan-out,
every copy read and checked once, no disk, no protocol around it.

The first delivery of a large message is not the floor: Mosquitto and the subscribers' process
then touch gigabytes of fresh memory (a 5 MiB message to 1,000 subscribers is 5 GB of packet
copies in the broker), which takes several times as long as the delivery itself (FLOORS.md: "a
first delivery in a fresh process once took ~15 s"). So one warm-up delivery goes first, then
``rounds`` measured ones; the floor is their median, and the warm-up is reported as the cold
figure.
"""

import asyncio
import hashlib
import os
import secrets
import time
from dataclasses import dataclass

from agent.protocol.topics import Topics
from agent.telemetry import percentile
from bench.bare import Account, BareClients
from bench.machine import raise_fd_limit
from bench.timing import BenchTimeout

IN_FLIGHT = 100
KEEPALIVE_S = 60  # one large message can keep a busy loop from pinging for a while


@dataclass(frozen=True)
class FanoutConfig:
    host: str
    port: int
    subscribers: list[Account]
    publisher: Account
    payload_bytes: int
    timeout_s: float
    rounds: int = 3
    topic_root: str = "outpost"


@dataclass(frozen=True)
class Delivery:
    """One message to every subscriber, times from its publish."""

    received: int  # copies that arrived with the right hash
    first_s: float
    median_s: float
    last_s: float


@dataclass(frozen=True)
class FanoutRun:
    subscribers: int
    cold: Delivery  # the warm-up delivery
    rounds: list[Delivery]

    def _median(self, attr: str) -> float:
        return percentile([getattr(d, attr) for d in self.rounds], 0.5)

    @property
    def received(self) -> int:
        return min(d.received for d in self.rounds)

    @property
    def first_s(self) -> float:
        return self._median("first_s")

    @property
    def median_s(self) -> float:
        return self._median("median_s")

    @property
    def last_s(self) -> float:
        return self._median("last_s")


class _Round:
    """What the subscribers have hashed of the message in flight."""

    def __init__(self, subscribers: int, payload: bytes) -> None:
        self.subscribers = subscribers
        self.expected = hashlib.sha256(payload).hexdigest()
        self.done_at: list[float] = []
        self.wrong = 0
        self.finished = asyncio.Event()

    def hashed(self, index: int, topic: str, data: bytes | bytearray) -> None:
        if hashlib.sha256(data).hexdigest() == self.expected:
            self.done_at.append(time.monotonic())
        else:
            self.wrong += 1
        if len(self.done_at) + self.wrong == self.subscribers:
            self.finished.set()


async def _deliver(
    cfg: FanoutConfig, publisher: BareClients, topic: str, current: list[_Round]
) -> Delivery:
    payload = os.urandom(cfg.payload_bytes)
    round_ = _Round(len(cfg.subscribers), payload)
    current[0] = round_
    started = time.monotonic()
    publisher.publish(0, topic, payload, qos=1)
    try:
        async with asyncio.timeout(cfg.timeout_s):
            await round_.finished.wait()
    except TimeoutError:
        raise BenchTimeout(
            f"{len(round_.done_at)} of {len(cfg.subscribers)} subscribers got the message "
            f"within {cfg.timeout_s:g} s"
        ) from None
    times = [t - started for t in round_.done_at]
    return Delivery(
        received=len(times),
        first_s=min(times, default=float("nan")),
        median_s=percentile(times, 0.5) if times else float("nan"),
        last_s=max(times, default=float("nan")),
    )


async def _fanout(cfg: FanoutConfig) -> FanoutRun:
    current: list[_Round] = [_Round(0, b"")]

    def hashed(index: int, topic: str, data: bytes | bytearray) -> None:
        current[0].hashed(index, topic, data)

    subscribers = BareClients(
        host=cfg.host,
        port=cfg.port,
        accounts=cfg.subscribers,
        keepalive_s=KEEPALIVE_S,
        on_message=hashed,
    )
    publisher = BareClients(
        host=cfg.host, port=cfg.port, accounts=[cfg.publisher], keepalive_s=KEEPALIVE_S
    )
    # A topic the ACL lets every device read: a package chunk of a package nobody has.
    topic = Topics(cfg.topic_root).chunk(secrets.token_hex(32), 0)
    try:
        await subscribers.connect_all(in_flight=IN_FLIGHT, timeout_s=cfg.timeout_s)
        await publisher.connect_all(timeout_s=cfg.timeout_s)
        await subscribers.subscribe_all(topic, qos=1, timeout_s=cfg.timeout_s)
        cold = await _deliver(cfg, publisher, topic, current)
        rounds = [await _deliver(cfg, publisher, topic, current) for _ in range(cfg.rounds)]
    finally:
        subscribers.abort_all()
        publisher.abort_all()
    return FanoutRun(subscribers=len(cfg.subscribers), cold=cold, rounds=rounds)


def run_fanout(cfg: FanoutConfig) -> FanoutRun:
    """The floor, in its own process."""
    raise_fd_limit()
    return asyncio.run(_fanout(cfg))
