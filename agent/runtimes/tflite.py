"""LiteRT (TensorFlow Lite): load a package's ``.tflite`` file and score request data with it.

The interpreter is chosen when a model loads: ``ai-edge-litert`` (the ``tflite`` extra) when it
imports, else ``tflite-runtime``, the older package that still has wheels for some boards
LiteRT has none for. Request data is checked against the model's declared inputs
(``agent.runtimes.tensors``) before it reaches the interpreter, so a wrong request gets the same
400 as from ONNX Runtime.

Batches: an input whose batch dimension is dynamic (``-1`` in its shape signature) is resized
to each request's rows, and only when they change. A model converted with a fixed batch of 1
is run one row at a time and its outputs stacked, so batch requests work on either kind.
"""

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import IncompatibleError, InputError, ModelLoadError
from agent.protocol.documents import ModelSignature, TensorSpec
from agent.runtimes.options import TfliteOptions
from agent.runtimes.tensors import (
    Shape,
    TensorInput,
    dtype_name,
    feeds,
    free_shape,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install outpost[tflite] (ai-edge-litert), or tflite-runtime where ai-edge-litert has no wheel"
)


def interpreter_class() -> tuple[Any, str]:
    """The ``Interpreter`` class of the first TFLite package that imports, and its name."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite-runtime"
    except ImportError:
        raise IncompatibleError(f"no TFLite interpreter on this device; {INSTALL_HINT}") from None


@dataclass(frozen=True)
class _Tensor:
    """One model input or output: the interpreter's tensor index and what requests see."""

    index: int
    name: str
    dtype: npt.DTypeLike
    shape: Shape  # as requests see it: free dimensions are None
    resizable: bool  # the shape signature has a -1, so the interpreter takes other sizes


def _shape_signature(details: dict[str, Any]) -> list[int]:
    # Interpreters from before TF 2.3 give no shape_signature; their shapes are all fixed.
    raw = details.get("shape_signature")
    if raw is None or len(raw) == 0:
        raw = details["shape"]
    return [int(d) for d in raw]


def _signature_names(interpreter: Any) -> dict[int, str]:
    """Tensor index -> the name the model's only SignatureDef gives it, or {} if there is none.

    TensorFlow's converter names tensors after graph internals ("serving_default_input:0",
    "StatefulPartitionedCall:1"); the SignatureDef carries the names the model was written with.
    """
    try:
        keys = list(interpreter.get_signature_list())
        if len(keys) != 1:
            return {}
        runner = interpreter.get_signature_runner(keys[0])
        inputs = runner.get_input_details()
        outputs = runner.get_output_details()
    except (AttributeError, ValueError, RuntimeError) as exc:
        # Old interpreters without signature support: the tensor names serve.
        logger.info("no usable SignatureDef; using tensor names", extra={"error": str(exc)})
        return {}
    names = {int(d["index"]): str(n) for n, d in inputs.items()}
    names.update({int(d["index"]): str(n) for n, d in outputs.items()})
    return names


def _is_fixed_batch_of_one(inputs: list[list[int]], outputs: list[list[int]]) -> bool:
    """Every input is [1, ...] of rank 2 or more and every output [1, ...]: a model converted
    for one row at a time, which a batch request runs row by row."""
    return all(len(s) >= 2 and s[0] == 1 for s in inputs) and all(
        len(s) >= 1 and s[0] == 1 for s in outputs
    )


class TfliteRuntime:
    """A model loaded in a LiteRT (or tflite-runtime) ``Interpreter``."""

    def __init__(self, model_path: Path, options: TfliteOptions | None = None) -> None:
        options = options or TfliteOptions()
        interpreter_type, self.package = interpreter_class()
        if not model_path.is_file():
            raise ModelLoadError(f"model file {model_path.name} is missing")
        try:
            self._interpreter = interpreter_type(
                model_path=str(model_path), num_threads=options.threads
            )
            self._interpreter.allocate_tensors()
            input_details = self._interpreter.get_input_details()
            output_details = self._interpreter.get_output_details()
        except Exception as exc:
            # The interpreter raises ValueError for a bad flatbuffer and RuntimeError for an
            # op it lacks, with no common base besides Exception.
            raise ModelLoadError(f"{self.package} could not load {model_path.name}: {exc}") from exc
        if not input_details:
            raise ModelLoadError(f"{model_path.name} declares no inputs")

        names = _signature_names(self._interpreter)
        in_signatures = [_shape_signature(d) for d in input_details]
        out_signatures = [_shape_signature(d) for d in output_details]
        self.row_by_row = _is_fixed_batch_of_one(in_signatures, out_signatures)

        def tensor(details: dict[str, Any], signature: list[int]) -> _Tensor:
            shape = free_shape(signature)
            if self.row_by_row:
                shape[0] = None  # any number of rows, run one at a time
            index = int(details["index"])
            return _Tensor(
                index=index,
                name=names.get(index, str(details["name"])),
                dtype=details["dtype"],
                shape=shape,
                resizable=any(d < 0 for d in signature),
            )

        self._inputs = [tensor(d, s) for d, s in zip(input_details, in_signatures, strict=True)]
        self._outputs = [tensor(d, s) for d, s in zip(output_details, out_signatures, strict=True)]
        self._checks = [TensorInput(t.name, t.dtype, t.shape) for t in self._inputs]
        self._output_names = [t.name for t in self._outputs]
        self._output_indexes = [t.index for t in self._outputs]
        # The input shapes of the last call that ran: a call with the same ones skips resizing.
        self._last_shapes: list[tuple[int, ...]] | None = None
        # The shape each input tensor is allocated at now; a request of other rows resizes it.
        self._allocated: dict[int, tuple[int, ...] | None] = {
            int(d["index"]): tuple(int(x) for x in d["shape"]) for d in input_details
        }
        # The interpreter is not safe to call from two threads at once.
        self._lock = threading.Lock()
        _log_quantized(model_path.name, input_details, output_details)
        logger.info(
            "tflite model loaded",
            extra={
                "model": model_path.name,
                "package": self.package,
                "threads": options.threads,
                "row_by_row": self.row_by_row,
            },
        )

    def signature(self) -> ModelSignature:
        """The model's inputs and outputs as the interpreter reports them (SignatureDef names
        when the model has one); batch dimensions a request may choose are None."""
        return ModelSignature(
            inputs=[c.spec() for c in self._checks],
            outputs=[
                TensorSpec(name=t.name, dtype=dtype_name(t.dtype), shape=t.shape)
                for t in self._outputs
            ],
        )

    def predict(self, data: Any) -> dict[str, Any]:
        """Score ``data`` (a list of rows, an array, or input name -> rows); outputs by name,
        as NumPy arrays."""
        arrays = feeds(data, self._checks)
        with self._lock:
            results = self._run_rows(arrays) if self.row_by_row else self._run(arrays)
        # The interpreter's outputs are always arrays: nothing for named_outputs to convert.
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        """Nothing to release beyond the interpreter, which goes with the last reference."""

    # -- running; called with the lock held --------------------------------------------------

    def _run(self, arrays: dict[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        interpreter = self._interpreter
        shapes = [arrays[t.name].shape for t in self._inputs]
        if shapes != self._last_shapes:
            self._last_shapes = None  # until a call with these shapes has run
            self._resize_to(arrays)
        try:
            for t in self._inputs:
                interpreter.set_tensor(t.index, arrays[t.name])  # C-contiguous (TensorInput)
            interpreter.invoke()
        except (ValueError, RuntimeError) as exc:
            # Dimensions the signature leaves free can still be wrong inside the graph.
            raise InputError(f"the model rejected the input: {exc}") from exc
        self._last_shapes = shapes
        return [interpreter.get_tensor(index) for index in self._output_indexes]

    def _resize_to(self, arrays: dict[str, npt.NDArray[Any]]) -> None:
        """Resize inputs whose free dimensions differ from the allocated ones, then allocate
        once. Called only when the shapes differ from the last call's."""
        changed = False
        try:
            for t in self._inputs:
                shape = arrays[t.name].shape
                if t.resizable and self._allocated[t.index] != shape:
                    # Forget the allocated shape first: if resizing fails half-way, the next
                    # call resizes again instead of trusting a shape that was never allocated.
                    self._allocated[t.index] = None
                    self._interpreter.resize_tensor_input(t.index, list(shape), strict=True)
                    changed = True
                    self._allocated[t.index] = shape
            if changed:
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            for t in self._inputs:
                self._allocated[t.index] = None
            shapes = {name: list(a.shape) for name, a in arrays.items()}
            raise InputError(f"the model cannot take inputs of shapes {shapes}: {exc}") from exc

    def _run_rows(self, arrays: dict[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        rows = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(rows.values())) > 1:
            raise InputError(f"every input needs the same number of rows; got {rows}")
        count = next(iter(rows.values()))
        if count == 0:
            return [
                np.empty((0, *(d or 0 for d in t.shape[1:])), dtype=t.dtype) for t in self._outputs
            ]
        per_row: list[list[npt.NDArray[Any]]] = [[] for _ in self._outputs]
        for i in range(count):
            results = self._run({name: a[i : i + 1] for name, a in arrays.items()})
            for collected, value in zip(per_row, results, strict=True):
                collected.append(value)
        return [np.concatenate(collected, axis=0) for collected in per_row]


def _log_quantized(model: str, *tensor_lists: list[dict[str, Any]]) -> None:
    """Say which tensors are quantized: requests must send them as the integers they hold."""
    quantized = {
        str(d["name"]): {"scale": float(d["quantization"][0]), "zero_point": d["quantization"][1]}
        for details in tensor_lists
        for d in details
        if d.get("quantization") and d["quantization"][0]
    }
    if quantized:
        logger.info("quantized tensors", extra={"model": model, "tensors": quantized})
