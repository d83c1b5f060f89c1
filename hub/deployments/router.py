"""Deployment routes under /api/v1/deployments."""

from typing import Annotated

from fastapi import APIRouter, Header, Query
from starlette.concurrency import run_in_threadpool

from hub.dependencies import AdminDep, ContextDep, SessionDep
from hub.deployments import dryrun, service
from hub.deployments.schemas import (
    AuditPublic,
    ControlRequest,
    DeploymentCreate,
    DeploymentEventPublic,
    DeploymentPublic,
    DeploymentSummary,
    DryRunPublic,
)
from hub.deployments.targets import resolve_targets

router = APIRouter(prefix="/api/v1", tags=["deployments"], dependencies=[AdminDep])

# Who is acting, as the CLI sends it ("alice@ops-laptop"); recorded in the deployment history.
# The API token says the caller may act; per-user tokens and roles come with the security work.
ActorHeader = Annotated[str, Header(alias="X-Outpost-Actor", max_length=255)]


def _actor(value: str) -> str:
    return value.strip() or "api"


@router.post("/deployments", status_code=201)
async def create(
    ctx: ContextDep, session: SessionDep, body: DeploymentCreate, actor: ActorHeader = ""
) -> DeploymentPublic:
    devices = resolve_targets(session=session, body=body)
    # Building a package reads and hashes every file; keep it off the event loop.
    deployment = await run_in_threadpool(
        service.create_deployment,
        session=session,
        keys=ctx.keys,
        blobs=ctx.blobs,
        director=ctx.director(),
        packages_dir=ctx.settings.packages_dir,
        max_package_bytes=ctx.settings.registry.max_package_bytes,
        body=body,
        devices=devices,
        actor=_actor(actor),
    )
    return service.get_deployment(session=session, deployment_id=deployment.id)


@router.get("/deployments")
def list_all(
    session: SessionDep,
    model: str | None = None,
    state: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[DeploymentSummary]:
    """Deployments, newest first."""
    return service.list_deployments(session=session, model=model, state=state, limit=limit)


@router.post("/deployments/dry-run")
def dry_run(session: SessionDep, body: DeploymentCreate) -> DryRunPublic:
    """What ``POST /api/v1/deployments`` with this body would do; changes nothing."""
    devices = resolve_targets(session=session, body=body)
    return dryrun.dry_run(session=session, body=body, devices=devices)


@router.get("/deployments/{deployment_id}")
def show(session: SessionDep, deployment_id: str, devices: bool = True) -> DeploymentPublic:
    """The rollout's state, waves and counts; with ``?devices=false`` no per-device list (for
    polling a large rollout)."""
    return service.get_deployment(
        session=session, deployment_id=deployment_id, with_devices=devices
    )


@router.get("/deployments/{deployment_id}/events")
def events(
    session: SessionDep, deployment_id: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
) -> list[DeploymentEventPublic]:
    """The devices' progress events for this deployment, oldest first."""
    return service.deployment_events(session=session, deployment_id=deployment_id, limit=limit)


@router.get("/deployments/{deployment_id}/history")
def deployment_history(session: SessionDep, deployment_id: str) -> list[AuditPublic]:
    """Who created, paused, resumed, promoted, aborted or rolled back this deployment, and
    what the rollout did by itself (actor "rollout"), oldest first."""
    return service.deployment_history(session=session, deployment_id=deployment_id)


@router.post("/deployments/{deployment_id}/pause")
def pause(
    ctx: ContextDep,
    session: SessionDep,
    deployment_id: str,
    body: ControlRequest | None = None,
    actor: ActorHeader = "",
) -> DeploymentPublic:
    return service.pause(
        session=session,
        director=ctx.director(),
        deployment_id=deployment_id,
        actor=_actor(actor),
        reason=(body or ControlRequest()).reason,
    )


@router.post("/deployments/{deployment_id}/resume")
def resume(
    ctx: ContextDep,
    session: SessionDep,
    deployment_id: str,
    body: ControlRequest | None = None,
    actor: ActorHeader = "",
) -> DeploymentPublic:
    return service.resume(
        session=session,
        director=ctx.director(),
        deployment_id=deployment_id,
        actor=_actor(actor),
        reason=(body or ControlRequest()).reason,
    )


@router.post("/deployments/{deployment_id}/promote")
def promote(
    ctx: ContextDep,
    session: SessionDep,
    deployment_id: str,
    body: ControlRequest | None = None,
    actor: ActorHeader = "",
) -> DeploymentPublic:
    """Release the next wave now (``all_waves``: every wave left)."""
    request = body or ControlRequest()
    return service.promote(
        session=session,
        director=ctx.director(),
        deployment_id=deployment_id,
        actor=_actor(actor),
        reason=request.reason,
        all_waves=request.all_waves,
    )


@router.post("/deployments/{deployment_id}/abort")
def abort(
    ctx: ContextDep,
    session: SessionDep,
    deployment_id: str,
    body: ControlRequest | None = None,
    actor: ActorHeader = "",
) -> DeploymentPublic:
    """Stop releasing; cancel devices still installing; with ``rollback`` (default: the
    policy's ``rollback_on_abort``) send updated devices back too."""
    request = body or ControlRequest()
    return service.abort(
        session=session,
        director=ctx.director(),
        deployment_id=deployment_id,
        actor=_actor(actor),
        reason=request.reason,
        rollback=request.rollback,
    )


@router.post("/deployments/{deployment_id}/rollback")
def rollback(
    ctx: ContextDep,
    session: SessionDep,
    deployment_id: str,
    body: ControlRequest | None = None,
    actor: ActorHeader = "",
) -> DeploymentPublic:
    """Send every device this deployment updated back to what it ran before."""
    return service.rollback(
        session=session,
        director=ctx.director(),
        deployment_id=deployment_id,
        actor=_actor(actor),
        reason=(body or ControlRequest()).reason,
    )
