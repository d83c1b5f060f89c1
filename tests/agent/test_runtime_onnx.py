"""OnnxRuntime, load_runtime and the health check, with the project's real iris model."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from agent.errors import HealthCheckError, IncompatibleError, InputError, ModelLoadError
from agent.protocol.documents import (
    FileEntry,
    Framework,
    HealthCheck,
    Manifest,
    ModelInfo,
    RuntimeSpec,
)
from agent.runtimes import load_runtime
from agent.runtimes.health import check_health
from agent.runtimes.onnx import OnnxRuntime
from tests.support.bad_inputs import IRIS_BAD_INPUTS, IRIS_EXPECTATION

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel

CHECK = HealthCheck(input="sample_input.json", expected_output="expected_output.json")


def manifest(
    framework: Framework = Framework.ONNX,
    options: dict[str, str | int | bool | list[str]] | None = None,
) -> Manifest:
    return Manifest(
        model=ModelInfo(name="iris", version=1, framework=framework),
        runtime=RuntimeSpec(model_file="model.onnx", options=options or {}),
        files=[FileEntry(path="model.onnx", size=1, sha256="0" * 64)],
        health_check=CHECK,
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )


@pytest.fixture(scope="module")
def runtime(iris_model: IrisModel) -> OnnxRuntime:
    return OnnxRuntime(iris_model.model)


@pytest.fixture
def files(iris_model: IrisModel, tmp_path: Path) -> Path:
    """A writable copy of the model's files, for tests that spoil one of them."""
    shutil.copytree(iris_model.directory, tmp_path / "files")
    return tmp_path / "files"


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def test_predict_gives_expected_outputs(runtime: OnnxRuntime, iris_model: IrisModel) -> None:
    out = runtime.predict(load(iris_model.sample_input))
    expected = load(iris_model.expected_output)
    assert list(out) == ["label", "probabilities"]
    assert out["label"].tolist() == expected["label"] == [0, 1, 2]
    np.testing.assert_allclose(out["probabilities"], expected["probabilities"], rtol=1e-6)


def test_predict_accepts_input_name_mapping_and_int_values(runtime: OnnxRuntime) -> None:
    out = runtime.predict({"input": [[5, 3, 1, 0]]})
    assert out["label"].tolist() == [0]


def test_signature(runtime: OnnxRuntime) -> None:
    sig = runtime.signature()
    assert [(t.name, t.dtype, t.shape) for t in sig.inputs] == [("input", "float32", [None, 4])]
    assert [(t.name, t.dtype) for t in sig.outputs] == [
        ("label", "int64"),
        ("probabilities", "float32"),
    ]


@pytest.mark.parametrize(("data", "reason"), IRIS_BAD_INPUTS)
def test_bad_input_says_what_was_expected(runtime: OnnxRuntime, data: Any, reason: str) -> None:
    with pytest.raises(InputError, match=reason) as info:
        runtime.predict(data)
    assert IRIS_EXPECTATION in str(info.value)


def test_garbage_model_is_a_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00not an onnx model at all" * 10)
    with pytest.raises(ModelLoadError, match=r"onnxruntime could not load model\.onnx"):
        OnnxRuntime(bad)
    with pytest.raises(ModelLoadError):
        OnnxRuntime(tmp_path / "missing.onnx")


def test_load_runtime_takes_the_options_and_refuses_bad_ones(files: Path) -> None:
    rt = load_runtime(files, manifest(options={"threads": 2, "warmup": 3}))
    assert isinstance(rt, OnnxRuntime)
    with pytest.raises(IncompatibleError, match=r"threads: Input should be a valid integer"):
        load_runtime(files, manifest(options={"threads": "many"}))
    with pytest.raises(IncompatibleError, match=r"thread.*it takes providers, threads, warmup"):
        load_runtime(files, manifest(options={"thread": 2}))
    with pytest.raises(IncompatibleError, match=r"warmup: Input should be greater than"):
        load_runtime(files, manifest(options={"warmup": -1}))


def test_providers_missing_here_fall_back_to_the_cpu(files: Path) -> None:
    rt = load_runtime(
        files, manifest(options={"providers": ["NoSuchExecutionProvider", "CPUExecutionProvider"]})
    )
    assert isinstance(rt, OnnxRuntime)
    assert rt.providers == ["CPUExecutionProvider"]
    rt = load_runtime(files, manifest(options={"providers": ["NoSuchExecutionProvider"]}))
    assert isinstance(rt, OnnxRuntime)
    assert rt.providers == ["CPUExecutionProvider"]


# -- health check --------------------------------------------------------------------------------


def test_health_check_passes_on_the_built_sample(runtime: OnnxRuntime, files: Path) -> None:
    check_health(runtime, files, CHECK)


def test_health_check_accepts_request_shaped_sample_and_bare_list_expected(
    runtime: OnnxRuntime, files: Path
) -> None:
    sample = load(files / "sample_input.json")
    (files / "sample_input.json").write_text(json.dumps({"data": sample}))
    (files / "expected_output.json").write_text(json.dumps([0, 1, 2]))  # the first output
    check_health(runtime, files, CHECK)


def test_health_check_fails_on_wrong_values(runtime: OnnxRuntime, files: Path) -> None:
    expected = load(files / "expected_output.json")
    expected["probabilities"][0][0] += 0.01
    (files / "expected_output.json").write_text(json.dumps(expected))
    with pytest.raises(HealthCheckError, match=r"'probabilities'.*max abs diff 0\.01"):
        check_health(runtime, files, CHECK)


def test_health_check_tolerance_is_the_manifests(runtime: OnnxRuntime, files: Path) -> None:
    expected = load(files / "expected_output.json")
    expected["probabilities"][0][0] += 0.01
    (files / "expected_output.json").write_text(json.dumps(expected))
    check_health(runtime, files, CHECK.model_copy(update={"atol": 0.02}))


def test_health_check_fails_on_wrong_label_and_shape(runtime: OnnxRuntime, files: Path) -> None:
    (files / "expected_output.json").write_text(json.dumps({"label": [0, 1, 1]}))
    with pytest.raises(HealthCheckError, match="'label'"):
        check_health(runtime, files, CHECK)
    (files / "expected_output.json").write_text(json.dumps({"label": [0, 1]}))
    with pytest.raises(HealthCheckError, match=r"shape \[3\], expected \[2\]"):
        check_health(runtime, files, CHECK)


def test_health_check_fails_on_unknown_output_name(runtime: OnnxRuntime, files: Path) -> None:
    (files / "expected_output.json").write_text(json.dumps({"scores": [1]}))
    with pytest.raises(HealthCheckError, match="'scores' is not among"):
        check_health(runtime, files, CHECK)


def test_health_check_fails_on_nan_output(files: Path) -> None:
    class NanRuntime:
        def predict(self, data: Any) -> dict[str, Any]:
            return {"y": [1.0, float("nan")]}

    (files / "expected_output.json").write_text(json.dumps({"y": [1.0, 2.0]}))
    with pytest.raises(HealthCheckError, match="NaN"):
        check_health(NanRuntime(), files, CHECK)


def test_health_check_fails_when_sample_is_rejected(runtime: OnnxRuntime, files: Path) -> None:
    (files / "sample_input.json").write_text(json.dumps([[1, 2, 3]]))
    with pytest.raises(HealthCheckError, match="rejected its own sample input"):
        check_health(runtime, files, CHECK)


@pytest.mark.parametrize("content", [None, "{not json"])
def test_health_check_fails_on_missing_or_bad_files(
    runtime: OnnxRuntime, files: Path, content: str | None
) -> None:
    path = files / "expected_output.json"
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises(HealthCheckError, match="expected output"):
        check_health(runtime, files, CHECK)


def test_health_check_refuses_paths_outside_files(runtime: OnnxRuntime, files: Path) -> None:
    with pytest.raises(HealthCheckError, match="outside"):
        check_health(runtime, files, CHECK.model_copy(update={"input": "../secret.json"}))
