"""Device routes: enrolment (authenticated by its token) and the admin device list."""

import logging

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from hub.dependencies import AdminDep, ContextDep, SessionDep
from hub.devices import service
from hub.devices.schemas import (
    DevicePublic,
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


@enroll_router.post("/enroll", status_code=201)
async def enroll(ctx: ContextDep, session: SessionDep, body: EnrollRequest) -> EnrollResponse:
    host, port = ctx.broker_public
    response = await run_in_threadpool(
        service.enroll,
        session=session,
        keys=ctx.keys,
        token=body.token,
        name=body.name,
        device_class=body.device_class,
        broker_host=host,
        broker_port=port,
        topic_root=ctx.topics.root,
    )
    # The broker must know the new password before the device tries it.
    await run_in_threadpool(ctx.on_credentials_changed)
    return response


@router.get("/devices")
def list_devices(session: SessionDep) -> list[DevicePublic]:
    return service.list_devices(session=session)


@router.get("/devices/{device_id}")
def show_device(session: SessionDep, device_id: str) -> DevicePublic:
    return service.to_public(service.get_device(session=session, device_id=device_id))
