"""HTTP authentication and authorization for an external broker (EMQX), from the device registry.

Not guarded by an API token: the broker proves itself with the shared secret of
``broker.http_auth_secret`` in the ``X-Outpost-Broker-Secret`` header. Without that setting the
routes answer 404. A missing or wrong secret is a 401, which EMQX reads as ``ignore``; its chain
then ends in a denial (docs/security-devices.md), so a hub that cannot be asked admits nobody.
"""

import hmac
import logging
from typing import Annotated

from fastapi import APIRouter, Header
from sqlmodel import Session

from hub.broker.http_auth import (
    AuthnRequest,
    AuthnResponse,
    AuthzRequest,
    AuthzResponse,
    DeviceAccount,
    authenticate,
    authorize,
    is_device_username,
)
from hub.context import HubContext
from hub.dependencies import ContextDep, SessionDep
from hub.devices.models import Device, DeviceStatus
from hub.errors import NotFound, Unauthorized

logger = logging.getLogger(__name__)

SECRET_HEADER = "X-Outpost-Broker-Secret"  # noqa: S105 - a header name, not a secret

router = APIRouter(prefix="/api/v1/broker", tags=["broker"])


def _check_secret(ctx: HubContext, given: str | None) -> None:
    expected = ctx.settings.broker.http_auth_secret
    if expected is None:
        raise NotFound("broker HTTP authentication is off (set broker.http_auth_secret)")
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized(f"missing or wrong {SECRET_HEADER} header")


def _account(session: Session, username: str) -> DeviceAccount | None:
    if not is_device_username(username):
        return None
    device = session.get(Device, username)
    if device is None:
        return None
    return DeviceAccount(
        device_id=device.id,
        password_hash=device.password_hash,
        active=device.status == DeviceStatus.ACTIVE,
    )


SecretHeader = Annotated[str | None, Header(alias=SECRET_HEADER)]


@router.post("/authn")
def broker_authn(
    ctx: ContextDep, session: SessionDep, body: AuthnRequest, secret: SecretHeader = None
) -> AuthnResponse:
    """EMQX's HTTP authenticator: may this client connect?"""
    _check_secret(ctx, secret)
    answer = authenticate(body, _account(session, body.username))
    if answer.result == "deny":
        logger.info("broker connect denied", extra={"username": body.username[:64]})
    return answer


@router.post("/authz")
def broker_authz(
    ctx: ContextDep, session: SessionDep, body: AuthzRequest, secret: SecretHeader = None
) -> AuthzResponse:
    """EMQX's HTTP authorizer: may this client publish to or subscribe to this topic?"""
    _check_secret(ctx, secret)
    return authorize(body, _account(session, body.username), topic_root=ctx.topics.root)
