"""Install with a real ONNX model: verified, health-checked, switched atomically, or refused
with nothing written outside staging and the previous version still active."""

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from agent.archive import ArchiveLimits
from agent.errors import (
    HealthCheckError,
    IntegrityError,
    ModelLoadError,
    RejectedError,
    TooLargeError,
    UnsafeArchiveError,
)
from agent.install import ModelStore, TrustContext
from agent.protocol.messages import Step
from agent.runtimes import load_runtime
from agent.runtimes.health import check_health
from tests.support.repository import ExtraMember, RepositorySimulator


@pytest.fixture
def repo() -> RepositorySimulator:
    return RepositorySimulator()


def _store(root: Path, **limits: int) -> ModelStore:
    return ModelStore(
        root, load_runtime=load_runtime, check_health=check_health, limits=ArchiveLimits(**limits)
    )


def _archive(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"{hashlib.sha256(data).hexdigest()}.tar"
    path.write_bytes(data)
    return path


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_install_switches_pointer_and_serves(
    tmp_path: Path, repo: RepositorySimulator, files: dict[str, bytes], trust: TrustContext
) -> None:
    store = _store(tmp_path / "models")
    package = repo.build_package(files)
    steps: list[Step] = []
    active = store.install(_archive(tmp_path, package.data), package.ref, trust, steps.append)
    assert steps == [Step.VERIFIED, Step.INSTALLING, Step.HEALTH_CHECK]
    assert store.pointer("iris").digest == package.ref.digest  # type: ignore[union-attr]
    sample = json.loads(files["sample_input.json"])
    expected = json.loads(files["expected_output.json"])
    assert active.runtime.predict(sample)["label"].tolist() == expected["label"]
    # After a restart the same version is found and re-verified from disk alone.
    again = _store(tmp_path / "models").load_active("iris", trust)
    assert again is not None
    assert again.digest == package.ref.digest


def _install_v1(
    tmp_path: Path, repo: RepositorySimulator, files: dict[str, bytes], trust: TrustContext
) -> ModelStore:
    store = _store(tmp_path / "models")
    v1 = repo.build_package(files, version=1)
    store.install(_archive(tmp_path, v1.data), v1.ref, trust, lambda _: None)
    return store


BAD_PACKAGES = {
    "tampered_file": (
        lambda f: {"tamper": {"model.onnx": f["model.onnx"][:-1] + b"\x00"}},
        IntegrityError,
    ),
    "traversal": (lambda f: {"extra": [ExtraMember("files/../../evil", b"x")]}, UnsafeArchiveError),
    "absolute": (lambda f: {"extra": [ExtraMember("/tmp/outpost-evil", b"x")]}, UnsafeArchiveError),
    "symlink": (
        lambda f: {
            "extra": [ExtraMember("files/link", type=tarfile.SYMTYPE, linkname="/etc/passwd")]
        },
        UnsafeArchiveError,
    ),
    "hardlink": (
        lambda f: {
            "extra": [ExtraMember("files/hl", type=tarfile.LNKTYPE, linkname="manifest.json")]
        },
        UnsafeArchiveError,
    ),
    "device": (
        lambda f: {"extra": [ExtraMember("files/dev", type=tarfile.CHRTYPE)]},
        UnsafeArchiveError,
    ),
    "fifo": (
        lambda f: {"extra": [ExtraMember("files/fifo", type=tarfile.FIFOTYPE)]},
        UnsafeArchiveError,
    ),
    "setuid": (
        lambda f: {"extra": [ExtraMember("files/suid", b"x", mode=0o4755)]},
        UnsafeArchiveError,
    ),
    "duplicate": (lambda f: {"extra": [ExtraMember("files/MODEL.onnx", b"x")]}, UnsafeArchiveError),
    "unlisted": (lambda f: {"extra": [ExtraMember("files/unlisted.bin", b"x")]}, IntegrityError),
    "unsigned": (lambda f: {"release_signers": []}, RejectedError),
    "garbage_model": (
        lambda f: {"tamper": {}, "files_override": {"model.onnx": b"not an onnx model"}},
        ModelLoadError,
    ),
    "wrong_expected_output": (
        lambda f: {
            "files_override": {"expected_output.json": json.dumps({"label": [2, 2, 2]}).encode()}
        },
        HealthCheckError,
    ),
}


@pytest.mark.parametrize("variant", sorted(BAD_PACKAGES))
def test_bad_package_is_refused_and_v1_keeps_serving(
    tmp_path: Path,
    repo: RepositorySimulator,
    files: dict[str, bytes],
    trust: TrustContext,
    variant: str,
) -> None:
    store = _install_v1(tmp_path, repo, files, trust)
    before = _tree(tmp_path / "models")
    make_kwargs, error = BAD_PACKAGES[variant]
    kwargs = make_kwargs(files)
    package_files = {**files, **kwargs.pop("files_override", {})}
    bad = repo.build_package(package_files, version=2, **kwargs)
    with pytest.raises(error):
        store.install(_archive(tmp_path, bad.data), bad.ref, trust, lambda _: None)
    assert _tree(tmp_path / "models") == before, "a refused package left files behind"
    assert not Path("/tmp/outpost-evil").exists()
    assert store.pointer("iris").version == 1  # type: ignore[union-attr]
    assert store.load_active("iris", trust) is not None


def test_package_over_the_size_limit_is_refused(
    tmp_path: Path, repo: RepositorySimulator, files: dict[str, bytes], trust: TrustContext
) -> None:
    store = _store(tmp_path / "models", max_total_bytes=1000)
    package = repo.build_package(files)
    with pytest.raises(TooLargeError):
        store.install(_archive(tmp_path, package.data), package.ref, trust, lambda _: None)
    assert store.pointer("iris") is None


def test_model_changed_on_disk_falls_back_to_previous_version(
    tmp_path: Path, repo: RepositorySimulator, files: dict[str, bytes], trust: TrustContext
) -> None:
    store = _install_v1(tmp_path, repo, files, trust)
    v2 = repo.build_package(files, version=2)
    store.install(_archive(tmp_path, v2.data), v2.ref, trust, lambda _: None)
    pointer = store.pointer("iris")
    assert pointer is not None
    assert pointer.version == 2
    assert pointer.previous is not None
    (tmp_path / "models" / "iris" / pointer.directory / "files" / "model.onnx").write_bytes(b"x")
    active = _store(tmp_path / "models").load_active("iris", trust)
    assert active is not None
    assert active.version == 1
