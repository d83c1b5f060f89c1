"""Enrolment: trade a token for device identities, broker credentials and the root key.

The root key arrives over the enrolment connection, so that connection is the moment of trust
(use HTTPS to the hub, or pass the root key's fingerprint printed by ``outpost-hub keys show``
to pin it). Everything signed later is checked against this key.

``enroll`` makes one device; ``enroll_many`` makes a fleet (the simulator's) with one request,
spending one use of the token per device. A token made for a serial number (manufacturing)
enrols the device whose id is that serial; ``serial`` lets the device check it got its own.
"""

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.errors import EnrollmentError
from agent.hubhttp import post_json
from agent.protocol.documents import Signed
from agent.protocol.keys import b64decode, key_id
from agent.state import BrokerCredentials, Identity, StateDir
from agent.trust import verify_keyring

ENROLL_PATH = "/api/v1/enroll"
BULK_ENROLL_PATH = "/api/v1/enroll/bulk"

_Response = TypeVar("_Response", bound=BaseModel)
# Threads writing identities at once in ``enroll_many``; enough to keep a disk's queue busy.
_STORE_WORKERS = 16


@dataclass(frozen=True)
class DeviceRequest:
    """What one device asks to be enrolled as."""

    name: str | None = None
    device_class: str = "generic"
    tags: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"name": self.name, "device_class": self.device_class, "tags": dict(self.tags)}


class EnrollmentResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    device_id: str
    broker: BrokerCredentials
    topic_root: str
    root_public_key: str
    keyring: Signed
    # "pending" when the hub requires approval: the broker refuses the device until accepted.
    status: str = "active"


class BulkEnrollmentResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    devices: list[EnrollmentResponse]


def _post_json(url: str, body: dict[str, Any], timeout_s: float) -> Any:
    return post_json(url, body, timeout_s=timeout_s, error=EnrollmentError, what="enrolment")


def _parse(model: type[_Response], raw: Any) -> _Response:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise EnrollmentError(f"unexpected enrolment response: {exc}") from None


def _refuse_enrolled(states: Sequence[StateDir]) -> None:
    """Refuse before asking the hub, so no token use is spent on a device that cannot keep it."""
    seen: set[str] = set()
    for state in states:
        if (state.root / "identity.json").exists():
            raise EnrollmentError(f"{state.root} already holds an identity; use another state dir")
        key = str(state.root.resolve())
        if key in seen:
            raise EnrollmentError(f"{state.root} is given for two devices")
        seen.add(key)


def _check_trust(
    response: EnrollmentResponse, *, root_fingerprint: str | None, now: datetime
) -> None:
    """The root key matches the pinned fingerprint (if any) and signs a valid keyring."""
    root_id = key_id(b64decode(response.root_public_key))
    if root_fingerprint is not None and not root_id.startswith(root_fingerprint.lower()):
        raise EnrollmentError(
            f"the hub's root key {root_id[:16]} does not match the pinned {root_fingerprint}"
        )
    verify_keyring(
        response.keyring, root_public_b64=response.root_public_key, current=None, now=now
    )


def _store(
    state: StateDir, response: EnrollmentResponse, *, hub_url: str, device_class: str
) -> Identity:
    """Write one device's identity, keyring and scoring keys; the keyring is already checked."""
    identity = Identity(
        device_id=response.device_id,
        hub_url=hub_url,
        broker=response.broker,
        topic_root=response.topic_root,
        root_public_key=response.root_public_key,
        device_class=device_class,
    )
    state.create()
    state.save_keyring(response.keyring)
    state.save_identity(identity)
    state.scoring_keys()
    return identity


def enroll(
    *,
    hub_url: str,
    token: str,
    state: StateDir,
    now: datetime,
    device_class: str = "generic",
    name: str | None = None,
    tags: Mapping[str, str] | None = None,
    root_fingerprint: str | None = None,
    timeout_s: float = 30.0,
    serial: str | None = None,
) -> Identity:
    """Enrol this device with the hub and store its identity in ``state``.

    ``serial``: this device's serial number, when ``token`` was made for one; the hub refuses
    a token made for another serial, and the identity's device id is the serial.
    """
    _refuse_enrolled([state])
    request = DeviceRequest(name=name, device_class=device_class, tags=tags or {})
    body: dict[str, Any] = {"token": token, **request.body()}
    if serial is not None:
        body["serial"] = serial
    raw = _post_json(hub_url.rstrip("/") + ENROLL_PATH, body, timeout_s)
    response = _parse(EnrollmentResponse, raw)
    if serial is not None and response.device_id != serial:
        raise EnrollmentError(
            f"asked to enrol serial {serial}, the hub answered {response.device_id}"
        )
    _check_trust(response, root_fingerprint=root_fingerprint, now=now)
    return _store(state, response, hub_url=hub_url, device_class=device_class)


def enroll_many(
    *,
    hub_url: str,
    token: str,
    devices: Sequence[tuple[StateDir, DeviceRequest]],
    now: datetime,
    root_fingerprint: str | None = None,
    timeout_s: float = 60.0,
) -> list[Identity]:
    """Enrol every device with one request to the hub; each identity goes to its state dir.

    The hub enrols all of them or none. If some identities cannot be written, the others are
    still stored and the error says how many failed: those are enrolled on the hub but lost
    here, so replacing them takes that many more uses of a token.
    """
    if not devices:
        return []
    _refuse_enrolled([state for state, _ in devices])
    raw = _post_json(
        hub_url.rstrip("/") + BULK_ENROLL_PATH,
        {"token": token, "devices": [request.body() for _, request in devices]},
        timeout_s,
    )
    answers = _parse(BulkEnrollmentResponse, raw).devices
    if len(answers) != len(devices):
        raise EnrollmentError(
            f"asked the hub for {len(devices)} devices and it answered with {len(answers)}"
        )
    _check_all_trust(answers, root_fingerprint=root_fingerprint, now=now)
    return _store_all(devices, answers, hub_url=hub_url)


def _check_all_trust(
    answers: Sequence[EnrollmentResponse], *, root_fingerprint: str | None, now: datetime
) -> None:
    # One hub hands every device of a request the same root and keyring; verify each distinct
    # pair once rather than one signature check per device.
    checked: set[tuple[str, str]] = set()
    for answer in answers:
        pair = (answer.root_public_key, answer.keyring.model_dump_json())
        if pair not in checked:
            _check_trust(answer, root_fingerprint=root_fingerprint, now=now)
            checked.add(pair)


def _store_all(
    devices: Sequence[tuple[StateDir, DeviceRequest]],
    answers: Sequence[EnrollmentResponse],
    *,
    hub_url: str,
) -> list[Identity]:
    # Storing is bound by fsync waits (every file is written atomically); threads overlap them.
    with ThreadPoolExecutor(_STORE_WORKERS, thread_name_prefix="enroll-store") as pool:
        futures = [
            pool.submit(_store, state, answer, hub_url=hub_url, device_class=request.device_class)
            for (state, request), answer in zip(devices, answers, strict=True)
        ]
    failed = [
        (state, exc)
        for (state, _), future in zip(devices, futures, strict=True)
        if (exc := future.exception()) is not None
    ]
    if failed:
        state, exc = failed[0]
        if not isinstance(exc, OSError):
            raise exc
        raise EnrollmentError(
            f"could not store {len(failed)} of {len(devices)} identities the hub enrolled"
            f" (first {state.root}: {exc}); the others are stored"
        ) from exc
    return [f.result() for f in futures]
