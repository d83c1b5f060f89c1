"""Turning a scoring request's data into a model's input arrays, checked against its signature.

Shared by every built-in runtime, so a wrong request gets the same 400 from ONNX Runtime and
LiteRT, naming the input, dtype and shape the model expects instead of a runtime's message
about node internals. Data is a list of rows for a model with one input, or an object of input
name to rows; a NumPy array (from an ``.npy`` body) is taken as it is, after the same checks.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import InputError
from agent.protocol.documents import TensorSpec

Shape = list[int | None]


def free_shape(dims: Any) -> Shape:
    """Fixed dimensions as ints; symbolic or unknown ones (``"N"``, ``None``, ``-1``) as None."""
    if not isinstance(dims, Sequence) or isinstance(dims, str):
        return []
    return [int(d) if isinstance(d, int | np.integer) and d >= 0 else None for d in dims]


def shape_text(shape: Shape) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def dtype_name(dtype: npt.DTypeLike) -> str:
    """The name a signature uses: ``float32``, ``int64``, ``bool``, ``string``."""
    resolved = np.dtype(dtype)
    if resolved.kind in "OUS":
        return "string"
    return resolved.name


def json_ready(value: Any) -> Any:
    """Arrays, numpy scalars and the maps/sequences runtimes return, as plain JSON values."""
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


def named_outputs(names: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
    """A runtime's outputs by name: arrays stay arrays (the endpoint writes them as JSON without
    a detour through Python lists), anything else becomes JSON values."""
    return {
        name: value if isinstance(value, np.ndarray) else json_ready(value)
        for name, value in zip(names, values, strict=True)
    }


def non_finite(outputs: Mapping[str, Any]) -> str | None:
    """The name of the first output holding NaN or infinity, or None."""
    for name, value in outputs.items():
        if _holds_non_finite(value):
            return name
    return None


def _holds_non_finite(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "fc" and not bool(np.isfinite(value).all())
    if isinstance(value, float | np.floating):
        return not math.isfinite(value)
    if isinstance(value, Mapping):
        return any(_holds_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_non_finite(v) for v in value)
    return False


PLAIN_ROWS_MAX_VALUES = 1024


def _plain_rows(rows: list[Any], width: int, largest: float) -> bool:
    """Whether ``rows`` is a small list of ``width``-long lists of plain numbers (ints and
    floats, not bools) within ±``largest``: then ``np.array(rows, dtype=...)`` is exact.

    Why: on a device's cold CPU between requests each numpy call costs ~10-20 µs of a call's
    latency, whatever its size, and a JSON request needs three to be checked (read, cast,
    range). Checking a few hundred numbers in Python costs less. Anything else (bigger, nested
    otherwise, other values) returns False, and the numpy path checks it and says what is wrong.
    """
    if not rows or len(rows) * width > PLAIN_ROWS_MAX_VALUES:
        return False  # [] has no rows to be of the width: numpy's path refuses its shape
    for row in rows:
        if type(row) is not list or len(row) != width:
            return False
        for number in row:
            kind = type(number)
            if (kind is not float and kind is not int) or not -largest <= number <= largest:
                return False  # NaN fails the comparison too
    return True


class TensorInput:
    """One declared model input and how to turn a request's value into an array for it.

    ``dtype`` None means the runtime gave a type no JSON value can become (a sequence or map
    input); such an input is reported in the signature and refused with a clear 400.
    """

    def __init__(
        self, name: str, dtype: npt.DTypeLike | None, shape: Shape, *, type_name: str = ""
    ) -> None:
        self.name = name
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.dtype_name = type_name if self.dtype is None else dtype_name(self.dtype)
        self.shape = shape
        self._ndim = len(shape)
        self._fixed = [(i, size) for i, size in enumerate(shape) if size is not None]
        is_float = self.dtype is not None and self.dtype.kind == "f"
        largest = float(np.finfo(self.dtype).max) if is_float else 0.0
        # Below this sum of squares every value fits the float dtype (0: no such bound; float64
        # squared is past a Python float, and nothing narrower is cast to it).
        square = largest * largest
        self._square_limit = square if math.isfinite(square) else 0.0
        # (width, largest value) for a float input of rows of fixed width: small requests of
        # plain numbers are checked in Python (see _plain_rows).
        self._row_width: tuple[int, float] | None = None
        if is_float and len(shape) == 2 and shape[1]:
            self._row_width = (shape[1], largest)

    def spec(self) -> TensorSpec:
        return TensorSpec(name=self.name, dtype=self.dtype_name, shape=self.shape)

    def expectation(self) -> str:
        return f"input {self.name!r} expects {self.dtype_name} of shape {shape_text(self.shape)}"

    def convert(self, value: Any) -> npt.NDArray[Any]:
        """``value`` as a C-contiguous array of this input's dtype and shape, or ``InputError``
        saying why.

        On every scoring call: the common case (numbers for a float input) takes the fewest
        steps, since this is a large part of the agent's own cost per call.
        """
        target = self.dtype
        if target is None:
            raise InputError(f"input {self.name!r} has type {self.dtype_name}, not supported")
        if self._row_width and type(value) is list and _plain_rows(value, *self._row_width):
            # Checked in Python already: one numpy call instead of three (see _plain_rows).
            return np.array(value, dtype=target)
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as exc:
            # numpy refuses ragged nesting ("inhomogeneous shape").
            raise InputError(f"{self.expectation()}; got a ragged or invalid array") from exc
        if array.dtype != target:
            array = self._cast(array, target)
        shape = array.shape
        if len(shape) != self._ndim:
            raise InputError(f"{self.expectation()}; got shape {list(shape)}")
        for i, size in self._fixed:
            if shape[i] != size:
                raise InputError(f"{self.expectation()}; got shape {list(shape)}")
        if type(value) is np.ndarray and not array.flags.c_contiguous:
            # Runtimes copy raw memory. Only an array from a .npy body (transposed, say) can
            # be laid out otherwise; arrays made from JSON never are.
            array = array.copy(order="C")
        return array

    def _cast(self, raw: npt.NDArray[Any], target: np.dtype[Any]) -> npt.NDArray[Any]:
        kind = raw.dtype.kind
        if target.kind == "f":
            # JSON booleans are numbers to numpy; a model asking for numbers wants numbers.
            if kind not in "iuf":
                raise InputError(f"{self.expectation()}; got non-numeric values")
            # Narrowing floats (JSON's float64 to a float32 input) may overflow. The sum of
            # squares (one BLAS call) bounds every value, so only a request with large values
            # pays for the exact check below (~4 µs a call saved on the common one). Integers
            # fit float32 and wider whatever they are; float16 they may not (70000).
            if kind == "f" and raw.dtype.itemsize <= target.itemsize:
                return raw.astype(target)
            if kind != "f" and target.itemsize >= 4:
                return raw.astype(target)
            if kind == "f" and np.vdot(raw, raw) <= self._square_limit:
                return raw.astype(target)
        elif target.kind in "iu":
            if kind not in "iuf":
                raise InputError(f"{self.expectation()}; got non-numeric values")
            if kind == "f" and not np.all(np.mod(raw, 1) == 0):
                raise InputError(f"{self.expectation()}; got fractional values")
        elif target.kind in "OUS":
            if kind not in "US":
                raise InputError(f"{self.expectation()}; got non-string values")
            return raw.astype(target)
        else:  # bool
            raise InputError(f"{self.expectation()}; got non-boolean values")
        try:
            with np.errstate(over="raise", invalid="raise"):
                array = raw.astype(target, casting="unsafe")
            if target.kind != "f" and not np.array_equal(array, raw):
                raise OverflowError
        except (OverflowError, FloatingPointError) as exc:
            raise InputError(f"{self.expectation()}; values out of range") from exc
        return array


def feeds(data: Any, inputs: Sequence[TensorInput]) -> dict[str, npt.NDArray[Any]]:
    """Request data as one array per input: a list of rows (or an array) for a model with one
    input, an object of input name to rows for any model."""
    if type(data) is list and len(inputs) == 1:  # the common JSON case, first
        only = inputs[0]
        return {only.name: only.convert(data)}
    if type(data) is dict or isinstance(data, Mapping):  # dict: the JSON case, checked fast
        names = {i.name for i in inputs}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise InputError(
                f"data must name the inputs {sorted(names)}; "
                f"missing {missing}, unknown {unknown}; "
                + "; ".join(i.expectation() for i in inputs)
            )
        return {i.name: i.convert(data[i.name]) for i in inputs}
    if len(inputs) > 1:
        raise InputError(
            "this model has several inputs; send data as an object of input name to rows: "
            + "; ".join(i.expectation() for i in inputs)
        )
    if not isinstance(data, list | np.ndarray):
        raise InputError(f"data must be a list of rows; {inputs[0].expectation()}")
    return {inputs[0].name: inputs[0].convert(data)}
