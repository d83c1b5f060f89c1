"""TfliteRuntime, load_runtime and the health check, with the project's real TFLite iris model
(examples/models/iris-tflite, built by examples/build_tflite_model.py)."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import types
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
from agent.runtimes import available_frameworks, load_runtime
from agent.runtimes.health import check_health
from agent.runtimes.tflite import TfliteRuntime
from examples.build_tflite_model import (
    build_iris_tflite,
    classifier_flatbuffer,
    committed_model,
    train_iris,
)
from tests.support.bad_inputs import IRIS_BAD_INPUTS, IRIS_EXPECTATION

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel

CHECK = HealthCheck(input="sample_input.json", expected_output="expected_output.json")
COMMITTED = committed_model()


def manifest(options: dict[str, str | int | bool | list[str]] | None = None) -> Manifest:
    return Manifest(
        model=ModelInfo(name="iris", version=1, framework=Framework.TFLITE),
        runtime=RuntimeSpec(model_file="model.tflite", options=options or {}),
        files=[FileEntry(path="model.tflite", size=1, sha256="0" * 64)],
        health_check=CHECK,
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )


def load(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def runtime() -> TfliteRuntime:
    return TfliteRuntime(COMMITTED.model)


@pytest.fixture(scope="module")
def trained() -> tuple[Any, Any, Any]:
    """The iris pipeline as the builder trains it: (weights, bias, sample rows)."""
    return train_iris()


@pytest.fixture(scope="module")
def fixed_batch(trained: tuple[Any, Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same classifier converted with a fixed batch of 1 and no SignatureDef, as older
    converters and many downloaded models have it."""
    weights, bias, _ = trained
    path = tmp_path_factory.mktemp("fixed") / "model.tflite"
    path.write_bytes(classifier_flatbuffer(weights, bias, batch=1, signature=False))
    return path


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A writable copy of the committed model's files, for tests that spoil one of them."""
    shutil.copytree(COMMITTED.directory, tmp_path / "files")
    return tmp_path / "files"


def rows(count: int) -> np.ndarray[Any, Any]:
    """``count`` distinct rows around the sample flowers."""
    base = np.array(load(COMMITTED.sample_input), dtype=np.float32)
    jitter = np.linspace(-0.5, 0.5, count, dtype=np.float32)[:, None]
    return base[np.arange(count) % 3] + jitter


# -- the committed model --------------------------------------------------------------------------


def test_predict_gives_the_committed_expected_outputs(runtime: TfliteRuntime) -> None:
    out = runtime.predict(load(COMMITTED.sample_input))
    expected = load(COMMITTED.expected_output)
    assert list(out) == ["label", "probabilities"]
    assert out["label"].tolist() == expected["label"] == [0, 1, 2]
    np.testing.assert_allclose(out["probabilities"], expected["probabilities"], rtol=1e-6)
    # Arrays of the model's own dtypes: the endpoint writes them as JSON.
    assert (out["label"].dtype, out["probabilities"].dtype) == (np.int64, np.float32)
    assert runtime.package == "ai-edge-litert"
    assert not runtime.row_by_row


def test_it_agrees_with_the_onnx_example(runtime: TfliteRuntime, iris_model: IrisModel) -> None:
    assert load(iris_model.sample_input) == load(COMMITTED.sample_input)
    onnx = load(iris_model.expected_output)
    out = runtime.predict(load(COMMITTED.sample_input))
    assert out["label"].tolist() == onnx["label"]
    np.testing.assert_allclose(out["probabilities"], onnx["probabilities"], atol=1e-6)


def test_the_script_rebuilds_the_committed_model(tmp_path: Path) -> None:
    rebuilt = build_iris_tflite(tmp_path / "rebuilt")
    assert load(rebuilt.sample_input) == load(COMMITTED.sample_input)
    fresh = TfliteRuntime(rebuilt.model).predict(load(COMMITTED.sample_input))
    expected = load(COMMITTED.expected_output)
    assert fresh["label"].tolist() == expected["label"]
    np.testing.assert_allclose(fresh["probabilities"], expected["probabilities"], atol=1e-6)
    assert COMMITTED.model.stat().st_size < 4096, "the committed model stays small"


def test_signature_uses_the_signature_def_names(runtime: TfliteRuntime) -> None:
    sig = runtime.signature()
    assert [(t.name, t.dtype, t.shape) for t in sig.inputs] == [("input", "float32", [None, 4])]
    assert [(t.name, t.dtype, t.shape) for t in sig.outputs] == [
        ("label", "int64", [None]),
        ("probabilities", "float32", [None, 3]),
    ]


def test_batches_of_any_size_match_row_by_row_answers(runtime: TfliteRuntime) -> None:
    data = rows(50)
    singles = [runtime.predict(data[i : i + 1].tolist()) for i in range(50)]
    # Sizes that change from call to call: each resizes the input and allocates again.
    for count in (50, 3, 1, 50, 3):
        out = runtime.predict(data[:count].tolist())
        assert out["label"].tolist() == [s["label"][0] for s in singles[:count]]
        np.testing.assert_allclose(
            out["probabilities"], [s["probabilities"][0] for s in singles[:count]], rtol=1e-6
        )
    assert sorted(set(runtime.predict(data.tolist())["label"].tolist())) == [0, 1, 2]


def shapes(outputs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {name: value.shape for name, value in outputs.items()}


def test_an_empty_batch_gives_empty_outputs(runtime: TfliteRuntime) -> None:
    empty = runtime.predict(np.zeros((0, 4), np.float32))
    assert shapes(empty) == {"label": (0,), "probabilities": (0, 3)}


def test_numpy_arrays_of_any_layout_are_taken(runtime: TfliteRuntime) -> None:
    data = rows(3)
    transposed_back = np.asfortranarray(data)  # same values, column-major memory
    from_array, from_json = runtime.predict(transposed_back), runtime.predict(data.tolist())
    np.testing.assert_array_equal(from_array["probabilities"], from_json["probabilities"])
    assert runtime.predict({"input": data})["label"].tolist() == [0, 1, 2]


def test_threads_calling_at_once_each_get_their_own_answer(runtime: TfliteRuntime) -> None:
    data = rows(50)
    want = {n: runtime.predict(data[:n].tolist())["label"].tolist() for n in (1, 3, 50)}
    failures: list[str] = []

    def hammer(count: int) -> None:
        for _ in range(200):
            try:
                got = runtime.predict(data[:count].tolist())["label"].tolist()
            except Exception as exc:
                failures.append(f"{count} rows: {exc!r}")
                return
            if got != want[count]:
                failures.append(f"{count} rows: {got}")
                return

    threads = [threading.Thread(target=hammer, args=(n,)) for n in (1, 3, 50, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.parametrize(("data", "reason"), IRIS_BAD_INPUTS)
def test_bad_input_says_what_was_expected(runtime: TfliteRuntime, data: Any, reason: str) -> None:
    with pytest.raises(InputError, match=reason) as info:
        runtime.predict(data)
    assert IRIS_EXPECTATION in str(info.value)


def test_a_refused_request_leaves_the_model_serving(runtime: TfliteRuntime) -> None:
    with pytest.raises(InputError):
        runtime.predict([[1.0, 2.0, 3.0]])
    assert runtime.predict(load(COMMITTED.sample_input))["label"].tolist() == [0, 1, 2]


# -- a model with a fixed batch of 1 -----------------------------------------------------------


def test_fixed_batch_of_one_runs_row_by_row(fixed_batch: Path, runtime: TfliteRuntime) -> None:
    fixed = TfliteRuntime(fixed_batch)
    assert fixed.row_by_row
    sig = fixed.signature()
    # No SignatureDef: the tensor names serve; the batch is free for requests.
    assert [(t.name, t.shape) for t in sig.inputs] == [("input", [None, 4])]
    assert [(t.name, t.shape) for t in sig.outputs] == [
        ("label", [None]),
        ("probabilities", [None, 3]),
    ]
    for count in (3, 50, 1):
        data = rows(count).tolist()
        out, dynamic = fixed.predict(data), runtime.predict(data)
        assert out["label"].tolist() == dynamic["label"].tolist()
        np.testing.assert_allclose(out["probabilities"], dynamic["probabilities"], atol=1e-6)
    empty = fixed.predict(np.zeros((0, 4), np.float32))
    assert shapes(empty) == {"label": (0,), "probabilities": (0, 3)}
    with pytest.raises(InputError, match=r"expects float32 of shape \[N, 4\]; got shape \[2, 5\]"):
        fixed.predict([[1, 2, 3, 4, 5]] * 2)


# -- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"\x00not a tflite model at all" * 10, b"", None],
    ids=["garbage", "empty", "truncated"],
)
def test_a_bad_flatbuffer_is_a_load_error(tmp_path: Path, content: bytes | None) -> None:
    bad = tmp_path / "model.tflite"
    whole = COMMITTED.model.read_bytes()
    bad.write_bytes(whole[: len(whole) // 2] if content is None else content)
    with pytest.raises(ModelLoadError, match=r"ai-edge-litert could not load model\.tflite"):
        TfliteRuntime(bad)


def test_a_missing_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model file model\.tflite is missing"):
        TfliteRuntime(tmp_path / "model.tflite")


def test_no_tflite_package_is_incompatible_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry in sys.modules makes its import fail, as on a device without the package.
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(IncompatibleError, match=r"install outpost\[tflite\].*tflite-runtime"):
        TfliteRuntime(COMMITTED.model)


def test_tflite_runtime_serves_when_litert_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from ai_edge_litert.interpreter import Interpreter

    # Stands in for the tflite-runtime package (same Interpreter API), which needs numpy < 2.
    package = types.ModuleType("tflite_runtime")
    module = types.ModuleType("tflite_runtime.interpreter")
    module.Interpreter = Interpreter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", package)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", module)
    fallback = TfliteRuntime(COMMITTED.model)
    assert fallback.package == "tflite-runtime"
    assert fallback.predict(load(COMMITTED.sample_input))["label"].tolist() == [0, 1, 2]


def test_load_runtime_takes_the_options_and_refuses_bad_ones(files: Path) -> None:
    assert "tflite" in available_frameworks()
    rt = load_runtime(files, manifest(options={"threads": 2, "warmup": 3}))
    assert isinstance(rt, TfliteRuntime)
    assert rt.predict(load(files / "sample_input.json"))["label"].tolist() == [0, 1, 2]
    with pytest.raises(IncompatibleError, match=r"threads: Input should be a valid integer"):
        load_runtime(files, manifest(options={"threads": "many"}))
    with pytest.raises(IncompatibleError, match=r"providers.*it takes threads, warmup"):
        load_runtime(files, manifest(options={"providers": ["CPUExecutionProvider"]}))
    with pytest.raises(IncompatibleError, match=r"threads: Input should be greater than"):
        load_runtime(files, manifest(options={"threads": 0}))


def test_a_sample_warm_up_cannot_run_is_left_to_the_health_check(files: Path) -> None:
    (files / "sample_input.json").write_text(json.dumps([[1, 2, 3]]))
    rt = load_runtime(files, manifest(options={"warmup": 2}))
    with pytest.raises(HealthCheckError, match="rejected its own sample input"):
        check_health(rt, files, CHECK)


# -- health check --------------------------------------------------------------------------------


def test_health_check_passes_on_the_committed_sample(runtime: TfliteRuntime, files: Path) -> None:
    check_health(runtime, files, CHECK)


def test_health_check_fails_on_wrong_values(runtime: TfliteRuntime, files: Path) -> None:
    expected = load(files / "expected_output.json")
    expected["probabilities"][1][1] += 0.01
    (files / "expected_output.json").write_text(json.dumps(expected))
    with pytest.raises(HealthCheckError, match=r"'probabilities'.*max abs diff 0\.01"):
        check_health(runtime, files, CHECK)
    (files / "expected_output.json").write_text(json.dumps({"label": [0, 2, 2]}))
    with pytest.raises(HealthCheckError, match="'label'"):
        check_health(runtime, files, CHECK)


# -- quantized models ---------------------------------------------------------------------------


def _dequantize_model(scale: float, zero_point: int) -> bytes:
    """The smallest integer-interface model: int8 [N, 4] in, DEQUANTIZE, float32 out."""
    import flatbuffers  # type: ignore[import-untyped]
    from ai_edge_litert import schema_py_generated as tfl

    quantization = tfl.QuantizationParametersT()
    quantization.scale = [scale]
    quantization.zeroPoint = [zero_point]

    def tensor(name: str, kind: int, quant: Any = None) -> Any:
        t = tfl.TensorT()
        t.name, t.type, t.buffer, t.quantization = name, kind, 0, quant
        t.shape, t.shapeSignature = [1, 4], [-1, 4]
        return t

    code = tfl.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = tfl.BuiltinOperator.DEQUANTIZE
    code.version = 1
    op = tfl.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    graph = tfl.SubGraphT()
    graph.tensors = [
        tensor("q", tfl.TensorType.INT8, quantization),
        tensor("x", tfl.TensorType.FLOAT32),
    ]
    graph.inputs, graph.outputs, graph.operators = [0], [1], [op]
    model = tfl.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [graph]
    model.buffers = [tfl.BufferT()]
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_an_integer_interface_takes_the_quantized_integers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "model.tflite"
    path.write_bytes(_dequantize_model(scale=0.5, zero_point=3))
    with caplog.at_level("INFO", logger="agent.runtimes.tflite"):
        quantized = TfliteRuntime(path)
    logged = next(r for r in caplog.records if r.getMessage() == "quantized tensors")
    assert logged.tensors == {"q": {"scale": 0.5, "zero_point": 3}}  # type: ignore[attr-defined]
    assert [(t.name, t.dtype) for t in quantized.signature().inputs] == [("q", "int8")]
    # x = scale * (q - zero_point)
    assert quantized.predict([[3, 5, -128, 127]])["x"].tolist() == [[0.0, 1.0, -65.5, 62.0]]
    with pytest.raises(InputError, match="expects int8 of shape \\[N, 4\\]; got fractional"):
        quantized.predict([[0.5, 1, 2, 3]])
    with pytest.raises(InputError, match="values out of range"):
        quantized.predict([[200, 1, 2, 3]])
