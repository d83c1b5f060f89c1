"""Enrolment tokens, enrolment and the device list."""

import hashlib
import logging
import re
import secrets
from datetime import timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from agent.protocol.documents import document_dict
from agent.protocol.topics import is_valid_device_id
from hub.broker.passwords import BrokerUser, hash_password
from hub.database import utcnow
from hub.devices.models import Device, EnrollmentToken
from hub.devices.schemas import BrokerCredentials, DevicePublic, EnrollResponse, TokenCreated
from hub.errors import InvalidInput, NotFound, Unauthorized
from hub.signing.keystore import KeyStore

logger = logging.getLogger(__name__)

DEVICE_CLASS_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(*, session: Session, uses: int, ttl_s: int) -> TokenCreated:
    """A new enrolment token; the plain token is returned here and never again."""
    token = secrets.token_urlsafe(24)
    row = EnrollmentToken(
        token_hash=hash_token(token), expires_at=utcnow() + timedelta(seconds=ttl_s), max_uses=uses
    )
    session.add(row)
    session.commit()
    logger.info("created enrolment token", extra={"uses": uses, "ttl_s": ttl_s})
    return TokenCreated(token=token, expires_at=row.expires_at, uses=uses)


def _new_device_id(session: Session) -> str:
    while True:
        device_id = f"dev-{secrets.token_hex(6)}"
        if session.get(Device, device_id) is None:
            return device_id


def enroll(
    *,
    session: Session,
    keys: KeyStore,
    token: str,
    name: str | None,
    device_class: str,
    broker_host: str,
    broker_port: int,
    topic_root: str,
) -> EnrollResponse:
    """Spend one use of ``token`` on a new device identity with broker credentials."""
    if not DEVICE_CLASS_PATTERN.fullmatch(device_class):
        raise InvalidInput(f"invalid device class {device_class!r}")
    row = session.exec(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token))
    ).first()
    # One message for every refusal, so the endpoint does not tell which tokens exist.
    refused = Unauthorized("enrolment token is unknown, expired or used up")
    if row is None or row.expires_at <= utcnow():
        raise refused
    # Conditional update: two devices racing for the last use cannot both get it.
    spent = session.execute(
        update(EnrollmentToken)
        .where(col(EnrollmentToken.id) == row.id)
        .where(col(EnrollmentToken.uses) < col(EnrollmentToken.max_uses))
        .values(uses=EnrollmentToken.uses + 1)
    )
    if spent.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise refused
    password = secrets.token_urlsafe(24)
    device = Device(
        id=_new_device_id(session),
        name=name,
        device_class=device_class,
        password_hash=hash_password(password),
        token_id=row.id,
    )
    assert is_valid_device_id(device.id)
    session.add(device)
    session.commit()
    logger.info("enrolled device", extra={"device_id": device.id, "device_class": device_class})
    return EnrollResponse(
        device_id=device.id,
        broker=BrokerCredentials(
            host=broker_host, port=broker_port, username=device.id, password=password
        ),
        topic_root=topic_root,
        root_public_key=keys.root_public_b64(),
        keyring=document_dict(keys.keyring()),
    )


def broker_users(*, session: Session) -> list[BrokerUser]:
    """Every enrolled device as a broker account."""
    rows = session.exec(select(Device).order_by(col(Device.id))).all()
    return [BrokerUser(username=d.id, password_hash=d.password_hash) for d in rows]


def get_device(*, session: Session, device_id: str) -> Device:
    row = session.get(Device, device_id)
    if row is None:
        raise NotFound(f"device {device_id} not found")
    return row


def to_public(device: Device) -> DevicePublic:
    return DevicePublic(
        id=device.id,
        name=device.name,
        device_class=device.device_class,
        enrolled_at=device.enrolled_at,
        online=device.online,
        last_seen=device.last_seen,
        desired_counter=device.desired_counter,
        reported_state=device.reported_state,
    )


def list_devices(*, session: Session) -> list[DevicePublic]:
    rows = session.exec(select(Device).order_by(col(Device.enrolled_at))).all()
    return [to_public(d) for d in rows]
