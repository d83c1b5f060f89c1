"""Model runtimes: how a verified package's model is loaded and called."""

import importlib.util
from pathlib import Path

from agent.errors import IncompatibleError
from agent.protocol.documents import Framework, Manifest
from agent.runtimes.base import Runtime


def load_runtime(model_dir: Path, manifest: Manifest) -> Runtime:
    """Load the manifest's model from ``model_dir`` (the package's files) with its framework."""
    framework = manifest.model.framework
    if framework is Framework.ONNX:
        # Imported here so a device without onnxruntime can still run other frameworks.
        from agent.runtimes.onnx import OnnxRuntime

        return OnnxRuntime.from_manifest(model_dir, manifest)
    if framework is Framework.TFLITE:
        raise IncompatibleError("tflite runtime arrives later")
    raise IncompatibleError(f"no runtime for framework {framework!r}")


def available_frameworks() -> list[str]:
    """The frameworks this device can load, reported to the hub so a deployment skips devices
    that could not run its model instead of sending them a package they must refuse."""
    found = []
    if importlib.util.find_spec("onnxruntime") is not None:
        found.append(str(Framework.ONNX))
    return found
