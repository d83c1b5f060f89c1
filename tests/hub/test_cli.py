"""The ``outpost-hub`` CLI: local key and database commands, and the HTTP commands against a
hub served by uvicorn."""

import getpass
import itertools
import re
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from click.testing import CliRunner, Result
from sqlmodel import Session, col, select

from agent.protocol.messages import EventBody, Reason, Step, encode
from agent.protocol.topics import Channel
from hub.cli import main
from hub.cli_client import HubClient
from hub.cli_policy import describe_policy
from hub.cli_progress import ProgressDisplay, progress_line
from hub.deployments.engine import RolloutEngine
from hub.deployments.models import Deployment, DeploymentDevice, DeviceState
from hub.messaging.handlers import Handlers, handle_message

from .conftest import ServedHub

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel


def _run(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def test_keys_lifecycle(tmp_path: Path) -> None:
    data = str(tmp_path / "hub")
    result = _run(["keys", "init", "--data-dir", data])
    assert result.exit_code == 0, result.output
    assert "release" in result.output

    again = _run(["keys", "init", "--data-dir", data])
    assert again.exit_code == 2
    assert "already exist" in again.output
    assert "Traceback" not in again.output

    refused = _run(["keys", "remove", "--role", "release", "--data-dir", data])
    assert refused.exit_code == 2
    assert "never exported" in refused.output

    out = tmp_path / "release.pem"
    exported = _run(["keys", "export", "--role", "release", "--out", str(out), "--data-dir", data])
    assert exported.exit_code == 0, exported.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert _run(["keys", "remove", "--role", "release", "--data-dir", data]).exit_code == 0

    shown = _run(["keys", "show"], env={"OUTPOST_HUB_DATA_DIR": data})
    assert shown.exit_code == 0
    release_line = next(line for line in shown.output.splitlines() if "release" in line)
    assert "OFFLINE" in release_line
    director_line = next(line for line in shown.output.splitlines() if "director" in line)
    assert "online" in director_line


def test_db_upgrade(tmp_path: Path) -> None:
    result = _run(["db", "upgrade", "--data-dir", str(tmp_path / "hub")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hub" / "hub.db").exists()


def test_unreachable_hub_is_one_line_exit_2() -> None:
    result = _run(
        ["model", "list"], env={"OUTPOST_HUB_URL": "http://127.0.0.1:9", "OUTPOST_HUB_TOKEN": "x"}
    )
    assert result.exit_code == 2
    assert "cannot reach the hub" in result.output
    assert "Traceback" not in result.output


def _env(hub: ServedHub) -> dict[str, str]:
    return {"OUTPOST_HUB_URL": hub.url, "OUTPOST_HUB_TOKEN": hub.token}


def _register(hub: ServedHub, iris: "IrisModel") -> Result:
    return _run(
        [
            "model",
            "register",
            str(iris.model),
            "--name",
            "iris",
            "--framework",
            "onnx",
            "--sample-input",
            str(iris.sample_input),
            "--expected-output",
            str(iris.expected_output),
            "--tag",
            "team=vision",
            "--description",
            "iris classifier",
        ],
        env=_env(hub),
    )


def test_model_commands(served_hub: ServedHub, iris_model: "IrisModel", tmp_path: Path) -> None:
    result = _register(served_hub, iris_model)
    assert result.exit_code == 0, result.output
    assert "registered iris:1" in result.output

    listed = _run(["model", "list"], env=_env(served_hub))
    assert "iris" in listed.output
    assert "team=vision" in listed.output
    shown = _run(["model", "show", "iris"], env=_env(served_hub))
    assert "iris:1" in shown.output
    assert "input  input float32" in shown.output

    out = tmp_path / "dl"
    downloaded = _run(["model", "download", "iris:1", "--out", str(out)], env=_env(served_hub))
    assert downloaded.exit_code == 0, downloaded.output
    assert (out / "model.onnx").read_bytes() == iris_model.model.read_bytes()

    missing = _run(
        [
            "model",
            "register",
            str(tmp_path / "nope.onnx"),
            "--name",
            "x",
            "--framework",
            "onnx",
            "--sample-input",
            "a",
            "--expected-output",
            "b",
        ],
        env=_env(served_hub),
    )
    assert missing.exit_code == 2
    assert "cannot read" in missing.output
    not_found = _run(["model", "show", "ghost:3"], env=_env(served_hub))
    assert not_found.exit_code == 2
    assert "not found" in not_found.output


def test_bad_token_is_refused(served_hub: ServedHub) -> None:
    result = _run(
        ["model", "list"], env={"OUTPOST_HUB_URL": served_hub.url, "OUTPOST_HUB_TOKEN": "wrong"}
    )
    assert result.exit_code == 2
    assert "401" in result.output


def test_token_from_data_dir(served_hub: ServedHub) -> None:
    result = _run(
        ["--hub", served_hub.url, "--data-dir", str(served_hub.settings.data_dir), "device", "list"]
    )
    assert result.exit_code == 0, result.output


def _enroll(hub: ServedHub) -> str:
    token = _run(["device", "token"], env=_env(hub)).output.splitlines()[0]
    response = httpx.post(f"{hub.url}/api/v1/enroll", json={"token": token, "name": "d"})
    assert response.status_code == 201
    device_id: str = response.json()["device_id"]
    return device_id


class Fleet:
    """Plays the devices against a served hub, which has no message worker: every device
    released by a deployment sends its outcome once (active unless told otherwise), and the
    rollout engine ticks, as the worker would, so later waves are released."""

    def __init__(
        self, hub: ServedHub, outcomes: dict[str, tuple[Step, Reason | None]] | None = None
    ) -> None:
        self.hub = hub
        self.outcomes = outcomes or {}
        self.seq: dict[str, int] = {}
        self.sent: set[tuple[str, str]] = set()
        self.stop = threading.Event()
        self.handlers = Handlers(
            director=hub.ctx.director(),
            publisher=hub.publisher,
            topics=hub.ctx.topics,
            packages_dir=hub.settings.packages_dir,
        )
        self.engine = RolloutEngine(owner="test-fleet")
        self.thread = threading.Thread(target=self._play, name="fleet", daemon=True)

    def __enter__(self) -> "Fleet":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _play(self) -> None:
        while not self.stop.is_set():
            with Session(self.hub.ctx.engine, expire_on_commit=False) as session:
                released = session.exec(
                    select(DeploymentDevice, Deployment)
                    .join(Deployment, col(Deployment.id) == col(DeploymentDevice.deployment_id))
                    .where(DeploymentDevice.state == DeviceState.IN_PROGRESS)
                ).all()
                for row, dep in released:
                    if (dep.id, row.device_id) in self.sent:
                        continue
                    self.sent.add((dep.id, row.device_id))
                    step, reason = self.outcomes.get(row.device_id, (Step.ACTIVE, None))
                    self.seq[row.device_id] = self.seq.get(row.device_id, 0) + 1
                    body = EventBody(
                        seq=self.seq[row.device_id],
                        deployment_id=dep.id,
                        model=dep.model,
                        version=dep.version,
                        digest=dep.package_digest,
                        step=step,
                        reason=reason,
                        detail="label differs" if reason else "",
                    )
                    handle_message(
                        session=session,
                        handlers=self.handlers,
                        topic=self.hub.ctx.topics.device(row.device_id, Channel.EVT),
                        payload=encode(body),
                    )
                self.engine.tick(session)
            self.stop.wait(0.05)


@pytest.mark.parametrize("fail_one", [False, True])
def test_deploy_wait_reports_outcome(
    served_hub: ServedHub, iris_model: "IrisModel", fail_one: bool
) -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    a, b = _enroll(served_hub), _enroll(served_hub)
    outcomes: dict[str, Any] = {
        b: (Step.FAILED, Reason.HEALTH_CHECK) if fail_one else (Step.ACTIVE, None)
    }
    with Fleet(served_hub, outcomes):
        result = _run(
            ["deploy", "iris:1", "--device", a, "--device", b, "--wait", "--timeout", "30"],
            env=_env(served_hub),
        )
    if fail_one:
        assert result.exit_code == 1, result.output
        assert "1 failed, 0 timed out, 1 succeeded" in result.output
        assert f"{b}: E_HEALTH_CHECK label differs" in result.output
    else:
        assert result.exit_code == 0, result.output
        assert "all 2 succeeded" in result.output

    dep_id = result.output.split()[1].rstrip(":")
    shown = _run(["deployment", "show", dep_id], env=_env(served_hub))
    assert shown.exit_code == 0
    assert a in shown.output


def test_deploy_wait_times_out(served_hub: ServedHub, iris_model: "IrisModel") -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    a = _enroll(served_hub)
    result = _run(
        ["deploy", "iris", "--device", a, "--wait", "--timeout", "1"], env=_env(served_hub)
    )
    assert result.exit_code == 3
    assert "timed out" in result.output
    assert a in result.output


def test_deploy_to_unknown_device_is_exit_2(served_hub: ServedHub, iris_model: "IrisModel") -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    result = _run(["deploy", "iris", "--device", "dev-000000000000"], env=_env(served_hub))
    assert result.exit_code == 2
    assert "unknown devices" in result.output


def test_admin_token_file_is_0600(served_hub: ServedHub) -> None:
    path = served_hub.settings.admin_token_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == served_hub.token


# -- staged rollouts from the CLI --------------------------------------------------------------

ME = f"{getpass.getuser()}@{socket.gethostname()}"


@dataclass
class Sent:
    method: str
    path: str
    json: Any
    params: Any
    actor: str | None


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[Sent]:
    """Every request the CLI sends (it still reaches the hub)."""
    calls: list[Sent] = []
    real = HubClient.request

    def spy(self: HubClient, method: str, path: str, **kwargs: Any) -> Any:
        actor = self._http.headers.get("X-Outpost-Actor")
        calls.append(Sent(method, path, kwargs.get("json"), kwargs.get("params"), actor))
        return real(self, method, path, **kwargs)

    monkeypatch.setattr(HubClient, "request", spy)
    return calls


def _enroll_many(hub: ServedHub, devices: list[dict[str, Any]]) -> list[str]:
    token = _run(["device", "token", "--uses", str(len(devices))], env=_env(hub))
    response = httpx.post(
        f"{hub.url}/api/v1/enroll/bulk",
        json={"token": token.output.splitlines()[0], "devices": devices},
    )
    assert response.status_code == 201, response.text
    return [d["device_id"] for d in response.json()["devices"]]


def _api(hub: ServedHub, method: str, path: str, **kwargs: Any) -> Any:
    response = httpx.request(
        method, f"{hub.url}{path}", headers={"Authorization": f"Bearer {hub.token}"}, **kwargs
    )
    assert response.status_code < 400, response.text
    return response.json()


def _dep_id(output: str) -> str:
    first = output.splitlines()[0]
    assert first.startswith("deployment dep-"), output
    return first.split()[1].rstrip(":")


ALL_OPTIONS = [
    "--group", "line-4",
    "--select", "site=a",
    "--canary", "1",
    "--waves", "50%",
    "--soak", "30",
    "--max-failures", "10%",
    "--min-devices", "2",
    "--rollback-on-abort",
    "--max-concurrent", "2",
    "--pause-after-canary",
    "--in-order",
    "--priority", "5",
    "--continuous",
    "--retry-bad",
    "--device-timeout", "120",
]  # fmt: skip
ALL_POLICY = {
    "canary": 1,
    "wave_percent": 50.0,
    "soak_s": 30,
    "max_failure_ratio": 0.1,
    "min_devices": 2,
    "rollback_on_abort": True,
    "max_concurrent": 2,
    "pause_after_canary": True,
    "order": "listed",
}


def test_every_deploy_option_reaches_the_api_in_a_dry_run_and_a_deployment(
    served_hub: ServedHub, iris_model: "IrisModel", sent: list[Sent]
) -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    # One device named, two in the group and one the selector picks.
    named, *_ = _enroll_many(
        served_hub,
        [
            {"tags": {"site": "b"}},
            {"group": "line-4"},
            {"group": "line-4"},
            {"tags": {"site": "a"}},
        ],
    )
    args = ["deploy", "iris:1", "--device", named, *ALL_OPTIONS]

    dry = _run([*args, "--dry-run"], env=_env(served_hub))
    assert dry.exit_code == 0, dry.output
    # 4 devices: a canary of 1, then waves of 50% (2 devices), then the last one.
    assert "4 targeted, 0 skipped" in dry.output
    assert "3 wave(s) of 1, 2, 1 device(s) (the first is the canary)" in dry.output
    expected = {
        "model": "iris",
        "version": 1,
        "devices": [named],
        "selector": "site=a",
        "groups": ["line-4"],
        "device_timeout_s": 120,
        "policy": ALL_POLICY,
        "priority": 5,
        "continuous": True,
        "retry_bad": True,
        "data_collection": None,
    }
    assert (sent[-1].path, sent[-1].json) == ("/api/v1/deployments/dry-run", expected)

    created = _run(args, env=_env(served_hub))
    assert created.exit_code == 0, created.output
    assert "to 4 device(s) in 3 waves" in created.output
    assert (sent[-1].path, sent[-1].json) == ("/api/v1/deployments", expected)
    dep = _api(served_hub, "GET", f"/api/v1/deployments/{_dep_id(created.output)}")
    assert dep["policy"] == {**dep["policy"], **ALL_POLICY}
    assert (dep["priority"], dep["continuous"], dep["selector"], dep["groups"]) == (
        5,
        True,
        "site=a",
        ["line-4"],
    )
    assert (dep["device_timeout_s"], dep["created_by"]) == (120, ME)
    # Listed order: the named device first, then the selector's, then the group's members.
    assert [d["device_id"] for d in dep["devices"] if d["wave"] == 0] == [named]
    with Session(served_hub.ctx.engine) as session:
        row = session.get(Deployment, dep["id"])
        assert row is not None
        assert row.retry_bad is True
    # Every request named who sent it.
    assert {s.actor for s in sent} == {ME}


@pytest.mark.parametrize(
    ("options", "policy"),
    [
        (["--canary", "10%", "--exponential", "1,3,2"],
         {"canary_percent": 10.0, "exponential": {"first": 1, "factor": 3.0, "max": 2}}),
        (["--waves", "2", "--max-failures", "1"], {"wave_size": 2, "max_failures": 1}),
        (["--exponential", "2"], {"exponential": {"first": 2, "factor": 2.0}}),
        (["--max-failures", "0%"], {"max_failure_ratio": 0.0}),
        ([], {}),
    ],
)  # fmt: skip
def test_wave_shapes_reach_the_policy(
    served_hub: ServedHub,
    iris_model: "IrisModel",
    sent: list[Sent],
    options: list[str],
    policy: dict[str, Any],
) -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    device = _enroll(served_hub)
    result = _run(
        ["deploy", "iris", "--device", device, *options, "--dry-run"], env=_env(served_hub)
    )
    assert result.exit_code == 0, result.output
    assert sent[-1].json["policy"] == policy
    assert "1 wave(s) of 1 device(s)" in result.output


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--canary", "0"], "--canary"),
        (["--canary", "0%"], "--canary"),
        (["--canary", "101%"], "--canary"),
        (["--canary", "some"], "--canary"),
        (["--canary", "x%"], "--canary"),
        (["--waves", "-1"], "--waves"),
        (["--waves", "nan%"], "--waves"),
        (["--exponential", "0"], "--exponential"),
        (["--exponential", "1,1"], "--exponential"),
        (["--exponential", "1,2,0"], "--exponential"),
        (["--exponential", "1,2,3,4"], "--exponential"),
        (["--exponential", "a,b"], "--exponential"),
        (["--waves", "5", "--exponential", "1"], "--exponential"),
        (["--soak", "-1"], "--soak"),
        (["--soak", str(8 * 24 * 3600)], "--soak"),
        (["--max-failures", "-1"], "--max-failures"),
        (["--max-failures", "100%"], "--max-failures"),
        (["--min-devices", "0"], "--min-devices"),
        (["--min-devices", "3"], "--max-failures"),
        (["--max-concurrent", "0"], "--max-concurrent"),
        (["--pause-after-canary"], "--canary"),
        (["--priority", "5000"], "--priority"),
        (["--continuous"], "--select or --group"),
        (["--group", "Line 4"], "--group"),
        (["--device-timeout", "0"], "--device-timeout"),
    ],
)
def test_bad_deploy_options_are_refused_naming_the_option(options: list[str], named: str) -> None:
    # The hub is unreachable: a refusal must come before any request.
    env = {"OUTPOST_HUB_URL": "http://127.0.0.1:9", "OUTPOST_HUB_TOKEN": "x"}
    result = _run(["deploy", "iris", "--device", "dev-000000000001", *options], env=env)
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert "cannot reach" not in result.output
    assert "Traceback" not in result.output


def _wait_for(hub: ServedHub, dep_id: str, what: str, check: Callable[[Any], bool]) -> Any:
    deadline = time.monotonic() + 20
    while True:
        dep = _api(hub, "GET", f"/api/v1/deployments/{dep_id}", params={"devices": "false"})
        if check(dep):
            return dep
        assert time.monotonic() < deadline, f"waited in vain for {what}: {dep}"
        time.sleep(0.05)


def test_pause_resume_promote_abort_rollback_and_history(
    served_hub: ServedHub, iris_model: "IrisModel"
) -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    a, b, c = (_enroll(served_hub) for _ in range(3))
    env = _env(served_hub)
    created = _run(
        ["deploy", "iris", "--device", f"{a},{b},{c}", "--in-order", "--canary", "1",
         "--waves", "1"],
        env=env,
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    dep_id = _dep_id(created.output)

    def control(*args: str) -> Result:
        result = _run(["deployment", *args], env=env)
        assert result.exit_code == 0, result.output
        return result

    paused = control("pause", dep_id, "--reason", "look at the logs")
    assert paused.output == (
        f"deployment {dep_id}: paused at canary (1/3): paused by {ME}: look at the logs\n"
    )
    again = _run(["deployment", "pause", dep_id], env=env)
    assert again.exit_code == 2
    assert f"hub refused (409): cannot pause {dep_id}: it is paused" in again.output

    assert control("resume", dep_id).output == f"deployment {dep_id}: running at canary (1/3)\n"
    promoted = control("promote", dep_id, "--reason", "canary looks fine")
    assert promoted.output == f"deployment {dep_id}: running at wave 1 (2/3)\n"
    assert control("promote", dep_id, "--all").output == (
        f"deployment {dep_id}: running at wave 2 (3/3)\n"
    )
    shown = control("show", dep_id)
    assert f"{dep_id}  iris:1  running  at wave 2 (3/3)" in shown.output
    assert "policy: canary 1, waves of 1, in the listed order" in shown.output
    assert f"by {ME}" in shown.output
    table = shown.output.splitlines()
    assert table[3].split() == ["wave", "devices", "in", "progress", "released", "finished"]
    assert table[4].split() == ["canary", "1", "1", "yes", "no"]
    assert f"  {a:<18} in_progress  queued" in shown.output

    aborted = control("abort", dep_id, "--rollback", "--reason", "bad labels")
    assert aborted.output == f"deployment {dep_id}: aborted: aborted by {ME}: bad labels\n"
    refused = _run(["deployment", "abort", dep_id], env=env)
    assert refused.exit_code == 2
    assert "409" in refused.output
    rolled = control("rollback", dep_id)
    assert rolled.output == f"deployment {dep_id}: rolled_back: rolled back by {ME}\n"
    assert "rolling_back" in control("show", dep_id).output

    history = control("history", dep_id).output.splitlines()
    actions = [(line.split()[2], line.split()[3]) for line in history]
    assert actions == [
        (ME, "created"),
        (ME, "paused"),
        (ME, "resumed"),
        (ME, "promoted"),
        (ME, "promoted"),
        (ME, "aborted"),
        (ME, "rolled_back"),
    ]
    assert history[1].endswith("look at the logs")
    assert history[3].endswith("to wave 1: canary looks fine")
    assert history[5].endswith("bad labels; rolling back")

    listed = control("list", "--state", "rolled_back").output
    assert dep_id in listed
    assert "iris:1" in listed
    assert control("list", "--model", "other").output == "no deployments\n"
    bad_state = _run(["deployment", "list", "--state", "gone"], env=env)
    assert bad_state.exit_code == 2
    assert "--state" in bad_state.output


def test_abort_with_no_rollback_leaves_updated_devices(
    served_hub: ServedHub, iris_model: "IrisModel", sent: list[Sent]
) -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    a = _enroll(served_hub)
    created = _run(["deploy", "iris", "--device", a, "--rollback-on-abort"], env=_env(served_hub))
    dep_id = _dep_id(created.output)
    result = _run(["deployment", "abort", dep_id, "--no-rollback"], env=_env(served_hub))
    assert result.exit_code == 0, result.output
    assert sent[-1].json == {"reason": "", "rollback": False}
    assert sent[-1].actor == ME


def test_deploy_wait_follows_the_waves_with_a_progress_line_per_change(
    served_hub: ServedHub, iris_model: "IrisModel", sent: list[Sent]
) -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    devices = [_enroll(served_hub) for _ in range(3)]
    with Fleet(served_hub):
        result = _run(
            ["deploy", "iris", "--device", ",".join(devices), "--canary", "1", "--waves", "1",
             "--wait", "--timeout", "30"],
            env=_env(served_hub),
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].endswith("to 3 device(s) in 3 waves")
    assert lines[-1] == f"deployment {_dep_id(result.output)}: all 3 succeeded"
    progress = lines[1:-1]
    assert progress, result.output
    # Not a TTY: no carriage returns, and a line only when it changed.
    assert "\r" not in result.output
    assert all(x != y for x, y in itertools.pairwise(progress))
    assert all(re.fullmatch(r"\[[#-]{20}\] \d/3 succeeded.*", line) for line in progress)
    assert progress[-1] == "[####################] 3/3 succeeded  wave 3/3"
    # The polls asked for the summary only; the devices were fetched once, at the end.
    gets = [s for s in sent if s.method == "GET"]
    assert all(s.params == {"devices": "false"} for s in gets[:-1])
    assert gets[-1].params is None


def test_wait_on_a_rollout_the_failure_threshold_aborted_exits_1_with_the_reason(
    served_hub: ServedHub, iris_model: "IrisModel"
) -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    a, b, c = (_enroll(served_hub) for _ in range(3))
    with Fleet(served_hub, {a: (Step.FAILED, Reason.HEALTH_CHECK)}):
        result = _run(
            ["deploy", "iris", "--device", a, b, c, "--in-order", "--canary", "1",
             "--max-failures", "0", "--wait", "--timeout", "30"],
            env=_env(served_hub),
        )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "1 failed, 0 timed out, 0 succeeded, 2 cancelled" in result.output
    assert (
        "  aborted: failure threshold: 1 devices failed, more than the 0 allowed" in result.output
    )
    assert f"  {a}: E_HEALTH_CHECK label differs" in result.output


def test_wait_on_a_paused_rollout_times_out_saying_why(
    served_hub: ServedHub, iris_model: "IrisModel"
) -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    a, b = _enroll(served_hub), _enroll(served_hub)
    with Fleet(served_hub):
        created = _run(
            ["deploy", "iris", "--device", a, b, "--in-order", "--canary", "1",
             "--pause-after-canary"],
            env=_env(served_hub),
        )  # fmt: skip
        dep_id = _dep_id(created.output)
        _wait_for(served_hub, dep_id, "the pause", lambda d: d["state"] == "paused")
        result = _run(["deployment", "wait", dep_id, "--timeout", "0.2"], env=_env(served_hub))
    assert result.exit_code == 3, result.output
    assert "paused: the canary finished; promote or resume to go on" in result.output
    assert f"still pending: {b}" in result.output


def test_progress_display_redraws_one_line_on_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    display = ProgressDisplay(interactive=True)
    display.show("[#---] 1/4 succeeded  downloading 3")
    display.show("[##--] 2/4 succeeded")
    display.show("[##--] 2/4 succeeded")
    display.end()
    assert capsys.readouterr().out == (
        "\r[#---] 1/4 succeeded  downloading 3"
        "\r[##--] 2/4 succeeded               "
        "\r[##--] 2/4 succeeded"
        "\n"
    )


def test_progress_line_counts_waves_steps_and_states() -> None:
    summary = {
        "state": "running",
        "state_reason": "",
        "done": False,
        "total": 205,
        "current_wave": 1,
        "waves": [{}, {}, {}, {}],
        "counts": {
            "succeeded": 120,
            "failed": 3,
            "soaking": 10,
            "in_progress": 7,
            "pending": 60,
            "skipped": 5,
        },
        "steps": {"downloading": 5, "installing": 2},
    }
    assert progress_line(summary) == (
        "[############--------] 120/200 succeeded  failed 3  wave 2/4  downloading 5"
        "  installing 2  soaking 10  pending 60"
    )
    paused = {**summary, "state": "paused", "state_reason": "paused by me"}
    assert progress_line(paused).endswith("  paused: paused by me")


def test_describe_policy() -> None:
    assert describe_policy({}) == "all at once"
    assert describe_policy({"canary": 2}) == "canary 2, then the rest at once"
    assert describe_policy(
        {
            "canary_percent": 5.0,
            "exponential": {"first": 10, "factor": 2.0, "max": 500},
            "soak_s": 600,
            "max_failure_ratio": 0.05,
            "min_devices": 20,
            "rollback_on_abort": True,
            "max_concurrent": 50,
            "pause_after_canary": True,
            "order": "random",
        }
    ) == (
        "canary 5%, waves from 10 growing x2 up to 500, soak 600 s, abort over 5% failed,"
        " judged after 20 finished, roll back on abort, at most 50 downloading,"
        " pause after the canary"
    )


def test_wait_on_a_continuous_rollout_ends_once_it_caught_up(
    served_hub: ServedHub, iris_model: "IrisModel"
) -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    _enroll_many(served_hub, [{"group": "pilot"}])
    with Fleet(served_hub):
        result = _run(
            ["deploy", "iris", "--group", "pilot", "--continuous", "--wait", "--timeout", "30"],
            env=_env(served_hub),
        )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (
        f"deployment {_dep_id(result.output)}: all 1 succeeded so far;"
        " it goes on to devices that join its target"
    )
