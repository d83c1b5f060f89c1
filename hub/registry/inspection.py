"""Opening a model at registration: record its signature and run the sample input.

A model whose sample input does not give the expected output is refused here, so the person
registering it learns at once, not from a fleet of devices failing their health checks.

Sample input files hold either ``{"data": ...}`` (a scoring request), an object keyed by input
name, or the value of the single input. Expected output files hold an object keyed by output name
(only the named outputs are compared) or the value of the first output.
"""

import logging
from typing import Any

import numpy as np

from agent.protocol.documents import Framework, ModelSignature, TensorSpec
from hub.errors import ModelCheckFailed

logger = logging.getLogger(__name__)

RTOL = 1e-4
ATOL = 1e-5

_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}


def _shape(raw: Any) -> list[int | None]:
    # Symbolic dimensions ("batch", None) are free; only fixed sizes are part of the signature.
    return [d if isinstance(d, int) and d >= 0 else None for d in (raw or [])]


def _feed(sample: Any, inputs: list[TensorSpec]) -> dict[str, Any]:
    if isinstance(sample, dict) and set(sample) == {"data"}:
        sample = sample["data"]
    names = [t.name for t in inputs]
    if isinstance(sample, dict):
        missing = [n for n in names if n not in sample]
        if missing:
            raise ModelCheckFailed(f"sample input lacks model inputs {missing}; model has {names}")
        values = {n: sample[n] for n in names}
    elif len(inputs) == 1:
        values = {names[0]: sample}
    else:
        raise ModelCheckFailed(
            f"model has {len(names)} inputs {names}; the sample input must be an object keyed by "
            "input name"
        )
    feed: dict[str, Any] = {}
    for spec in inputs:
        dtype = spec.dtype if spec.dtype != "str" else "object"
        try:
            feed[spec.name] = np.asarray(values[spec.name], dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise ModelCheckFailed(
                f"sample input {spec.name!r} cannot be read as {spec.dtype}: {exc}"
            ) from None
    return feed


def _matches(actual: Any, expected: Any) -> tuple[bool, str]:
    got = np.asarray(actual)
    want = np.asarray(expected)
    if got.shape != want.shape:
        return False, f"shape {list(got.shape)} != expected {list(want.shape)}"
    if got.dtype.kind in "fciub" and want.dtype.kind in "fciub":
        if np.allclose(got, want, rtol=RTOL, atol=ATOL):
            return True, ""
        worst = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
        return False, f"values differ (max abs difference {worst:.3g}, rtol {RTOL}, atol {ATOL})"
    if np.array_equal(got.astype(str), want.astype(str)):
        return True, ""
    return False, "values differ"


def inspect_onnx(model_bytes: bytes, sample_input: Any, expected_output: Any) -> ModelSignature:
    """Load an ONNX model, run the sample input and compare; returns the model's signature."""
    import onnxruntime as ort  # heavy; only the registry needs it

    try:
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unexported error types
        raise ModelCheckFailed(f"onnxruntime cannot load the model: {exc}") from None
    inputs = [
        TensorSpec(name=i.name, dtype=_ONNX_DTYPES.get(i.type, i.type), shape=_shape(i.shape))
        for i in session.get_inputs()
    ]
    outputs = [
        TensorSpec(name=o.name, dtype=_ONNX_DTYPES.get(o.type, o.type), shape=_shape(o.shape))
        for o in session.get_outputs()
    ]
    feed = _feed(sample_input, inputs)
    try:
        results = session.run(None, feed)
    except Exception as exc:  # shape or type errors surface as onnxruntime's own types
        raise ModelCheckFailed(f"running the sample input failed: {exc}") from None
    by_name = dict(zip([o.name for o in outputs], results, strict=True))
    if isinstance(expected_output, dict):
        unknown = [k for k in expected_output if k not in by_name]
        if unknown:
            raise ModelCheckFailed(
                f"expected output names {unknown} are not model outputs {list(by_name)}"
            )
        pairs = [(k, by_name[k], v) for k, v in expected_output.items()]
    else:
        pairs = [(outputs[0].name, results[0], expected_output)]
    for name, actual, expected in pairs:
        try:
            ok, why = _matches(actual, expected)
        except (TypeError, ValueError) as exc:
            ok, why = False, str(exc)
        if not ok:
            raise ModelCheckFailed(
                f"sample input does not give the expected output for {name!r}: {why}"
            )
    logger.info("model check passed", extra={"inputs": len(inputs), "outputs": len(outputs)})
    return ModelSignature(inputs=inputs, outputs=outputs)


def inspect_model(
    framework: Framework, model_bytes: bytes, sample_input: Any, expected_output: Any
) -> ModelSignature:
    """Check a model of any framework; frameworks the hub cannot run are taken on trust."""
    if framework is Framework.ONNX:
        return inspect_onnx(model_bytes, sample_input, expected_output)
    # The hub does not carry the TFLite runtime; the device's health check still guards it.
    logger.info("no registration check for framework", extra={"framework": str(framework)})
    return ModelSignature()
