"""A model's load and health check tried first in a throwaway process (THREATS.md C4).

A validly signed model can still be corrupt, and a runtime's native code can crash on it:
onnxruntime had fuzzed models end the process with SIGSEGV (#4349, #4585). Loaded straight
into the agent, such a model would take down every model the agent serves, and then, after each
restart, again, until the install journal gave up on it. So a built-in runtime's model is first
loaded and health-checked in a child process, with the same code the agent runs:

- the child is killed by a signal: the model is refused (``ModelLoadError``, E_MODEL_LOAD),
  naming the signal and the child's last output, and is never loaded into the agent;
- the child does not finish within the time limit: refused the same way (a load that hangs
  would otherwise hold the install forever);
- the child fails with a Python error: the load in the agent gives the same error, and reports
  it as it always did (the trial adds nothing to the message);
- the child succeeds: the model is loaded into the agent.

Start-up loads go through the trial too, so a runtime upgraded under an installed model cannot
put the agent into a crash loop at boot. Entry scripts need no trial: their ``init()`` already
runs in their own worker process.

    python -m agent.runtimes.trial MODEL_DIR < manifest.json      (the child)
"""

import signal
import subprocess
import sys
from pathlib import Path

from agent.errors import ModelLoadError
from agent.failpoints import Failpoint, Failpoints
from agent.install import HealthChecker, RuntimeLoader
from agent.protocol.documents import Manifest
from agent.runtimes.base import Runtime

OUTPUT_TAIL_CHARS = 600


class TrialLoader:
    """``load_runtime`` with each built-in runtime's model tried in a child process first."""

    def __init__(self, load: RuntimeLoader, *, timeout_s: float) -> None:
        self._load = load
        self._timeout_s = timeout_s

    def __call__(self, model_dir: Path, manifest: Manifest) -> Runtime:
        if manifest.runtime.entry_script is None:
            try_in_child(model_dir, manifest, timeout_s=self._timeout_s)
        return self._load(model_dir, manifest)


def try_in_child(
    model_dir: Path, manifest: Manifest, *, timeout_s: float, what: str | None = None
) -> None:
    """Load and health-check the model in a child process; raise ``ModelLoadError`` when
    the child was killed by a signal or ran past ``timeout_s``. ``what`` names the model in
    the message (by default its name and version)."""
    what = what or f"{manifest.model.name} v{manifest.model.version}"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agent.runtimes.trial", str(model_dir)],
            input=manifest.model_dump_json().encode(),
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise ModelLoadError(
            f"loading {what} did not finish within {timeout_s:g} s in a trial process;"
            " it was not loaded into the agent"
        ) from None
    if done.returncode < 0:
        try:
            how = signal.Signals(-done.returncode).name
        except ValueError:
            how = f"signal {-done.returncode}"
        tail = done.stderr.decode("utf-8", "replace").strip()[-OUTPUT_TAIL_CHARS:]
        raise ModelLoadError(
            f"loading {what} killed a trial process with {how}"
            + (f" (its last output: {tail})" if tail else "")
            + "; it was not loaded into the agent"
        )


def _child(model_dir: Path, load: RuntimeLoader, check: HealthChecker) -> int:
    manifest = Manifest.model_validate_json(sys.stdin.buffer.read())
    # A fault injected here stands for a runtime crashing on the model (tests, THREATS C4).
    Failpoints.from_env().hit(Failpoint.IN_TRIAL_LOAD)
    runtime = load(model_dir, manifest)
    try:
        check(runtime, model_dir, manifest.health_check)
    finally:
        runtime.close()
    return 0


if __name__ == "__main__":
    from agent.runtimes import load_runtime
    from agent.runtimes.health import check_health

    # A Python error exits 1 with its traceback on stderr; the agent's own load reports it.
    sys.exit(_child(Path(sys.argv[1]), load_runtime, check_health))
