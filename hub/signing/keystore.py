"""The hub's Ed25519 keys and the root-signed keyring, kept as files in data_dir/keys.

    keys/root.pem, release.pem, director.pem   private keys, mode 0600
    keys/root.pub                             the root public key (base64 raw), kept when the
                                              root private key goes offline: devices pin it
    keys/keyring.json                         Signed keyring (root signature)
    keys/<role>.exported                      marks that the private key was exported

Root and release keys may be taken offline (exported, then removed); the director key signs
desired states on every deployment and always stays here.
"""

import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.protocol.documents import Keyring, PublicKey, Role, RoleKeys, Signed, document_dict
from agent.protocol.keys import Signature, SigningKey
from hub.database import utcnow
from hub.errors import Conflict, InvalidInput, NotFound, SigningUnavailable
from hub.secretfiles import write_secret

logger = logging.getLogger(__name__)

KEYRING_FILE = "keyring.json"
ROOT_PUBLIC_FILE = "root.pub"


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


class KeyStore:
    """Reads, creates and uses the keys in one directory; safe to share between threads."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self._lock = threading.Lock()
        self._cache: dict[Role, SigningKey] = {}

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
                keys={
                    keys[r].keyid: PublicKey(public=keys[r].public_b64)
                    for r in (Role.RELEASE, Role.DIRECTOR)
                },
                roles={
                    Role.RELEASE: RoleKeys(keyids=[keys[Role.RELEASE].keyid]),
                    Role.DIRECTOR: RoleKeys(keyids=[keys[Role.DIRECTOR].keyid]),
                },
            )
            signed_part = document_dict(keyring)
            signed = Signed(signed=signed_part, signatures=[keys[Role.ROOT].sign(signed_part)])
            write_secret(
                self.keyring_path,
                json.dumps(document_dict(signed), indent=2, sort_keys=True).encode(),
                overwrite=True,
            )
            self._cache = dict(keys)
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
            cached = self._cache.get(role)
            if cached is not None and self._pem_path(role).exists():
                return cached
            self._cache.pop(role, None)
            try:
                pem = self._pem_path(role).read_bytes()
            except FileNotFoundError:
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
            self._cache[role] = key
            return key

    def sign_release(self, document: dict[str, Any]) -> Signature:
        """Sign a package manifest; raises SigningUnavailable when the release key is offline."""
        return self._key(Role.RELEASE).sign(document)

    def sign_director(self, document: dict[str, Any]) -> Signature:
        """Sign a desired state or command with the always-online director key."""
        return self._key(Role.DIRECTOR).sign(document)

    def status(self) -> KeyStatus:
        keyring = self.keyring_document()
        signed = self.keyring()
        return KeyStatus(
            root_keyid=signed.signatures[0].keyid if signed.signatures else "",
            release_keyid=keyring.roles[Role.RELEASE].keyids[0],
            director_keyid=keyring.roles[Role.DIRECTOR].keyids[0],
            keyring_version=keyring.version,
            expires_at=keyring.expires_at,
            private_present={str(r): self._pem_path(r).exists() for r in Role},
            exported={str(r): self._exported_marker(r).exists() for r in OfflineRole},
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
