"""Device routes: enrolment (authenticated by its token), the admin device list, and changes to
a device's group and tags."""

import logging
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from hub.context import HubContext
from hub.dependencies import AdminDep, ContextDep, SessionDep
from hub.devices import service
from hub.devices.schemas import (
    GROUP_PATTERN,
    BulkEnrollRequest,
    BulkEnrollResponse,
    DevicePublic,
    DeviceSpec,
    DeviceUpdate,
    EnrollRequest,
    EnrollResponse,
    TokenCreate,
    TokenCreated,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["devices"], dependencies=[AdminDep])
# No admin auth: the enrolment token in the body is the credential.
enroll_router = APIRouter(prefix="/api/v1", tags=["enrolment"])


@router.post("/enrollment-tokens", status_code=201)
def create_token(session: SessionDep, body: TokenCreate) -> TokenCreated:
    return service.create_token(session=session, uses=body.uses, ttl_s=body.ttl_s)


async def _enroll(
    ctx: HubContext, session: Session, token: str, devices: Sequence[DeviceSpec]
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
    )
    # The broker must know the new passwords before the devices try them. One reload per
    # request, however many devices it enrolled: each rewrites the whole password file.
    await run_in_threadpool(ctx.on_credentials_changed)
    return responses


@enroll_router.post("/enroll", status_code=201)
async def enroll(ctx: ContextDep, session: SessionDep, body: EnrollRequest) -> EnrollResponse:
    (response,) = await _enroll(ctx, session, body.token, [body])
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
) -> list[DevicePublic]:
    """Enrolled devices; ``?tag=site=plant-1&tag=hw=rpi4`` keeps those with both tags,
    ``?group=line-4`` the members of a group. ``follows`` is left out (null) here."""
    return service.list_devices(
        session=session, tags=service.parse_tag_filter(tag or []), group=group
    )


@router.get("/devices/{device_id}")
def show_device(session: SessionDep, device_id: str) -> DevicePublic:
    """One device, with ``follows``: the deployment each of its models follows."""
    return service.show_device(session=session, device_id=device_id)


@router.patch("/devices/{device_id}")
def update_device(session: SessionDep, device_id: str, body: DeviceUpdate) -> DevicePublic:
    """Set or clear (null) the device's group, or replace its whole tag set; fields left out
    stay as they are."""
    return service.update_device(session=session, device_id=device_id, changes=body)
