"""Model runtimes shared between simulated devices that install the same model.

A thousand devices running the same package would otherwise hold a thousand copies of one
onnxruntime session. Sessions are safe to ``run()`` from several threads, so devices whose
packages carry the same model file (by sha256) with the same framework and runtime options share
one loaded runtime; each device still unpacks, verifies and health-checks its own copy.
"""

import logging
import threading
from pathlib import Path

from agent.install import RuntimeLoader
from agent.protocol.canonical import canonical_bytes
from agent.protocol.documents import Manifest
from agent.runtimes import load_runtime
from agent.runtimes.base import Runtime

logger = logging.getLogger(__name__)

RuntimeKey = tuple[str, str, bytes]  # framework, model file sha256, canonical runtime options


def runtime_key(manifest: Manifest) -> RuntimeKey | None:
    """What makes two loaded runtimes interchangeable; None when they must not be shared: the
    manifest lacks the file, or the model runs through an entry script (each device's own
    worker process, which the agent closes when the version is replaced)."""
    if manifest.runtime.kind != "builtin":
        return None
    for entry in manifest.files:
        if entry.path == manifest.runtime.model_file:
            # The options (threads, ...) shape the session, so they are part of the key.
            options = canonical_bytes(dict(manifest.runtime.options))
            return (str(manifest.model.framework), entry.sha256, options)
    return None


class SharedRuntimes:
    """A ``RuntimeLoader`` that loads each distinct model once and hands the same runtime out.

    Called from the event loop's worker threads (installs run in ``asyncio.to_thread``), so it
    locks; a per-key lock makes concurrent installs of one model wait for a single load instead
    of loading it N times. A failed load is not cached: the next device tries again.
    """

    def __init__(self, load: RuntimeLoader = load_runtime) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._key_locks: dict[RuntimeKey, threading.Lock] = {}
        self._runtimes: dict[RuntimeKey, Runtime] = {}
        self.loads = 0
        self.hits = 0

    def __call__(self, model_dir: Path, manifest: Manifest) -> Runtime:
        key = runtime_key(manifest)
        if key is None:
            # The real loader reports what is wrong with the manifest.
            return self._load(model_dir, manifest)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                cached = self._runtimes.get(key)
                if cached is not None:
                    self.hits += 1
                    return cached
            runtime = self._load(model_dir, manifest)
            with self._lock:
                self._runtimes[key] = runtime
                self.loads += 1
        logger.info(
            "loaded shared runtime",
            extra={"model": manifest.model.name, "version": manifest.model.version},
        )
        return runtime

    def __len__(self) -> int:
        with self._lock:
            return len(self._runtimes)
