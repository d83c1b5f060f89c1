"""The deadline waits every agent loop is built on: a cancel is never lost."""

import asyncio

import pytest

from agent.aio import wait_set, wait_within


async def _cancel_as_the_event_is_set(waiter: asyncio.Task[None], event: asyncio.Event) -> None:
    """The window ``asyncio.wait_for`` (3.11) loses a cancel in: the wait done, not resumed."""
    event.set()
    await asyncio.sleep(0)  # the inner wait finishes; the outer task has not run yet
    waiter.cancel()


def test_a_loop_of_waits_stops_when_cancelled_as_its_event_is_set() -> None:
    asyncio.run(_a_loop_of_waits_stops_when_cancelled_as_its_event_is_set())


async def _a_loop_of_waits_stops_when_cancelled_as_its_event_is_set() -> None:
    event = asyncio.Event()
    woken = 0

    async def sender_loop() -> None:
        nonlocal woken
        while True:
            await wait_set(event, 10)
            event.clear()
            woken += 1

    for _ in range(50):  # the same window, many times over
        event.clear()
        task = asyncio.create_task(sender_loop())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await _cancel_as_the_event_is_set(task, event)
        await asyncio.wait({task}, timeout=2)
        assert task.cancelled(), "the cancel was swallowed: the loop is still running"


def test_wait_set_says_whether_the_event_was_set_or_time_ran_out() -> None:
    asyncio.run(_wait_set_says_whether_the_event_was_set_or_time_ran_out())


async def _wait_set_says_whether_the_event_was_set_or_time_ran_out() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_set(event, 5) is True
    assert await wait_set(event, None) is True  # already set, no limit


def test_wait_within_returns_the_result_or_raises_timeout() -> None:
    asyncio.run(_wait_within_returns_the_result_or_raises_timeout())


async def _wait_within_returns_the_result_or_raises_timeout() -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    loop.call_later(0.01, done.set_result, 7)
    assert await wait_within(done, 5) == 7
    with pytest.raises(TimeoutError):
        await wait_within(loop.create_future(), 0.01)
