"""Signing requests and signature files: how an offline key signs without the hub's data.

    outpost-hub keys rotate --role root --offline --out req.json   (on the hub)
    outpost-hub keys sign-request req.json --key root.pem --out sig.json   (on the offline machine)
    outpost-hub keys import-signature sig.json   (on the hub)

A request carries the document to sign, the sha256 of its canonical bytes, the keys that may
sign it grouped with their thresholds, and the signatures already made. The offline machine
needs only this module: it checks the request is whole, that its key is one asked for, and
signs the canonical bytes. The hub keeps its own copy of the request and judges a returned
signature against that copy, never against what the offline machine was shown, so an edited
request yields a signature the hub refuses.
"""

import hashlib
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from agent.protocol.canonical import canonical_bytes
from agent.protocol.keys import Signature, SigningKey, verify_signature
from hub.errors import InvalidInput

REQUEST_TYPE: Literal["outpost-signing-request"] = "outpost-signing-request"
SIGNATURE_TYPE: Literal["outpost-signature"] = "outpost-signature"


class RequestKind(StrEnum):
    KEYRING = "keyring"  # a new keyring version, signed by root keys
    MANIFEST = "manifest"  # a package manifest, signed by a release key


class SignerGroup(BaseModel):
    """Keys of which ``threshold`` distinct ones must sign (each key counts once)."""

    model_config = ConfigDict(frozen=True)

    name: str  # "current root", "new root", "release"
    keyids: list[str]
    threshold: int = Field(default=1, ge=1)


class SigningRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: Literal["outpost-signing-request"] = REQUEST_TYPE
    kind: RequestKind
    summary: str  # what is being signed, in words, shown before signing
    version: int | None = None  # the keyring version, for kind keyring
    document: dict[str, Any]
    sha256: str
    keys: dict[str, str]  # keyid -> base64 public key of every key that may sign
    groups: list[SignerGroup]
    signatures: list[Signature] = Field(default_factory=list)
    created_at: AwareDatetime

    def label(self) -> str:
        return f"keyring version {self.version}" if self.version is not None else str(self.kind)


class SignatureFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: Literal["outpost-signature"] = SIGNATURE_TYPE
    kind: RequestKind
    version: int | None = None
    sha256: str  # of the document signed, so the hub can tell which request it answers
    signature: Signature


def document_sha256(document: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(document)).hexdigest()


def new_request(
    *,
    kind: RequestKind,
    summary: str,
    document: dict[str, Any],
    keys: dict[str, str],
    groups: list[SignerGroup],
    created_at: datetime,
    version: int | None = None,
) -> SigningRequest:
    return SigningRequest(
        kind=kind,
        summary=summary,
        version=version,
        document=document,
        sha256=document_sha256(document),
        keys=keys,
        groups=groups,
        created_at=created_at,
    )


def parse_request(raw: bytes, *, source: str) -> SigningRequest:
    """A request read from a file, checked to be whole: its document matches its digest."""
    try:
        request = SigningRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidInput(f"{source} is not an Outpost signing request: {_first(exc)}") from None
    if document_sha256(request.document) != request.sha256:
        raise InvalidInput(
            f"{source} was changed after it was exported: its document does not match its "
            "sha256; export the request again"
        )
    return request


def parse_signature(raw: bytes, *, source: str) -> SignatureFile:
    try:
        return SignatureFile.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidInput(f"{source} is not an Outpost signature file: {_first(exc)}") from None


def _first(exc: ValidationError) -> str:
    e = exc.errors()[0]
    return f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}"


def sign_request(request: SigningRequest, key: SigningKey) -> SignatureFile:
    """Sign ``request`` with ``key``, refusing a key the request does not ask for."""
    if key.keyid not in request.keys:
        asked = "; ".join(
            f"{g.name}: {', '.join(k[:16] for k in g.keyids)}" for g in request.groups
        )
        raise InvalidInput(
            f"key {key.keyid[:16]} is not one this request asks for ({asked}); wrong key file?"
        )
    return SignatureFile(
        kind=request.kind,
        version=request.version,
        sha256=request.sha256,
        signature=key.sign(request.document),
    )


def add_signature(request: SigningRequest, answer: SignatureFile) -> SigningRequest:
    """``request`` with ``answer``'s signature added, after checking it answers this request,
    comes from a key it asks for and verifies over the request's own document."""
    if answer.kind != request.kind or answer.version != request.version:
        raise InvalidInput(
            f"the signature is for {_what(answer.kind, answer.version)}, the pending request is "
            f"for {request.label()}"
        )
    if answer.sha256 != request.sha256:
        raise InvalidInput(
            f"the signature is over other bytes than the pending request for {request.label()} "
            "(sha256 differs): it signed an older or edited copy of the request"
        )
    keyid = answer.signature.keyid
    if keyid not in request.keys:
        raise InvalidInput(
            f"the signature is by key {keyid[:16]}, which this request does not ask for"
        )
    if not verify_signature(request.keys[keyid], answer.signature.sig, request.document):
        raise InvalidInput(
            f"the signature by key {keyid[:16]} does not verify over the pending request's "
            "document: the request was edited before signing, or the file is damaged"
        )
    kept = [s for s in request.signatures if s.keyid != keyid]
    return request.model_copy(update={"signatures": [*kept, answer.signature]})


def _what(kind: RequestKind, version: int | None) -> str:
    return f"keyring version {version}" if version is not None else str(kind)


def unmet_groups(request: SigningRequest) -> list[SignerGroup]:
    """The groups whose threshold the request's valid signatures do not reach yet."""
    valid = {
        s.keyid
        for s in request.signatures
        if s.keyid in request.keys
        and verify_signature(request.keys[s.keyid], s.sig, request.document)
    }
    return [g for g in request.groups if len(valid & set(g.keyids)) < g.threshold]
