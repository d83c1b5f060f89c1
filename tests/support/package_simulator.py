"""A package repository simulator for the security suite (the python-tuf RepositorySimulator
pattern): packages and desired states are built and signed by the hub's own code
(``hub.signing.keystore.KeyStore``, ``hub.packages.builder``) on demand, and any mutated
variant of them can be emitted as bytes or documents.

Packages are handled as an ordered ``{archive name: bytes}`` map, so a test can change one
member and rebuild the archive the way the hub writes it (deterministic ustar, regular files).
"""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.protocol.canonical import canonical_bytes
from agent.protocol.documents import (
    DesiredState,
    DetachedSignatures,
    FileEntry,
    Framework,
    HealthCheck,
    Keyring,
    Manifest,
    ModelInfo,
    PackageRef,
    PublicKey,
    Role,
    RoleKeys,
    RuntimeSpec,
    Signed,
    document_dict,
)
from agent.protocol.keys import Signature, SigningKey
from agent.protocol.messages import DesiredBody, encode
from agent.protocol.package import FILES_DIR, MANIFEST_NAME, SIGNATURE_NAME
from hub.packages.builder import build_archive
from hub.signing.keystore import KeyStore
from tests.support.repository import package_ref, regular, tar_bytes

CHUNK_BYTES = 4096


def tar_of(members: Mapping[str, bytes]) -> bytes:
    """An archive of regular files, written like ``hub.packages.builder`` writes packages, but
    with whatever members a test chooses (in the order given)."""
    return tar_bytes([regular(name, data) for name, data in members.items()])


@dataclass(frozen=True)
class SimPackage:
    """A signed package: its archive, the members it was built from, and the director's ref."""

    data: bytes
    members: dict[str, bytes]
    manifest: Manifest
    ref: PackageRef


class PackageRepoSimulator:
    """The hub's signing side, with its real key store in ``keys_dir``."""

    def __init__(self, keys_dir: Path, *, device_id: str) -> None:
        self.keys = KeyStore(keys_dir)
        self.keys.init(keyring_ttl_days=365)
        self.device_id = device_id
        # The root key signs custom keyrings (thresholds, extra keys); the key store only
        # signs the one it made, so read it where the store keeps it.
        self.root = SigningKey.from_pem((keys_dir / "root.pem").read_bytes())
        self.release = SigningKey.from_pem((keys_dir / "release.pem").read_bytes())
        self.director = SigningKey.from_pem((keys_dir / "director.pem").read_bytes())
        self._deployments = 0

    @property
    def root_public_b64(self) -> str:
        return self.keys.root_public_b64()

    def keyring(self) -> Signed:
        return self.keys.keyring()

    def custom_keyring(
        self,
        *,
        version: int,
        release: list[SigningKey],
        director: list[SigningKey],
        release_threshold: int = 1,
        director_threshold: int = 1,
        expires_in: timedelta = timedelta(days=365),
    ) -> Signed:
        """A root-signed keyring naming the given keys, for threshold and rotation cases."""
        keys = {k.keyid: PublicKey(public=k.public_b64) for k in [*release, *director]}
        doc = document_dict(
            Keyring(
                version=version,
                expires_at=datetime.now(UTC) + expires_in,
                keys=keys,
                roles={
                    Role.RELEASE: RoleKeys(
                        keyids=[k.keyid for k in release], threshold=release_threshold
                    ),
                    Role.DIRECTOR: RoleKeys(
                        keyids=[k.keyid for k in director], threshold=director_threshold
                    ),
                },
            )
        )
        return Signed(signed=doc, signatures=[self.root.sign(doc)])

    def manifest(
        self,
        files: Mapping[str, bytes],
        *,
        model: str = "iris",
        version: int = 1,
        model_file: str = "model.onnx",
        device_classes: list[str] | None = None,
        min_agent_version: str = "0.1.0",
    ) -> Manifest:
        return Manifest(
            model=ModelInfo(name=model, version=version, framework=Framework.ONNX),
            runtime=RuntimeSpec(model_file=model_file),
            files=[
                FileEntry(path=p, size=len(d), sha256=hashlib.sha256(d).hexdigest())
                for p, d in sorted(files.items())
            ],
            health_check=HealthCheck(
                input="sample_input.json", expected_output="expected_output.json"
            ),
            device_classes=device_classes or ["*"],
            min_agent_version=min_agent_version,
            created_at=datetime.now(UTC).replace(microsecond=0),
        )

    def package(
        self,
        files: Mapping[str, bytes],
        *,
        signatures: list[Signature] | None = None,
        manifest: Manifest | None = None,
        **manifest_args: Any,
    ) -> SimPackage:
        """Build and sign a package as the hub does (release key, ``build_archive``);
        ``signatures`` replaces the release signature (other keys, none, duplicates), made
        over ``manifest`` when one is given (its time stamp then matches them)."""
        if manifest is None:
            manifest = self.manifest(files, **manifest_args)
        doc = document_dict(manifest)
        sigs = [self.keys.sign_release(doc)] if signatures is None else signatures
        data = build_archive(manifest, sigs, dict(files))
        members = {
            MANIFEST_NAME: canonical_bytes(doc),
            SIGNATURE_NAME: canonical_bytes(document_dict(DetachedSignatures(signatures=sigs))),
            **{f"{FILES_DIR}/{p}": d for p, d in sorted(files.items())},
        }
        return SimPackage(data, members, manifest, self.ref_for(data, manifest))

    def ref_for(
        self, data: bytes, manifest: Manifest, *, deployment_id: str | None = None
    ) -> PackageRef:
        """The director's entry for these exact bytes, as the hub would name them."""
        if deployment_id is None:
            self._deployments += 1
            deployment_id = f"dep-{self._deployments:05d}"
        return package_ref(data, manifest, chunk_bytes=CHUNK_BYTES, deployment_id=deployment_id)

    def desired_doc(
        self,
        packages: list[PackageRef],
        *,
        counter: int,
        expires_in: timedelta = timedelta(days=7),
        device_id: str | None = None,
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        return document_dict(
            DesiredState(
                device_id=device_id or self.device_id,
                counter=counter,
                issued_at=now,
                expires_at=now + expires_in,
                packages=packages,
            )
        )

    def desired(self, packages: list[PackageRef], *, counter: int, **kwargs: Any) -> Signed:
        """A desired state signed by the hub's director key."""
        doc = self.desired_doc(packages, counter=counter, **kwargs)
        return Signed(signed=doc, signatures=[self.keys.sign_director(doc)])

    def desired_message(self, desired: Signed, *, keyring: Signed | None = None) -> bytes:
        """The MQTT payload the hub publishes on the device's desired topic."""
        return encode(DesiredBody(keyring=keyring or self.keyring(), desired=desired))
