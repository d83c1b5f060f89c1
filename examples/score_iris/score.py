"""An Azure-ML-style entry script for the example iris model: rows in, species out.

The device agent runs it as it is (docs/entry-scripts.md): ``init()`` once per worker, then
``run(raw_data)`` for each scoring request, with ``raw_data`` the request body as text.

Pre-processing: rows may be objects named by measurement (``{"sepal_length": 5.1, ...}``) or
plain lists of the four numbers in the model's order. Post-processing: the model's class index
becomes a species name, and its probabilities an object keyed by species.
"""

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
SPECIES = ("setosa", "versicolor", "virginica")

session: Any = None


def init() -> None:
    global session
    # OUTPOST_MODEL_DIR on a device; AZUREML_MODEL_DIR is set to the same folder, so a script
    # written for Azure ML finds its model unchanged.
    model_dir = os.environ.get("OUTPOST_MODEL_DIR") or os.environ["AZUREML_MODEL_DIR"]
    path = os.path.join(model_dir, "model.onnx")  # noqa: PTH118 - as Azure's samples write it
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _row(row: Any) -> list[float]:
    if isinstance(row, dict):
        missing = [name for name in FEATURES if name not in row]
        if missing:
            raise ValueError(f"a row lacks {', '.join(missing)}")
        return [float(row[name]) for name in FEATURES]
    if len(row) != len(FEATURES):
        raise ValueError(f"a row has {len(row)} values, expected {len(FEATURES)}")
    return [float(value) for value in row]


def run(raw_data: str) -> dict[str, Any]:
    rows = json.loads(raw_data)["data"]
    features = np.asarray([_row(row) for row in rows], dtype=np.float32)
    labels, probabilities = session.run(["label", "probabilities"], {"input": features})
    return {
        "species": [SPECIES[int(label)] for label in labels],
        "probabilities": [
            {name: round(float(p), 6) for name, p in zip(SPECIES, row, strict=True)}
            for row in probabilities
        ],
    }
