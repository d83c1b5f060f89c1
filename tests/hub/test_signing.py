"""Keys on disk, the root-signed keyring, and taking the release key offline."""

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from agent.protocol.documents import Keyring, Role
from agent.protocol.keys import SigningKey, verify_signature
from examples.build_tflite_model import committed_model
from hub.errors import Conflict, InvalidInput, SigningUnavailable
from hub.signing.keystore import KeyStore, OfflineRole

TFLITE = committed_model()  # a real model: the hub checks TFLite models too


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_private_keys_0600_and_a_root_signed_keyring(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    status = store.init(keyring_ttl_days=365)

    for role in ("root", "release", "director"):
        assert _mode(tmp_path / "keys" / f"{role}.pem") == 0o600
    signed = store.keyring()
    keyring = Keyring.model_validate(signed.signed)
    assert keyring.roles[Role.RELEASE].keyids == [status.release_keyid]
    assert keyring.roles[Role.DIRECTOR].keyids == [status.director_keyid]
    assert abs(keyring.expires_at - (datetime.now(UTC) + timedelta(days=365))) < timedelta(
        minutes=1
    )
    root_public = store.root_public_b64()
    assert signed.signatures[0].keyid == status.root_keyid
    assert verify_signature(root_public, signed.signatures[0].sig, signed.signed)
    assert status.private_present == {"root": True, "release": True, "director": True}


def test_init_refuses_existing_keys_unless_forced(keys: KeyStore) -> None:
    before = keys.status()
    with pytest.raises(Conflict):
        keys.init(keyring_ttl_days=1)
    after = keys.init(keyring_ttl_days=1, force=True)
    assert after.root_keyid != before.root_keyid


def test_signatures_verify_with_keyring_keys(keys: KeyStore) -> None:
    keyring = keys.keyring_document()
    doc = {"type": "desired", "counter": 1}
    sig = keys.sign_director(doc)
    assert sig.keyid in keyring.roles[Role.DIRECTOR].keyids
    assert verify_signature(keyring.keys[sig.keyid].public, sig.sig, doc)


def test_remove_requires_export_then_release_signing_is_unavailable(
    keys: KeyStore, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="never exported"):
        keys.remove(OfflineRole.RELEASE)

    out = tmp_path / "offline" / "release.pem"
    keys.export(OfflineRole.RELEASE, out)
    assert _mode(out) == 0o600
    with pytest.raises(Conflict):
        keys.export(OfflineRole.RELEASE, out)  # never over an existing file
    keys.remove(OfflineRole.RELEASE)

    with pytest.raises(SigningUnavailable, match="release key is offline"):
        keys.sign_release({"x": 1})
    # The director key stays online.
    keys.sign_director({"x": 1})
    assert keys.status().private_present["release"] is False

    keys.import_key(OfflineRole.RELEASE, out)
    keys.sign_release({"x": 1})


def test_import_refuses_a_foreign_key(keys: KeyStore, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pem"
    foreign.write_bytes(SigningKey.generate().private_pem())
    with pytest.raises(InvalidInput):
        keys.import_key(OfflineRole.RELEASE, foreign)


def test_remove_with_yes_skips_the_export_check(keys: KeyStore) -> None:
    keys.remove(OfflineRole.ROOT, yes=True)
    # Devices still get the pinned root public key and the signed keyring.
    assert keys.root_public_b64()
    assert keys.keyring().signatures


@pytest.mark.parametrize("role", [Role.ROOT, Role.RELEASE, Role.DIRECTOR])
def test_rotate_online_issues_the_next_keyring_with_a_new_key(keys: KeyStore, role: Role) -> None:
    from agent.trust import verify_keyring

    pinned = keys.root_public_b64()
    before = keys.status()
    serving = KeyStore(keys.keys_dir)  # the running hub's own instance, keys cached
    serving.sign_director({"x": 1})
    current = verify_keyring(keys.keyring(), root_public_b64=pinned, current=None, now=None)

    rotation = keys.rotate(role, keyring_ttl_days=30)

    assert rotation.done
    assert rotation.version == 2
    after = keys.status()
    assert getattr(after, f"{role}_keyid") == rotation.new_keyid
    assert getattr(before, f"{role}_keyid") != rotation.new_keyid
    for other in set(Role) - {role}:
        assert getattr(after, f"{other}_keyid") == getattr(before, f"{other}_keyid")
    # Devices with version 1 take it (old and new root for a root rotation).
    signed = keys.keyring()
    assert len(signed.signatures) == (2 if role is Role.ROOT else 1)
    assert verify_keyring(signed, root_public_b64=pinned, current=current, now=None).version == 2
    assert keys.keyring_history() == [1, 2]
    # The serving hub signs with the new director key from the next signature on.
    sig = serving.sign_director({"x": 1})
    assert sig.keyid == after.director_keyid
    if role is Role.ROOT:
        assert keys.root_public_b64() != pinned


def test_rotate_without_the_root_key_needs_offline(keys: KeyStore) -> None:
    keys.remove(OfflineRole.ROOT, yes=True)
    with pytest.raises(SigningUnavailable, match="--offline"):
        keys.rotate(Role.DIRECTOR, keyring_ttl_days=30)
    assert keys.pending_request() is None
    pending = keys.rotate(Role.DIRECTOR, keyring_ttl_days=30, offline=True)
    assert not pending.done
    assert [g.name for g in pending.missing] == ["current root"]
    assert keys.keyring_document().version == 1
    with pytest.raises(Conflict, match="already waiting"):
        keys.rotate(Role.RELEASE, keyring_ttl_days=30, offline=True)
    keys.cancel_pending()
    assert keys.pending_request() is None


def test_a_rotation_interrupted_while_completing_is_finished_by_the_next_rotate(
    keys: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = keys.status()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("power cut")

    # Dies after the new key is written but before the keyring: the hub would sign with a
    # key its keyring does not name.
    monkeypatch.setattr(keys, "_write_keyring", crash)
    with pytest.raises(OSError, match="power cut"):
        keys.rotate(Role.DIRECTOR, keyring_ttl_days=30)
    monkeypatch.undo()
    assert keys.keyring_document().version == 1

    finished = keys.rotate(Role.DIRECTOR, keyring_ttl_days=30)
    assert finished.done
    assert finished.version == 2
    after = keys.status()
    assert after.director_keyid == finished.new_keyid != before.director_keyid
    assert keys.sign_director({"x": 1}).keyid == after.director_keyid
    assert keys.pending_request() is None


def test_a_package_manifest_signed_offline_builds_the_package(
    session: Session, keys: KeyStore, tmp_path: Path
) -> None:
    """Release key offline: building a package leaves a signing request for its manifest;
    signed elsewhere with `keys sign-request` and imported, the next build uses it, and the
    package verifies on a device like any other."""
    from click.testing import CliRunner

    from agent.trust import verify_keyring, verify_manifest
    from hub.blobs import BlobStore
    from hub.cli import main as hub_cli
    from hub.packages.service import ensure_package
    from hub.registry import service as registry

    offline = tmp_path / "offline"
    keys.export(OfflineRole.RELEASE, offline / "release.pem")
    keys.export(OfflineRole.ROOT, offline / "root.pem")
    keys.remove(OfflineRole.RELEASE)
    blobs = BlobStore(tmp_path / "models")
    mv = registry.register_model(
        session=session,
        blobs=blobs,
        name="tiny",
        framework="tflite",
        files=[registry.UploadedFile("model.tflite", TFLITE.model.read_bytes())],
        sample_input=TFLITE.sample_input.read_bytes(),
        expected_output=TFLITE.expected_output.read_bytes(),
        max_bytes=1_000_000,
    )

    def build() -> Any:
        return ensure_package(
            session=session,
            keys=keys,
            blobs=blobs,
            packages_dir=tmp_path / "packages",
            model_version=mv,
            max_package_bytes=10_000_000,
            chunk_bytes=1024,
        )

    with pytest.raises(SigningUnavailable, match="release key is offline") as info:
        build()
    (request,) = keys.release_requests()
    assert str(keys.keys_dir / "release-requests") in info.value.detail
    assert request.summary.startswith("package manifest of tiny version 1")
    request_file = keys.keys_dir / "release-requests" / f"{request.sha256}.json"

    def cli(*args: str) -> Any:
        return CliRunner().invoke(hub_cli, list(args), catch_exceptions=False)

    data = ("--data-dir", str(keys.keys_dir.parent))
    wrong = cli(
        "keys",
        "sign-request",
        str(request_file),
        "--key",
        str(offline / "root.pem"),
        "--out",
        str(offline / "wrong.sig"),
    )
    assert wrong.exit_code == 2
    assert "is not one this request asks for" in wrong.output
    signed = cli(
        "keys",
        "sign-request",
        str(request_file),
        "--key",
        str(offline / "release.pem"),
        "--out",
        str(offline / "m.sig"),
    )
    assert signed.exit_code == 0, signed.output
    imported = cli("keys", "import-signature", str(offline / "m.sig"), *data)
    assert imported.exit_code == 0, imported.output
    assert "deploy it again" in imported.output
    assert keys.release_requests() == []

    package = build()
    archive = (tmp_path / "packages" / f"{package.digest}.tar").read_bytes()
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        manifest = tar.extractfile("manifest.json").read()  # type: ignore[union-attr]
        sig = tar.extractfile("manifest.sig").read()  # type: ignore[union-attr]
    keyring = verify_keyring(
        keys.keyring(), root_public_b64=keys.root_public_b64(), current=None, now=None
    )
    assert verify_manifest(manifest, sig, keyring=keyring, device_class="g", agent_version="9.9.9")
    # Importing the same answer again: nothing waits for it any more.
    again = cli("keys", "import-signature", str(offline / "m.sig"), *data)
    assert again.exit_code == 2
    assert "waits for a release signature" in again.output
