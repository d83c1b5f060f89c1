"""The operators' actions on a rollout: pause, resume, promote, abort, rollback.

Each runs in one transaction that starts by locking the deployment's row (``engine.lock``), so it
never interleaves with the engine's tick on the same rollout, is recorded in the history with who
asked and why, and publishes the desired states it changed after the commit.
"""

from collections.abc import Callable
from datetime import datetime
from enum import StrEnum

from sqlmodel import Session, select

from hub.database import utcnow
from hub.deployments import engine
from hub.deployments.audit import record
from hub.deployments.desired import Director
from hub.deployments.models import Deployment, DeploymentDevice, DeviceState, RolloutState
from hub.deployments.schemas import ControlRequest
from hub.deployments.service import publish
from hub.errors import Conflict, NotFound


class Verb(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ABORT = "abort"
    ROLLBACK = "rollback"


_LIVE = frozenset({RolloutState.RUNNING, RolloutState.PAUSED})
ALLOWED: dict[Verb, frozenset[RolloutState]] = {
    Verb.PAUSE: frozenset({RolloutState.RUNNING}),
    Verb.RESUME: frozenset({RolloutState.PAUSED}),
    Verb.PROMOTE: _LIVE,
    Verb.ABORT: _LIVE,
    # A completed rollout can still be rolled back; a rolled-back one has nothing left to undo.
    Verb.ROLLBACK: frozenset(RolloutState) - {RolloutState.ROLLED_BACK},
}


def act(
    *,
    session: Session,
    director: Director,
    deployment_id: str,
    verb: Verb,
    actor: str,
    request: ControlRequest,
) -> None:
    """Do ``verb`` to the rollout; NotFound, or Conflict when its state does not allow it."""
    now = utcnow()
    deployment = engine.lock(session, deployment_id, now)
    if deployment is None:
        session.rollback()
        raise NotFound(f"deployment {deployment_id} not found")
    if deployment.state not in ALLOWED[verb]:
        session.rollback()
        raise Conflict(f"cannot {verb} {deployment_id}: it is {deployment.state}")
    published = _ACTIONS[verb](session, deployment, actor, request, now)
    session.commit()
    publish(director, session, published, f"{verb} of {deployment_id}")


def _by(actor: str, request: ControlRequest, what: str) -> str:
    return f"{what} by {actor}" + (f": {request.reason}" if request.reason else "")


def _pause(
    session: Session, d: Deployment, actor: str, request: ControlRequest, now: datetime
) -> list[str]:
    # Devices already released carry on, and are still judged: the failure threshold can
    # abort a paused rollout.
    d.state = RolloutState.PAUSED
    d.state_reason = _by(actor, request, "paused")
    record(session, d.id, actor, "paused", request.reason, now)
    return []


def _resume(
    session: Session, d: Deployment, actor: str, request: ControlRequest, now: datetime
) -> list[str]:
    d.state = RolloutState.RUNNING
    d.state_reason = ""
    record(session, d.id, actor, "resumed", request.reason, now)
    session.flush()
    return engine.advance(session, d.id, now)


def _promote(
    session: Session, d: Deployment, actor: str, request: ControlRequest, now: datetime
) -> list[str]:
    """Release the next wave now (or every wave left) without waiting for the current one."""
    last = d.waves - 1
    # A rollout paused after its canary already stands at the next wave, not released yet:
    # promoting it releases that wave, not the one after.
    waiting = d.state == RolloutState.PAUSED and _unreleased(session, d.id, d.current_wave)
    step = 0 if waiting else 1
    d.current_wave = last if request.all_waves else min(last, d.current_wave + step)
    d.state = RolloutState.RUNNING
    d.state_reason = ""
    detail = f"to {engine.wave_name(d.current_wave, engine.policy_of(d))}"
    if request.reason:
        detail += f": {request.reason}"
    record(session, d.id, actor, "promoted", detail, now)
    session.flush()
    return engine.advance(session, d.id, now)


def _unreleased(session: Session, deployment_id: str, wave: int) -> bool:
    released = session.exec(
        select(DeploymentDevice.id).where(
            DeploymentDevice.deployment_id == deployment_id,
            DeploymentDevice.wave == wave,
            DeploymentDevice.state != DeviceState.PENDING,
        )
    ).first()
    return released is None


def _abort(
    session: Session, d: Deployment, actor: str, request: ControlRequest, now: datetime
) -> list[str]:
    rollback = (
        engine.policy_of(d).rollback_on_abort if request.rollback is None else request.rollback
    )
    return engine.abort(
        session=session,
        deployment=d,
        actor=actor,
        why=_by(actor, request, "aborted"),
        rollback=rollback,
        now=now,
    )


def _rollback(
    session: Session, d: Deployment, actor: str, request: ControlRequest, now: datetime
) -> list[str]:
    return engine.rollback(
        session=session, deployment=d, actor=actor, why=_by(actor, request, "rolled back"), now=now
    )


_Action = Callable[[Session, Deployment, str, ControlRequest, datetime], list[str]]
_ACTIONS: dict[Verb, _Action] = {
    Verb.PAUSE: _pause,
    Verb.RESUME: _resume,
    Verb.PROMOTE: _promote,
    Verb.ABORT: _abort,
    Verb.ROLLBACK: _rollback,
}
