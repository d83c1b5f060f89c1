"""Waiting with a deadline without losing a cancel.

On Python 3.11, ``asyncio.wait_for`` returns the inner result when it is cancelled at the
moment the awaited thing completes, so the cancel is swallowed (fixed in 3.12, gh-86296). A
loop such as ``while True: await wait_for(event.wait(), t)`` then never ends, and an agent
asked to stop while records were waking its sender hung on shutdown. ``asyncio.timeout``
has no such window: these helpers are built on it, and nothing here calls ``wait_for``.
"""

import asyncio
from typing import TypeVar

T = TypeVar("T")


async def wait_set(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passes (None: no limit); True if set."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def wait_within(future: asyncio.Future[T], timeout_s: float | None) -> T:
    """Await ``future`` for at most ``timeout_s``; raise ``TimeoutError`` after that."""
    async with asyncio.timeout(timeout_s):
        return await future
