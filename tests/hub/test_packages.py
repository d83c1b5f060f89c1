"""Package archives: deterministic layout, release signature, reuse, release key offline."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from sqlmodel import Session

from agent.protocol.canonical import canonical_bytes
from agent.protocol.documents import DetachedSignatures, Manifest, Role
from agent.protocol.keys import verify_signature
from agent.protocol.package import plan_chunks
from examples.build_tflite_model import committed_model
from hub.blobs import BlobStore
from hub.errors import SigningUnavailable
from hub.packages.models import Package
from hub.packages.service import ensure_package, package_path
from hub.registry import service as registry
from hub.registry.models import ModelVersion
from hub.signing.keystore import KeyStore, OfflineRole

TFLITE = committed_model()  # a real model: the hub checks TFLite models too


def _register(session: Session, blobs: BlobStore, name: str = "tiny") -> ModelVersion:
    return registry.register_model(
        session=session,
        blobs=blobs,
        name=name,
        framework="tflite",
        files=[registry.UploadedFile("model.tflite", TFLITE.model.read_bytes())],
        sample_input=TFLITE.sample_input.read_bytes(),
        expected_output=TFLITE.expected_output.read_bytes(),
        max_bytes=1_000_000,
    )


def _build(
    session: Session, keys: KeyStore, blobs: BlobStore, tmp: Path, mv: ModelVersion
) -> Package:
    return ensure_package(
        session=session,
        keys=keys,
        blobs=blobs,
        packages_dir=tmp / "packages",
        model_version=mv,
        max_package_bytes=10_000_000,
        chunk_bytes=1024,
    )


def test_package_is_a_deterministic_signed_tar(
    session: Session, keys: KeyStore, tmp_path: Path
) -> None:
    blobs = BlobStore(tmp_path / "models")
    mv = _register(session, blobs)
    pkg = _build(session, keys, blobs, tmp_path, mv)

    archive = package_path(tmp_path / "packages", pkg.digest).read_bytes()
    assert hashlib.sha256(archive).hexdigest() == pkg.digest
    plan = plan_chunks(archive, 1024)
    assert (pkg.size, pkg.chunk_bytes, pkg.chunks) == (plan.size, 1024, list(plan.chunks))

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert names == [
            "files/expected_output.json",
            "files/model.tflite",
            "files/sample_input.json",
            "manifest.json",
            "manifest.sig",
        ]
        for m in members:
            assert (m.isreg(), m.mtime, m.uid, m.gid, m.mode) == (True, 0, 0, 0, 0o644)
        manifest_bytes = tar.extractfile("manifest.json").read()  # type: ignore[union-attr]
        sig_bytes = tar.extractfile("manifest.sig").read()  # type: ignore[union-attr]
        model_bytes = tar.extractfile("files/model.tflite").read()  # type: ignore[union-attr]

    manifest_dict = json.loads(manifest_bytes)
    assert canonical_bytes(manifest_dict) == manifest_bytes
    manifest = Manifest.model_validate(manifest_dict)
    assert (manifest.model.name, manifest.model.version) == ("tiny", 1)
    assert manifest.runtime.model_file == "model.tflite"
    assert manifest.health_check.input == "sample_input.json"
    assert manifest.health_check.expected_output == "expected_output.json"
    entry = next(f for f in manifest.files if f.path == "model.tflite")
    assert entry.sha256 == hashlib.sha256(model_bytes).hexdigest()

    sigs = DetachedSignatures.model_validate_json(sig_bytes).signatures
    keyring = keys.keyring_document()
    assert sigs[0].keyid in keyring.roles[Role.RELEASE].keyids
    assert verify_signature(keyring.keys[sigs[0].keyid].public, sigs[0].sig, manifest_dict)


def test_package_is_reused_and_survives_release_key_offline(
    session: Session, keys: KeyStore, tmp_path: Path
) -> None:
    blobs = BlobStore(tmp_path / "models")
    v1 = _register(session, blobs)
    first = _build(session, keys, blobs, tmp_path, v1)

    keys.remove(OfflineRole.RELEASE, yes=True)
    again = _build(session, keys, blobs, tmp_path, v1)
    assert again.digest == first.digest

    v2 = _register(session, blobs)
    with pytest.raises(SigningUnavailable, match="release key is offline"):
        _build(session, keys, blobs, tmp_path, v2)


def test_lost_package_file_is_rebuilt_with_the_same_digest(
    session: Session, keys: KeyStore, tmp_path: Path
) -> None:
    blobs = BlobStore(tmp_path / "models")
    mv = _register(session, blobs)
    first = _build(session, keys, blobs, tmp_path, mv)
    path = package_path(tmp_path / "packages", first.digest)
    path.unlink()
    second = _build(session, keys, blobs, tmp_path, mv)
    assert second.digest == first.digest
    assert hashlib.sha256(path.read_bytes()).hexdigest() == first.digest
