"""The ``outpost-hub`` CLI: local key and database commands, and the HTTP commands against a
hub served by uvicorn."""

import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from click.testing import CliRunner, Result
from sqlmodel import Session, select

from agent.protocol.messages import EventBody, Reason, Step, encode
from agent.protocol.topics import Channel
from hub.cli import main
from hub.deployments.models import Deployment, DeploymentDevice
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
    import httpx

    token = _run(["device", "token"], env=_env(hub)).output.splitlines()[0]
    response = httpx.post(f"{hub.url}/api/v1/enroll", json={"token": token, "name": "d"})
    assert response.status_code == 201
    device_id: str = response.json()["device_id"]
    return device_id


def _report_when_deployed(
    hub: ServedHub, outcomes: dict[str, tuple[Step, Reason | None]]
) -> threading.Thread:
    """Play the devices: once the deployment exists, send each device's final event."""

    def play() -> None:
        deadline = time.monotonic() + 30
        handlers = Handlers(
            director=hub.ctx.director(),
            publisher=hub.publisher,
            topics=hub.ctx.topics,
            packages_dir=hub.settings.packages_dir,
        )
        while time.monotonic() < deadline:
            with Session(hub.ctx.engine) as session:
                dep = session.exec(select(Deployment)).first()
                rows = session.exec(select(DeploymentDevice)).all() if dep else []
                if dep is not None and len(rows) == len(outcomes):
                    for seq, (device_id, (step, reason)) in enumerate(outcomes.items(), 1):
                        body = EventBody(
                            seq=seq,
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
                            handlers=handlers,
                            topic=hub.ctx.topics.device(device_id, Channel.EVT),
                            payload=encode(body),
                        )
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("fail_one", [False, True])
def test_deploy_wait_reports_outcome(
    served_hub: ServedHub, iris_model: "IrisModel", fail_one: bool
) -> None:
    assert _register(served_hub, iris_model).exit_code == 0
    a, b = _enroll(served_hub), _enroll(served_hub)
    outcomes: dict[str, Any] = {
        a: (Step.ACTIVE, None),
        b: (Step.FAILED, Reason.HEALTH_CHECK) if fail_one else (Step.ACTIVE, None),
    }
    player = _report_when_deployed(served_hub, outcomes)
    result = _run(
        ["deploy", "iris:1", "--device", a, "--device", b, "--wait", "--timeout", "30"],
        env=_env(served_hub),
    )
    player.join(5)
    if fail_one:
        assert result.exit_code == 1, result.output
        assert f"{b}: E_HEALTH_CHECK label differs" in result.output
    else:
        assert result.exit_code == 0, result.output
        assert "all 2 active" in result.output

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
