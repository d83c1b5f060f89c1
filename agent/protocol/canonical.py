"""The canonical bytes that get signed.

Signatures are made over a JSON document serialised one fixed way, so both sides produce the same
bytes from the same data: keys sorted, no insignificant whitespace, UTF-8, no NaN or infinity.
Signed documents carry times as ISO 8601 strings and sizes as integers; the only floats are
tolerances, which Python's shortest round-trip float repr makes stable.
"""

import json
from typing import Any


class CanonicalizationError(ValueError):
    """The value cannot be written canonically (NaN, infinity, or a type JSON does not have)."""


def canonical_bytes(value: Any) -> bytes:
    """Serialise ``value`` to its canonical JSON bytes."""
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise CanonicalizationError(str(exc)) from exc
    return text.encode("utf-8")
