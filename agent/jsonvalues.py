"""JSON with NumPy values, the one way the agent writes a model's outputs (the scoring answer and
the data-collection record), so both say the same numbers: float32 values in their shortest
float32 form, written by orjson straight from the arrays."""

from typing import Any

import orjson


def _numpy_default(value: Any) -> Any:
    # What orjson's own NumPy support leaves out: strings, objects, float16 and the like.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def to_json(value: Any) -> bytes:
    """JSON bytes; NaN and infinity become null (check for them first where they matter)."""
    return orjson.dumps(value, default=_numpy_default, option=orjson.OPT_SERIALIZE_NUMPY)


def plain(value: Any) -> Any:
    """``value`` with arrays as the lists and numbers its JSON says."""
    return orjson.loads(to_json(value))
