"""A model of a chosen size for the rollout: an MLP with random float32 weights, built with
``onnx.helper``, with the health-check sample and the output onnxruntime gives for it.

Random weights compress badly, so the package is as large on the wire as the model file.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

INPUTS = 64
OUTPUTS = 10
SAMPLE_ROWS = 3
OPSET = 15
IR_VERSION = 8  # what every onnxruntime this project supports can load


@dataclass(frozen=True)
class ModelFiles:
    directory: Path
    model: Path
    sample_input: Path
    expected_output: Path

    @property
    def size_bytes(self) -> int:
        return self.model.stat().st_size


def build_mlp(out_dir: Path, *, target_bytes: int, seed: int = 0) -> ModelFiles:
    """input[N, 64] -> MatMul -> Add -> Relu -> MatMul -> Add -> output[N, 10], with the hidden
    width chosen so the weights come to about ``target_bytes``."""
    rng = np.random.default_rng(seed)
    floats_per_hidden = INPUTS + 1 + OUTPUTS  # w1 column, b1 entry, w2 row
    hidden = max(1, target_bytes // (4 * floats_per_hidden))
    # Small weights keep the activations, and so the expected output, well inside float32.
    scale = 1.0 / np.sqrt(hidden)
    w1 = rng.standard_normal((INPUTS, hidden), dtype=np.float32) * np.float32(scale)
    b1 = rng.standard_normal(hidden, dtype=np.float32) * np.float32(0.1)
    w2 = rng.standard_normal((hidden, OUTPUTS), dtype=np.float32) * np.float32(scale)
    b2 = np.zeros(OUTPUTS, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["a"]),
            helper.make_node("MatMul", ["a", "w2"], ["o"]),
            helper.make_node("Add", ["o", "b2"], ["output"]),
        ],
        "outpost_bench_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, INPUTS])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, OUTPUTS])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)

    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.onnx"
    model_path.write_bytes(model.SerializeToString())
    sample = rng.standard_normal((SAMPLE_ROWS, INPUTS), dtype=np.float32)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (output,) = session.run(["output"], {"input": sample})
    sample_path = out_dir / "sample_input.json"
    expected_path = out_dir / "expected_output.json"
    sample_path.write_text(json.dumps(sample.tolist()), encoding="utf-8")
    expected_path.write_text(json.dumps({"output": output.tolist()}), encoding="utf-8")
    return ModelFiles(out_dir, model_path, sample_path, expected_path)
