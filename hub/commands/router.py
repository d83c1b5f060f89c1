"""Device-command routes under /api/v1/devices/{device_id}/commands."""

from typing import Annotated

from fastapi import APIRouter, Body, Query

from agent.protocol.documents import CommandAction
from hub.commands import service
from hub.commands.schemas import CommandCreate, CommandPublic, CommandSummary
from hub.dependencies import AdminDep, ContextDep, SessionDep
from hub.deployments.router import ActorHeader

router = APIRouter(prefix="/api/v1", tags=["commands"], dependencies=[AdminDep])


@router.post("/devices/{device_id}/commands", status_code=202)
def create(
    ctx: ContextDep,
    session: SessionDep,
    device_id: str,
    body: Annotated[CommandCreate, Body()],
    actor: ActorHeader = "",
) -> CommandPublic:
    """Sign a command for the device and publish it; 202: the answer comes later (poll
    ``GET .../commands/{id}``). A device that is offline gets it when it comes back online,
    unless it has expired by then (``ttl_s``)."""
    command = service.create_command(
        session=session,
        sender=service.CommandSender(keys=ctx.keys, publisher=ctx.publisher, topics=ctx.topics),
        device_id=device_id,
        action=CommandAction(body.action),
        args=body.args.wire(),
        ttl_s=body.ttl_s,
        actor=actor.strip() or "api",
    )
    return service.to_public(command)


@router.get("/devices/{device_id}/commands")
def list_all(
    session: SessionDep, device_id: str, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> list[CommandSummary]:
    """The device's commands, newest first, without their results."""
    return service.list_commands(session=session, device_id=device_id, limit=limit)


@router.get("/devices/{device_id}/commands/{command_id}")
def show(session: SessionDep, device_id: str, command_id: str) -> CommandPublic:
    """One command with the device's answer: ``state`` is pending until it answers, then
    succeeded or failed (``reason``, ``detail``), or expired when it never did."""
    return service.get_command(session=session, device_id=device_id, command_id=command_id)
