"""ONNX Runtime: load a package's ``.onnx`` file and score request data with it.

Request data is checked against the model's declared inputs (``agent.runtimes.tensors``)
before it reaches onnxruntime.
"""

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.errors import InputError, ModelLoadError
from agent.protocol.documents import ModelSignature, TensorSpec
from agent.runtimes.options import CPU_PROVIDER, OnnxOptions
from agent.runtimes.tensors import TensorInput, feeds, free_shape, named_outputs

logger = logging.getLogger(__name__)

# ONNX element types as onnxruntime names them, and the numpy dtype a request value becomes.
ONNX_DTYPES: dict[str, npt.DTypeLike] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def _tensor(name: str, onnx_type: str, dims: Any) -> TensorInput:
    # Sequence and map types (sklearn's ZipMap output) keep onnxruntime's own type name.
    return TensorInput(name, ONNX_DTYPES.get(onnx_type), free_shape(dims), type_name=onnx_type)


def choose_providers(wanted: list[str]) -> list[str]:
    """``wanted`` in order, without those this onnxruntime lacks, always ending with the CPU."""
    available = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in available]
    skipped = [p for p in wanted if p not in available]
    if skipped:
        logger.warning(
            "execution providers not available here; skipped",
            extra={"skipped": skipped, "available": sorted(available)},
        )
    if CPU_PROVIDER not in chosen:
        chosen.append(CPU_PROVIDER)
    return chosen


class OnnxRuntime:
    """A model loaded in an onnxruntime ``InferenceSession``."""

    def __init__(self, model_path: Path, options: OnnxOptions | None = None) -> None:
        options = options or OnnxOptions()
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.threads
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.log_severity_level = 3  # errors only: unused initialisers are noise
        self.providers = choose_providers(list(options.providers))
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=session_options, providers=self.providers
            )
        except Exception as exc:
            # onnxruntime raises its own pybind exception types (InvalidProtobuf, Fail, ...)
            # with no common base besides Exception.
            raise ModelLoadError(f"onnxruntime could not load {model_path.name}: {exc}") from exc
        self._inputs = [_tensor(i.name, i.type, i.shape) for i in self._session.get_inputs()]
        self._outputs = [_tensor(o.name, o.type, o.shape) for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]
        if not self._inputs:
            raise ModelLoadError(f"{model_path.name} declares no inputs")

    def signature(self) -> ModelSignature:
        """The model's inputs and outputs as onnxruntime reports them."""
        return ModelSignature(
            inputs=[i.spec() for i in self._inputs],
            outputs=[
                TensorSpec(name=o.name, dtype=o.dtype_name, shape=o.shape) for o in self._outputs
            ],
        )

    def predict(self, data: Any) -> dict[str, Any]:
        """Score ``data`` (a list of rows, an array, or input name -> rows); outputs by name."""
        try:
            results = self._session.run(self._output_names, feeds(data, self._inputs))
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
            # Dimensions the declared shape leaves symbolic can still be wrong inside the graph.
            raise InputError(f"the model rejected the input: {exc}") from exc
        return named_outputs(self._output_names, results)

    def close(self) -> None:
        """Nothing to release beyond the session, which goes with the last reference."""
