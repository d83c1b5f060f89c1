"""JSON with NumPy values, the one way the agent writes a model's outputs (the scoring answer and
the data-collection record), so both say the same numbers: float32 values in their shortest
float32 form, written by orjson straight from the arrays."""

import json
from typing import Any

import orjson


class JsonText:
    """JSON already written (an entry script's answer, as its worker wrote it): written out as
    it is by ``to_json``, and read only when someone asks for its value."""

    __slots__ = ("_value", "text")

    _UNREAD: Any = object()

    def __init__(self, text: bytes) -> None:
        self.text = text
        self._value: Any = JsonText._UNREAD

    def value(self) -> Any:
        """The value the text holds (the stdlib's reader: integers of any size stay exact)."""
        if self._value is JsonText._UNREAD:
            self._value = json.loads(self.text)
        return self._value

    def __repr__(self) -> str:
        return f"JsonText({self.text[:60]!r})"


def _numpy_default(value: Any) -> Any:
    if type(value) is JsonText:
        return orjson.Fragment(value.text)
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
