"""Entry scripts end to end on real parts: registered on the hub with the CLI, deployed over MQTT
to a real agent beside a built-in ONNX model, and scored through the agent's HTTP endpoint; a
script that hangs and one that crashes answer 504 and 503 while the other models keep
answering; a script whose requirement the device lacks is refused at install, with the reason
on the hub."""

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.main import scoring_server
from agent.settings import ScoringSettings
from tests.support.agents import AgentThread
from tests.support.live_hub import LiveHub

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "score_iris"
IRIS_ROWS = [
    {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    {"sepal_length": 6.9, "sepal_width": 3.2, "petal_length": 5.7, "petal_width": 2.3},
]
# Scripts that answer their health check (data [1]) and fail on request.
FAULTY = """
import json, os, time

def init():
    pass

def run(raw_data):
    data = json.loads(raw_data)["data"]
    if data == "hang":
        while True:
            time.sleep(1)
    if data == "die":
        os._exit(3)
    return {"echo": data}
"""


def _register_script(
    hub: LiveHub, iris: Any, tmp_path: Path, name: str, *extra: str, script: Path | None = None
) -> None:
    if script is None:
        sample, expected = EXAMPLE / "sample_input.json", EXAMPLE / "expected_output.json"
        script = EXAMPLE / "score.py"
    else:
        sample, expected = tmp_path / "sample.json", tmp_path / "expected.json"
        sample.write_text('{"data": [1]}')
        expected.write_text('{"echo": [1]}')
    result = hub.cli(
        "model",
        "register",
        str(iris.model),
        "--name",
        name,
        "--framework",
        "onnx",
        "--sample-input",
        str(sample),
        "--expected-output",
        str(expected),
        "--entry-script",
        str(script),
        *extra,
    )
    assert result.exit_code == 0, result.output


def _deploy(hub: LiveHub, ref: str, runner: AgentThread) -> Any:
    assert runner.agent is not None
    return hub.cli("deploy", ref, "--device", runner.agent.device_id, "--wait", "--timeout", "60")


class Scoring:
    """The agent's endpoint as `outpost-agent run` serves it, with the device's own key."""

    def __init__(self, runner: AgentThread) -> None:
        agent = runner.agent
        assert agent is not None
        self.runner = runner
        self.server = scoring_server(ScoringSettings(port=0), models=agent, state=agent.state)
        runner.run(self.server.start())
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.key = agent.state.scoring_keys().primary

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30
        )

    def stop(self) -> None:
        self.runner.run(self.server.stop())


def test_script_and_builtin_models_serve_side_by_side_and_faulty_scripts_hurt_no_one_else(
    live_hub: LiveHub, iris_model: Any, tmp_path: Path
) -> None:
    live_hub.register(iris_model, name="iris")
    _register_script(live_hub, iris_model, tmp_path, "iris-script", "--option", "timeout_ms=3000")
    faulty = tmp_path / "score.py"
    faulty.write_text(FAULTY)
    _register_script(
        live_hub, iris_model, tmp_path, "hangs", "--option", "timeout_ms=1000", script=faulty
    )
    _register_script(live_hub, iris_model, tmp_path, "crashes", script=faulty)
    runner = live_hub.start_agent("edge")
    for ref in ("iris:1", "iris-script:1", "hangs:1", "crashes:1"):
        result = _deploy(live_hub, ref, runner)
        assert result.exit_code == 0, result.output

    scoring = Scoring(runner)
    sample = json.loads(iris_model.sample_input.read_text())
    try:
        with scoring.client() as client:
            builtin = client.post("/models/iris/score", json={"data": sample})
            assert builtin.status_code == 200, builtin.text
            assert builtin.json()["result"] == [0, 1, 2]
            scripted = client.post("/models/iris-script/score", json={"data": IRIS_ROWS})
            assert scripted.status_code == 200, scripted.text
            assert scripted.json()["result"]["species"] == ["setosa", "virginica"]
            assert scripted.json()["model"] == {"name": "iris-script", "version": 1}
            listed = {m["name"]: m for m in client.get("/models").json()}
            assert set(listed) == {"iris", "iris-script", "hangs", "crashes"}
            assert (listed["iris"]["runtime"], listed["iris"]["framework"]) == ("builtin", "onnx")
            assert listed["iris"]["signature"]["inputs"][0]["shape"] == [None, 4]
            assert (listed["iris-script"]["runtime"], listed["iris-script"]["entry_script"]) == (
                "script",
                "score.py",
            )

            # A hung script: its caller waits out the limit, everyone else is served meanwhile.
            hung: dict[str, Any] = {}

            def call_the_hung_script() -> None:
                started = time.monotonic()
                with scoring.client() as own:
                    hung["response"] = own.post("/models/hangs/score", json={"data": "hang"})
                hung["took_s"] = time.monotonic() - started
                hung["ended"] = time.monotonic()

            caller = threading.Thread(target=call_the_hung_script)
            caller.start()
            during: list[tuple[float, int]] = []
            while caller.is_alive():
                answer = client.post("/models/iris/score", json={"data": sample})
                during.append((time.monotonic(), answer.status_code))
                script_answer = client.post("/models/iris-script/score", json={"data": IRIS_ROWS})
                assert script_answer.status_code == 200, script_answer.text
            caller.join()
            assert hung["response"].status_code == 504, hung["response"].text
            assert "did not answer within 1000 ms" in hung["response"].json()["error"]
            assert hung["took_s"] >= 1.0
            answered_during = [s for at, s in during if at < hung["ended"]]
            assert len(answered_during) >= 3, during
            assert set(answered_during) == {200}

            # A crashing script: 503 naming the exit, the others unaffected, then it is back.
            crashed = client.post("/models/crashes/score", json={"data": "die"})
            assert crashed.status_code == 503, crashed.text
            assert "exited with code 3" in crashed.json()["error"]
            assert client.post("/models/iris/score", json={"data": sample}).status_code == 200

            def serves(model: str) -> bool:
                response = client.post(f"/models/{model}/score", json={"data": [2]})
                return response.status_code == 200 and response.json()["result"] == {"echo": [2]}

            live_hub.wait_until(lambda: serves("crashes"), what="the crashed script's restart")
            live_hub.wait_until(lambda: serves("hangs"), what="the hung script's restart")
    finally:
        scoring.stop()


def test_a_script_whose_requirement_is_missing_is_refused_at_install_with_the_reason(
    live_hub: LiveHub, iris_model: Any, tmp_path: Path
) -> None:
    _register_script(
        live_hub, iris_model, tmp_path, "needy", "--requirement", "surely-not-installed-pkg>=1"
    )
    runner = live_hub.start_agent("plain")
    result = _deploy(live_hub, "needy:1", runner)
    assert result.exit_code == 1, result.output
    assert "E_INCOMPATIBLE" in result.output
    assert "score.py needs surely-not-installed-pkg>=1 (not installed)" in result.output
    with live_hub.api as client:
        (deployment,) = client.get("/api/v1/deployments").json()
        shown = client.get(f"/api/v1/deployments/{deployment['id']}").json()
    assert "surely-not-installed-pkg>=1 (not installed)" in json.dumps(shown)
    assert runner.call(lambda: runner.agent.names()) == []  # type: ignore[union-attr]
