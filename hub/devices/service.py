"""Enrolment tokens (general and serial-bound), enrolment, a device's access (accept, disable,
enable), the device list and changes to a device's group and tags."""

import hashlib
import logging
import secrets
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from agent.protocol.documents import document_dict
from agent.protocol.topics import is_valid_device_id
from hub.broker.passwords import BrokerUser, hash_password
from hub.database import utcnow
from hub.deployments.models import (
    DEVICE_FINISHED,
    Deployment,
    DeploymentDevice,
    DeviceDesired,
    DeviceState,
)
from hub.devices.models import Device, DeviceStatus, EnrollmentToken
from hub.devices.schemas import (
    BrokerCredentials,
    DevicePublic,
    DeviceSpec,
    DeviceStatusChanged,
    DeviceUpdate,
    EnrollResponse,
    FollowPublic,
    SerialToken,
    TokenCreated,
    check_tags,
)
from hub.errors import Conflict, InvalidInput, NotFound, Unauthorized
from hub.packages.models import Package
from hub.signing.keystore import KeyStore

logger = logging.getLogger(__name__)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _new_token() -> str:
    # A prefix, so a token never starts with '-' and is never taken for a command-line option.
    return f"et_{secrets.token_urlsafe(24)}"


def create_token(*, session: Session, uses: int, ttl_s: int) -> TokenCreated:
    """A new enrolment token; the plain token is returned here and never again."""
    token = _new_token()
    row = EnrollmentToken(
        token_hash=hash_token(token), expires_at=utcnow() + timedelta(seconds=ttl_s), max_uses=uses
    )
    session.add(row)
    session.commit()
    logger.info("created enrolment token", extra={"uses": uses, "ttl_s": ttl_s})
    return TokenCreated(token=token, expires_at=row.expires_at, uses=uses)


def create_serial_tokens(
    *, session: Session, serials: Sequence[str], ttl_s: int
) -> list[SerialToken]:
    """One single-use token per serial, each enrolling only the device whose id is its serial;
    the plain tokens are returned here and never again. Serials already enrolled are refused,
    all of them named, and no token is made."""
    taken = _taken_ids(session, list(serials))
    if taken:
        shown = ", ".join(sorted(taken)[:10]) + (" ..." if len(taken) > 10 else "")
        raise Conflict(f"{len(taken)} of these serials are enrolled already: {shown}")
    now = utcnow()
    expires_at = now + timedelta(seconds=ttl_s)
    tokens = [_new_token() for _ in serials]
    session.execute(
        insert(EnrollmentToken),
        [
            {
                "token_hash": hash_token(token),
                "created_at": now,
                "expires_at": expires_at,
                "max_uses": 1,
                "uses": 0,
                "device_id": serial,
            }
            for serial, token in zip(serials, tokens, strict=True)
        ],
    )
    session.commit()
    logger.info("created serial-bound enrolment tokens", extra={"count": len(tokens)})
    return [
        SerialToken(serial=serial, token=token, expires_at=expires_at)
        for serial, token in zip(serials, tokens, strict=True)
    ]


def _refusal(count: int) -> Unauthorized:
    # One message for every refusal, so the endpoint does not tell which tokens exist.
    if count == 1:
        return Unauthorized("enrolment token is unknown, expired or used up")
    return Unauthorized(f"enrolment token is unknown, expired or has fewer than {count} uses left")


def _usable_token(session: Session, token: str, count: int) -> EnrollmentToken:
    """The token's row if it can pay for ``count`` devices now.

    Only a pre-check, so that a wrong token costs no password hashing; the conditional update
    in ``_spend_token`` is what decides.
    """
    row = session.exec(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token))
    ).first()
    if row is None or row.expires_at <= utcnow() or row.max_uses - row.uses < count:
        raise _refusal(count)
    return row


def _spend_token(session: Session, token_id: int, count: int) -> None:
    """Take ``count`` uses of the token in the session's transaction, all or none."""
    # One conditional UPDATE: enrolments racing for the last uses cannot together overspend.
    spent = session.execute(
        update(EnrollmentToken)
        .where(col(EnrollmentToken.id) == token_id)
        .where(col(EnrollmentToken.uses) + count <= col(EnrollmentToken.max_uses))
        .where(col(EnrollmentToken.expires_at) > utcnow())
        .values(uses=col(EnrollmentToken.uses) + count)
    )
    if spent.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise _refusal(count)


# Well under SQLite's host-parameter limit, so looking ids up never needs a larger IN list.
_ID_QUERY_BATCH = 500


def _taken_ids(session: Session, ids: list[str]) -> set[str]:
    taken: set[str] = set()
    for start in range(0, len(ids), _ID_QUERY_BATCH):
        batch = ids[start : start + _ID_QUERY_BATCH]
        taken.update(session.exec(select(Device.id).where(col(Device.id).in_(batch))).all())
    return taken


def _new_device_ids(session: Session, count: int) -> list[str]:
    """``count`` random device ids, distinct from each other and from every enrolled device."""
    ids: set[str] = set()
    while len(ids) < count:
        fresh = {f"dev-{secrets.token_hex(6)}" for _ in range(count - len(ids))} - ids
        ids |= fresh - _taken_ids(session, sorted(fresh))
    assert all(is_valid_device_id(i) for i in ids)
    return sorted(ids)


def _device_row(
    device_id: str, spec: DeviceSpec, password: str, token_id: int, status: DeviceStatus
) -> dict[str, Any]:
    """The values of one new device row; the broker password is only kept hashed."""
    return {
        "status": status.value,
        "id": device_id,
        "name": spec.name,
        "device_class": spec.device_class,
        "tags": dict(spec.tags),
        "group": spec.group,
        "password_hash": hash_password(password),
        "token_id": token_id,
    }


def enroll(
    *,
    session: Session,
    keys: KeyStore,
    token: str,
    devices: Sequence[DeviceSpec],
    broker_host: str,
    broker_port: int,
    topic_root: str,
    approval_required: bool = False,
    serial: str | None = None,
) -> list[EnrollResponse]:
    """Spend ``len(devices)`` uses of ``token`` on new device identities, all or none.

    A token made for a serial enrols that one device, with the serial as its id (``serial``,
    when the device names it, must be the same). With ``approval_required`` the devices start
    ``pending``: enrolled, but refused by the broker until an operator accepts them.

    The answers are in the order of ``devices``. Callers run this off the event loop: it hashes
    one password per device. The broker learns the new credentials only when the caller calls
    ``on_credentials_changed``, once for the whole batch.
    """
    count = len(devices)
    usable = _usable_token(session, token, count)
    token_id = usable.id
    assert token_id is not None
    bound = usable.device_id
    if bound is not None:
        if count != 1:
            raise InvalidInput("a token made for a serial enrols exactly one device: its own")
        if serial is not None and serial != bound:
            raise Unauthorized(f"this enrolment token is for another serial, not {serial}")
        if session.get(Device, bound) is not None:
            raise Conflict(f"device {bound} is enrolled already")
        ids = [bound]
    else:
        if serial is not None:
            raise InvalidInput(
                "a serial is enrolled only with the token made for it"
                " (outpost-hub device tokens --serials FILE)"
            )
        ids = _new_device_ids(session, count)
    status = DeviceStatus.PENDING if approval_required else DeviceStatus.ACTIVE
    # Read the trust root before spending anything, so a missing key costs no token uses.
    root_public_key = keys.root_public_b64()
    keyring = document_dict(keys.keyring())
    passwords = [secrets.token_urlsafe(24) for _ in ids]
    # Hashing happens before the token is spent so that the write transaction (which holds
    # SQLite's single writer lock) is just the UPDATE and the INSERTs.
    rows = [
        _device_row(device_id, spec, password, token_id, status)
        for device_id, spec, password in zip(ids, devices, passwords, strict=True)
    ]
    _spend_token(session, token_id, count)
    try:
        # A Core-style bulk insert: building thousands of ORM objects costs more than hashing.
        session.execute(insert(Device), rows)
        session.commit()
    except IntegrityError:
        # Two enrolments raced for one serial: the token's use goes back with the rollback.
        session.rollback()
        raise Conflict(f"device {ids[0]} is enrolled already") from None
    _log_enrolled(rows, token_id)
    return [
        EnrollResponse(
            device_id=device_id,
            broker=BrokerCredentials(
                host=broker_host, port=broker_port, username=device_id, password=password
            ),
            topic_root=topic_root,
            root_public_key=root_public_key,
            keyring=keyring,
            status=status.value,
        )
        for device_id, password in zip(ids, passwords, strict=True)
    ]


def _log_enrolled(rows: list[dict[str, Any]], token_id: int) -> None:
    if len(rows) == 1:
        extra = {"device_id": rows[0]["id"], "device_class": rows[0]["device_class"]}
        logger.info("enrolled device", extra=extra)
    else:
        logger.info("enrolled devices", extra={"count": len(rows), "token_id": token_id})


def broker_users(*, session: Session) -> list[BrokerUser]:
    """Every enrolled device as a broker account; only active ones may log in."""
    rows = session.exec(
        select(Device.id, Device.password_hash, Device.status).order_by(col(Device.id))
    ).all()
    return [
        BrokerUser(username=i, password_hash=h, active=status == DeviceStatus.ACTIVE)
        for i, h, status in rows
    ]


# Which status each operator action leads to, and from which statuses it may start.
_TRANSITIONS: dict[str, tuple[DeviceStatus, frozenset[DeviceStatus]]] = {
    "accept": (DeviceStatus.ACTIVE, frozenset({DeviceStatus.PENDING, DeviceStatus.ACTIVE})),
    "enable": (DeviceStatus.ACTIVE, frozenset({DeviceStatus.DISABLED, DeviceStatus.ACTIVE})),
    "disable": (DeviceStatus.DISABLED, frozenset(DeviceStatus)),
}
_WRONG_START = {
    ("accept", DeviceStatus.DISABLED): "it is disabled; enable it instead",
    ("enable", DeviceStatus.PENDING): "it is waiting for approval; accept it instead",
}


def change_status(*, session: Session, device_id: str, action: str) -> DeviceStatusChanged:
    """Accept a pending device, disable one, or enable a disabled one (each idempotent).

    Disabling also cancels the device's unfinished work in every deployment, so no rollout
    waits on it. The broker learns the change only when the caller calls
    ``on_credentials_changed``: the embedded Mosquitto then drops the device's connection.
    """
    target, starts = _TRANSITIONS[action]
    device = get_device(session=session, device_id=device_id)
    current = DeviceStatus(device.status)
    if current not in starts:
        raise Conflict(f"cannot {action} device {device_id}: {_WRONG_START[(action, current)]}")
    cancelled: list[str] = []
    if current != target:
        device.status = target.value
        device.status_changed_at = utcnow()
        if target is DeviceStatus.DISABLED:
            device.online = False
            cancelled = _cancel_unfinished(session, device_id)
        session.add(device)
        session.commit()
        logger.info(
            "device access changed",
            extra={"device_id": device_id, "from": current.value, "to": target.value},
        )
    return DeviceStatusChanged(
        device=show_device(session=session, device_id=device_id),
        cancelled_deployments=cancelled,
    )


def _cancel_unfinished(session: Session, device_id: str) -> list[str]:
    """Mark the device's unfinished rows in every deployment cancelled; their deployment ids.

    Cancelled is a finished state, so rollouts neither wait for the device nor count it as a
    failure; the device's desired state is left as it was, for when it is enabled again.
    """
    now = utcnow()
    rows = session.exec(
        select(DeploymentDevice).where(
            DeploymentDevice.device_id == device_id,
            col(DeploymentDevice.state).not_in([str(s) for s in DEVICE_FINISHED]),
        )
    ).all()
    for row in rows:
        row.state = DeviceState.CANCELLED
        row.detail = "device disabled"
        row.state_changed_at = now
        row.updated_at = now
        session.add(row)
    return sorted({row.deployment_id for row in rows})


def get_device(*, session: Session, device_id: str) -> Device:
    row = session.get(Device, device_id)
    if row is None:
        raise NotFound(f"device {device_id} not found")
    return row


def to_public(device: Device, follows: list[FollowPublic] | None = None) -> DevicePublic:
    return DevicePublic(
        id=device.id,
        name=device.name,
        device_class=device.device_class,
        tags=device.tags,
        group=device.group,
        enrolled_at=device.enrolled_at,
        status=device.status,
        status_changed_at=device.status_changed_at,
        online=device.online,
        last_seen=device.last_seen,
        desired_counter=device.desired_counter,
        reported_state=device.reported_state,
        follows=follows,
    )


def show_device(*, session: Session, device_id: str) -> DevicePublic:
    """One device with the deployment each of its models follows."""
    device = get_device(session=session, device_id=device_id)
    return to_public(device, follows=follows(session=session, device_id=device_id))


def follows(*, session: Session, device_id: str) -> list[FollowPublic]:
    """The deployment each model of the device follows, by model name."""
    rows = session.exec(
        select(DeviceDesired, Deployment, Package.version, DeploymentDevice.state)
        .join(Deployment, col(Deployment.id) == col(DeviceDesired.deployment_id))
        .join(Package, col(Package.digest) == col(DeviceDesired.package_digest))
        .outerjoin(
            DeploymentDevice,
            (col(DeploymentDevice.deployment_id) == col(DeviceDesired.deployment_id))
            & (col(DeploymentDevice.device_id) == col(DeviceDesired.device_id)),
        )
        .where(DeviceDesired.device_id == device_id)
        .order_by(col(DeviceDesired.model))
    ).all()
    return [
        FollowPublic(
            model=desired.model,
            deployment_id=deployment.id,
            version=version,
            priority=deployment.priority,
            state=deployment.state,
            device_state=device_state,
        )
        for desired, deployment, version, device_state in rows
    ]


def update_device(*, session: Session, device_id: str, changes: DeviceUpdate) -> DevicePublic:
    """Set the device's group and/or replace its tags. Continuous deployments that follow a
    selector or group pick the device up at the rollout engine's next tick."""
    device = get_device(session=session, device_id=device_id)
    changed = changes.model_dump(include=changes.model_fields_set)
    if "group" in changed:
        device.group = changes.group
    if changes.tags is not None:
        device.tags = dict(changes.tags)
    session.add(device)
    session.commit()
    logger.info("updated device", extra={"device_id": device_id, "changed": changed})
    return show_device(session=session, device_id=device_id)


def parse_tag_filter(selectors: Sequence[str]) -> list[tuple[str, str]]:
    """``["site=plant-1", "hw=rpi4"]`` as (key, value) pairs, each checked like a device's tag."""
    pairs: list[tuple[str, str]] = []
    for selector in selectors:
        key, sep, value = selector.partition("=")
        if not sep:
            raise InvalidInput(f"tag filter {selector!r} is not key=value")
        try:
            check_tags({key: value})
        except ValueError as exc:
            raise InvalidInput(f"tag filter {selector!r}: {exc}") from None
        pairs.append((key, value))
    return pairs


def select_device_ids(*, session: Session, tags: Sequence[tuple[str, str]]) -> list[str]:
    """Ids of the devices carrying every one of ``tags``, oldest first."""
    query = select(Device.id).order_by(col(Device.enrolled_at))
    for key, value in tags:
        query = query.where(col(Device.tags)[key].as_string() == value)
    return list(session.exec(query).all())


def list_devices(
    *,
    session: Session,
    tags: Sequence[tuple[str, str]] = (),
    group: str | None = None,
    status: DeviceStatus | None = None,
) -> list[DevicePublic]:
    """Enrolled devices, oldest first; with ``tags``, only those carrying every one of them;
    with ``group``, only the group's members; with ``status``, only those in it."""
    query = select(Device).order_by(col(Device.enrolled_at))
    if group is not None:
        query = query.where(Device.group == group)
    if status is not None:
        query = query.where(Device.status == status.value)
    for key, value in tags:
        query = query.where(col(Device.tags)[key].as_string() == value)
    return [to_public(d) for d in session.exec(query).all()]
