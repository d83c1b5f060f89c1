"""Build the example TFLite classifier without TensorFlow: the iris model of
``build_example_model`` (StandardScaler + LogisticRegression on scikit-learn's bundled data),
written as a ``.tflite`` flatbuffer with the schema's object API that ``ai-edge-litert`` ships.

    python -m examples.build_tflite_model [OUT_DIR]   (default: examples/models/iris-tflite)

The scaler is folded into one dense layer: FULLY_CONNECTED -> SOFTMAX gives ``probabilities``
(float32 [N, 3]) and ARG_MAX gives ``label`` (int64 [N]), the outputs of the ONNX example, in the
same order. The input ``input`` is float32 of shape [N, 4] (a dynamic batch). As TensorFlow's
converter does, the tensors carry graph-internal names and a ``serving_default`` SignatureDef
carries the ones above. Also writes ``sample_input.json`` (the ONNX example's three rows, one
per species) and ``expected_output.json`` (what LiteRT gives for them). Deterministic; the
committed copy in examples/models/iris-tflite is this script's output.
"""

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

DEFAULT_OUT_DIR = Path("examples/models/iris-tflite")
# The committed build, wherever the checkout is: tests and the demo use it as it is.
COMMITTED_DIR = Path(__file__).resolve().parent / "models" / "iris-tflite"
SAMPLE_ROWS = (0, 60, 120)  # one flower of each species, as in build_example_model
INPUT_NAME = "input"
OUTPUT_NAMES = ("label", "probabilities")
FEATURES = 4
SIGNATURE_KEY = "serving_default"
TFLITE_SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"

Floats = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TfliteModel:
    """Where the built files are."""

    directory: Path
    model: Path
    sample_input: Path
    expected_output: Path


def committed_model() -> TfliteModel:
    """The committed build, without building anything."""
    return _files(COMMITTED_DIR)


def _files(directory: Path) -> TfliteModel:
    return TfliteModel(
        directory,
        directory / "model.tflite",
        directory / "sample_input.json",
        directory / "expected_output.json",
    )


def train_iris() -> tuple[Floats, Floats, Floats]:
    """The ONNX example's pipeline, trained the same way, folded into one dense layer:
    ``softmax(x @ weights.T + bias)``. Returns (weights [3, 4], bias [3], sample rows [3, 4])."""
    # Imported here: only building needs scikit-learn.
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    iris = load_iris()
    x = iris.data.astype(np.float32)
    scaler = StandardScaler()
    clf = LogisticRegression(max_iter=500, random_state=0)
    Pipeline([("scale", scaler), ("clf", clf)]).fit(x, iris.target)
    # ((x - mean) / scale) @ coef.T + intercept == x @ (coef / scale).T + (intercept - ...),
    # computed in float64 and rounded once.
    coef = clf.coef_ / scaler.scale_
    weights = coef.astype(np.float32)
    bias = (clf.intercept_ - coef @ scaler.mean_).astype(np.float32)
    return weights, bias, x[list(SAMPLE_ROWS)]


def classifier_flatbuffer(
    weights: Floats, bias: Floats, *, batch: int | None = None, signature: bool = True
) -> bytes:
    """A .tflite model: ``input`` -> FULLY_CONNECTED -> SOFTMAX (``probabilities``) and
    ARG_MAX (``label``). ``batch`` None makes the batch dynamic ([-1, features]); a number
    fixes it. Without ``signature`` the tensors carry the plain names and no SignatureDef."""
    import flatbuffers  # type: ignore[import-untyped]  # ships no type information
    from ai_edge_litert import schema_py_generated as tfl

    classes, features = weights.shape
    rows = 1 if batch is None else batch
    free = -1 if batch is None else batch

    buffers = [tfl.BufferT()]  # buffer 0 is the empty one every tensor without data points at

    def buffer(values: npt.NDArray[Any]) -> int:
        data = tfl.BufferT()
        data.data = np.frombuffer(np.ascontiguousarray(values).tobytes(), dtype=np.uint8)
        buffers.append(data)
        return len(buffers) - 1

    tensors: list[Any] = []

    def tensor(name: str, shape: list[int], kind: int, data: int = 0, batched: bool = True) -> int:
        t = tfl.TensorT()
        t.name = name
        t.type = kind
        t.buffer = data
        t.shape = [rows, *shape] if batched else shape
        t.shapeSignature = [free, *shape] if batched else None
        tensors.append(t)
        return len(tensors) - 1

    names = {n: n for n in (INPUT_NAME, *OUTPUT_NAMES, "logits")}
    if signature:
        names = {
            INPUT_NAME: "serving_default_input:0",
            "label": "StatefulPartitionedCall:0",
            "probabilities": "StatefulPartitionedCall:1",
            "logits": "dense/BiasAdd",
        }
    f32, i32, i64 = tfl.TensorType.FLOAT32, tfl.TensorType.INT32, tfl.TensorType.INT64
    x = tensor(names[INPUT_NAME], [features], f32)
    w = tensor("dense/weights", [classes, features], f32, buffer(weights), batched=False)
    b = tensor("dense/bias", [classes], f32, buffer(bias), batched=False)
    logits = tensor(names["logits"], [classes], f32)
    probabilities = tensor(names["probabilities"], [classes], f32)
    axis = tensor("argmax/axis", [1], i32, buffer(np.array([1], np.int32)), batched=False)
    label = tensor(names["label"], [], i64)

    codes = []
    for op in (
        tfl.BuiltinOperator.FULLY_CONNECTED,
        tfl.BuiltinOperator.SOFTMAX,
        tfl.BuiltinOperator.ARG_MAX,
    ):
        code = tfl.OperatorCodeT()
        code.builtinCode = op
        code.deprecatedBuiltinCode = op  # readers of the old schema look here (codes < 127)
        code.version = 1
        codes.append(code)

    def operator(code: int, inputs: list[int], outputs: list[int], kind: int, opts: Any) -> Any:
        o = tfl.OperatorT()
        o.opcodeIndex = code
        o.inputs = inputs
        o.outputs = outputs
        o.builtinOptionsType = kind
        o.builtinOptions = opts
        return o

    softmax = tfl.SoftmaxOptionsT()
    softmax.beta = 1.0
    argmax = tfl.ArgMaxOptionsT()
    argmax.outputType = i64  # the ONNX example's label is int64
    graph = tfl.SubGraphT()
    graph.name = "main"
    graph.tensors = tensors
    graph.inputs = [x]
    graph.outputs = [label, probabilities]
    graph.operators = [
        operator(
            0, [x, w, b], [logits], tfl.BuiltinOptions.FullyConnectedOptions,
            tfl.FullyConnectedOptionsT(),
        ),
        operator(1, [logits], [probabilities], tfl.BuiltinOptions.SoftmaxOptions, softmax),
        operator(2, [logits, axis], [label], tfl.BuiltinOptions.ArgMaxOptions, argmax),
    ]  # fmt: skip

    model = tfl.ModelT()
    model.version = TFLITE_SCHEMA_VERSION
    model.description = "Outpost iris classifier (scaler folded into a dense layer)"
    model.operatorCodes = codes
    model.subgraphs = [graph]
    model.buffers = buffers
    if signature:

        def mapped(name: str, index: int) -> Any:
            entry = tfl.TensorMapT()
            entry.name = name
            entry.tensorIndex = index
            return entry

        sig = tfl.SignatureDefT()
        sig.signatureKey = SIGNATURE_KEY
        sig.subgraphIndex = 0
        sig.inputs = [mapped(INPUT_NAME, x)]
        sig.outputs = [mapped("label", label), mapped("probabilities", probabilities)]
        model.signatureDefs = [sig]

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=None) + "\n", encoding="utf-8")


def run_litert(model: bytes, rows: Floats) -> dict[str, Any]:
    """What LiteRT gives for ``rows``, by output name as JSON values (row by row for a model
    with a fixed batch of 1)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model, num_threads=1)
    input_index = interpreter.get_input_details()[0]["index"]
    fixed = int(interpreter.get_input_details()[0]["shape_signature"][0]) != -1
    batches = [rows[i : i + 1] for i in range(len(rows))] if fixed else [rows]
    got: dict[str, list[Any]] = {name: [] for name in OUTPUT_NAMES}
    for batch in batches:
        interpreter.resize_tensor_input(input_index, list(batch.shape), strict=not fixed)
        interpreter.allocate_tensors()
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        # Graph outputs are in OUTPUT_NAMES order whatever the tensors are called.
        for name, details in zip(OUTPUT_NAMES, interpreter.get_output_details(), strict=True):
            got[name].extend(interpreter.get_tensor(details["index"]).tolist())
    return got


def build_iris_tflite(
    out_dir: Path, *, batch: int | None = None, signature: bool = True
) -> TfliteModel:
    """Train, write the model and its health-check files; ``batch``/``signature`` as in
    ``classifier_flatbuffer`` (the committed model uses the defaults)."""
    weights, bias, sample = train_iris()
    model = classifier_flatbuffer(weights, bias, batch=batch, signature=signature)
    out_dir.mkdir(parents=True, exist_ok=True)
    built = _files(out_dir)
    built.model.write_bytes(model)
    _write_json(built.sample_input, sample.tolist())
    _write_json(built.expected_output, run_litert(model, sample))
    logger.info("built iris tflite model", extra={"directory": str(out_dir)})
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    built = build_iris_tflite(args.out_dir)
    # A CLI script: telling the person where the files went is its output.
    sys.stdout.write(f"wrote {built.model}, {built.sample_input}, {built.expected_output}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
