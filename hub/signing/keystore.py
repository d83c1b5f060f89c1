"""The hub's Ed25519 keys and the root-signed keyring, kept as files in data_dir/keys.

    keys/root.pem, release.pem, director.pem   private keys, mode 0600
    keys/root.pub                             the root public key (base64 raw), kept when the
                                              root private key goes offline: devices pin it
    keys/keyring.json                         Signed keyring (root signature)
    keys/<role>.exported                      marks that the private key was exported
    keys/keyrings/<version>.json              every keyring version issued, for the record
    keys/pending/request.json, <role>.pem     a rotation waiting for offline signatures

Root and release keys may be taken offline (exported, then removed); the director key signs
desired states on every deployment and always stays here.

Rotation (``rotate``) issues keyring version N+1 naming a new key for one role. Devices accept
it only if a threshold of the current root keys signs it, and, when the root changes, a
threshold of the new root keys too (``agent.trust.verify_keyring``). When a needed root key is
offline the rotation waits in ``pending/`` as a signing request (``hub.signing.requests``)
until the signatures are imported.
"""

import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.protocol.documents import (
    DetachedSignatures,
    Keyring,
    PublicKey,
    Role,
    RoleKeys,
    Signed,
    document_dict,
)
from agent.protocol.keys import Signature, SigningKey, b64decode, key_id, verify_signature
from hub.database import utcnow
from hub.errors import Conflict, InvalidInput, NotFound, SigningUnavailable
from hub.secretfiles import write_secret
from hub.signing.requests import (
    RequestKind,
    SignatureFile,
    SignerGroup,
    SigningRequest,
    add_signature,
    document_sha256,
    new_request,
    unmet_groups,
)

logger = logging.getLogger(__name__)

KEYRING_FILE = "keyring.json"
ROOT_PUBLIC_FILE = "root.pub"
HISTORY_DIR = "keyrings"
PENDING_DIR = "pending"
REQUEST_FILE = "request.json"
RELEASE_REQUESTS_DIR = "release-requests"
RELEASE_SIGNATURES_DIR = "release-signatures"
# Earlier keyrings sent with each desired state: a device more rotations behind than this
# cannot catch up by itself and is enrolled again (docs/keys.md).
KEYRING_CHAIN_SENT = 8


class OfflineRole(StrEnum):
    """The roles whose private key may leave the hub."""

    ROOT = "root"
    RELEASE = "release"


@dataclass(frozen=True)
class KeyStatus:
    root_keyid: str
    release_keyid: str
    director_keyid: str
    keyring_version: int
    expires_at: datetime
    private_present: dict[str, bool]
    exported: dict[str, bool]
    pending: str | None = None  # what a rotation waiting for signatures is for


@dataclass(frozen=True)
class ReleaseSigned:
    """The outcome of importing a release signature for a package manifest."""

    request: SigningRequest
    done: bool  # the manifest has its signatures: deploying the package builds it now


@dataclass(frozen=True)
class Rotation:
    """The outcome of ``rotate`` or ``import_signature``."""

    role: Role
    version: int
    new_keyid: str
    done: bool  # the new keyring is in force; False: waiting for the signatures of ``missing``
    request: SigningRequest
    missing: list[SignerGroup]


class KeyStore:
    """Reads, creates and uses the keys in one directory; safe to share between threads."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self._lock = threading.Lock()
        # role -> (file identity, key): a rotation by another process (the CLI) replaces the
        # file, and the serving hub must sign with the new key from then on.
        self._cache: dict[Role, tuple[tuple[int, int], SigningKey]] = {}

    def _pem_path(self, role: Role | OfflineRole) -> Path:
        return self.keys_dir / f"{role}.pem"

    def _exported_marker(self, role: OfflineRole) -> Path:
        return self.keys_dir / f"{role}.exported"

    @property
    def keyring_path(self) -> Path:
        return self.keys_dir / KEYRING_FILE

    def exists(self) -> bool:
        return self.keyring_path.exists() or any(self._pem_path(r).exists() for r in Role)

    def init(self, *, keyring_ttl_days: int, force: bool = False) -> KeyStatus:
        """Create root, release and director keys and a root-signed keyring."""
        with self._lock:
            if self.exists() and not force:
                raise Conflict(f"keys already exist in {self.keys_dir}; use --force to replace")
            keys = {role: SigningKey.generate() for role in Role}
            self.keys_dir.mkdir(parents=True, exist_ok=True)
            for role, key in keys.items():
                write_secret(self._pem_path(role), key.private_pem(), overwrite=True)
            for offline in OfflineRole:
                self._exported_marker(offline).unlink(missing_ok=True)
            write_secret(
                self.keys_dir / ROOT_PUBLIC_FILE,
                (keys[Role.ROOT].public_b64 + "\n").encode(),
                overwrite=True,
            )
            keyring = Keyring(
                version=1,
                expires_at=utcnow() + timedelta(days=keyring_ttl_days),
                # The root lists itself, so a later root rotation has a current root to name.
                keys={keys[r].keyid: PublicKey(public=keys[r].public_b64) for r in Role},
                roles={r: RoleKeys(keyids=[keys[r].keyid]) for r in Role},
            )
            signed_part = document_dict(keyring)
            signed = Signed(signed=signed_part, signatures=[keys[Role.ROOT].sign(signed_part)])
            self._cancel_pending()
            self._write_keyring(signed, version=1)
            self._cache = {}
        logger.info("created hub keys", extra={"keys_dir": str(self.keys_dir)})
        return self.status()

    def ensure(self, *, keyring_ttl_days: int) -> None:
        """Create the keys on a hub's first start; leave existing (or partly offline) keys."""
        if not self.exists():
            self.init(keyring_ttl_days=keyring_ttl_days)

    def keyring(self) -> Signed:
        """The root-signed keyring devices receive with every desired state."""
        try:
            raw = json.loads(self.keyring_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SigningUnavailable(
                f"no keyring in {self.keys_dir}; run `outpost-hub keys init`"
            ) from None
        return Signed.model_validate(raw)

    def keyring_document(self) -> Keyring:
        return Keyring.model_validate(self.keyring().signed)

    def root_public_b64(self) -> str:
        try:
            return (self.keys_dir / ROOT_PUBLIC_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise SigningUnavailable(
                f"no root public key in {self.keys_dir}; run `outpost-hub keys init`"
            ) from None

    def _key(self, role: Role) -> SigningKey:
        with self._lock:
            path = self._pem_path(role)
            try:
                st = path.stat()
                identity = (st.st_ino, st.st_mtime_ns)
                cached = self._cache.get(role)
                if cached is not None and cached[0] == identity:
                    return cached[1]
                pem = path.read_bytes()
            except FileNotFoundError:
                self._cache.pop(role, None)
                if role is Role.RELEASE:
                    raise SigningUnavailable(
                        "the release key is offline (removed from the hub): building a new "
                        "package needs it; bring it back with `outpost-hub keys import` or "
                        "deploy an already built package"
                    ) from None
                raise SigningUnavailable(
                    f"the {role} private key is missing from {self.keys_dir}"
                ) from None
            key = SigningKey.from_pem(pem)
            self._cache[role] = (identity, key)
            return key

    def sign_release(self, document: dict[str, Any]) -> Signature:
        """Sign a package manifest with the release key, or return the signature made offline
        for exactly this manifest (``import_signature``). With neither, a signing request for
        it is left in keys/release-requests and SigningUnavailable says how to sign it."""
        try:
            return self._key(Role.RELEASE).sign(document)
        except SigningUnavailable:
            if self._pem_path(Role.RELEASE).exists():
                raise
        sha256 = document_sha256(document)
        stored = self._release_signature(sha256, document)
        if stored is not None:
            return stored
        path = self._release_request(document, sha256)
        raise SigningUnavailable(
            "the release key is offline (removed from the hub): building a new package needs "
            "it; bring it back with `outpost-hub keys import` or deploy an already built "
            f"package, or sign this manifest offline: the request is {path} "
            "(`outpost-hub keys sign-request REQUEST --key release.pem --out SIG` where the key "
            "is, `outpost-hub keys import-signature SIG` here, then deploy again)"
        )

    def _release_signature(self, sha256: str, document: dict[str, Any]) -> Signature | None:
        try:
            raw = (self.keys_dir / RELEASE_SIGNATURES_DIR / f"{sha256}.json").read_bytes()
        except FileNotFoundError:
            return None
        role = self.keyring_document().roles[Role.RELEASE]
        keys = self.keyring_document().keys
        for sig in DetachedSignatures.model_validate_json(raw).signatures:
            # Only while its key still holds the release role: a rotation retires it.
            if sig.keyid in role.keyids and verify_signature(
                keys[sig.keyid].public, sig.sig, document
            ):
                return sig
        return None

    def _release_request(self, document: dict[str, Any], sha256: str) -> Path:
        keyring = self.keyring_document()
        role = keyring.roles[Role.RELEASE]
        model = document.get("model", {})
        request = new_request(
            kind=RequestKind.MANIFEST,
            summary=(
                f"package manifest of {model.get('name')} version {model.get('version')} "
                f"({len(document.get('files', []))} files)"
            ),
            document=document,
            keys={kid: keyring.keys[kid].public for kid in role.keyids},
            groups=[
                SignerGroup(name="release", keyids=list(role.keyids), threshold=role.threshold)
            ],
            created_at=utcnow(),
        )
        path = self.keys_dir / RELEASE_REQUESTS_DIR / f"{sha256}.json"
        if not path.exists():
            write_secret(path, request.model_dump_json(indent=2).encode(), overwrite=True)
        return path

    def release_requests(self) -> list[SigningRequest]:
        """Package manifests waiting for an offline release signature."""
        folder = self.keys_dir / RELEASE_REQUESTS_DIR
        return [
            SigningRequest.model_validate_json(p.read_bytes())
            for p in sorted(folder.glob("*.json"))
        ]

    def _import_release_signature(self, answer: SignatureFile) -> ReleaseSigned:
        path = self.keys_dir / RELEASE_REQUESTS_DIR / f"{answer.sha256}.json"
        try:
            request = SigningRequest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise NotFound(
                f"no package manifest with sha256 {answer.sha256[:16]} waits for a release "
                "signature here"
            ) from None
        request = add_signature(request, answer)
        missing = unmet_groups(request)
        if missing:
            write_secret(path, request.model_dump_json(indent=2).encode(), overwrite=True)
            return ReleaseSigned(request, done=False)
        write_secret(
            self.keys_dir / RELEASE_SIGNATURES_DIR / f"{answer.sha256}.json",
            DetachedSignatures(signatures=request.signatures).model_dump_json().encode(),
            overwrite=True,
        )
        path.unlink()
        return ReleaseSigned(request, done=True)

    def sign_director(self, document: dict[str, Any]) -> Signature:
        """Sign a desired state or command with the always-online director key."""
        return self._key(Role.DIRECTOR).sign(document)

    def status(self) -> KeyStatus:
        keyring = self.keyring_document()
        pending = self.pending_request()
        return KeyStatus(
            root_keyid=self._root_role(keyring)[0][0],
            release_keyid=keyring.roles[Role.RELEASE].keyids[0],
            director_keyid=keyring.roles[Role.DIRECTOR].keyids[0],
            keyring_version=keyring.version,
            expires_at=keyring.expires_at,
            private_present={str(r): self._pem_path(r).exists() for r in Role},
            exported={str(r): self._exported_marker(r).exists() for r in OfflineRole},
            pending=pending.summary if pending is not None else None,
        )

    def export(self, role: OfflineRole, out: Path) -> None:
        """Copy a private key to ``out`` (mode 0600, never over an existing file)."""
        try:
            pem = self._pem_path(role).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"the {role} private key is not on this hub") from None
        try:
            write_secret(out, pem)
        except FileExistsError:
            raise Conflict(f"{out} exists; choose another path") from None
        write_secret(self._exported_marker(role), b"", overwrite=True)
        logger.info("exported private key", extra={"role": str(role), "path": str(out)})

    def remove(self, role: OfflineRole, *, yes: bool = False) -> None:
        """Take a private key offline; refuses unless it was exported (or ``yes``)."""
        path = self._pem_path(role)
        if not path.exists():
            raise NotFound(f"the {role} private key is not on this hub")
        if not yes and not self._exported_marker(role).exists():
            raise InvalidInput(
                f"the {role} key was never exported; export it first or pass --yes to lose it"
            )
        with self._lock:
            path.unlink()
            self._cache.pop(Role(role), None)
        logger.info("removed private key", extra={"role": str(role)})

    def import_key(self, role: OfflineRole, pem_file: Path) -> None:
        """Bring an offline key back; it must be the key the keyring (or root.pub) names."""
        try:
            key = SigningKey.from_pem(pem_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read an Ed25519 key from {pem_file}: {exc}") from None
        if role is OfflineRole.ROOT:
            expected = self.root_public_b64()
            matches = key.public_b64 == expected
        else:
            matches = key.keyid in self.keyring_document().roles[Role.RELEASE].keyids
        if not matches:
            raise InvalidInput(f"{pem_file} is not this hub's {role} key")
        write_secret(self._pem_path(role), key.private_pem(), overwrite=True)
        with self._lock:
            self._cache.pop(Role(role), None)

    # -- rotation -----------------------------------------------------------------------------

    @property
    def _pending_dir(self) -> Path:
        return self.keys_dir / PENDING_DIR

    def _write_keyring(self, signed: Signed, *, version: int) -> None:
        data = json.dumps(document_dict(signed), indent=2, sort_keys=True).encode()
        history = self.keys_dir / HISTORY_DIR
        if version == 1 and history.exists():
            for old in history.glob("*.json"):
                old.unlink()  # a fresh `init`: the old chain belongs to keys that are gone
        previous = history / f"{version - 1}.json"
        if version > 1 and not previous.exists() and self.keyring_path.exists():
            # A hub from before the history was kept: record the version being replaced.
            write_secret(previous, self.keyring_path.read_bytes())
        write_secret(history / f"{version}.json", data, overwrite=True)
        write_secret(self.keyring_path, data, overwrite=True)

    def _root_role(self, keyring: Keyring) -> tuple[list[str], int, dict[str, str]]:
        """The current root key ids, threshold and public keys; a keyring from before roots
        were listed has the one root key of root.pub."""
        role = keyring.roles.get(Role.ROOT)
        if role is not None:
            publics = {kid: keyring.keys[kid].public for kid in role.keyids}
            return list(role.keyids), role.threshold, publics
        public = self.root_public_b64()
        kid = key_id(b64decode(public))
        return [kid], 1, {kid: public}

    def pending_request(self) -> SigningRequest | None:
        try:
            raw = (self._pending_dir / REQUEST_FILE).read_bytes()
        except FileNotFoundError:
            return None
        return SigningRequest.model_validate_json(raw)

    def _cancel_pending(self) -> None:
        if self._pending_dir.exists():
            for path in self._pending_dir.iterdir():
                path.unlink()
            self._pending_dir.rmdir()

    def cancel_pending(self) -> None:
        """Drop a rotation that waits for signatures (its new key is thrown away)."""
        if self.pending_request() is None:
            raise NotFound("no rotation is waiting for signatures")
        self._cancel_pending()

    def rotate(self, role: Role, *, keyring_ttl_days: int, offline: bool = False) -> Rotation:
        """Issue keyring version N+1 with a new key for ``role``.

        It is signed here by the keys this hub holds; with ``offline`` (or when a needed root
        key is not here) it waits in ``pending/`` as a signing request for the rest.
        """
        pending = self.pending_request()
        if pending is not None and not unmet_groups(pending):
            # Fully signed but not in force: the last rotation stopped part-way through
            # ``_complete`` (a crash). Finish that one rather than start another.
            logger.warning("finishing an interrupted rotation", extra={"summary": pending.summary})
            return self._complete(pending)
        if pending is not None:
            raise Conflict(
                "a rotation is already waiting for signatures: finish it with "
                "`outpost-hub keys import-signature` or drop it with `outpost-hub keys cancel`"
            )
        current = self.keyring_document()
        root_ids, threshold, root_publics = self._root_role(current)
        replaced = root_ids if role is Role.ROOT else current.roles[role].keyids
        new_key = SigningKey.generate()
        keys = dict(current.keys)
        keys.update({kid: PublicKey(public=pub) for kid, pub in root_publics.items()})
        roles = dict(current.roles)
        roles.setdefault(Role.ROOT, RoleKeys(keyids=root_ids, threshold=threshold))
        roles[role] = RoleKeys(keyids=[new_key.keyid])
        keys[new_key.keyid] = PublicKey(public=new_key.public_b64)
        used = {kid for r in roles.values() for kid in r.keyids}
        keyring = Keyring(
            version=current.version + 1,
            expires_at=utcnow() + timedelta(days=keyring_ttl_days),
            keys={kid: pk for kid, pk in keys.items() if kid in used},
            roles=roles,
        )
        document = document_dict(keyring)
        groups = [SignerGroup(name="current root", keyids=root_ids, threshold=threshold)]
        signer_keys = dict(root_publics)
        if role is Role.ROOT:
            groups.append(SignerGroup(name="new root", keyids=[new_key.keyid]))
            signer_keys[new_key.keyid] = new_key.public_b64
        request = new_request(
            kind=RequestKind.KEYRING,
            summary=(
                f"keyring version {keyring.version}: new {role} key {new_key.keyid[:16]} "
                f"(replaces {', '.join(k[:16] for k in replaced)})"
            ),
            version=keyring.version,
            document=document,
            keys=signer_keys,
            groups=groups,
            created_at=utcnow(),
        )
        signatures: list[Signature] = []
        if role is Role.ROOT:
            signatures.append(new_key.sign(document))
        root_pem = self._pem_path(Role.ROOT)
        if not offline and root_pem.exists():
            held = SigningKey.from_pem(root_pem.read_bytes())
            if held.keyid in root_ids:
                signatures.append(held.sign(document))
        request = request.model_copy(update={"signatures": signatures})
        missing = unmet_groups(request)
        if missing and not offline:
            raise SigningUnavailable(
                f"the root key is not on this hub; rotate with --offline to export a signing "
                f"request for {', '.join(g.name for g in missing)} keys"
            )
        with self._lock:
            self._pending_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_secret(self._pending_dir / f"{role}.pem", new_key.private_pem(), overwrite=True)
            write_secret(
                self._pending_dir / REQUEST_FILE,
                request.model_dump_json(indent=2).encode(),
                overwrite=True,
            )
        logger.info(
            "keyring rotation prepared", extra={"role": str(role), "version": keyring.version}
        )
        if missing:
            return Rotation(role, keyring.version, new_key.keyid, False, request, missing)
        return self._complete(request)

    def import_signature(self, answer: SignatureFile) -> "Rotation | ReleaseSigned":
        """Add an offline signature to the pending rotation (complete it once every group's
        threshold is reached), or to a package manifest waiting for its release signature."""
        if answer.kind is RequestKind.MANIFEST:
            return self._import_release_signature(answer)
        request = self.pending_request()
        if request is None:
            raise NotFound("no rotation is waiting for signatures")
        request = add_signature(request, answer)
        write_secret(
            self._pending_dir / REQUEST_FILE,
            request.model_dump_json(indent=2).encode(),
            overwrite=True,
        )
        missing = unmet_groups(request)
        if missing:
            role, new_keyid = self._pending_role(request)
            assert request.version is not None
            return Rotation(role, request.version, new_keyid, False, request, missing)
        return self._complete(request)

    def _pending_role(self, request: SigningRequest) -> tuple[Role, str]:
        for role in Role:
            path = self._pending_dir / f"{role}.pem"
            if path.exists():
                return role, SigningKey.from_pem(path.read_bytes()).keyid
        raise SigningUnavailable(
            f"the new key of the pending rotation is missing from {self._pending_dir}"
        )

    def _complete(self, request: SigningRequest) -> Rotation:
        """Put the signed keyring in force: new private key, history, keyring, root.pub."""
        role, new_keyid = self._pending_role(request)
        keyring = Keyring.model_validate(request.document)
        # Each key once, in the order the groups name them.
        signatures = list({s.keyid: s for s in request.signatures}.values())
        signed = Signed(signed=request.document, signatures=signatures)
        new_pem = (self._pending_dir / f"{role}.pem").read_bytes()
        with self._lock:
            write_secret(self._pem_path(role), new_pem, overwrite=True)
            self._write_keyring(signed, version=keyring.version)
            if role is Role.ROOT:
                write_secret(
                    self.keys_dir / ROOT_PUBLIC_FILE,
                    (keyring.keys[new_keyid].public + "\n").encode(),
                    overwrite=True,
                )
            if role in (Role.ROOT, Role.RELEASE):
                self._exported_marker(OfflineRole(role)).unlink(missing_ok=True)
            self._cache.pop(role, None)
            self._cancel_pending()
        logger.info("keyring rotated", extra={"role": str(role), "version": keyring.version})
        return Rotation(role, keyring.version, new_keyid, True, request, [])

    def keyring_chain(self, *, limit: int = KEYRING_CHAIN_SENT) -> list[Signed]:
        """The last ``limit`` keyring versions before the current one, oldest first: sent
        beside the keyring so a device that missed rotations can walk them one by one."""
        current = self.keyring_document().version
        wanted = [v for v in self.keyring_history() if v < current][-limit:]
        chain = []
        for version in wanted:
            raw = (self.keys_dir / HISTORY_DIR / f"{version}.json").read_bytes()
            chain.append(Signed.model_validate_json(raw))
        return chain

    def keyring_history(self) -> list[int]:
        """The keyring versions kept in keys/keyrings."""
        return sorted(int(p.stem) for p in (self.keys_dir / HISTORY_DIR).glob("*.json"))
