"""ONNX Runtime: load a package's ``.onnx`` file and score JSON data with it.

Request data is checked against the model's declared inputs before it reaches onnxruntime, so
a bad request gets a 400 that names the input, dtype and shape it should have had, instead of
an onnxruntime message about node internals.
"""

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.errors import InputError, ModelLoadError
from agent.protocol.documents import Manifest, ModelSignature, TensorSpec

logger = logging.getLogger(__name__)

# ONNX element types as onnxruntime names them, and the numpy dtype a JSON value becomes.
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

DEFAULT_THREADS = 1  # our models are small: a second thread costs more in sync than it saves


def _dtype_name(onnx_type: str) -> str:
    """``float32`` for ``tensor(float)``; non-tensor types keep onnxruntime's name."""
    dtype = ONNX_DTYPES.get(onnx_type)
    if dtype is None:
        return onnx_type
    if dtype is np.object_:
        return "string"
    return np.dtype(dtype).name


def _shape(dims: Any) -> list[int | None]:
    """Fixed dimensions as ints, symbolic or unknown ones (``"N"``, ``None``) as None."""
    if not isinstance(dims, list):
        return []
    return [d if isinstance(d, int) and d >= 0 else None for d in dims]


def _shape_text(shape: list[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def json_ready(value: Any) -> Any:
    """Arrays, numpy scalars and the maps/sequences onnxruntime returns, as plain JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        # JSON keys are strings; sklearn's ZipMap uses int64 class labels as keys.
        return {str(json_ready(k)): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


class _Input:
    """One declared model input and how to turn a JSON value into a feed for it."""

    def __init__(self, name: str, onnx_type: str, dims: Any) -> None:
        self.name = name
        self.onnx_type = onnx_type
        self.dtype = ONNX_DTYPES.get(onnx_type)
        self.dtype_name = _dtype_name(onnx_type)
        self.shape = _shape(dims)

    def expectation(self) -> str:
        return f"input {self.name!r} expects {self.dtype_name} of shape {_shape_text(self.shape)}"

    def convert(self, value: Any) -> npt.NDArray[Any]:
        if self.dtype is None:
            raise InputError(f"input {self.name!r} has type {self.onnx_type}, not supported")
        try:
            raw = np.asarray(value)
        except (ValueError, TypeError) as exc:
            # numpy refuses ragged nesting ("inhomogeneous shape").
            raise InputError(f"{self.expectation()}; got a ragged or invalid array") from exc
        target = np.dtype(self.dtype)
        if target.kind == "O":
            if raw.dtype.kind != "U":
                raise InputError(f"{self.expectation()}; got non-string values")
            array = raw.astype(np.object_)
        elif target.kind == "b":
            if raw.dtype.kind != "b":
                raise InputError(f"{self.expectation()}; got non-boolean values")
            array = raw
        else:
            # JSON booleans are numbers to numpy; a model asking for numbers wants numbers.
            if raw.dtype.kind not in "iuf":
                raise InputError(f"{self.expectation()}; got non-numeric values")
            if target.kind in "iu" and raw.dtype.kind == "f" and not np.all(np.mod(raw, 1) == 0):
                raise InputError(f"{self.expectation()}; got fractional values")
            try:
                with np.errstate(over="raise", invalid="raise"):
                    array = raw.astype(target, casting="unsafe")
                if target.kind in "iu" and not np.array_equal(array, raw):
                    raise OverflowError
            except (OverflowError, FloatingPointError) as exc:
                raise InputError(f"{self.expectation()}; values out of range") from exc
        if array.ndim != len(self.shape) or any(
            want is not None and want != got
            for want, got in zip(self.shape, array.shape, strict=True)
        ):
            raise InputError(f"{self.expectation()}; got shape {list(array.shape)}")
        return array


class OnnxRuntime:
    """A model loaded in an onnxruntime ``InferenceSession`` on the CPU."""

    def __init__(self, model_path: Path, *, threads: int = DEFAULT_THREADS) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: warnings about unused initialisers are noise
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            # onnxruntime raises its own pybind exception types (InvalidProtobuf, Fail, ...)
            # with no common base besides Exception.
            raise ModelLoadError(f"onnxruntime could not load {model_path.name}: {exc}") from exc
        self._inputs = [_Input(i.name, i.type, i.shape) for i in self._session.get_inputs()]
        self._output_names = [o.name for o in self._session.get_outputs()]
        if not self._inputs:
            raise ModelLoadError(f"{model_path.name} declares no inputs")

    @classmethod
    def from_manifest(cls, model_dir: Path, manifest: Manifest) -> "OnnxRuntime":
        """Load the manifest's model file from ``model_dir`` with its runtime options."""
        threads = manifest.runtime.options.get("threads", DEFAULT_THREADS)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ModelLoadError(f"runtime option threads must be a positive integer: {threads!r}")
        return cls(model_dir / manifest.runtime.model_file, threads=threads)

    def signature(self) -> ModelSignature:
        """The model's inputs and outputs as onnxruntime reports them."""
        return ModelSignature(
            inputs=[
                TensorSpec(name=i.name, dtype=i.dtype_name, shape=i.shape) for i in self._inputs
            ],
            outputs=[
                TensorSpec(name=o.name, dtype=_dtype_name(o.type), shape=_shape(o.shape))
                for o in self._session.get_outputs()
            ],
        )

    def _feeds(self, data: Any) -> dict[str, npt.NDArray[Any]]:
        if isinstance(data, dict):
            names = {i.name for i in self._inputs}
            unknown = sorted(set(data) - names)
            missing = sorted(names - set(data))
            if unknown or missing:
                raise InputError(
                    f"data must name the inputs {sorted(names)}; "
                    f"missing {missing}, unknown {unknown}; "
                    + "; ".join(i.expectation() for i in self._inputs)
                )
            return {i.name: i.convert(data[i.name]) for i in self._inputs}
        if len(self._inputs) > 1:
            raise InputError(
                "this model has several inputs; send data as an object of input name to rows: "
                + "; ".join(i.expectation() for i in self._inputs)
            )
        if not isinstance(data, list):
            raise InputError(f"data must be a list of rows; {self._inputs[0].expectation()}")
        return {self._inputs[0].name: self._inputs[0].convert(data)}

    def predict(self, data: Any) -> dict[str, Any]:
        """Score ``data`` (a list of rows, or input name -> rows); outputs by name as JSON."""
        feeds = self._feeds(data)
        try:
            results = self._session.run(self._output_names, feeds)
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
            # Dimensions the declared shape leaves symbolic can still be wrong inside the graph.
            raise InputError(f"the model rejected the input: {exc}") from exc
        return {
            name: json_ready(value) for name, value in zip(self._output_names, results, strict=True)
        }
