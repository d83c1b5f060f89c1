"""The rollout's floor: one message fanned out by the broker to N bare paho subscribers, each
hashing what it got (sha256), timed from the publish until the last one has hashed it.

That is the least any rollout over this broker can take: one publish, the broker's fan-out,
every copy read and checked once, no disk, no protocol around it.
"""

import asyncio
import hashlib
import os
import secrets
import time
from dataclasses import dataclass

from agent.protocol.topics import Topics
from bench.bare import Account, BareClients
from bench.machine import raise_fd_limit
from bench.timing import BenchTimeout, percentile

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
    topic_root: str = "outpost"


@dataclass(frozen=True)
class FanoutRun:
    subscribers: int
    received: int  # copies that arrived with the right hash
    first_s: float  # from the publish to the first subscriber done
    median_s: float
    last_s: float  # from the publish to the last subscriber done


async def _fanout(cfg: FanoutConfig) -> FanoutRun:
    payload = os.urandom(cfg.payload_bytes)
    expected = hashlib.sha256(payload).hexdigest()
    done_at: list[float] = []
    wrong = 0
    all_done = asyncio.Event()

    def hashed(index: int, data: bytes | bytearray) -> None:
        nonlocal wrong
        if hashlib.sha256(data).hexdigest() == expected:
            done_at.append(time.monotonic())
        else:
            wrong += 1
        if len(done_at) + wrong == len(cfg.subscribers):
            all_done.set()

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
        started = time.monotonic()
        publisher.publish(0, topic, payload, qos=1)
        try:
            await asyncio.wait_for(all_done.wait(), cfg.timeout_s)
        except TimeoutError:
            raise BenchTimeout(
                f"{len(done_at)} of {len(cfg.subscribers)} subscribers got the message within "
                f"{cfg.timeout_s:g} s"
            ) from None
    finally:
        subscribers.abort_all()
        publisher.abort_all()
    times = [t - started for t in done_at]
    return FanoutRun(
        subscribers=len(cfg.subscribers),
        received=len(done_at),
        first_s=min(times),
        median_s=percentile(times, 0.5),
        last_s=max(times),
    )


def run_fanout(cfg: FanoutConfig) -> FanoutRun:
    """The floor, in its own process."""
    raise_fd_limit()
    return asyncio.run(_fanout(cfg))
