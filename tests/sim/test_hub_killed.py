"""The hub SIGKILLed mid-rollout, as an OOM kill or a crash would end it: nothing of it is
cleaned up (its Mosquitto keeps running, its lease stays in the database), and the restarted hub
must still finish the rollout with one install per device.

The hub runs as ``outpost-hub serve`` in a child process (the benchmarks' ``HubProcess``), so it
can really be killed; the fleet is the simulator's, following the rollout through the API.
"""

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.hub import HubProcess
from hub.failpoints import ENV_VAR, HubFailpoint
from outpost_sim.scenario import parse_scenario
from tests.support.runner_thread import RunnerThread

from .conftest import FAST_AGENT

pytestmark = pytest.mark.e2e


def _wait(predicate: Callable[[], str | None], timeout_s: float, what: str) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s} s")


@pytest.mark.parametrize("how", ["killed after wave 1 is out", "failpoint after_release_commit"])
def test_a_hub_killed_mid_rollout_finishes_it_after_a_restart_with_one_install_per_device(
    tmp_path: Path, iris_model: Any, how: str
) -> None:
    # With the failpoint the hub kills itself after committing wave 1's release and before
    # publishing it: those devices hear nothing until the restarted hub publishes again.
    armed = how.startswith("failpoint")
    hub = HubProcess(
        tmp_path / "hub", env={ENV_VAR: HubFailpoint.AFTER_RELEASE_COMMIT} if armed else {}
    )
    hub.start()
    try:
        hub.register_model("iris", iris_model)
        scenario = parse_scenario(
            {
                "name": "hub-killed",
                "hub": {"url": hub.url, "admin_token": hub.token},
                "state_dir": str(tmp_path / "fleet"),
                "ramp_s": 1.0,
                "agent": FAST_AGENT,
                "linger_s": 3,
                "fleet": [
                    {
                        "group": "site",
                        "count": 40,
                        "profile": {"link": {"kbps": 64, "latency_ms": 200}},
                    }
                ],
                "steps": [
                    {"do": "wait_connected", "timeout_s": 30},
                    {
                        "do": "deploy",
                        "model": "iris",
                        "policy": {"canary": 5, "wave_size": 10},
                        "expect": "completed",
                        "timeout_s": 150,
                    },
                ],
            }
        )
        runner = RunnerThread(scenario).start()

        def wave_one() -> str | None:
            for d in hub.call("GET", "/api/v1/deployments?model=iris"):
                view = hub.call("GET", f"/api/v1/deployments/{d['id']}?devices=false")
                if view["current_wave"] >= 1:
                    return str(d["id"])
            return None

        if armed:
            assert hub.wait_exit(timeout_s=60) == -signal.SIGKILL
            hub.env.clear()
            hub.start()
            deployment_id = _wait(wave_one, 10, "wave 1 released before the crash")
        else:
            deployment_id = _wait(wave_one, 60, "wave 1 released")
            hub.kill()
            hub.start()  # same data dir and API port; the broker comes back on the devices' port
        report = runner.report(timeout_s=180)
        (rollout,) = report.rollouts
        assert (rollout.state, rollout.as_expected, rollout.counts) == (
            "completed",
            True,
            {"succeeded": 40},
        )
        assert rollout.installs_per_device == {"1": 40}, "no device installed it twice"
        events = hub.call("GET", f"/api/v1/deployments/{deployment_id}/events?limit=10000")
        actives = sorted(e["device_id"] for e in events if e["step"] == "active")
        assert len(actives) == len(set(actives)) == 40
        history = hub.call("GET", f"/api/v1/deployments/{deployment_id}/history")
        assert [h["action"] for h in history] == [
            "created",
            "wave",
            "wave",
            "wave",
            "wave",
            "completed",
        ]
    finally:
        hub.stop()
