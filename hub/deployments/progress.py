"""What a device's reports do to its place in a deployment.

Events say how an install goes; the reported state says what the device runs. Either one can be
lost or arrive late, so both lead to the same transitions, and a finished row never reopens.
"""

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from agent.protocol.messages import EventBody, Step
from hub.deployments.engine import complete_if_done
from hub.deployments.models import DEVICE_FINISHED, Deployment, DeploymentDevice, DeviceState
from hub.deployments.release import set_state


def on_event(
    *, session: Session, device_id: str, body: EventBody, now: datetime
) -> DeploymentDevice | None:
    """Apply one (new, not duplicate) progress event; returns the row when its state changed."""
    found = session.exec(
        select(DeploymentDevice, Deployment)
        .join(Deployment, col(Deployment.id) == col(DeploymentDevice.deployment_id))
        .where(
            DeploymentDevice.deployment_id == body.deployment_id,
            DeploymentDevice.device_id == device_id,
        )
    ).first()
    if found is None:
        return None
    row, deployment = found
    before = row.state
    if row.state == DeviceState.ROLLING_BACK:
        _rolling_back_event(row, body, now)
    elif row.state == DeviceState.IN_PROGRESS and body.digest == deployment.package_digest:
        row.step = str(body.step)
        row.reason = str(body.reason) if body.reason is not None else None
        row.detail = body.detail
        if body.progress is not None:
            row.progress = body.progress
        row.updated_at = now
        if body.step == Step.ACTIVE:
            reached_package(row, deployment, now)
        elif body.step == Step.FAILED:
            set_state(row, DeviceState.FAILED, now)
    elif row.state == DeviceState.TIMED_OUT and body.digest == deployment.package_digest:
        _late_event(row, body, now)
    elif row.state == DeviceState.SOAKING and body.step == Step.FAILED:
        set_state(row, DeviceState.FAILED, now, f"failed while soaking: {body.detail}")
        row.reason = str(body.reason) if body.reason is not None else None
    else:
        return None  # pending, finished, or about another package: stored, nothing to do
    session.add(row)
    if row.state == before:
        return None
    if row.state in DEVICE_FINISHED:
        complete_if_done(session, deployment, now)
    return row


def _late_event(row: DeploymentDevice, body: EventBody, now: datetime) -> None:
    """A device that timed out and then finished is recorded as it ended. It skips the soak:
    the rollout may have moved on, and nothing would be left to judge it."""
    if body.step == Step.ACTIVE:
        row.step, row.reason, row.progress = str(Step.ACTIVE), None, 1.0
        row.activated_at = now
        set_state(row, DeviceState.SUCCEEDED, now, "active after it had timed out")
    elif body.step == Step.FAILED:
        row.step = str(Step.FAILED)
        row.reason = str(body.reason) if body.reason is not None else None
        set_state(row, DeviceState.FAILED, now, body.detail)


def _rolling_back_event(row: DeploymentDevice, body: EventBody, now: datetime) -> None:
    if body.step == Step.ACTIVE and body.digest == row.previous_digest:
        set_state(row, DeviceState.ROLLED_BACK, now, "back on the version it ran before")
        row.step = str(body.step)
    elif body.step == Step.FAILED and body.digest == row.previous_digest:
        set_state(row, DeviceState.FAILED, now, f"rollback failed: {body.detail}")
        row.reason = str(body.reason) if body.reason is not None else None


def reached_package(row: DeploymentDevice, deployment: Deployment, now: datetime) -> None:
    """The device runs the package: a success at once, or after the soak time."""
    row.step = str(Step.ACTIVE)
    row.reason = None
    row.progress = 1.0
    row.activated_at = now
    soak_s = int(deployment.policy.get("soak_s", 0))
    if soak_s > 0:
        set_state(row, DeviceState.SOAKING, now, f"healthy for {soak_s} s to count as a success")
    else:
        set_state(row, DeviceState.SUCCEEDED, now, "")
        row.detail = ""


def on_reported_state(
    *, session: Session, device_id: str, reported: dict[str, Any], now: datetime
) -> list[DeploymentDevice]:
    """Apply what a device says it runs to its unfinished rows; returns rows that changed.

    A package reported active completes its deployment even when the event saying so was lost;
    a soaking device that no longer runs the package, or says it is degraded, failed its soak;
    a device rolling back that runs its old package again (or no longer has a model that was
    new) is back.
    """
    active = {m["model"]: m["digest"] for m in reported.get("active", [])}
    degraded = reported.get("health") == "degraded"
    found = session.exec(
        select(DeploymentDevice, Deployment)
        .join(Deployment, col(Deployment.id) == col(DeploymentDevice.deployment_id))
        .where(DeploymentDevice.device_id == device_id)
        .where(
            col(DeploymentDevice.state).in_(
                [DeviceState.IN_PROGRESS, DeviceState.SOAKING, DeviceState.ROLLING_BACK]
            )
        )
    ).all()
    changed = []
    for row, deployment in found:
        running = active.get(deployment.model)
        if row.state == DeviceState.IN_PROGRESS and running == deployment.package_digest:
            reached_package(row, deployment, now)
        elif row.state == DeviceState.SOAKING and running != deployment.package_digest:
            set_state(row, DeviceState.FAILED, now, "stopped running the package while soaking")
        elif row.state == DeviceState.SOAKING and degraded:
            set_state(row, DeviceState.FAILED, now, "reported degraded health while soaking")
        elif row.state == DeviceState.ROLLING_BACK and running == row.previous_digest:
            set_state(row, DeviceState.ROLLED_BACK, now, "back on the version it ran before")
        else:
            continue
        session.add(row)
        changed.append(row)
        if row.state in DEVICE_FINISHED:
            complete_if_done(session, deployment, now)
    return changed
