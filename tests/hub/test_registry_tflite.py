"""Registering TFLite models: the hub checks them with the agent's LiteRT runtime and health
check (hub.registry.inspection), records the signature and refuses what a device would refuse."""

import json
import logging
import sys
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from agent.protocol.documents import Framework
from examples.build_tflite_model import committed_model
from hub.cli import main as hub_cli
from hub.errors import ModelCheckFailed
from hub.registry.inspection import inspect_model

from .conftest import RunningHub, ServedHub

TFLITE = committed_model()


def _post(
    hub: RunningHub,
    *,
    model: bytes | None = None,
    sample: bytes | None = None,
    expected: bytes | None = None,
    framework: str = "tflite",
) -> Any:
    return hub.client.post(
        "/api/v1/models",
        data={"name": "iris-lite", "framework": framework},
        files=[
            ("files", ("model.tflite", model or TFLITE.model.read_bytes())),
            ("sample_input", ("sample_input.json", sample or TFLITE.sample_input.read_bytes())),
            (
                "expected_output",
                ("expected_output.json", expected or TFLITE.expected_output.read_bytes()),
            ),
        ],
    )


def _expected() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(TFLITE.expected_output.read_text())
    return body


def test_register_records_the_signature(running_hub: RunningHub) -> None:
    response = _post(running_hub)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["version"], body["framework"]) == ("iris-lite", 1, "tflite")
    assert body["signature"] == {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 4]}],
        "outputs": [
            {"name": "label", "dtype": "int64", "shape": [None]},
            {"name": "probabilities", "dtype": "float32", "shape": [None, 3]},
        ],
    }
    stored = running_hub.client.get("/api/v1/models/iris-lite/1/files/model.tflite")
    assert stored.content == TFLITE.model.read_bytes()


def test_wrong_expected_output_is_refused_with_the_reason(running_hub: RunningHub) -> None:
    expected = _expected()
    expected["probabilities"][2][2] -= 0.1
    response = _post(running_hub, expected=json.dumps(expected).encode())
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "'probabilities' differs from the expected output: max abs diff 0.1" in detail
    assert running_hub.client.get("/api/v1/models").json() == []


def test_wrong_label_and_unknown_output_are_refused(running_hub: RunningHub) -> None:
    wrong_label = _post(running_hub, expected=json.dumps({"label": [0, 1, 1]}).encode())
    assert wrong_label.status_code == 422
    assert "'label' differs from the expected output" in wrong_label.json()["detail"]
    unknown = _post(running_hub, expected=json.dumps({"scores": [1]}).encode())
    assert unknown.status_code == 422
    assert "'scores' is not among the model's outputs" in unknown.json()["detail"]


def test_a_sample_that_does_not_fit_names_the_expected_input(running_hub: RunningHub) -> None:
    response = _post(running_hub, sample=b"[[1.0, 2.0, 3.0]]")
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "rejected its own sample input" in detail
    assert "'input' expects float32 of shape [N, 4]; got shape [1, 3]" in detail


def test_a_garbage_flatbuffer_is_refused(running_hub: RunningHub) -> None:
    response = _post(running_hub, model=b"\x00not a tflite model" * 8)
    assert response.status_code == 422
    assert "cannot load the model" in response.json()["detail"]
    assert "model.tflite" in response.json()["detail"]


def test_without_a_tflite_runtime_the_hub_accepts_unchecked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A None entry in sys.modules makes the import fail, as on a hub without the packages.
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime"):
        monkeypatch.setitem(sys.modules, name, None)
    with caplog.at_level(logging.WARNING, logger="hub.registry.inspection"):
        signature = inspect_model(Framework.TFLITE, b"anything", [[1]], [[1]])
    assert signature.inputs == signature.outputs == []
    assert "accepted unchecked" in caplog.text
    assert caplog.records[0].reason.startswith("no TFLite interpreter")  # type: ignore[attr-defined]


def test_the_cli_registers_a_tflite_model(served_hub: ServedHub) -> None:
    env = {"OUTPOST_HUB_URL": served_hub.url, "OUTPOST_HUB_TOKEN": served_hub.token}
    args = [
        "model", "register", str(TFLITE.model), "--name", "iris-lite", "--framework", "tflite",
        "--sample-input", str(TFLITE.sample_input),
        "--expected-output", str(TFLITE.expected_output),
    ]  # fmt: skip
    result = CliRunner().invoke(hub_cli, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "registered iris-lite:1" in result.output
    shown = CliRunner().invoke(hub_cli, ["model", "show", "iris-lite"], env=env)
    assert "tflite" in shown.output
    assert "input  input float32" in shown.output


def test_onnx_with_external_data_is_refused_before_loading() -> None:
    """THREATS.md E6 on the hub: only the model file is written for the check, and a tensor
    location such as ``../../keys/release.pem`` must never be read there."""
    weights = numpy_helper.from_array(np.ones((1, 4), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    # Point the tensor elsewhere without writing anything there.
    tensor = model.graph.initializer[0]
    set_external_data(tensor, location="../../keys/release.pem")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    with pytest.raises(ModelCheckFailed, match=r"keeps tensors in other files \['\.\./\.\./keys"):
        inspect_model(Framework.ONNX, model.SerializeToString(), [[1, 1, 1, 1]], [[2]])


@pytest.mark.parametrize("fault", ["segv", "hang"])
def test_a_model_crashing_or_hanging_its_runtime_is_refused_and_the_hub_serves_on(
    running_hub: RunningHub, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """THREATS.md C4 on the hub: the model is first loaded in a trial process, where the
    crash or hang is injected, as a runtime's native code would crash or hang there."""
    monkeypatch.setenv("OUTPOST_FAILPOINT", f"in_trial_load:{fault}")
    monkeypatch.setattr("hub.registry.inspection.TRIAL_TIMEOUT_S", 5.0)
    response = _post(running_hub)
    assert response.status_code == 422, response.text
    expected = (
        "killed a trial process with SIGSEGV" if fault == "segv" else "did not finish within 5 s"
    )
    assert expected in response.json()["detail"]
    assert "cannot load the model: loading the uploaded model" in response.json()["detail"]
    monkeypatch.delenv("OUTPOST_FAILPOINT")
    assert _post(running_hub).status_code == 201  # the hub is still there, and registers
