"""``POST /api/v1/devices/{device_id}/certificate``: a device trades a CSR for a certificate.

No API token: the device's own broker credentials (HTTP Basic, or ``password`` in the body)
are the credential, as its enrolment token was at enrolment.
"""

import base64
import binascii
from datetime import timedelta
from typing import Annotated

from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Header

from hub.context import HubContext
from hub.dependencies import ContextDep, SessionDep
from hub.errors import Conflict, Unauthorized
from hub.security.schemas import CertificateIssued, CertificateRequest
from hub.security.service import issue_device_certificate

router = APIRouter(prefix="/api/v1", tags=["certificates"])


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    if not authorization or not authorization.strip():
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized("use HTTP Basic with the device id and its broker password")
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("malformed HTTP Basic credentials") from None
    if not sep:
        raise Unauthorized("malformed HTTP Basic credentials")
    return user, password


def tls_address(ctx: HubContext) -> tuple[str, int | None]:
    """The TLS listener's (host, port) as devices reach it."""
    tls = ctx.settings.broker.tls
    listener = ctx.broker.tls if ctx.broker is not None else None
    return ctx.broker_public[0], tls.public_port or (listener.port if listener else tls.port)


@router.post("/devices/{device_id}/certificate", status_code=201)
def request_certificate(
    device_id: str,
    body: CertificateRequest,
    ctx: ContextDep,
    session: SessionDep,
    authorization: Annotated[str | None, Header()] = None,
) -> CertificateIssued:
    """Certify the CSR's key as ``device_id`` (CN), for the broker's TLS listener."""
    basic = _basic_credentials(authorization)
    if basic is not None:
        user, password = basic
        if user != device_id:
            raise Unauthorized("the credentials are another device's")
    elif body.password is not None:
        password = body.password
    else:
        raise Unauthorized("send the device's broker password (HTTP Basic or 'password')")
    if not ctx.settings.broker.tls.enabled:
        raise Conflict("the broker has no TLS listener (set broker.tls.enabled on the hub)")
    if ctx.device_ca is None:
        raise Conflict("this hub runs without a device CA")
    cert = issue_device_certificate(
        session=session,
        ca=ctx.device_ca,
        device_id=device_id,
        password=password,
        csr_pem=body.csr.encode("utf-8", errors="replace"),
        validity=timedelta(days=ctx.settings.broker.tls.client_cert_days),
    )
    host, port = tls_address(ctx)
    return CertificateIssued(
        device_id=device_id,
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc,
        certificate=cert.public_bytes(serialization.Encoding.PEM).decode(),
        ca_certificate=ctx.device_ca.ca_pem().decode(),
        tls_host=host,
        tls_port=port,
    )
