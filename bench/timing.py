"""Waiting for conditions with deadlines, and turning event times into rates."""

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence


class BenchTimeout(TimeoutError):
    """A condition a benchmark waits for did not come true within its deadline."""


async def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float, poll_s: float, what: str
) -> float:
    """Poll ``predicate`` on the running loop until it holds; returns when (monotonic).

    Polling instead of callbacks keeps the agents untouched; ``poll_s`` bounds the error.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise BenchTimeout(f"{what}: not within {timeout_s:g} s")
        await asyncio.sleep(poll_s)


def peak_rate(times: Sequence[float], start: float, *, bin_s: float = 1.0) -> float:
    """The highest event rate (per second) in any ``bin_s`` bin counted from ``start``."""
    bins = Counter(int((t - start) // bin_s) for t in times)
    return max(bins.values(), default=0) / bin_s


def per_bin(times: Sequence[float], start: float, *, bin_s: float = 1.0) -> list[int]:
    """Events in each ``bin_s`` bin from ``start`` to the last event (events before ``start``
    count in the first bin)."""
    if not times:
        return []
    bins = Counter(max(0, int((t - start) // bin_s)) for t in times)
    return [bins.get(i, 0) for i in range(max(bins) + 1)]


def span_rate(times: Sequence[float]) -> float:
    """Events per second between the first and the last event."""
    if len(times) < 2:
        return 0.0
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else math.inf
