"""Model runtimes: how a verified package's model is loaded and called."""

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from agent.errors import IncompatibleError, InputError, ModelCallError, ModelLoadError
from agent.protocol.documents import Framework, Manifest
from agent.runtimes.base import Runtime
from agent.runtimes.options import (
    OnnxOptions,
    OptionsError,
    RuntimeOptions,
    ScriptOptions,
    TfliteOptions,
    options_of,
)

logger = logging.getLogger(__name__)


def _construct(model_dir: Path, manifest: Manifest, options: RuntimeOptions) -> Runtime:
    framework = manifest.model.framework
    # Runtimes are imported here, so a device without onnxruntime can run other frameworks.
    if isinstance(options, ScriptOptions):
        from agent.runtimes.script import ScriptRuntime

        return ScriptRuntime.start(model_dir, manifest, options)
    if framework is Framework.ONNX and isinstance(options, OnnxOptions):
        from agent.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(model_dir / manifest.runtime.model_file, options)
    if framework is Framework.TFLITE and isinstance(options, TfliteOptions):
        from agent.runtimes.tflite import TfliteRuntime

        return TfliteRuntime(model_dir / manifest.runtime.model_file, options)
    raise IncompatibleError(f"no runtime for framework {framework!r}")


def _warm_up(runtime: Runtime, model_dir: Path, manifest: Manifest, runs: int) -> None:
    """Run the health-check sample ``runs`` times, so the first real call is not the slow one."""
    try:
        sample: Any = json.loads((model_dir / manifest.health_check.input).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # the health check that follows says what is wrong with the sample
    if isinstance(sample, dict) and "data" in sample:
        sample = sample["data"]
    started = time.perf_counter()
    try:
        for _ in range(runs):
            runtime.predict(sample)
    except (InputError, ModelCallError):
        return  # likewise: the health check reports it
    logger.info(
        "warmed up",
        extra={
            "model": manifest.model.name,
            "runs": runs,
            "ms": round((time.perf_counter() - started) * 1000, 3),
        },
    )


def load_runtime(model_dir: Path, manifest: Manifest) -> Runtime:
    """Load the manifest's model from ``model_dir`` (the package's files) with its inference
    config: the framework's built-in runtime or the entry script, with its options."""
    try:
        options = options_of(manifest.model.framework, manifest.runtime)
    except OptionsError as exc:
        raise IncompatibleError(str(exc)) from None
    runtime = _construct(model_dir, manifest, options)
    if options.warmup:
        try:
            _warm_up(runtime, model_dir, manifest, options.warmup)
        except Exception as exc:
            runtime.close()
            raise ModelLoadError(f"the model failed while warming up: {exc}") from exc
    return runtime


def available_frameworks() -> list[str]:
    """The frameworks this device can load, reported to the hub so a deployment skips devices
    that could not run its model instead of sending them a package they must refuse."""
    found = []
    if importlib.util.find_spec("onnxruntime") is not None:
        found.append(str(Framework.ONNX))
    if any(importlib.util.find_spec(m) is not None for m in ("ai_edge_litert", "tflite_runtime")):
        found.append(str(Framework.TFLITE))
    return found
