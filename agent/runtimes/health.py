"""The install-time health check: the package's sample input must give its expected output.

Runs in the caller's thread: for the models we ship it is microseconds of CPU work.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import HealthCheckError, InputError, ModelCallError
from agent.protocol.documents import HealthCheck
from agent.runtimes.base import Runtime
from agent.runtimes.tensors import json_ready, non_finite


def _read_json(files_dir: Path, relative: str, what: str) -> Any:
    path = (files_dir / relative).resolve()
    if not path.is_relative_to(files_dir.resolve()):
        raise HealthCheckError(f"{what} {relative!r} is outside the package files")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HealthCheckError(f"{what} {relative!r} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HealthCheckError(f"{what} {relative!r} is not valid JSON: {exc}") from exc


def _numeric(value: Any) -> np.ndarray[Any, Any] | None:
    """``value`` as a float array if it is a rectangular array of numbers (not booleans)."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return None
    if array.dtype.kind not in "iuf":
        return None
    return array.astype(np.float64)


def _compare(name: str, actual: Any, expected: Any, check: HealthCheck) -> None:
    want = _numeric(expected)
    got = _numeric(actual)
    if want is not None and got is not None:
        if want.shape != got.shape:
            raise HealthCheckError(
                f"output {name!r} has shape {list(got.shape)}, expected {list(want.shape)}"
            )
        if not np.allclose(got, want, rtol=check.rtol, atol=check.atol):
            diff = float(np.max(np.abs(got - want))) if got.size else 0.0
            raise HealthCheckError(
                f"output {name!r} differs from the expected output: max abs diff {diff:.3g}"
                f" (rtol {check.rtol}, atol {check.atol})"
            )
        return
    # Labels, strings, maps: compare as JSON, so tuples equal lists and int keys equal strings.
    if json.loads(json.dumps(json_ready(actual))) != expected:
        raise HealthCheckError(f"output {name!r} is not the expected value")


def check_health(runtime: Runtime, files_dir: Path, check: HealthCheck) -> None:
    """Run the sample input; raise ``HealthCheckError`` unless it gives the expected output."""
    sample = _read_json(files_dir, check.input, "sample input")
    # The sample is what a scoring request's "data" carries; accept the whole request too.
    if isinstance(sample, dict) and "data" in sample:
        sample = sample["data"]
    expected = _read_json(files_dir, check.expected_output, "expected output")

    try:
        outputs = runtime.predict(sample)
    except InputError as exc:
        raise HealthCheckError(f"the model rejected its own sample input: {exc.detail}") from exc
    except ModelCallError as exc:
        raise HealthCheckError(f"the model failed on its sample input: {exc.detail}") from exc
    if not outputs:
        raise HealthCheckError("the model returned no outputs")
    broken = non_finite(outputs)
    if broken is not None:
        raise HealthCheckError(f"output {broken!r} contains NaN or infinity")

    if isinstance(expected, dict):
        if not expected:
            raise HealthCheckError("expected output names no outputs")
        pairs = list(expected.items())
    elif isinstance(expected, list):
        pairs = [(next(iter(outputs)), expected)]
    else:
        raise HealthCheckError("expected output must be an object of outputs or a list")
    for name, want in pairs:
        if name not in outputs:
            raise HealthCheckError(
                f"expected output {name!r} is not among the model's outputs {list(outputs)}"
            )
        _compare(name, outputs[name], want, check)
