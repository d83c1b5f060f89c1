"""End-to-end fixtures: the live hub (tests/support/live_hub.py)."""

from tests.support.live_hub import LiveHub, live_hub

__all__ = ["LiveHub", "live_hub"]
