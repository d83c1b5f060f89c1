"""A repository simulator for agent tests (after python-tuf's RepositorySimulator).

It plays the hub's signing side in memory: root, release and director keys, a keyring, packages
built from files, and desired states; and it can publish every bad variant a test needs
(tampered files, unknown signers, replayed counters, hostile archive entries).
"""

import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.protocol.canonical import canonical_bytes
from agent.protocol.documents import (
    Command,
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
from agent.protocol.keys import SigningKey
from agent.protocol.messages import CommandBody, DesiredBody, encode
from agent.protocol.package import FILES_DIR, MANIFEST_NAME, SIGNATURE_NAME, plan_chunks

# Documents are issued "now" (to the hour, so a run sees one value): tests that run a real agent
# judge expiry against the real clock, and a fixed date made them fail a week after it.
NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class BuiltPackage:
    data: bytes
    ref: PackageRef
    manifest: Manifest


@dataclass
class ExtraMember:
    """A hostile or odd archive entry to add after signing."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    mode: int = 0o644


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def regular(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def package_ref(
    data: bytes, manifest: Manifest, *, chunk_bytes: int, deployment_id: str
) -> PackageRef:
    """The director's entry for these exact package bytes, as the hub names them."""
    plan = plan_chunks(data, chunk_bytes)
    return PackageRef(
        model=manifest.model.name,
        version=manifest.model.version,
        digest=hashlib.sha256(data).hexdigest(),
        size=plan.size,
        chunk_bytes=plan.chunk_bytes,
        chunks=list(plan.chunks),
        deployment_id=deployment_id,
    )


@dataclass
class RepositorySimulator:
    device_id: str = "dev-000000000001"
    now: datetime = NOW
    root: SigningKey = field(default_factory=SigningKey.generate)
    release: SigningKey = field(default_factory=SigningKey.generate)
    director: SigningKey = field(default_factory=SigningKey.generate)
    keyring_version: int = 1
    counter: int = 0
    deployment_seq: int = 0
    command_seq: int = 0

    def keyring_doc(self, *, expires_in: timedelta = timedelta(days=365)) -> Keyring:
        return Keyring(
            version=self.keyring_version,
            expires_at=self.now + expires_in,
            keys={k.keyid: PublicKey(public=k.public_b64) for k in (self.release, self.director)},
            roles={
                Role.RELEASE: RoleKeys(keyids=[self.release.keyid]),
                Role.DIRECTOR: RoleKeys(keyids=[self.director.keyid]),
            },
        )

    def keyring(self, *, signer: SigningKey | None = None, **kwargs: Any) -> Signed:
        doc = document_dict(self.keyring_doc(**kwargs))
        return Signed(signed=doc, signatures=[(signer or self.root).sign(doc)])

    def build_package(
        self,
        files: dict[str, bytes],
        *,
        model: str = "iris",
        version: int = 1,
        model_file: str = "model.onnx",
        release_signers: list[SigningKey] | None = None,
        tamper: dict[str, bytes] | None = None,
        extra: list[ExtraMember] | None = None,
        device_classes: list[str] | None = None,
        chunk_bytes: int = 4096,
        deployment_id: str | None = None,
    ) -> BuiltPackage:
        """Build and sign a package; ``tamper`` swaps file bytes after signing."""
        manifest = Manifest(
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
            created_at=self.now,
        )
        doc = document_dict(manifest)
        signers = self.release if release_signers is None else release_signers
        signers_list = signers if isinstance(signers, list) else [signers]
        signature = DetachedSignatures(signatures=[k.sign(doc) for k in signers_list])
        members = [
            regular(MANIFEST_NAME, canonical_bytes(doc)),
            regular(SIGNATURE_NAME, signature.model_dump_json().encode()),
        ]
        swapped = {**files, **(tamper or {})}
        members += [regular(f"{FILES_DIR}/{p}", d) for p, d in sorted(swapped.items())]
        for item in extra or []:
            info = tarfile.TarInfo(item.name)
            info.type = item.type
            info.linkname = item.linkname
            info.mode = item.mode
            info.size = len(item.data) if item.type == tarfile.REGTYPE else 0
            members.append((info, item.data))
        data = tar_bytes(members)
        return BuiltPackage(
            data, self.ref_for(data, manifest, chunk_bytes, deployment_id), manifest
        )

    def ref_for(
        self,
        data: bytes,
        manifest: Manifest,
        chunk_bytes: int = 4096,
        deployment_id: str | None = None,
    ) -> PackageRef:
        if deployment_id is None:
            self.deployment_seq += 1
            deployment_id = f"dep-{self.deployment_seq:04d}"
        return package_ref(data, manifest, chunk_bytes=chunk_bytes, deployment_id=deployment_id)

    def desired(
        self,
        packages: list[PackageRef],
        *,
        counter: int | None = None,
        expires_in: timedelta = timedelta(days=7),
        signer: SigningKey | None = None,
        device_id: str | None = None,
        unsigned: bool = False,
    ) -> Signed:
        if counter is None:
            self.counter += 1
            counter = self.counter
        doc = document_dict(
            DesiredState(
                device_id=device_id or self.device_id,
                counter=counter,
                issued_at=self.now,
                expires_at=self.now + expires_in,
                packages=packages,
            )
        )
        signatures = [] if unsigned else [(signer or self.director).sign(doc)]
        return Signed(signed=doc, signatures=signatures)

    def desired_message(self, packages: list[PackageRef], **kwargs: Any) -> bytes:
        return encode(DesiredBody(keyring=self.keyring(), desired=self.desired(packages, **kwargs)))

    def command(
        self,
        action: str,
        args: dict[str, Any] | None = None,
        *,
        seq: int | None = None,
        expires_in: timedelta = timedelta(minutes=1),
        signer: SigningKey | None = None,
        device_id: str | None = None,
    ) -> Signed:
        """A director-signed command; seqs count up unless one is given. Times are real (not
        ``now``): the agent judges a command's expiry against its own clock."""
        if seq is None:
            self.command_seq += 1
            seq = self.command_seq
        issued = datetime.now(UTC)
        doc = document_dict(
            Command(
                device_id=device_id or self.device_id,
                seq=seq,
                command_id=f"cmd-{seq:04d}",
                action=action,
                args=args or {},
                issued_at=issued,
                expires_at=issued + expires_in,
            )
        )
        return Signed(signed=doc, signatures=[(signer or self.director).sign(doc)])

    def command_message(self, action: str, args: dict[str, Any] | None = None, **kw: Any) -> bytes:
        return encode(CommandBody(keyring=self.keyring(), command=self.command(action, args, **kw)))


def iris_files(model_dir: Path) -> dict[str, bytes]:
    """The example model's files as a package carries them."""
    return {
        "model.onnx": (model_dir / "model.onnx").read_bytes(),
        "sample_input.json": (model_dir / "sample_input.json").read_bytes(),
        "expected_output.json": (model_dir / "expected_output.json").read_bytes(),
    }
