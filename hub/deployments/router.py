"""Deployment routes under /api/v1/deployments."""

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from hub.dependencies import AdminDep, ContextDep, SessionDep
from hub.deployments import dryrun, service
from hub.deployments.schemas import (
    DeploymentCreate,
    DeploymentEventPublic,
    DeploymentPublic,
    DryRunPublic,
)
from hub.deployments.targets import resolve_targets

router = APIRouter(prefix="/api/v1/deployments", tags=["deployments"], dependencies=[AdminDep])


@router.post("", status_code=201)
async def create(ctx: ContextDep, session: SessionDep, body: DeploymentCreate) -> DeploymentPublic:
    # Building a package reads and hashes every file; keep it off the event loop.
    deployment = await run_in_threadpool(
        service.create_deployment,
        session=session,
        keys=ctx.keys,
        blobs=ctx.blobs,
        director=ctx.director(),
        packages_dir=ctx.settings.packages_dir,
        max_package_bytes=ctx.settings.registry.max_package_bytes,
        model=body.model,
        version=body.version,
        devices=resolve_targets(session=session, body=body),
        device_timeout_s=body.device_timeout_s,
    )
    return service.get_deployment(session=session, deployment_id=deployment.id)


@router.post("/dry-run")
def dry_run(session: SessionDep, body: DeploymentCreate) -> DryRunPublic:
    """What ``POST /api/v1/deployments`` with this body would do; changes nothing."""
    devices = resolve_targets(session=session, body=body)
    return dryrun.dry_run(session=session, model=body.model, version=body.version, devices=devices)


@router.get("/{deployment_id}")
def show(session: SessionDep, deployment_id: str) -> DeploymentPublic:
    return service.get_deployment(session=session, deployment_id=deployment_id)


@router.get("/{deployment_id}/events")
def events(
    session: SessionDep, deployment_id: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
) -> list[DeploymentEventPublic]:
    """The devices' progress events for this deployment, oldest first."""
    return service.deployment_events(session=session, deployment_id=deployment_id, limit=limit)
