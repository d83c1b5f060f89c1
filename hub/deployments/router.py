"""Deployment routes under /api/v1/deployments."""

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Header, Query
from starlette.concurrency import run_in_threadpool

from hub.dependencies import AdminDep, ContextDep, SessionDep
from hub.deployments import control, dryrun, service
from hub.deployments.control import Verb
from hub.deployments.models import RolloutState
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
    state: RolloutState | None = None,
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


def _control_route(verb: Verb) -> Callable[..., DeploymentPublic]:
    def route(
        ctx: ContextDep,
        session: SessionDep,
        deployment_id: str,
        body: ControlRequest | None = None,
        actor: ActorHeader = "",
    ) -> DeploymentPublic:
        control.act(
            session=session,
            director=ctx.director(),
            deployment_id=deployment_id,
            verb=verb,
            actor=_actor(actor),
            request=body or ControlRequest(),
        )
        # Without the device list: an action on a large rollout answers with its state.
        return service.get_deployment(
            session=session, deployment_id=deployment_id, with_devices=False
        )

    return route


_CONTROL_DOCS = {
    Verb.PAUSE: "Release nothing new; devices already released carry on and are still judged.",
    Verb.RESUME: "Go on releasing waves.",
    Verb.PROMOTE: "Release the next wave now (``all_waves``: every wave left).",
    Verb.ABORT: "Stop releasing and send devices still installing back; with ``rollback`` "
    "(default: the policy's ``rollback_on_abort``) the updated devices too.",
    Verb.ROLLBACK: "Send every device this deployment updated back to what it ran before.",
}
for _verb, _doc in _CONTROL_DOCS.items():
    router.add_api_route(
        f"/deployments/{{deployment_id}}/{_verb}",
        _control_route(_verb),
        methods=["POST"],
        name=str(_verb),
        summary=f"{str(_verb).capitalize()} a rollout",
        description=_doc + " 409 when the rollout's state does not allow it.",
    )
