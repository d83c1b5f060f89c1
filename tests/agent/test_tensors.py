"""Request values becoming a model's input arrays: the checks every built-in runtime shares."""

import numpy as np
import pytest

from agent.errors import InputError
from agent.runtimes.tensors import PLAIN_ROWS_MAX_VALUES, TensorInput, _plain_rows, feeds

F32_MAX = float(np.finfo(np.float32).max)


def float32_rows() -> TensorInput:
    return TensorInput("input", np.float32, [None, 2])


def test_json_numbers_become_float32_and_values_past_its_range_are_refused() -> None:
    spec = float32_rows()
    array = spec.convert([[1.5, 2], [3, 4]])
    assert array.dtype == np.float32
    assert array.tolist() == [[1.5, 2.0], [3.0, 4.0]]
    # Each value fits though the sum of their squares is past the quick bound: the exact
    # check decides, and lets them through.
    big = spec.convert([[F32_MAX, -F32_MAX], [F32_MAX / 2, 1.0]])
    assert np.isfinite(big).all()
    for past in (1e39, -1e39, 1e300):
        with pytest.raises(InputError, match="out of range"):
            spec.convert([[1.0, past]])


def test_narrower_floats_and_wider_ones_from_npy_bodies() -> None:
    half = TensorInput("x", np.float16, [None])
    assert half.convert(np.array([1.0, 65504.0], dtype=np.float32)).dtype == np.float16
    with pytest.raises(InputError, match="out of range"):
        half.convert(np.array([1.0, 70000.0], dtype=np.float32))
    with pytest.raises(InputError, match="out of range"):
        half.convert(np.array([1e30], dtype=np.float32))  # squares overflow float32 itself
    # Integers fit float32 and wider whatever they are; float16 they may not.
    assert half.convert([1, -65504]).tolist() == [1.0, -65504.0]
    for value in ([1, 70000], np.array([70000], dtype=np.int64)):
        with pytest.raises(InputError, match="out of range"):
            half.convert(value)
    double = TensorInput("x", np.float64, [None])
    widened = double.convert(np.array([1.5], dtype=np.float32))
    assert widened.dtype == np.float64
    assert widened.tolist() == [1.5]


def test_nan_in_an_npy_body_reaches_the_model_as_before() -> None:
    """NaN is not out of range: the model's NaN output is what the endpoint refuses."""
    array = float32_rows().convert(np.array([[np.nan, 1.0]]))
    assert np.isnan(array[0, 0])


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([[True, False]], "non-numeric"),
        ([["1", "2"]], "non-numeric"),
        ([[None, 1.0]], "non-numeric"),
        ([[1.0, 2.0, 3.0]], r"got shape \[1, 3\]"),
        ([1.0, 2.0], r"got shape \[2\]"),
        ([[1.0], [1.0, 2.0]], "ragged"),
    ],
)
def test_wrong_values_are_refused_saying_what_was_expected(value: object, words: str) -> None:
    with pytest.raises(InputError, match=words) as raised:
        float32_rows().convert(value)
    assert "input 'input' expects float32 of shape [N, 2]" in raised.value.detail


def test_integer_inputs_refuse_fractions_and_overflow() -> None:
    spec = TensorInput("ids", np.int32, [None])
    assert spec.convert([1, 2.0]).tolist() == [1, 2]
    with pytest.raises(InputError, match="fractional"):
        spec.convert([1.5])
    with pytest.raises(InputError, match="out of range"):
        spec.convert([2**40])


def test_feeds_takes_rows_for_one_input_and_names_for_several() -> None:
    one = [float32_rows()]
    assert list(feeds([[1.0, 2.0]], one)) == ["input"]
    assert list(feeds({"input": [[1.0, 2.0]]}, one)) == ["input"]
    two = [TensorInput("a", np.float32, [None]), TensorInput("b", np.int64, [None])]
    arrays = feeds({"a": [1.0], "b": [2]}, two)
    assert arrays["b"].dtype == np.int64
    with pytest.raises(InputError, match="several inputs"):
        feeds([[1.0]], two)
    with pytest.raises(InputError, match=r"missing \['b'\]"):
        feeds({"a": [1.0]}, two)


def test_small_requests_of_plain_numbers_convert_as_numpy_would() -> None:
    """The Python check for small requests (_plain_rows) lets through only what numpy's own
    path would accept, and gives the same array."""
    spec = float32_rows()
    for rows in (
        [[1.5, 2]],
        [[-0.0, 1e-45], [F32_MAX, -F32_MAX]],
        [[2**60, -(2**60)]],
    ):
        fast = spec.convert(rows)
        assert _plain_rows(rows, 2, F32_MAX)
        exact = np.asarray(rows, dtype=np.float64).astype(np.float32).reshape(-1, 2)
        assert fast.dtype == np.float32
        assert fast.shape == exact.shape
        assert np.array_equal(fast, exact)
    for rows in (
        [[True, 1.0]],
        [[None, 1.0]],
        [[1.0, "2"]],
        [[1.0, 1e39]],
        [[1.0, float("nan")]],
        [[1.0]],
        [(1.0, 2.0)],
        [],
    ):
        assert not _plain_rows(rows, 2, F32_MAX), rows  # the numpy path decides these
    with pytest.raises(InputError, match=r"got shape \[0\]"):
        spec.convert([])


def test_large_requests_take_the_numpy_path_and_get_the_same_checks() -> None:
    spec = float32_rows()
    rows = [[float(i), 1.0] for i in range(PLAIN_ROWS_MAX_VALUES)]
    assert not _plain_rows(rows, 2, F32_MAX)
    assert spec.convert(rows).shape == (PLAIN_ROWS_MAX_VALUES, 2)
    rows[-1][0] = 1e300
    with pytest.raises(InputError, match="out of range"):
        spec.convert(rows)


def test_arrays_laid_out_otherwise_become_c_contiguous() -> None:
    """Runtimes copy raw memory: a column-major or strided .npy array is made C-contiguous
    (with or without a cast), so the model reads the values the request meant."""
    spec = float32_rows()
    rows = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    for value in (np.asfortranarray(rows), np.asfortranarray(rows.astype(np.float32)), rows[::2]):
        array = spec.convert(value)
        assert array.flags.c_contiguous
        assert array.tolist() == np.asarray(value).tolist()
