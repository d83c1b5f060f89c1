"""THREATS.md C4: a model that crashes or hangs its runtime is refused without taking the agent
down, because it is loaded and health-checked in a trial process first. The crash and the hang
are injected in that real child process (failpoint ``in_trial_load``), as a runtime's native
code would crash or hang in it."""

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from agent.archive import ArchiveLimits
from agent.errors import ModelLoadError
from agent.failpoints import ENV_VAR as FAILPOINT_ENV
from agent.install import ModelStore, TrustContext
from agent.protocol.documents import Manifest
from agent.runtimes import load_runtime
from agent.runtimes.health import check_health
from agent.runtimes.trial import TrialLoader
from tests.support.repository import RepositorySimulator


def _store(root: Path, timeout_s: float = 120) -> ModelStore:
    return ModelStore(
        root,
        load_runtime=TrialLoader(load_runtime, timeout_s=timeout_s),
        check_health=check_health,
        limits=ArchiveLimits(),
    )


def _install(store: ModelStore, tmp_path: Path, package: Any, trust: TrustContext) -> Any:
    archive = tmp_path / f"{hashlib.sha256(package.data).hexdigest()}.tar"
    archive.write_bytes(package.data)
    return store.install(archive, package.ref, trust, lambda _step: None)


def test_a_model_that_loads_in_the_trial_is_loaded_into_the_agent(
    tmp_path: Path, repo: RepositorySimulator, files: dict[str, bytes], trust: TrustContext
) -> None:
    active = _install(_store(tmp_path / "models"), tmp_path, repo.build_package(files), trust)
    assert active.runtime.predict([[5.1, 3.5, 1.4, 0.2]])["label"].tolist() == [0]
    active.runtime.close()


@pytest.mark.parametrize("crash", ["segv", "kill"])
def test_a_runtime_crashing_on_the_model_is_refused_and_the_old_version_keeps_serving(
    tmp_path: Path,
    repo: RepositorySimulator,
    files: dict[str, bytes],
    trust: TrustContext,
    monkeypatch: pytest.MonkeyPatch,
    crash: str,
) -> None:
    store = _store(tmp_path / "models")
    v1 = _install(store, tmp_path, repo.build_package(files, version=1), trust)
    monkeypatch.setenv(FAILPOINT_ENV, f"in_trial_load:{crash}")
    with pytest.raises(ModelLoadError) as refused:
        _install(store, tmp_path, repo.build_package(files, version=2), trust)
    signal_name = "SIGSEGV" if crash == "segv" else "SIGKILL"
    assert f"loading iris v2 killed a trial process with {signal_name}" in str(refused.value)
    assert "it was not loaded into the agent" in str(refused.value)
    assert refused.value.reason == "E_MODEL_LOAD"
    # This process (the agent) lives on, still on v1, which still answers.
    assert store.pointer("iris").version == 1  # type: ignore[union-attr]
    assert v1.runtime.predict([[5.1, 3.5, 1.4, 0.2]])["label"].tolist() == [0]
    v1.runtime.close()


def test_a_runtime_hanging_on_the_model_is_refused_after_the_time_limit(
    tmp_path: Path,
    repo: RepositorySimulator,
    files: dict[str, bytes],
    trust: TrustContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(FAILPOINT_ENV, "in_trial_load:hang")
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"did not finish within 5 s in a trial process"):
        _install(
            _store(tmp_path / "models", timeout_s=5), tmp_path, repo.build_package(files), trust
        )
    assert time.monotonic() - started < 60
    assert _store(tmp_path / "models").pointer("iris") is None


def test_a_model_failing_with_a_python_error_is_reported_as_without_a_trial(
    tmp_path: Path, repo: RepositorySimulator, files: dict[str, bytes], trust: TrustContext
) -> None:
    package = repo.build_package({**files, "model.onnx": b"not an onnx model"})
    with pytest.raises(ModelLoadError) as refused:
        _install(_store(tmp_path / "models"), tmp_path, package, trust)
    assert "trial" not in str(refused.value)  # the agent's own load said what is wrong
    assert "onnx" in str(refused.value).lower()


def test_at_start_up_a_model_crashing_its_runtime_falls_back_to_the_previous_version(
    tmp_path: Path,
    repo: RepositorySimulator,
    files: dict[str, bytes],
    trust: TrustContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As after a runtime upgrade that crashes on the installed model: no crash loop at boot."""
    store = _store(tmp_path / "models")
    for version in (1, 2):
        _install(store, tmp_path, repo.build_package(files, version=version), trust).runtime.close()
    monkeypatch.setenv(FAILPOINT_ENV, "in_trial_load:segv")
    # Each trial is a process of its own, so the failpoint fires for each version tried: v2,
    # then v1. Neither is loaded into the agent, and the pointer falls back to v1.
    assert _store(tmp_path / "models").load_active("iris", trust) is None
    monkeypatch.delenv(FAILPOINT_ENV)
    again = _store(tmp_path / "models").load_active("iris", trust)
    assert again is not None
    assert again.version == 1
    again.runtime.close()


def test_an_entry_script_has_no_trial_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its init() already runs in a worker process of its own."""
    monkeypatch.setenv(FAILPOINT_ENV, "in_trial_load:segv")
    loaded: list[Manifest] = []

    def load(model_dir: Path, manifest: Manifest) -> Any:
        loaded.append(manifest)
        return "runtime"

    manifest = Manifest.model_validate(
        {
            "model": {"name": "s", "version": 1, "framework": "onnx"},
            "runtime": {"kind": "script", "model_file": "m.onnx", "entry_script": "score.py"},
            "files": [{"path": "m.onnx", "size": 1, "sha256": "0" * 64}],
            "health_check": {"input": "in.json", "expected_output": "out.json"},
            "created_at": "2026-01-01T00:00:00Z",
        }
    )
    assert TrialLoader(load, timeout_s=60)(tmp_path, manifest) == "runtime"
    assert loaded == [manifest]
    builtin = manifest.model_copy(
        update={
            "runtime": manifest.runtime.model_copy(update={"kind": "builtin", "entry_script": None})
        }
    )
    with pytest.raises(ModelLoadError, match="killed a trial process with SIGSEGV"):
        TrialLoader(load, timeout_s=60)(
            tmp_path, builtin
        )  # while a built-in runtime's model gets a trial
    assert loaded == [manifest]
