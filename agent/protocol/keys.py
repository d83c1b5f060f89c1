"""Ed25519 keys, key ids and detached signatures over canonical bytes.

A key id is the sha256 of the raw 32-byte public key, so the same key always has the same id and
a keyring cannot list one key twice under two names to reach a threshold.

Signing (the hub, tests) uses ``cryptography``, imported only there; checking a signature, all a
device does, goes through `agent.protocol.ed25519` and keeps ``cryptography`` out of the agent
daemon's memory.
"""

import base64
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from agent.protocol import ed25519
from agent.protocol.canonical import canonical_bytes

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def public_key_bytes(key: "Ed25519PublicKey") -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()


class Signature(BaseModel):
    """One signature over a document's canonical bytes."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    keyid: str
    sig: str


@dataclass(frozen=True)
class SigningKey:
    """A private key with its id, as used by the hub's signing service and by tests."""

    private: "Ed25519PrivateKey"

    @classmethod
    def generate(cls) -> "SigningKey":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @property
    def public_raw(self) -> bytes:
        return public_key_bytes(self.private.public_key())

    @property
    def public_b64(self) -> str:
        return b64encode(self.public_raw)

    @property
    def keyid(self) -> str:
        return key_id(self.public_raw)

    def sign(self, document: Any) -> Signature:
        return Signature(
            keyid=self.keyid, sig=b64encode(self.private.sign(canonical_bytes(document)))
        )

    def private_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> "SigningKey":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("not an Ed25519 private key")
        return cls(key)


def verify_signature(public_b64: str, signature_b64: str, document: Any) -> bool:
    """True when ``signature_b64`` is a valid signature of ``document`` by the key."""
    try:
        public_raw, signature = b64decode(public_b64), b64decode(signature_b64)
        # A document with no canonical form (NaN, a float out of range) has no valid signature.
        message = canonical_bytes(document)
    except ValueError:  # also binascii.Error (not base64), UnicodeError (not ASCII)
        return False
    return ed25519.verify(public_raw, signature, message)
