"""Verification of keyrings, desired states and manifests: every refusal names its reason."""

from datetime import timedelta

import pytest

from agent.errors import IncompatibleError, RejectedError, TrustError
from agent.protocol.canonical import canonical_bytes
from agent.protocol.documents import (
    DetachedSignatures,
    Keyring,
    PublicKey,
    Signed,
    document_dict,
)
from agent.protocol.keys import SigningKey
from agent.protocol.messages import Reason
from agent.trust import DesiredVerdict, verify_desired, verify_keyring, verify_manifest
from tests.support.repository import NOW, RepositorySimulator


@pytest.fixture
def repo() -> RepositorySimulator:
    return RepositorySimulator()


def _keyring(repo: RepositorySimulator) -> Keyring:
    return verify_keyring(
        repo.keyring(), root_public_b64=repo.root.public_b64, current=None, now=NOW
    )


def test_keyring_signed_by_pinned_root_is_accepted(repo: RepositorySimulator) -> None:
    keyring = verify_keyring(
        repo.keyring(), root_public_b64=repo.root.public_b64, current=None, now=NOW
    )
    assert keyring.version == 1


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        ("other_root", Reason.UNKNOWN_KEY),
        ("bad_signature", Reason.SIGNATURE),
        ("expired", Reason.EXPIRED),
        ("older", Reason.REPLAY),
        ("same_version_different", Reason.REPLAY),
    ],
)
def test_keyring_refusals(repo: RepositorySimulator, mutate: str, reason: Reason) -> None:
    current = None
    signed = repo.keyring()
    if mutate == "other_root":
        signed = repo.keyring(signer=SigningKey.generate())
    elif mutate == "bad_signature":
        doc = dict(signed.signed, version=5)
        signed = Signed(signed=doc, signatures=signed.signatures)
    elif mutate == "expired":
        signed = repo.keyring(expires_in=timedelta(seconds=-1))
    elif mutate == "older":
        repo.keyring_version = 3
        current = verify_keyring(
            repo.keyring(), root_public_b64=repo.root.public_b64, current=None, now=NOW
        )
        repo.keyring_version = 2
        signed = repo.keyring()
    elif mutate == "same_version_different":
        current = verify_keyring(
            signed, root_public_b64=repo.root.public_b64, current=None, now=NOW
        )
        repo.director = SigningKey.generate()
        signed = repo.keyring()
    with pytest.raises(TrustError) as info:
        verify_keyring(signed, root_public_b64=repo.root.public_b64, current=current, now=NOW)
    assert info.value.reason is reason


def test_stored_keyring_is_not_judged_on_expiry(repo: RepositorySimulator) -> None:
    signed = repo.keyring(expires_in=timedelta(seconds=-1))
    assert verify_keyring(signed, root_public_b64=repo.root.public_b64, current=None, now=None)


def _verify(repo: RepositorySimulator, signed: Signed, **kwargs: object) -> object:
    keyring = verify_keyring(
        repo.keyring(), root_public_b64=repo.root.public_b64, current=None, now=NOW
    )
    args: dict[str, object] = {
        "keyring": keyring,
        "device_id": repo.device_id,
        "last_counter": 0,
        "last_fingerprint": None,
        "now": NOW,
    }
    args.update(kwargs)
    return verify_desired(signed, **args)  # type: ignore[arg-type]


def test_desired_state_accepted_then_same_then_replay(repo: RepositorySimulator) -> None:
    first = repo.desired([])
    verified = _verify(repo, first)
    assert verified.verdict is DesiredVerdict.NEW  # type: ignore[attr-defined]
    again = _verify(
        repo,
        first,
        last_counter=1,
        last_fingerprint=verified.fingerprint,  # type: ignore[attr-defined]
    )
    assert again.verdict is DesiredVerdict.SAME  # type: ignore[attr-defined]
    replay = repo.desired([], counter=1, expires_in=timedelta(days=8))
    with pytest.raises(TrustError) as info:
        _verify(repo, replay, last_counter=1, last_fingerprint="x")
    assert info.value.reason is Reason.REPLAY


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("unsigned", Reason.UNKNOWN_KEY),
        ("release_key", Reason.UNKNOWN_KEY),
        ("stranger", Reason.UNKNOWN_KEY),
        ("expired", Reason.EXPIRED),
        ("other_device", Reason.WRONG_DEVICE),
        ("tampered", Reason.SIGNATURE),
    ],
)
def test_desired_state_refusals(repo: RepositorySimulator, variant: str, reason: Reason) -> None:
    signed = {
        "unsigned": lambda: repo.desired([], unsigned=True),
        "release_key": lambda: repo.desired([], signer=repo.release),
        "stranger": lambda: repo.desired([], signer=SigningKey.generate()),
        "expired": lambda: repo.desired([], expires_in=timedelta(seconds=-1)),
        "other_device": lambda: repo.desired([], device_id="dev-999999999999"),
        "tampered": lambda: Signed(
            signed=dict(repo.desired([]).signed, counter=99),
            signatures=repo.desired([]).signatures,
        ),
    }[variant]()
    with pytest.raises(TrustError) as info:
        _verify(repo, signed)
    assert info.value.reason is reason


def test_duplicate_signatures_by_one_key_count_once(repo: RepositorySimulator) -> None:
    keyring_doc = repo.keyring_doc().model_copy()
    from agent.protocol.documents import Keyring, Role, RoleKeys

    # 2 of 2 release keys; only one of them signs, twice.
    other = SigningKey.generate()
    doc = document_dict(
        Keyring(
            version=1,
            expires_at=keyring_doc.expires_at,
            keys={**keyring_doc.keys, other.keyid: PublicKey(public=other.public_b64)},
            roles={
                Role.RELEASE: RoleKeys(keyids=[repo.release.keyid, other.keyid], threshold=2),
                Role.DIRECTOR: RoleKeys(keyids=[repo.director.keyid]),
            },
        )
    )
    keyring = verify_keyring(
        Signed(signed=doc, signatures=[repo.root.sign(doc)]),
        root_public_b64=repo.root.public_b64,
        current=None,
        now=NOW,
    )
    package = repo.build_package({"a": b"x"}, release_signers=[repo.release, repo.release])
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(package.data)) as archive:
        manifest_bytes = archive.extractfile("manifest.json").read()  # type: ignore[union-attr]
        sig_bytes = archive.extractfile("manifest.sig").read()  # type: ignore[union-attr]
    with pytest.raises(TrustError) as info:
        verify_manifest(
            manifest_bytes, sig_bytes, keyring=keyring, device_class="g", agent_version="0.1.0"
        )
    assert info.value.reason is Reason.THRESHOLD


def _manifest_parts(repo: RepositorySimulator, **kwargs: object) -> tuple[bytes, bytes]:
    manifest = repo.build_package({"model.onnx": b"m"}, **kwargs).manifest  # type: ignore[arg-type]
    doc = document_dict(manifest)
    return canonical_bytes(doc), DetachedSignatures(
        signatures=[repo.release.sign(doc)]
    ).model_dump_json().encode()


def test_manifest_signed_by_director_only_is_not_released(repo: RepositorySimulator) -> None:
    manifest = repo.build_package({"model.onnx": b"m"}).manifest
    doc = document_dict(manifest)
    sig = DetachedSignatures(signatures=[repo.director.sign(doc)]).model_dump_json().encode()
    with pytest.raises(TrustError) as info:
        verify_manifest(
            canonical_bytes(doc),
            sig,
            keyring=_keyring(repo),
            device_class="g",
            agent_version="1",
        )
    assert info.value.reason is Reason.NOT_RELEASED


def test_manifest_for_another_device_class_is_incompatible(repo: RepositorySimulator) -> None:
    manifest_bytes, sig = _manifest_parts(repo, device_classes=["x86-gpu"])
    with pytest.raises(IncompatibleError):
        verify_manifest(
            manifest_bytes,
            sig,
            keyring=_keyring(repo),
            device_class="rpi4",
            agent_version="0.1.0",
        )


def test_malformed_manifest_is_rejected(repo: RepositorySimulator) -> None:
    with pytest.raises(RejectedError):
        verify_manifest(
            b"{not json",
            b"{}",
            keyring=_keyring(repo),
            device_class="g",
            agent_version="0.1.0",
        )
