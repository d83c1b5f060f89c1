"""Pure verification of signed documents: bytes and documents in, a verified document or a
`TrustError` out. No I/O, no clock reads: the caller passes one fixed ``now`` per update, so
every expiry in one update is judged against the same instant (TUF's fixed update start time).

Roles (DESIGN.md): the pinned root key signs the keyring; the keyring names the release keys that
sign package manifests and the director keys that sign desired states. A stolen director key can
therefore withhold or reorder releases but not make a device run a package never released.
"""

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pydantic import ValidationError

from agent.errors import IncompatibleError, RejectedError, TrustError
from agent.protocol.canonical import canonical_bytes
from agent.protocol.documents import (
    ANY_DEVICE_CLASS,
    MANIFEST_FORMAT,
    Command,
    DesiredState,
    DetachedSignatures,
    Keyring,
    Manifest,
    Role,
    RoleKeys,
    Signed,
)
from agent.protocol.keys import Signature, key_id, verify_signature
from agent.protocol.keys import b64decode as _b64decode
from agent.protocol.messages import Reason


def _first_errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])


def _count_valid(
    document: object, signatures: list[Signature], *, keys: dict[str, str], allowed: set[str]
) -> tuple[int, bool, bool]:
    """Distinct allowed keys with a valid signature, and whether any allowed key signed badly
    or any signature came from a key the role does not name."""
    valid: set[str] = set()
    bad = unknown = False
    for sig in signatures:
        if sig.keyid not in allowed or sig.keyid not in keys:
            unknown = True
            continue
        if sig.keyid in valid:
            continue  # each key counts at most once toward the threshold
        if verify_signature(keys[sig.keyid], sig.sig, document):
            valid.add(sig.keyid)
        else:
            bad = True
    return len(valid), bad, unknown


def _check_role(
    document: object, signatures: list[Signature], keyring: Keyring, role: Role
) -> None:
    role_keys = keyring.roles.get(role)
    if role_keys is None or not role_keys.keyids:
        raise TrustError(f"keyring names no {role} keys", reason=Reason.UNKNOWN_KEY)
    keys = {kid: pk.public for kid, pk in keyring.keys.items()}
    count, bad, unknown = _count_valid(
        document, signatures, keys=keys, allowed=set(role_keys.keyids)
    )
    if count >= role_keys.threshold:
        return
    if bad:
        raise TrustError(f"invalid {role} signature", reason=Reason.SIGNATURE)
    if count == 0:
        reason = Reason.NOT_RELEASED if role is Role.RELEASE else Reason.UNKNOWN_KEY
        what = "no signature by a" if not unknown else "signed only by keys that are not"
        raise TrustError(f"{what} {role} key of the keyring", reason=reason)
    raise TrustError(
        f"{count} valid {role} signatures, {role_keys.threshold} needed", reason=Reason.THRESHOLD
    )


def _root_role(keyring: Keyring | None, pinned_b64: str) -> tuple[dict[str, str], RoleKeys]:
    """The root keys a keyring names, or the key pinned at enrolment when it names none (a
    keyring from a hub that did not list its root yet)."""
    if keyring is not None:
        role = keyring.roles.get(Role.ROOT)
        if role is not None:
            keys = {kid: keyring.keys[kid].public for kid in role.keyids if kid in keyring.keys}
            return keys, role
    pinned_id = key_id(_b64decode(pinned_b64))
    return {pinned_id: pinned_b64}, RoleKeys(keyids=[pinned_id])


def _require_roots(signed: Signed, keys: dict[str, str], role: RoleKeys, which: str) -> None:
    count, bad, _ = _count_valid(signed.signed, signed.signatures, keys=keys, allowed=set(keys))
    if count >= role.threshold:
        return
    if bad:
        raise TrustError(
            f"keyring has an invalid signature by a {which} root key", reason=Reason.SIGNATURE
        )
    if count == 0:
        raise TrustError(
            f"keyring is not signed by the {which} root key", reason=Reason.UNKNOWN_KEY
        )
    raise TrustError(
        f"keyring has {count} valid signatures by {which} root keys, {role.threshold} needed",
        reason=Reason.THRESHOLD,
    )


def _parse_keyring(signed: Signed) -> Keyring:
    try:
        keyring = Keyring.model_validate(signed.signed)
    except ValidationError as exc:
        raise RejectedError(f"malformed keyring: {_first_errors(exc)}") from None
    for kid, pk in keyring.keys.items():
        try:
            listed_id = key_id(_b64decode(pk.public))
        except ValueError:
            listed_id = ""
        if listed_id != kid:
            raise TrustError(
                f"keyring lists key {kid[:12]} under a wrong id", reason=Reason.MALFORMED
            )
    for role, role_keys in keyring.roles.items():
        distinct = set(role_keys.keyids)
        # A role that can never reach its threshold would lock the device out for good, and
        # a key listed twice must not count twice (THREATS.md A3).
        if len(distinct) != len(role_keys.keyids) or not distinct <= set(keyring.keys):
            raise TrustError(
                f"keyring lists a {role} key twice or one it does not define",
                reason=Reason.MALFORMED,
            )
        if role_keys.threshold > len(distinct):
            raise TrustError(
                f"keyring asks {role_keys.threshold} {role} signatures of {len(distinct)} keys",
                reason=Reason.MALFORMED,
            )
    return keyring


def verify_keyring(
    signed: Signed, *, root_public_b64: str, current: Keyring | None, now: datetime | None
) -> Keyring:
    """Accept a keyring under the rules of a TUF root update.

    With no ``current`` keyring (enrolment) it must be signed by the pinned root key. Otherwise
    it is the current one again, or exactly version current+1 signed by a threshold of the
    current root keys AND a threshold of the root keys it names itself (so a root rotation
    needs the old and the new root; each key counts once). ``now`` is the update's fixed start
    time; ``now=None`` skips the expiry judgement (see ``verify_stored_keyring``).
    """
    trusted_keys, trusted_role = _root_role(current, root_public_b64)
    _require_roots(signed, trusted_keys, trusted_role, "current" if current else "pinned")
    keyring = _parse_keyring(signed)
    new_keys, new_role = _root_role(keyring, root_public_b64)
    if new_keys != trusted_keys or new_role != trusted_role:
        _require_roots(signed, new_keys, new_role, "new")
    if current is not None:
        if keyring.version == current.version and keyring != current:
            raise TrustError(
                f"a different keyring with the same version {keyring.version}", reason=Reason.REPLAY
            )
        if keyring.version < current.version:
            raise TrustError(
                f"keyring version {keyring.version} is older than {current.version}",
                reason=Reason.REPLAY,
            )
        if keyring.version > current.version + 1:
            # TUF: root versions move N -> N+1 only, so every step is vouched for by the keys
            # of the step before it.
            raise TrustError(
                f"keyring version {keyring.version} skips {current.version + 1}: only the next "
                "version is accepted",
                reason=Reason.REPLAY,
            )
    if now is not None and keyring.expires_at <= now:
        raise TrustError(
            f"keyring expired at {keyring.expires_at:%Y-%m-%dT%H:%M:%SZ}", reason=Reason.EXPIRED
        )
    return keyring


MAX_KEYRING_STEPS = 32  # versions one update may walk (python-tuf: max_root_rotations 256)


def verify_keyring_update(
    final: Signed,
    earlier: list[Signed],
    *,
    root_public_b64: str,
    current: Keyring | None,
    now: datetime,
) -> Keyring:
    """The keyring to hold after an update that brought ``final`` and the ``earlier`` versions
    the hub keeps (a device that missed rotations walks them one at a time, as a TUF client
    walks root N+1, N+2, ...). Each step must pass ``verify_keyring`` against the one before;
    only the final one is judged on expiry (at the update's one ``now``), as in TUF, where an
    intermediate root may have expired since. Raises on the first step that fails: nothing of
    the update is kept then.
    """
    if current is None:
        return verify_keyring(final, root_public_b64=root_public_b64, current=None, now=now)
    trusted = current
    steps = 0
    for signed in sorted(earlier, key=_claimed_version):
        if _claimed_version(signed) != trusted.version + 1:
            continue  # one the device has, or beyond a gap: the final check names the gap
        steps += 1
        if steps > MAX_KEYRING_STEPS:
            raise TrustError(
                f"more than {MAX_KEYRING_STEPS} keyring versions in one update",
                reason=Reason.TOO_LARGE,
            )
        trusted = verify_keyring(signed, root_public_b64=root_public_b64, current=trusted, now=None)
    return verify_keyring(final, root_public_b64=root_public_b64, current=trusted, now=now)


def _claimed_version(signed: Signed) -> int:
    """The version a keyring says it has, before anything about it is trusted (for ordering
    only: every step is verified before it counts)."""
    version = signed.signed.get("version")
    return version if isinstance(version, int) else -1


def verify_stored_keyring(signed: Signed, *, root_public_b64: str) -> Keyring:
    """The keyring the device itself accepted earlier, read back on start-up.

    It was verified step by step on arrival; after root rotations the key pinned at enrolment
    no longer signs it, so it is checked against the root keys it names (self-consistency, as
    TUF trusts its local root). Its expiry is not judged, so a device that was off past it
    still serves what it verified (THREATS.md C7).
    """
    keyring = _parse_keyring(signed)
    keys, role = _root_role(keyring, root_public_b64)
    _require_roots(signed, keys, role, "listed")
    return keyring


class DesiredVerdict(StrEnum):
    NEW = "new"  # a newer desired state: reconcile towards it
    SAME = "same"  # the one already applied, delivered again (retained message on reconnect)


@dataclass(frozen=True)
class VerifiedDesired:
    state: DesiredState
    verdict: DesiredVerdict
    fingerprint: str  # sha256 of the signed document's canonical bytes


def desired_fingerprint(signed: Signed) -> str:
    return hashlib.sha256(canonical_bytes(signed.signed)).hexdigest()


def verify_desired(
    signed: Signed,
    *,
    keyring: Keyring,
    device_id: str,
    last_counter: int,
    last_fingerprint: str | None,
    now: datetime | None,
) -> VerifiedDesired:
    """Accept a director-signed desired state for this device, newer than the last one.

    ``now=None`` re-reads the state the device stored itself, whose expiry is not judged again.
    """
    _check_role(signed.signed, signed.signatures, keyring, Role.DIRECTOR)
    try:
        state = DesiredState.model_validate(signed.signed)
    except ValidationError as exc:
        raise RejectedError(
            f"malformed desired state: {exc.errors(include_url=False)[:2]}"
        ) from None
    if state.device_id != device_id:
        raise TrustError(
            f"desired state is for device {state.device_id!r}", reason=Reason.WRONG_DEVICE
        )
    fingerprint = desired_fingerprint(signed)
    if state.counter == last_counter and fingerprint == last_fingerprint:
        return VerifiedDesired(state, DesiredVerdict.SAME, fingerprint)
    if state.counter <= last_counter:
        raise TrustError(
            f"desired state counter {state.counter} is not above {last_counter}",
            reason=Reason.REPLAY,
        )
    if now is not None and state.expires_at <= now:
        raise TrustError(
            f"desired state expired at {state.expires_at:%Y-%m-%dT%H:%M:%SZ}"
            f" (device clock {now:%Y-%m-%dT%H:%M:%SZ}; if the device clock is wrong, fix it)",
            reason=Reason.EXPIRED,
        )
    return VerifiedDesired(state, DesiredVerdict.NEW, fingerprint)


def verify_command(
    signed: Signed, *, keyring: Keyring, device_id: str, last_seq: int, now: datetime
) -> Command:
    """Accept a director-signed command for this device, newer than the last one run, and not
    expired (a command is for now: it is never run late)."""
    _check_role(signed.signed, signed.signatures, keyring, Role.DIRECTOR)
    try:
        command = Command.model_validate(signed.signed)
    except ValidationError as exc:
        raise RejectedError(f"malformed command: {_first_errors(exc)}") from None
    if command.device_id != device_id:
        raise TrustError(f"command is for device {command.device_id!r}", reason=Reason.WRONG_DEVICE)
    if command.seq <= last_seq:
        raise TrustError(f"command seq {command.seq} is not above {last_seq}", reason=Reason.REPLAY)
    if command.expires_at <= now:
        raise TrustError(
            f"command expired at {command.expires_at:%Y-%m-%dT%H:%M:%SZ}"
            f" (device clock {now:%Y-%m-%dT%H:%M:%SZ})",
            reason=Reason.EXPIRED,
        )
    return command


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split(".")[:3])
    except ValueError:
        raise RejectedError(f"malformed version {version!r}") from None


def verify_manifest(
    manifest_bytes: bytes,
    signature_bytes: bytes,
    *,
    keyring: Keyring,
    device_class: str,
    agent_version: str,
) -> Manifest:
    """Accept a package manifest signed by a release key and meant for this device."""
    try:
        raw = json.loads(manifest_bytes)
        sigs = DetachedSignatures.model_validate_json(signature_bytes).signatures
    except (ValueError, ValidationError) as exc:
        raise RejectedError(f"malformed manifest or signature file: {exc}") from None
    if not isinstance(raw, dict):
        raise RejectedError("manifest is not a JSON object")
    _check_role(raw, sigs, keyring, Role.RELEASE)
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise RejectedError(f"malformed manifest: {_first_errors(exc)}") from None
    if manifest.format != MANIFEST_FORMAT:
        raise IncompatibleError(f"manifest format {manifest.format} is not supported")
    classes = manifest.device_classes
    if ANY_DEVICE_CLASS not in classes and device_class not in classes:
        raise IncompatibleError(f"package is for {classes}, this device is {device_class!r}")
    if _version_tuple(manifest.min_agent_version) > _version_tuple(agent_version):
        raise IncompatibleError(
            f"package needs agent {manifest.min_agent_version}, this is {agent_version}"
        )
    return manifest
