"""Build the example ONNX classifier: scikit-learn's bundled iris data, no downloads.

    python -m examples.build_example_model [OUT_DIR]   (default: examples/build/iris)

Writes ``model.onnx`` (float32 input ``input`` of shape [None, 4]; outputs ``label`` int64 and
``probabilities`` float32), ``sample_input.json`` (a bare list of 3 rows, the ``data`` of a
scoring request) and ``expected_output.json`` (what onnxruntime gives for the sample). The
result is deterministic, so the same sample checks the model on the hub and on every device.
"""

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

logger = logging.getLogger(__name__)

DEFAULT_OUT_DIR = Path("examples/build/iris")
SAMPLE_ROWS = (0, 60, 120)  # one flower of each species
INPUT_NAME = "input"
TARGET_OPSET = 15


@dataclass(frozen=True)
class IrisModel:
    """Where the built files are."""

    directory: Path
    model: Path
    sample_input: Path
    expected_output: Path


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=None) + "\n", encoding="utf-8")


def build_iris_model(out_dir: Path) -> IrisModel:
    """Train, convert and write the iris classifier with its health-check files."""
    iris = load_iris()
    x = iris.data.astype(np.float32)
    y = iris.target
    clf = LogisticRegression(max_iter=500, random_state=0)
    pipeline = Pipeline([("scale", StandardScaler()), ("clf", clf)])
    pipeline.fit(x, y)

    onnx_model = convert_sklearn(
        pipeline,
        initial_types=[(INPUT_NAME, FloatTensorType([None, 4]))],
        # Plain tensors instead of ZipMap's list of dicts: smaller, typed, the same on every
        # runtime.
        options={id(clf): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    # skl2onnx names the graph with a random uuid; a fixed name makes the bytes (and so the
    # package digest) the same on every build.
    onnx_model.graph.name = "outpost_iris"
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.onnx"
    model_path.write_bytes(onnx_model.SerializeToString())

    sample = x[list(SAMPLE_ROWS)]
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, {INPUT_NAME: sample})
    expected = {name: value.tolist() for name, value in zip(names, outputs, strict=True)}

    sample_path = out_dir / "sample_input.json"
    expected_path = out_dir / "expected_output.json"
    _write_json(sample_path, sample.tolist())
    _write_json(expected_path, expected)
    logger.info("built iris model", extra={"directory": str(out_dir)})
    return IrisModel(out_dir, model_path, sample_path, expected_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    built = build_iris_model(args.out_dir)
    # A CLI script: telling the person where the files went is its output.
    sys.stdout.write(f"wrote {built.model}, {built.sample_input}, {built.expected_output}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
