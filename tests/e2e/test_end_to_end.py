"""The whole path on real parts: hub (FastAPI, SQLite file, its own Mosquitto) → signed package
over MQTT → real agents (verify, install, health check, switch) → predictions; and every bad
input of the foundation issue, each reported with its reason while the old model keeps serving."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session, select

from agent.protocol.documents import Signed
from agent.protocol.keys import SigningKey
from agent.protocol.messages import DesiredBody, decode, encode
from agent.protocol.topics import Channel
from hub.deployments.models import DeviceEvent
from tests.e2e.conftest import LiveHub
from tests.support.agents import AgentThread

pytestmark = pytest.mark.e2e


def _device_id(runner: AgentThread) -> str:
    assert runner.agent is not None
    return runner.agent.device_id


def _active_version(runner: AgentThread, model: str = "iris") -> int | None:
    assert runner.agent is not None
    active = runner.call(lambda: runner.agent.get(model))  # type: ignore[union-attr]
    return None if active is None else int(active.version)


def _deploy(hub: LiveHub, ref: str, *runners: AgentThread) -> Any:
    args = ["deploy", ref, "--wait", "--timeout", "60"]
    for runner in runners:
        args += ["--device", _device_id(runner)]
    return hub.cli(*args)


class HubSideClient:
    """An MQTT client with the hub's broker credentials: it can publish anything anywhere."""

    def __init__(self, hub: LiveHub) -> None:
        assert hub.ctx.broker is not None
        password = hub.settings.hub_broker_password_path.read_text().strip()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="e2e-attacker")
        self.client.username_pw_set(hub.ctx.broker.hub_username, password)
        self.retained: dict[str, bytes] = {}
        self._got = threading.Event()
        self.client.on_message = self._on_message
        self.client.connect(hub.ctx.broker.host, hub.ctx.broker.port)
        self.client.loop_start()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        self.retained[msg.topic] = bytes(msg.payload)
        self._got.set()

    def capture(self, topic: str) -> bytes:
        self._got.clear()
        self.client.subscribe(topic, qos=1)
        assert self._got.wait(10), f"nothing retained on {topic}"
        self.client.unsubscribe(topic)
        return self.retained[topic]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_register_deploy_and_score_on_two_devices(live_hub: LiveHub, iris_model: Any) -> None:
    assert live_hub.register(iris_model) == 1
    first, second = live_hub.start_agent("a"), live_hub.start_agent("b")
    result = _deploy(live_hub, "iris:1", first, second)
    assert result.exit_code == 0, result.output
    assert "all 2 succeeded" in result.output
    sample = json.loads(iris_model.sample_input.read_text())
    expected = json.loads(iris_model.expected_output.read_text())
    for runner in (first, second):
        model = runner.call(lambda r=runner: r.agent.get("iris"))
        assert model.runtime.predict(sample)["label"].tolist() == expected["label"]
    # The hub learnt what each device runs from its reported state.
    live_hub.wait_until(
        lambda: live_hub.device(_device_id(first))["reported_state"]["active"][0]["version"] == 1,
        what="reported state",
    )


def test_tampered_package_in_the_hub_store_fails_with_reason_and_v1_keeps_serving(
    live_hub: LiveHub, iris_model: Any
) -> None:
    live_hub.register(iris_model)
    runner = live_hub.start_agent("a")
    assert _deploy(live_hub, "iris:1", runner).exit_code == 0
    # v2 is built and signed for a first device; then its archive is modified where the hub
    # keeps it, as an attacker on the package store would.
    live_hub.register(iris_model)
    other = live_hub.start_agent("b")
    assert _deploy(live_hub, "iris:2", other).exit_code == 0
    with live_hub.api as client:
        deployments = client.get(f"/api/v1/devices/{_device_id(other)}").json()
    digest = deployments["reported_state"]["active"][0]["digest"]
    archive = live_hub.settings.packages_dir / f"{digest}.tar"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))

    result = _deploy(live_hub, "iris:2", runner)
    assert result.exit_code == 1, result.output
    assert _device_id(runner) in result.output
    assert "E_HASH" in result.output
    assert _active_version(runner) == 1


def test_package_over_the_device_limit_is_refused_before_download(
    live_hub: LiveHub, iris_model: Any
) -> None:
    live_hub.register(iris_model)
    runner = live_hub.start_agent("small", download={"max_package_bytes": 1000})
    result = _deploy(live_hub, "iris:1", runner)
    assert result.exit_code == 1
    assert "E_TOO_LARGE" in result.output
    assert _active_version(runner) is None


def test_manifest_signed_by_a_key_the_keyring_does_not_name_is_not_installed(
    live_hub: LiveHub, iris_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    live_hub.register(iris_model)
    runner = live_hub.start_agent("a")
    assert _deploy(live_hub, "iris:1", runner).exit_code == 0
    # A compromised hub signs new packages with a key of its own instead of a release key.
    monkeypatch.setattr(live_hub.ctx.keys, "sign_release", SigningKey.generate().sign)
    live_hub.register(iris_model)
    result = _deploy(live_hub, "iris:2", runner)
    assert result.exit_code == 1, result.output
    assert "E_NOT_RELEASED" in result.output
    assert _active_version(runner) == 1


def test_replayed_unsigned_and_malformed_messages_are_refused_and_nothing_stops(
    live_hub: LiveHub, iris_model: Any
) -> None:
    live_hub.register(iris_model)
    runner = live_hub.start_agent("a")
    device = _device_id(runner)
    desired_topic = live_hub.ctx.topics.device(device, Channel.DESIRED)
    attacker = HubSideClient(live_hub)
    try:
        old = attacker.capture(desired_topic)  # the retained, empty desired state
        assert _deploy(live_hub, "iris:1", runner).exit_code == 0

        def rejection() -> str:
            state = live_hub.device(device).get("reported_state") or {}
            return str(state.get("last_rejection", ""))

        attacker.publish(desired_topic, old)
        live_hub.wait_until(lambda: rejection().startswith("E_REPLAY"), what="replay refused")

        body = decode(old).body
        assert isinstance(body, DesiredBody)
        unsigned = Signed(signed=dict(body.desired.signed, counter=10_000), signatures=[])
        attacker.publish(desired_topic, encode(DesiredBody(keyring=body.keyring, desired=unsigned)))
        live_hub.wait_until(lambda: rejection().startswith("E_UNKNOWN_KEY"), what="unsigned")

        for garbage in (b"", b"{", b"\xff\xfe", b'{"v": 1, "kind": "event"}', b"[" * 50_000):
            attacker.publish(desired_topic, garbage)
            for channel in (Channel.EVT, Channel.STATE, Channel.REQ, Channel.STATUS):
                attacker.publish(live_hub.ctx.topics.device(device, channel), garbage)
        attacker.publish(f"outpost/d/{device}/nonsense", b"x")
    finally:
        attacker.close()
    live_hub.wait_until(lambda: runner.call(lambda: runner.agent.malformed_received) >= 5)
    # Both sides kept running: a new deployment still goes through end to end.
    live_hub.register(iris_model)
    result = _deploy(live_hub, "iris:2", runner)
    assert result.exit_code == 0, result.output
    assert _active_version(runner) == 2


def test_make_demo_path_runs_and_leaves_no_process_behind(tmp_path: Path) -> None:
    """The demo as `make demo` runs it, stopping after the three answers."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--exit", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answers = [line for line in result.stdout.splitlines() if line.startswith("dev-")]
    assert len(answers) == 3, result.stdout
    assert all(line.endswith("[0, 1, 2]") for line in answers)
    leftover = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True, check=False
    )
    assert leftover.stdout.strip() == "", f"stray processes: {leftover.stdout}"


def test_a_device_that_never_answers_ends_timed_out_and_deploy_wait_says_so(
    live_hub: LiveHub, iris_model: Any
) -> None:
    live_hub.register(iris_model)
    with live_hub.api as client:
        token = client.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()["token"]
        enrolled = client.post("/api/v1/enroll", json={"token": token, "name": "silent"})
    assert enrolled.status_code == 201, enrolled.text
    silent = enrolled.json()["device_id"]  # enrolled, but no agent ever runs for it
    result = live_hub.cli("deploy", "iris", "--device", silent, "--device-timeout", "2", "--wait")
    assert result.exit_code == 1, result.output
    assert "0 failed, 1 timed out" in result.output
    assert f"{silent}: timed_out not active or failed 2 s after it was released" in result.output


def test_several_models_on_one_device_are_updated_each_on_its_own(
    live_hub: LiveHub, iris_model: Any
) -> None:
    live_hub.register(iris_model, name="iris")
    live_hub.register(iris_model, name="flowers")
    runner = live_hub.start_agent("multi")
    assert _deploy(live_hub, "iris:1", runner).exit_code == 0
    assert _deploy(live_hub, "flowers:1", runner).exit_code == 0
    assert (_active_version(runner, "iris"), _active_version(runner, "flowers")) == (1, 1)
    flowers_before = runner.call(lambda: runner.agent.get("flowers"))  # type: ignore[union-attr]

    live_hub.register(iris_model, name="iris")
    assert _deploy(live_hub, "iris:2", runner).exit_code == 0
    assert (_active_version(runner, "iris"), _active_version(runner, "flowers")) == (2, 1)
    # The other model was not touched: the same loaded runtime object still serves it.
    assert runner.call(lambda: runner.agent.get("flowers")) is flowers_before  # type: ignore[union-attr]
    assert runner.call(lambda: runner.agent.names()) == ["flowers", "iris"]  # type: ignore[union-attr]


def test_dry_run_shows_targets_skips_and_bytes_and_changes_nothing(
    live_hub: LiveHub, iris_model: Any
) -> None:
    live_hub.register(iris_model)
    runner = live_hub.start_agent("runs-v1")
    assert _deploy(live_hub, "iris:1", runner).exit_code == 0
    with live_hub.api as client:
        token = client.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()["token"]
        silent = client.post("/api/v1/enroll", json={"token": token}).json()["device_id"]
        counter_before = client.get(f"/api/v1/devices/{silent}").json()["desired_counter"]
        request = {"model": "iris", "version": 1, "devices": [_device_id(runner), silent, "nope-1"]}
        plan = client.post("/api/v1/deployments/dry-run", json=request).json()
        live_hub.register(iris_model)
        unbuilt = client.post(
            "/api/v1/deployments/dry-run", json={"model": "iris", "devices": [silent]}
        ).json()
        counter_after = client.get(f"/api/v1/devices/{silent}").json()["desired_counter"]

    assert [d["device_id"] for d in plan["targeted"]] == [silent]
    assert "offline" in plan["targeted"][0]["why"]
    assert {d["device_id"]: d["why"] for d in plan["skipped"]} == {
        _device_id(runner): "already runs v1",
        "nope-1": "unknown device",
    }
    assert plan["package_digest"] is not None
    assert plan["bytes_to_devices"] == plan["package_bytes"] == plan["bytes_from_hub"] > 0
    assert (unbuilt["version"], unbuilt["package_digest"]) == (2, None)
    assert unbuilt["package_bytes"] > iris_model.model.stat().st_size
    assert counter_after == counter_before, "a dry run publishes nothing"

    result = live_hub.cli("deploy", "iris:1", "--device", silent, _device_id(runner), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "1 targeted, 1 skipped" in result.output
    assert f"- {_device_id(runner)}  already runs v1" in result.output


def test_deploy_select_by_tags_from_the_cli(live_hub: LiveHub, iris_model: Any) -> None:
    live_hub.register(iris_model)
    with live_hub.api as client:
        token = client.post("/api/v1/enrollment-tokens", json={"uses": 2}).json()["token"]
        body = {"token": token, "devices": [{"tags": {"site": "lab"}}, {"tags": {"site": "x"}}]}
        lab, _ = (
            d["device_id"] for d in client.post("/api/v1/enroll/bulk", json=body).json()["devices"]
        )
    result = live_hub.cli("deploy", "iris", "--select", "site=lab", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"+ {lab}" in result.output
    assert "1 targeted, 0 skipped" in result.output
    result = live_hub.cli("deploy", "iris")
    assert result.exit_code != 0
    assert "--select" in result.output


def test_the_hub_restarted_mid_rollout_finishes_it_with_no_double_installs(
    live_hub: LiveHub, iris_model: Any
) -> None:
    live_hub.register(iris_model)
    runners = [live_hub.start_agent(f"restart-{i}") for i in range(4)]
    ids = [_device_id(r) for r in runners]
    with live_hub.api as client:
        created = client.post("/api/v1/deployments", json={"model": "iris", "devices": ids})
    assert created.status_code == 201, created.text
    deployment_id = created.json()["id"]
    # Hub and its broker go down right after the request and come back (the broker on the
    # same port, which the devices were enrolled with).
    live_hub.restart()

    def finished() -> bool:
        with live_hub.api as client:
            body: dict[str, Any] = client.get(f"/api/v1/deployments/{deployment_id}").json()
        return bool(body["ok"])

    live_hub.wait_until(finished, timeout_s=60, what="the rollout to finish after the restart")
    assert all(_active_version(r) == 1 for r in runners)
    with Session(live_hub.ctx.engine) as session:
        active_events = session.exec(
            select(DeviceEvent.device_id).where(
                DeviceEvent.deployment_id == deployment_id, DeviceEvent.step == "active"
            )
        ).all()
    assert sorted(active_events) == sorted(ids), "each device installed and reported once"


def test_deployment_logs_and_wait_from_the_cli(live_hub: LiveHub, iris_model: Any) -> None:
    live_hub.register(iris_model)
    runner = live_hub.start_agent("logged")
    result = live_hub.cli("deploy", "iris", "--device", _device_id(runner))
    assert result.exit_code == 0, result.output
    deployment_id = result.output.split()[1].rstrip(":")
    waited = live_hub.cli("deployment", "wait", deployment_id, "--timeout", "60")
    assert waited.exit_code == 0, waited.output
    assert "all 1 succeeded" in waited.output
    logs = live_hub.cli("deployment", "logs", deployment_id)
    assert logs.exit_code == 0, logs.output
    steps = [line.split()[2] for line in logs.output.splitlines()]
    assert steps[0] == "downloading"
    assert steps[-1] == "active"
    assert {"downloaded", "verified", "installing", "health_check"} <= set(steps)
    missing = live_hub.cli("deployment", "logs", "dep-000000000000")
    assert missing.exit_code != 0
    assert "not found" in missing.output
