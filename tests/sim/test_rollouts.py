"""Staged rollouts with real agents: the live hub, its Mosquitto and a simulated fleet.

tests/hub/test_rollouts.py pins the engine's rules with devices played by their messages; here
the same rules meet real agents over a real broker, with the faults a rollout must survive (the
broker or the hub restarted mid-rollout, devices that drop off the network). The scenario
runner follows each rollout through the hub's API; its report (the rollout's state, each wave's
counts and times, installs per device from the agents' own events) is what most checks read.
"""

import itertools
import signal
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from outpost_sim.device import SimulatedDevice
from outpost_sim.rollout import RolloutReport
from outpost_sim.scenario import Scenario
from tests.support.live_hub import LiveHub
from tests.support.runner_thread import RunnerThread

pytestmark = pytest.mark.integration

MakeScenario = Callable[..., Scenario]


def _get(live_hub: LiveHub, path: str) -> Any:
    with live_hub.api as client:
        response = client.get(path)
    assert response.status_code == 200, response.text
    return response.json()


def _view(live_hub: LiveHub, deployment_id: str) -> dict[str, Any]:
    view: dict[str, Any] = _get(live_hub, f"/api/v1/deployments/{deployment_id}")
    return view


def _deployment_of(live_hub: LiveHub, version: int, timeout_s: float = 60.0) -> str:
    """The id of the deployment of iris ``version``, once the runner has created it."""
    found: list[str] = []

    def created() -> bool:
        found[:] = [
            d["id"]
            for d in _get(live_hub, "/api/v1/deployments?model=iris")
            if d["version"] == version
        ]
        return bool(found)

    live_hub.wait_until(created, timeout_s=timeout_s, what=f"a deployment of iris v{version}")
    return found[0]


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _by_wave(view: dict[str, Any]) -> list[list[dict[str, Any]]]:
    waves: list[list[dict[str, Any]]] = [[] for _ in view["waves"]]
    for row in view["devices"]:
        waves[row["wave"]].append(row)
    return waves


def _print_waves(rollout: RolloutReport) -> None:
    for w in rollout.waves:
        took = (
            None
            if w.started_s is None or w.finished_s is None
            else round(w.finished_s - w.started_s, 2)
        )
        print(f"{w.name}: {w.devices} devices, {w.started_s}-{w.finished_s} s, took {took} s")


def _served_digest(device: SimulatedDevice) -> str | None:
    model = device.agent.get("iris")
    return None if model is None else model.digest


def _actives(device: SimulatedDevice, deployment_id: str) -> list[str]:
    """The digests the device reported active for the deployment, in order."""
    trace = device.record.deployments.get(deployment_id)
    return [] if trace is None else [digest for digest, _ in trace.actives]


def test_a_staged_rollout_to_200_devices_goes_wave_by_wave(
    live_hub: LiveHub, iris_model: Any, make_scenario: MakeScenario
) -> None:
    live_hub.register(iris_model)
    policy = {"canary": 10, "wave_percent": 30, "soak_s": 1}
    scenario = make_scenario(
        ramp_s=3.0,
        fleet=[{"group": "plant", "count": 200}],
        steps=[
            {"do": "wait_connected", "timeout_s": 60},
            {"do": "deploy", "model": "iris", "policy": policy, "expect": "completed"},
        ],
    )
    runner = RunnerThread(scenario).start()
    report = runner.report(timeout_s=150)

    (rollout,) = report.rollouts
    _print_waves(rollout)
    assert (rollout.state, rollout.as_expected, rollout.ok) == ("completed", True, True)
    assert rollout.counts == {"succeeded": 200}
    assert rollout.installs_per_device == {"1": 200}, "every device installed it exactly once"
    assert [(w.name, w.devices) for w in rollout.waves] == [
        ("canary", 10),
        ("wave 1", 60),
        ("wave 2", 60),
        ("wave 3", 60),
        ("wave 4", 10),
    ]
    assert all(w.released and w.finished for w in rollout.waves)
    assert report.unexpected_errors == {}

    # The hub's own rows: no device of a wave was released before every device of the wave
    # before had finished, its soak included.
    view = _get(live_hub, f"/api/v1/deployments/{rollout.deployment_id}")
    waves = _by_wave(view)
    for before, after in itertools.pairwise(waves):
        finished = max(_at(r["state_changed_at"]) for r in before)
        released = min(_at(r["released_at"]) for r in after)
        assert released >= finished
        soaked = max(_at(r["activated_at"]) for r in before)
        assert (released - soaked).total_seconds() >= policy["soak_s"]
    # ... and the devices' own clock agrees: a device of the next wave said its first word
    # about the deployment only after the last device of the wave before had installed it.
    device_of = {d.device_id: d for d in runner.runner.fleet.devices}
    for before, after in itertools.pairwise(waves):
        installed = []
        for row in before:
            trace = device_of[row["device_id"]].record.deployments[rollout.deployment_id]
            at = trace.active_at(rollout.package_digest)
            assert at is not None
            installed.append(at)
        first_words = [
            device_of[r["device_id"]].record.deployments[rollout.deployment_id].first_event_at
            for r in after
        ]
        assert min(first_words) > max(installed)
    # The report's wave times, from the same rows, are in order too.
    for before_w, after_w in itertools.pairwise(rollout.waves):
        assert before_w.finished_s is not None
        assert after_w.started_s is not None
        assert after_w.started_s >= before_w.finished_s

    # The history names every wave, in order, each started by the rollout itself.
    assert rollout.history[0]["actor"].startswith("outpost-sim@")
    assert [(h["actor"], h["action"]) for h in rollout.history[1:]] == [
        *[("rollout", "wave")] * 4,
        ("rollout", "completed"),
    ]
    assert [h["detail"] for h in rollout.history[1:5]] == [
        "canary finished; wave 1 started",
        "wave 1 finished; wave 2 started",
        "wave 2 finished; wave 3 started",
        "wave 3 finished; wave 4 started",
    ]
    assert [h["at_s"] for h in rollout.history] == sorted(h["at_s"] for h in rollout.history)


def test_failing_canaries_abort_the_rollout_roll_back_and_touch_nobody_else(
    live_hub: LiveHub, iris_model: Any, make_scenario: MakeScenario
) -> None:
    live_hub.register(iris_model)
    live_hub.register(iris_model)  # v2: the same model, a new release
    canary_policy = {
        "canary": 10,
        "wave_percent": 50,
        "max_failure_ratio": 0.2,
        "min_devices": 10,
        "rollback_on_abort": True,
        # Released in fleet order: the canary is the "bad" and "good" groups, listed first.
        "order": "listed",
    }
    scenario = make_scenario(
        fleet=[
            {"group": "bad", "count": 3},
            {"group": "good", "count": 7},
            {"group": "rest", "count": 30},
        ],
        # 3 of the 10 canaries fail v2's health check (30 %); v1 passes everywhere.
        faults=[{"kind": "health_fail", "group": "bad", "versions": [2]}],
        steps=[
            {"do": "wait_connected", "timeout_s": 30},
            {"do": "deploy", "model": "iris", "version": 1, "expect": "completed"},
            {
                "do": "deploy",
                "model": "iris",
                "version": 2,
                "policy": canary_policy,
                "expect": "aborted",
                "timeout_s": 60,
            },
        ],
    )
    runner = RunnerThread(scenario).start()
    report = runner.report(timeout_s=120)
    first, second = report.rollouts
    assert (first.state, first.counts) == ("completed", {"succeeded": 40})
    v1, v2 = first.package_digest, second.package_digest

    # The rollout aborted by itself once the canary had finished, and rolled back.
    assert (second.state, second.as_expected, second.ok) == ("aborted", True, False)
    assert "3 of 10 finished devices failed (30%)" in second.reason
    assert second.history[-1]["actor"] == "rollout"
    assert second.history[-1]["action"] == "aborted"
    assert second.history[-1]["detail"].endswith("rolling back")
    assert second.counts == {"failed": 3, "rolled_back": 7, "cancelled": 30}
    assert [(w.name, w.released) for w in second.waves] == [
        ("canary", True),
        ("wave 1", False),
        ("wave 2", False),
    ]
    assert second.installs_per_device == {"0": 33, "1": 7}
    assert (second.switched_back, second.installed_more_than_once) == (7, [])
    assert second.failures_by_reason == {"E_HEALTH_CHECK": 3}

    # The canaries that installed v2 went back to v1 (switching to the copy they kept, no
    # download) and serve it; the failed ones never left it.
    for device in runner.group("good"):
        assert _actives(device, second.deployment_id) == [v2, v1]
        assert _served_digest(device) == v1
    events = _get(live_hub, f"/api/v1/deployments/{second.deployment_id}/events?limit=10000")
    steps_after_install: dict[str, list[str]] = {}
    for event in events:
        seen = steps_after_install.setdefault(event["device_id"], [])
        if seen or event["step"] == "active":
            seen.append(event["step"])
    good = {d.device_id for d in runner.group("good")}
    assert all("downloading" not in steps_after_install[d] for d in good)
    for device in runner.group("bad"):
        trace = device.record.deployments[second.deployment_id]
        assert (trace.failed, trace.actives) == ("E_HEALTH_CHECK", [])
        assert _served_digest(device) == v1

    # Nobody outside the canary heard of v2: no event, no new desired state, still on v1.
    outside = second.outside_waves
    assert (outside.devices, outside.received, outside.desired_counter_changed) == (30, 0, 0)
    for device in runner.group("rest"):
        assert second.deployment_id not in device.record.deployments
        assert _served_digest(device) == v1
    assert {e["device_id"] for e in events} <= good | {d.device_id for d in runner.group("bad")}


def test_a_broker_restart_mid_rollout_still_completes_it_once_per_device(
    live_hub: LiveHub, iris_model: Any, make_scenario: MakeScenario
) -> None:
    live_hub.register(iris_model)
    scenario = make_scenario(
        # A slow link, so that a wave is still downloading when the broker goes down.
        fleet=[
            {"group": "cell", "count": 50, "profile": {"link": {"kbps": 64, "latency_ms": 300}}}
        ],
        steps=[
            {"do": "wait_connected", "timeout_s": 30},
            {
                "do": "deploy",
                "model": "iris",
                "policy": {"canary": 5, "wave_percent": 45},
                "expect": "completed",
                "timeout_s": 90,
            },
        ],
        linger_s=3,  # for the hub's last acknowledgements to cross the slow links
    )
    runner = RunnerThread(scenario).start()
    deployment_id = _deployment_of(live_hub, 1)
    at_restart: dict[str, Any] = {}

    def a_wave_downloading() -> bool:
        view = _view(live_hub, deployment_id)
        at_restart.update(view)
        return bool(view["current_wave"] >= 1 and view["steps"].get("downloading", 0) > 0)

    live_hub.wait_until(
        a_wave_downloading, timeout_s=60, what="a wave after the canary downloading"
    )
    live_hub.restart_broker(signal.SIGTERM)
    report = runner.report(timeout_s=120)

    (rollout,) = report.rollouts
    _print_waves(rollout)
    print("at the restart:", at_restart["current_wave"], at_restart["steps"], at_restart["counts"])
    assert (rollout.state, rollout.as_expected, rollout.counts) == (
        "completed",
        True,
        {"succeeded": 50},
    )
    assert rollout.installs_per_device == {"1": 50}, "every device installed it once"
    assert live_hub.ctx.broker is not None
    assert live_hub.ctx.broker.restarts == 1
    # Every device lost its connection and came back.
    assert all(a.link.connects >= 2 for a in runner.runner.fleet.agents)
    assert report.messages["events_unconfirmed"] == 0, "the hub stored every event"
    assert report.unexpected_errors == {}


def test_an_offline_device_gets_its_wave_when_back_and_a_lost_one_times_out(
    live_hub: LiveHub, iris_model: Any, make_scenario: MakeScenario
) -> None:
    live_hub.register(iris_model)
    device_timeout_s = 5
    scenario = make_scenario(
        # In fleet order: the canary, then wave 1 (with "late"), then wave 2 (with "lost").
        fleet=[
            {"group": "canary", "count": 5},
            {"group": "late", "count": 1},
            {"group": "wave-1", "count": 9},
            {"group": "lost", "count": 1},
            {"group": "wave-2", "count": 9},
        ],
        # Both are off the network from the start, so before their waves are released.
        faults=[
            {"kind": "offline", "at_s": 0, "for_s": 3600, "group": "late"},
            {"kind": "offline", "at_s": 0, "for_s": 3600, "group": "lost"},
        ],
        steps=[
            {"do": "wait_connected", "fraction": 0.92, "timeout_s": 30},
            {
                "do": "deploy",
                "model": "iris",
                "policy": {"canary": 5, "wave_size": 10, "order": "listed"},
                "device_timeout_s": device_timeout_s,
                "expect": "completed",
                "timeout_s": 90,
            },
        ],
    )
    runner = RunnerThread(scenario).start()
    (late,), (lost,) = runner.group("late"), runner.group("lost")
    deployment_id = _deployment_of(live_hub, 1)

    def late_released() -> bool:
        rows = _view(live_hub, deployment_id)["devices"]
        return any(r["device_id"] == late.device_id and r["released_at"] for r in rows)

    live_hub.wait_until(late_released, timeout_s=60, what="the late device's wave released")
    assert late.agent.link.connects == 0, "still offline when its wave was released"
    runner.call(late.come_back)
    report = runner.report(timeout_s=120)

    (rollout,) = report.rollouts
    _print_waves(rollout)
    assert (rollout.state, rollout.as_expected) == ("completed", True)
    assert rollout.counts == {"succeeded": 24, "timed_out": 1}
    rows = {r["device_id"]: r for r in _view(live_hub, deployment_id)["devices"]}
    # The late device installed it once back, within the device timeout.
    assert rows[late.device_id]["state"] == "succeeded"
    assert _actives(late, deployment_id) == [rollout.package_digest]
    waited_s = (
        _at(rows[late.device_id]["activated_at"]) - _at(rows[late.device_id]["released_at"])
    ).total_seconds()
    assert 0 < waited_s < device_timeout_s
    # The lost one never heard of it, and timed out after the device timeout.
    lost_row = rows[lost.device_id]
    assert lost_row["state"] == "timed_out"
    timed_out_after_s = (
        _at(lost_row["state_changed_at"]) - _at(lost_row["released_at"])
    ).total_seconds()
    assert timed_out_after_s >= device_timeout_s
    assert lost.record.deployments == {}
    assert lost.agent.link.connects == 0
    print(
        f"late device active {waited_s:.1f} s after release; lost one timed out after"
        f" {timed_out_after_s:.1f} s"
    )
    assert rollout.installs_per_device == {"0": 1, "1": 24}


def test_the_hub_restarted_mid_rollout_finishes_it_with_one_install_per_device(
    live_hub: LiveHub, iris_model: Any, make_scenario: MakeScenario
) -> None:
    live_hub.register(iris_model)
    scenario = make_scenario(
        fleet=[
            {"group": "site", "count": 60, "profile": {"link": {"kbps": 64, "latency_ms": 200}}}
        ],
        steps=[
            {"do": "wait_connected", "timeout_s": 30},
            {
                "do": "deploy",
                "model": "iris",
                "policy": {"canary": 10, "exponential": {"first": 10, "factor": 2}},
                "expect": "completed",
                "timeout_s": 120,
            },
        ],
        linger_s=3,  # for the hub's last acknowledgements to cross the slow links
    )
    runner = RunnerThread(scenario).start()
    deployment_id = _deployment_of(live_hub, 1)
    live_hub.wait_until(
        lambda: _view(live_hub, deployment_id)["current_wave"] >= 1,
        timeout_s=60,
        what="wave 1 released",
    )
    live_hub.restart()
    # The API came back on another port; the runner keeps following the rollout there.
    runner.runner.api.url = live_hub.url
    report = runner.report(timeout_s=150)

    (rollout,) = report.rollouts
    _print_waves(rollout)
    print(f"polls unanswered while the hub restarted: {rollout.api_errors}")
    assert (rollout.state, rollout.as_expected, rollout.counts) == (
        "completed",
        True,
        {"succeeded": 60},
    )
    assert [w.devices for w in rollout.waves] == [10, 10, 20, 20]
    assert rollout.installs_per_device == {"1": 60}, "no device installed it twice"
    assert [h["action"] for h in rollout.history] == [
        "created",
        "wave",
        "wave",
        "wave",
        "completed",
    ]
    # The hub stored exactly one "active" per device too.
    events = _get(live_hub, f"/api/v1/deployments/{deployment_id}/events?limit=10000")
    actives = sorted(e["device_id"] for e in events if e["step"] == "active")
    assert actives == sorted(d.device_id for d in runner.runner.fleet.devices)
    assert report.messages["events_unconfirmed"] == 0, "the hub stored every event"
    assert report.unexpected_errors == {}
