"""The chunk scheduler: one publish per chunk for every device that can still receive it."""

import pytest

from hub.messaging.chunks import ChunkScheduler, ChunkWanted

D = "d" * 64


def _chunk(index: int) -> ChunkWanted:
    return ChunkWanted(D, index, 1024)


def test_the_first_publish_waits_until_the_fleet_has_subscribed_later_ones_briefly() -> None:
    chunks = ChunkScheduler(gather_s=0.05, first_quiet_s=0.5, first_gather_max_s=5.0)
    assert chunks.request("a", _chunk(0), now=10.0)
    assert not chunks.due(now=10.4)
    # More devices of the rollout keep arriving: the first publish waits for them.
    for n, t in enumerate([10.3, 10.6, 10.9]):
        assert not chunks.request(f"dev-{n}", _chunk(0), now=t)
    assert not chunks.due(now=11.3)
    assert chunks.due(now=11.4)  # 0.5 s with no new device
    assert [c.index for c in chunks.take(now=11.4)] == [0]
    assert chunks.request("late", _chunk(1), now=12.0)
    assert chunks.due(now=12.05), "once published, requests are gathered only briefly"


def test_the_first_publish_waits_at_most_the_cap() -> None:
    chunks = ChunkScheduler(gather_s=0.05, first_quiet_s=0.5, first_gather_max_s=2.0)
    chunks.request("a", _chunk(0), now=0.0)
    for n in range(40):  # a new device every 0.1 s, forever
        chunks.request(f"dev-{n}", _chunk(0), now=0.1 * n)
    assert chunks.due(now=2.0)


def test_requests_fold_into_a_pending_publish_or_one_the_device_will_receive() -> None:
    chunks = ChunkScheduler(gather_s=0.05, first_gather_max_s=0.0, lost_after_s=30)
    assert chunks.request("a", _chunk(0), now=1.0)
    assert not chunks.request("b", _chunk(0), now=1.01)  # pending: the same publish
    chunks.take(now=1.05)
    # a and b were subscribed when it went out: asking again is a duplicate.
    assert not chunks.request("a", _chunk(0), now=2.0)
    assert not chunks.request("b", _chunk(0), now=2.0)
    # c subscribed after it (its first request is now): it needs another publish.
    assert chunks.request("c", _chunk(0), now=2.0)
    assert [c.index for c in chunks.take(now=2.05)] == [0]
    assert (chunks.requested, chunks.folded, chunks.published) == (5, 3, 2)


def test_a_reconnect_or_a_long_silence_gets_the_chunk_again() -> None:
    chunks = ChunkScheduler(gather_s=0.0, first_gather_max_s=0.0, lost_after_s=30)
    chunks.request("a", _chunk(0), now=1.0)
    chunks.take(now=1.0)
    assert not chunks.request("a", _chunk(0), now=5.0)
    chunks.forget_device("a")  # reconnected: the old subscription is gone
    assert chunks.request("a", _chunk(0), now=6.0)
    chunks.take(now=6.0)
    # Still missing 30 s after a publish it must have seen: lost or corrupt, published again.
    assert not chunks.request("a", _chunk(0), now=35.0)
    assert chunks.request("a", _chunk(0), now=36.5)


def test_one_chunk_is_published_again_at_most_once_per_interval_and_never_dropped() -> None:
    chunks = ChunkScheduler(gather_s=0.05, first_gather_max_s=0.0, min_interval_s=1.0)
    chunks.request("a", _chunk(0), now=1.0)
    chunks.take(now=1.05)
    assert chunks.request("late", _chunk(0), now=1.2)  # subscribed after it: needs one
    assert chunks.request("late", _chunk(1), now=1.2)  # another chunk is not held back
    assert [c.index for c in chunks.take(now=1.25)] == [1]
    assert not chunks.due(now=2.0)
    assert chunks.seconds_until_due(now=1.25) == pytest.approx(0.8)
    assert [c.index for c in chunks.take(now=2.05)] == [0]
