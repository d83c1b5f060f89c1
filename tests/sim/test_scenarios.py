"""Scenarios against the real hub and its Mosquitto: deploys that reach every device, and every
named fault injected and counted by the report."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from hub.telemetry.models import TelemetryPoint
from outpost_sim.report import RunReport, format_report
from outpost_sim.runner import ScenarioRunner, enroll_scenario
from outpost_sim.scenario import Scenario
from outpost_sim.view import ProgressView
from tests.support.live_hub import LiveHub

from .conftest import FAST_AGENT

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _run(scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> tuple[RunReport, Any]:
    assert enroll_scenario(scenario) is not None
    runner = ScenarioRunner(scenario, view=ProgressView(sys.stderr))
    report = asyncio.run(runner.run())
    print(json.dumps(report.as_dict(), indent=1, default=str))  # for -s
    return report, runner


def test_a_deploy_reaches_every_device_of_a_mixed_fleet(
    live_hub: LiveHub,
    iris_model: Any,
    make_scenario: Callable[..., Scenario],
    capsys: pytest.CaptureFixture[str],
) -> None:
    live_hub.register(iris_model)
    scenario = make_scenario(
        ramp_s=3.0,
        fleet=[
            {
                "group": "plant-1",
                "count": 200,
                "profile": {"tags": {"site": "plant-1", "hw": "rpi4"}},
            },
            {
                "group": "remote",
                "count": 100,
                "profile": {
                    "tags": {"site": "remote", "hw": "jetson"},
                    "link": {"kbps": 4000, "latency_ms": 40},
                    "disk_mb": 256,
                    "clock_offset_s": 90,
                },
            },
        ],
        steps=[{"do": "deploy", "model": "iris", "timeout_s": 120}],
    )
    report, runner = _run(scenario, capsys)

    (rollout,) = report.rollouts
    assert (rollout.state, rollout.done, rollout.ok) == ("completed", True, True)
    assert rollout.counts == {"succeeded": 300}
    assert (rollout.devices, rollout.succeeded, rollout.failed, rollout.timed_out) == (
        300,
        300,
        0,
        0,
    )
    assert rollout.installs_per_device == {"1": 300}, "every device installed it once"
    assert rollout.time_to_active_s["max"] is not None
    assert report.failures_by_reason == {}
    assert report.rejections_by_reason == {}
    assert report.unexpected_errors == {}
    assert report.connect["connected_once"] == 300
    assert report.fleet["active"] == {"iris:1": 300}
    assert report.fleet["runtimes_loaded"] == 1, "one loaded model shared by every device"
    assert report.messages["events_sent"] >= 300 * 3
    # The hub saw the profiles' tags from the bulk enrolment.
    devices = {d["name"]: d for d in live_hub.api.get("/api/v1/devices").json()}
    assert devices["plant-1-00001"]["tags"] == {"site": "plant-1", "hw": "rpi4"}
    assert devices["remote-00100"]["tags"] == {"site": "remote", "hw": "jetson"}
    remote = [d for d in runner.fleet.devices if d.profile.link.kbps]
    assert len(remote) == 100
    assert all(d.conditions.stats.delayed_messages > 0 for d in remote)


def test_every_named_fault_is_injected_and_counted(
    live_hub: LiveHub,
    iris_model: Any,
    make_scenario: Callable[..., Scenario],
    capsys: pytest.CaptureFixture[str],
) -> None:
    live_hub.register(iris_model)
    groups = ["plain", "drops", "offline", "slow", "corrupt", "crash", "disk", "health", "noisy"]
    fleet = [{"group": g, "count": 5} for g in groups] + [{"group": "skew", "count": 5}]
    faults = [
        {"kind": "connection_drops", "rate_per_min": 30, "end_s": 8, "group": "drops"},
        {"kind": "offline", "at_s": 3, "for_s": 4, "group": "offline"},
        {"kind": "slow_link", "kbps": 200, "latency_ms": 100, "group": "slow"},
        {"kind": "corrupt_chunks", "probability": 1.0, "limit": 1, "group": "corrupt"},
        {"kind": "crash", "at": "after_unpack", "restart_after_s": 0.5, "group": "crash"},
        {"kind": "disk_full", "free_mb": 1, "group": "disk"},
        {"kind": "health_fail", "group": "health"},
        {"kind": "clock_skew", "offset_s": 30 * 86400, "group": "skew"},
        {"kind": "malformed", "count": 4, "every_s": 0.5, "start_s": 3, "group": "noisy"},
    ]
    scenario = make_scenario(
        seed=42,
        fleet=fleet,
        faults=faults,
        steps=[
            {"do": "deploy", "model": "iris", "groups": groups, "timeout_s": 90},
            # The skewed devices refuse every desired state as expired: they time out.
            {
                "do": "deploy",
                "model": "iris",
                "groups": ["skew"],
                "device_timeout_s": 2,
                "timeout_s": 30,
            },
            {"do": "idle", "for_s": 2},  # past the last scheduled drop (8 s)
            {"do": "wait_connected", "timeout_s": 30},
        ],
    )
    report, runner = _run(scenario, capsys)
    by_group: dict[str, list[Any]] = {g: [] for g in [*groups, "skew"]}
    for device, planned in zip(runner.fleet.devices, runner.planned, strict=True):
        by_group[planned.group].append(device)

    main, skewed = report.rollouts
    assert main.devices == 45
    assert main.failures_by_reason == {"E_HEALTH_CHECK": 5, "E_NO_SPACE": 5}
    assert (main.state, main.succeeded, main.failed, main.timed_out) == ("completed", 35, 10, 0)
    assert (skewed.devices, skewed.succeeded, skewed.timed_out) == (5, 0, 5)
    assert skewed.state == "completed"
    assert report.rejections_by_reason.keys() == {"E_EXPIRED"}
    assert all(d.agent.rejections["E_EXPIRED"] >= 1 for d in by_group["skew"])
    assert report.unexpected_errors == {}
    assert report.fault_plan == runner.plan.fingerprint()

    f = report.faults
    assert {k: v["devices"] for k, v in f.items()} == {
        "connection_drops": 5,
        "offline": 5,
        "slow_link": 5,
        "corrupt_chunks": 5,
        "crash": 5,
        "disk_full": 5,
        "health_fail": 5,
        "clock_skew": 5,
        "malformed": 5,
    }
    # Drops: every drop cut a live connection, and every one was followed by a reconnect.
    drops = [d.conditions.stats.drops for d in by_group["drops"]]
    assert f["connection_drops"]["injected"] == sum(drops) >= 1
    for device in by_group["drops"]:
        assert device.agent.link.connects == 1 + device.conditions.stats.drops
    # Offline: one window each; back online afterwards and the model installed.
    assert f["offline"]["windows"] == 5
    assert all(d.agent.link.connects == 2 for d in by_group["offline"])
    # Slow links delayed every message to those devices and still got there.
    assert f["slow_link"]["delayed_messages"] >= 5
    # Corruption: exactly one chunk per device flipped, each caught by the agent's hash check.
    assert f["corrupt_chunks"]["injected"] == f["corrupt_chunks"]["caught_by_hash_check"] == 5
    # Crashes: once each at the named step, restarted, and then installed.
    assert (f["crash"]["crashes"], f["crash"]["restarts"]) == (5, 5)
    # Malformed: the hub counted exactly what the noisy devices sent.
    assert f["malformed"]["sent"] == 20
    assert report.hub_messages is not None
    assert report.hub_messages["malformed"] == 20
    for group in ("plain", "drops", "offline", "slow", "corrupt", "crash", "noisy"):
        assert all(d.agent.get("iris") is not None for d in by_group[group]), group
    for group in ("disk", "health", "skew"):
        assert all(d.agent.get("iris") is None for d in by_group[group]), group


def test_cli_runs_a_scenario_file_and_writes_the_json_report(
    live_hub: LiveHub, iris_model: Any, tmp_path: Path
) -> None:
    live_hub.register(iris_model)
    token_file = tmp_path / "admin.token"
    token_file.write_text(live_hub.token)
    scenario = tmp_path / "small.yaml"
    scenario.write_text(
        f"name: small\nseed: 5\nramp_s: 0.5\nstate_dir: {tmp_path / 'fleet'}\n"
        f"hub: {{url: '{live_hub.url}', admin_token_file: '{token_file}'}}\n"
        "fleet: [{group: cli, count: 12, profile: {tags: {site: lab}}}]\n"
        "faults: [{kind: health_fail, devices: 2}]\n"
        "steps:\n  - {do: deploy, model: iris, timeout_s: 60}\n"
        "  - {do: telemetry, interval_s: 0.5, for_s: 1}\n"
    )
    report_file = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "outpost_sim.cli", "run", str(scenario), "--json", str(report_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "enrolled 12 devices (0 already were)" in done.stderr
    assert "deploy iris:1" in done.stderr  # the live view and the human report
    report = json.loads(report_file.read_text())
    (rollout,) = report["rollouts"]
    assert (rollout["succeeded"], rollout["failed"], rollout["failures_by_reason"]) == (
        10,
        2,
        {"E_HEALTH_CHECK": 2},
    )
    assert report["messages"]["heartbeats_sent"] >= 12 * 2
    assert report["fault_plan"]
    assert report["seed"] == 5


def test_open_ended_run_stops_on_sigterm_with_a_report(
    live_hub: LiveHub, iris_model: Any, tmp_path: Path
) -> None:
    live_hub.register(iris_model)
    token = live_hub.api.post("/api/v1/enrollment-tokens", json={"uses": 3}).json()["token"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    common = ["--devices", "3", "--state-dir", str(tmp_path / "fleet"), "--ramp-s", "0.2"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "outpost_sim.cli",
            "run",
            "--hub",
            live_hub.url,
            "--token",
            token,
            *common,
            "--json",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        ids: list[str] = []
        while time.monotonic() < deadline and len(ids) < 3:
            ids = [d["id"] for d in live_hub.api.get("/api/v1/devices").json() if d["online"]]
            time.sleep(0.1)
        assert len(ids) == 3, "the three devices came online"
        assert live_hub.cli("deploy", "iris", "--device", *ids, "--wait").exit_code == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["fleet"]["active"] == {"iris:1": 3}
    assert report["fleet"]["connected"] == 3
    assert report["unexpected_errors"] == {}

    # Started again on the same state: nothing to enrol (no token needed), and every device
    # serves its installed model from disk at once, the model loaded once for all three.
    again = subprocess.run(
        [sys.executable, "-m", "outpost_sim.cli", "run", *common, "--duration-s", "1", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert "enrolled" not in again.stderr
    report = json.loads(again.stdout)
    assert report["fleet"]["active"] == {"iris:1": 3}
    assert report["fleet"]["runtimes_loaded"] == 1


def test_simulated_devices_send_telemetry_through_their_outboxes_across_drops_and_outages(
    live_hub: LiveHub,
    make_scenario: Callable[..., Scenario],
    capsys: pytest.CaptureFixture[str],
) -> None:
    scenario = make_scenario(
        seed=7,
        agent={**FAST_AGENT, "telemetry": {"interval_s": 0.25, "resend_s": 1.0}},
        fleet=[{"group": g, "count": 10} for g in ("steady", "drops", "offline")],
        faults=[
            {"kind": "connection_drops", "rate_per_min": 30, "end_s": 6, "group": "drops"},
            {"kind": "offline", "at_s": 2, "for_s": 4, "group": "offline"},
        ],
        steps=[
            {"do": "wait_connected", "timeout_s": 30},
            {"do": "idle", "for_s": 8},  # past the outage and the last drop
            {"do": "wait_connected", "timeout_s": 30},
        ],
        linger_s=3,
    )
    report, _ = _run(scenario, capsys)
    m = report.messages
    assert report.unexpected_errors == {}
    assert m["records_dropped"] == 0
    with Session(live_hub.ctx.engine) as session:
        rows = session.exec(select(TelemetryPoint.device_id, TelemetryPoint.seq)).all()
    stored: dict[str, list[int]] = {}
    for device_id, seq in rows:
        stored.setdefault(device_id, []).append(seq)
    assert len(stored) == 30
    for device_id, seqs in stored.items():
        seqs.sort()
        assert seqs == list(range(1, seqs[-1] + 1)), f"{device_id}: a record went missing"
    # What is not stored is what was still waiting for its ack when the fleet stopped.
    assert m["records_made"] - m["records_unacked"] <= len(rows) <= m["records_made"]
    assert m["records_made"] >= 30 * 30, "about 4 records a second per device for 13 s"
    assert "telemetry and data records made" in format_report(report)
