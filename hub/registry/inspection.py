"""Opening a model at registration: record its signature and run the sample input.

A model whose sample input does not give the expected output is refused here, so the person
registering it learns at once, not from a fleet of devices failing their health checks. The
check is the devices' own: the model is loaded by the agent's runtime for its framework
(``agent.runtimes``) and judged by the agent's health check, with the tolerances a package's
manifest carries, so what the hub accepts a device accepts, and a refusal reads the same here
as in a device's report.

The model is first loaded and checked in a throwaway process (``agent.runtimes.trial``, THREATS.md
C4): an uploaded model that crashes or hangs its runtime is refused, and cannot take the hub
down with it.

Sample input files hold either ``{"data": ...}`` (a scoring request), an object keyed by input
name, or the value of the single input. Expected output files hold an object keyed by output name
(only the named outputs are compared) or the value of the first output.
"""

import json
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.errors import HealthCheckError, IncompatibleError, ModelLoadError
from agent.external_data import external_locations
from agent.protocol.documents import (
    Framework,
    HealthCheck,
    Manifest,
    ModelInfo,
    ModelSignature,
    RuntimeSpec,
)
from agent.runtimes.base import Runtime
from agent.runtimes.health import check_health
from agent.runtimes.trial import try_in_child
from hub.errors import ModelCheckFailed

logger = logging.getLogger(__name__)

SAMPLE_FILE = "sample_input.json"
EXPECTED_FILE = "expected_output.json"
# The manifest's defaults: the tolerance every device will check this model with.
CHECK = HealthCheck(input=SAMPLE_FILE, expected_output=EXPECTED_FILE)
# A registration waits for this; a model loads in seconds, a hanging one is refused.
TRIAL_TIMEOUT_S = 120.0


def _try_apart(framework: Framework, model_path: Path) -> None:
    """Load and check the model in a child process first; ``ModelCheckFailed`` when the
    runtime crashed or hung on it. Other failures are left to the load that follows, which
    says what is wrong as it would without the trial."""
    manifest = Manifest(
        model=ModelInfo(name="model", version=1, framework=framework),
        runtime=RuntimeSpec(model_file=model_path.name),
        files=[],
        health_check=CHECK,
        created_at=datetime.now(UTC),
    )
    try:
        try_in_child(
            model_path.parent, manifest, timeout_s=TRIAL_TIMEOUT_S, what="the uploaded model"
        )
    except ModelLoadError as exc:
        raise ModelCheckFailed(f"cannot load the model: {exc.detail}") from None


def _load(framework: Framework, model_path: Path) -> Runtime:
    # Runtimes are imported when used: each pulls in its framework's native library.
    if framework is Framework.ONNX:
        from agent.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(model_path)
    from agent.runtimes.tflite import TfliteRuntime

    return TfliteRuntime(model_path)


def _refuse_external_data(model_bytes: bytes) -> None:
    """An ONNX model that keeps tensors in other files is refused: only the model file is
    opened here, and a location such as ``../../keys/...`` must never be read on the hub
    (THREATS.md E6). onnxruntime could not load such a model from the hub's copy anyway."""
    try:
        locations = external_locations(model_bytes)
    except ModelLoadError as exc:
        raise ModelCheckFailed(f"cannot load the model: {exc.detail}") from None
    if locations:
        raise ModelCheckFailed(
            f"the model keeps tensors in other files {sorted(set(locations))}; the registry "
            "checks models whose weights are inside the model file"
        )


def inspect_model(
    framework: Framework, model_bytes: bytes, sample_input: Any, expected_output: Any
) -> ModelSignature:
    """Load the model with the agent's runtime for ``framework``, run the sample input and
    compare with the expected output; returns the model's signature.

    A TFLite model is taken on trust (empty signature, a warning) when the hub has no TFLite
    interpreter installed; the devices' health check still guards it.
    """
    if framework is Framework.ONNX:
        _refuse_external_data(model_bytes)
    with tempfile.TemporaryDirectory(prefix="outpost-model-check-") as tmp:
        files = Path(tmp)
        model_path = files / f"model.{framework}"
        model_path.write_bytes(model_bytes)
        (files / SAMPLE_FILE).write_text(json.dumps(sample_input), encoding="utf-8")
        (files / EXPECTED_FILE).write_text(json.dumps(expected_output), encoding="utf-8")
        _try_apart(framework, model_path)
        try:
            runtime = _load(framework, model_path)
        except IncompatibleError as exc:
            logger.warning(
                "no runtime on the hub to check this model; accepted unchecked",
                extra={"framework": str(framework), "reason": exc.detail},
            )
            return ModelSignature()
        except ModelLoadError as exc:
            raise ModelCheckFailed(f"cannot load the model: {exc.detail}") from None
        try:
            signature = runtime.signature()
            check_health(runtime, files, CHECK)
        except HealthCheckError as exc:
            raise ModelCheckFailed(
                f"the model fails the health check devices will run: {exc.detail}"
            ) from None
        finally:
            runtime.close()
    logger.info(
        "model check passed",
        extra={
            "framework": str(framework),
            "inputs": len(signature.inputs),
            "outputs": len(signature.outputs),
        },
    )
    return signature
