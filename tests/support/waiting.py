"""Waiting on a condition with a deadline, the one way tests wait (never sleep-and-hope)."""

import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], object], timeout_s: float = 20.0, what: str = "condition"
) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s:g} s")
        time.sleep(0.02)
