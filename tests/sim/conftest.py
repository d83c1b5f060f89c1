"""Simulator fixtures: the live hub (tests/support/live_hub.py) and scenarios against it."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from outpost_sim.scenario import Scenario, parse_scenario
from tests.support.live_hub import LiveHub, live_hub

__all__ = ["LiveHub", "live_hub", "make_scenario"]

# Short timers, so faults heal within seconds.
FAST_AGENT = {
    "event_resend_s": 1.0,
    "mqtt": {"backoff_base_s": 0.05, "backoff_cap_s": 0.5, "keepalive_s": 5},
    "download": {"chunk_timeout_s": 0.5, "window_chunks": 8, "listen_s": 0.1},
}


@pytest.fixture
def make_scenario(live_hub: LiveHub, tmp_path: Path) -> Callable[..., Scenario]:
    """A scenario against the live hub, with its fleet under ``tmp_path`` and fast agent timers;
    the keyword arguments are the scenario's fields."""

    def make(**fields: Any) -> Scenario:
        raw = {
            "name": "test",
            "hub": {"url": live_hub.url, "admin_token": live_hub.token},
            "state_dir": str(tmp_path / "fleet"),
            "ramp_s": 1.0,
            "agent": FAST_AGENT,
            **fields,
        }
        return parse_scenario(raw)

    return make
