"""Device routes: enrolment (authenticated by its token), enrolment tokens (one per serial for
manufacturing), the device list, a device's access (accept, disable, enable) and changes to its
group and tags."""

import logging
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import AfterValidator
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from hub.broker.supervisor import BrokerError
from hub.context import HubContext
from hub.dependencies import AdminDep, ContextDep, SessionDep
from hub.devices import service
from hub.devices.models import DeviceStatus
from hub.devices.schemas import (
    GROUP_PATTERN,
    BulkEnrollRequest,
    BulkEnrollResponse,
    DevicePublic,
    DeviceSpec,
    DeviceStatusChanged,
    DeviceUpdate,
    EnrollRequest,
    EnrollResponse,
    SerialTokensCreate,
    SerialTokensCreated,
    TokenCreate,
    TokenCreated,
    check_device_id,
)
from hub.security.revocation import revoke_device_certificates

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["devices"], dependencies=[AdminDep])
# No admin auth: the enrolment token in the body is the credential.
enroll_router = APIRouter(prefix="/api/v1", tags=["enrolment"])

# A device id in a path is checked like one in a body: a 422 that says what an id looks like,
# before any lookup (THREATS E3).
DeviceIdPath = Annotated[str, Path(), AfterValidator(check_device_id)]


@router.post("/enrollment-tokens", status_code=201)
def create_token(session: SessionDep, body: TokenCreate) -> TokenCreated:
    return service.create_token(session=session, uses=body.uses, ttl_s=body.ttl_s)


@router.post("/enrollment-tokens/serials", status_code=201)
def create_serial_tokens(session: SessionDep, body: SerialTokensCreate) -> SerialTokensCreated:
    """Manufacturing: one single-use token per serial number; each enrols only the device whose
    id is its serial. The tokens are shown once."""
    tokens = service.create_serial_tokens(session=session, serials=body.serials, ttl_s=body.ttl_s)
    return SerialTokensCreated(tokens=tokens)


async def _enroll(
    ctx: HubContext,
    session: Session,
    token: str,
    devices: Sequence[DeviceSpec],
    serial: str | None = None,
) -> list[EnrollResponse]:
    host, port = ctx.broker_public
    responses = await run_in_threadpool(
        service.enroll,
        session=session,
        keys=ctx.keys,
        token=token,
        devices=devices,
        broker_host=host,
        broker_port=port,
        topic_root=ctx.topics.root,
        approval_required=ctx.settings.devices.approval_required,
        serial=serial,
    )
    # The broker must know the new passwords before the devices try them. One reload per
    # request, however many devices it enrolled: each rewrites the whole password file.
    await run_in_threadpool(ctx.on_credentials_changed)
    return responses


@enroll_router.post("/enroll", status_code=201)
async def enroll(ctx: ContextDep, session: SessionDep, body: EnrollRequest) -> EnrollResponse:
    (response,) = await _enroll(ctx, session, body.token, [body], body.serial)
    return response


@enroll_router.post("/enroll/bulk", status_code=201)
async def enroll_bulk(
    ctx: ContextDep, session: SessionDep, body: BulkEnrollRequest
) -> BulkEnrollResponse:
    """Enrol many devices with one token, spending one use per device, all or none."""
    return BulkEnrollResponse(devices=await _enroll(ctx, session, body.token, body.devices))


@router.get("/devices")
def list_devices(
    session: SessionDep,
    tag: Annotated[list[str] | None, Query(description="key=value; repeat for several")] = None,
    group: Annotated[str | None, Query(pattern=GROUP_PATTERN)] = None,
    status: DeviceStatus | None = None,
) -> list[DevicePublic]:
    """Enrolled devices; ``?tag=site=plant-1&tag=hw=rpi4`` keeps those with both tags,
    ``?group=line-4`` the members of a group, ``?status=pending`` those waiting for approval.
    ``follows`` is left out (null) here."""
    return service.list_devices(
        session=session, tags=service.parse_tag_filter(tag or []), group=group, status=status
    )


@router.get("/devices/{device_id}")
def show_device(session: SessionDep, device_id: DeviceIdPath) -> DevicePublic:
    """One device, with ``follows``: the deployment each of its models follows."""
    return service.show_device(session=session, device_id=device_id)


@router.patch("/devices/{device_id}")
def update_device(session: SessionDep, device_id: DeviceIdPath, body: DeviceUpdate) -> DevicePublic:
    """Set or clear (null) the device's group, or replace its whole tag set; fields left out
    stay as they are."""
    return service.update_device(session=session, device_id=device_id, changes=body)


async def _change_status(
    ctx: HubContext, session: Session, device_id: str, action: str
) -> DeviceStatusChanged:
    changed = service.change_status(session=session, device_id=device_id, action=action)
    # Rewrites the broker's password file and ACL; the embedded Mosquitto drops a disabled
    # device's connection during the reload this waits for.
    await run_in_threadpool(ctx.on_credentials_changed)
    if action != "disable":
        return changed
    # Its certificates go on the CRL (and the connection is dropped with them), so a TLS
    # reconnect is refused at the handshake, not only denied every topic by the ACL.
    if await run_in_threadpool(revoke_device_certificates, ctx, device_id):
        return changed
    if ctx.broker is not None:
        # A device logged in by certificate is not dropped by the reload: take its client id.
        try:
            await run_in_threadpool(ctx.broker.disconnect_client, device_id)
        except BrokerError as exc:
            # Its access is revoked all the same (the ACL denies it every topic).
            logger.warning("could not drop a disabled device's connection: %s", exc)
    return changed


@router.post("/devices/{device_id}/accept")
async def accept_device(
    ctx: ContextDep, session: SessionDep, device_id: DeviceIdPath
) -> DeviceStatusChanged:
    """Let a device that enrolled while approval was required onto the broker."""
    return await _change_status(ctx, session, device_id, "accept")


@router.post("/devices/{device_id}/disable")
async def disable_device(
    ctx: ContextDep, session: SessionDep, device_id: DeviceIdPath
) -> DeviceStatusChanged:
    """Revoke the device's broker access now (its connection is dropped) and cancel its
    unfinished deployment work."""
    return await _change_status(ctx, session, device_id, "disable")


@router.post("/devices/{device_id}/enable")
async def enable_device(
    ctx: ContextDep, session: SessionDep, device_id: DeviceIdPath
) -> DeviceStatusChanged:
    """Give a disabled device its broker access back."""
    return await _change_status(ctx, session, device_id, "enable")
