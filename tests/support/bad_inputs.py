"""Requests the iris model (one float32 input of shape [N, 4]) must refuse, with the words each
refusal must use: shared by every built-in runtime's tests, since they give the same 400s."""

from typing import Any

IRIS_BAD_INPUTS: list[tuple[Any, str]] = [
    ([[1.0, 2.0, 3.0]], r"got shape \[1, 3\]"),
    ([1.0, 2.0, 3.0, 4.0], r"got shape \[4\]"),
    ([[1, 2, 3, 4], [1, 2]], "ragged"),
    ([["a", "b", "c", "d"]], "non-numeric"),
    ([[True, False, True, False]], "non-numeric"),
    ([[None, 1, 2, 3]], "non-numeric"),
    ({"x": [[1, 2, 3, 4]]}, r"missing \['input'\], unknown \['x'\]"),
    ("1,2,3,4", "list of rows"),
    (None, "list of rows"),
    ([[1e300, 1, 1, 1]], "out of range"),
]
IRIS_EXPECTATION = "'input' expects float32 of shape [N, 4]"
