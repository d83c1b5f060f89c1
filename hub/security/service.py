"""A device asks for a client certificate, proving who it is with its broker credentials."""

import logging
import secrets
from datetime import timedelta

from cryptography import x509
from sqlmodel import Session

from agent.protocol.topics import is_valid_device_id
from hub.broker.passwords import hash_password, verify_password
from hub.devices.models import Device, DeviceStatus
from hub.errors import Unauthorized
from hub.security.ca import DeviceCA

logger = logging.getLogger(__name__)

# Checked against when the device is unknown, so a wrong id takes as long as a wrong password
# and the answer's timing does not tell which ids exist.
_NOBODY_HASH = hash_password(secrets.token_urlsafe(24))


def has_broker_access(device: Device) -> bool:
    """Whether the broker lets ``device`` in: a certificate gives no more access than that.

    A disabled device, or one still waiting for approval, gets no certificate.
    """
    return device.status == DeviceStatus.ACTIVE


def authenticate_device(*, session: Session, device_id: str, password: str) -> Device:
    """The device if ``password`` is its broker password and it has broker access."""
    device = session.get(Device, device_id) if is_valid_device_id(device_id) else None
    matches = verify_password(password, device.password_hash if device else _NOBODY_HASH)
    if device is None or not matches:
        logger.warning(
            "certificate request refused: bad credentials", extra={"device_id": device_id}
        )
        raise Unauthorized("unknown device or wrong broker password")
    if not has_broker_access(device):
        logger.warning(
            "certificate request refused: no broker access", extra={"device_id": device_id}
        )
        raise Unauthorized(f"device {device_id} is disabled or not approved")
    return device


def issue_device_certificate(
    *,
    session: Session,
    ca: DeviceCA,
    device_id: str,
    password: str,
    csr_pem: bytes,
    validity: timedelta,
) -> x509.Certificate:
    """Authenticate the device, then certify the key of its CSR as ``device_id``.

    Credentials are checked before the CSR is even parsed: an unauthenticated caller learns
    nothing about what the hub would sign.
    """
    authenticate_device(session=session, device_id=device_id, password=password)
    return ca.issue_client(device_id=device_id, csr_pem=csr_pem, validity=validity)
