"""Pointing devices at a deployment's package, and sending them back.

These only change rows; the caller commits and then publishes the devices' desired states
(``Director.publish_many``), so a crash between the two is repaired by the device asking for its
desired state on its next connect.
"""

import logging
from collections.abc import Sequence
from datetime import datetime

from sqlmodel import Session, col, select

from hub.deployments.eligibility import Candidate, judge
from hub.deployments.models import (
    DEVICE_FINISHED,
    Deployment,
    DeploymentDevice,
    DeviceDesired,
    DeviceState,
)
from hub.errors import NotFound
from hub.packages.models import Package
from hub.registry.models import ModelVersion

logger = logging.getLogger(__name__)


def candidate_for(session: Session, deployment: Deployment) -> Candidate:
    package = session.get(Package, deployment.package_digest)
    model_version = session.get(ModelVersion, package.model_version_id) if package else None
    if model_version is None:
        raise NotFound(f"the package of {deployment.id} is gone from the registry")
    return Candidate.of(
        model_version,
        deployment.package_digest,
        priority=deployment.priority,
        retry_bad=deployment.retry_bad,
        deployment_id=deployment.id,
    )


def set_state(row: DeploymentDevice, state: DeviceState, now: datetime, detail: str = "") -> None:
    row.state = state
    row.state_changed_at = now
    row.updated_at = now
    if detail:
        row.detail = detail


def release(
    *, session: Session, deployment: Deployment, rows: Sequence[DeploymentDevice], now: datetime
) -> list[str]:
    """Give each device's desired state this deployment's package; returns the devices whose
    desired state changed. A device judged ineligible now (it reached the version meanwhile,
    marked it bad, or a higher-priority deployment took it) is skipped with the reason."""
    verdicts = judge(
        session=session,
        candidate=candidate_for(session, deployment),
        devices=[row.device_id for row in rows],
    )
    by_device = {v.device_id: v for v in verdicts}
    released: list[str] = []
    for row in rows:
        verdict = by_device[row.device_id]
        if verdict.skip is not None:
            set_state(row, verdict.skip, now, verdict.why)
            session.add(row)
            continue
        desired = session.get(DeviceDesired, (row.device_id, deployment.model))
        if desired is None:
            desired = DeviceDesired(
                device_id=row.device_id,
                model=deployment.model,
                package_digest=deployment.package_digest,
                deployment_id=deployment.id,
            )
            row.previous_digest = None
        elif desired.deployment_id != deployment.id:
            row.previous_digest = desired.package_digest
            _supersede(session, row.device_id, deployment, now)
        desired.package_digest = deployment.package_digest
        desired.deployment_id = deployment.id
        desired.updated_at = now
        session.add(desired)
        row.step = "queued"
        row.reason = None
        row.progress = None
        row.released_at = now
        set_state(row, DeviceState.IN_PROGRESS, now)
        session.add(row)
        released.append(row.device_id)
    return released


def _supersede(session: Session, device_id: str, by: Deployment, now: datetime) -> None:
    """End the unfinished rows of other deployments of the same model on this device: it now
    works towards ``by``'s package, so they would otherwise wait for it forever."""
    rows = session.exec(
        select(DeploymentDevice)
        .join(Deployment, col(Deployment.id) == col(DeploymentDevice.deployment_id))
        .where(DeploymentDevice.device_id == device_id, Deployment.model == by.model)
        .where(DeploymentDevice.deployment_id != by.id)
        .where(col(DeploymentDevice.state).not_in(list(DEVICE_FINISHED)))
    ).all()
    for row in rows:
        set_state(row, DeviceState.SUPERSEDED, now, f"superseded by deployment {by.id}")
        session.add(row)


def revert(
    *, session: Session, deployment: Deployment, row: DeploymentDevice, now: datetime, why: str
) -> bool:
    """Send a released device back to what its desired state named before; False when another
    deployment owns the device's model by now (there is nothing of ours to undo)."""
    desired = session.get(DeviceDesired, (row.device_id, deployment.model))
    if desired is None or desired.deployment_id != deployment.id:
        return False
    if row.previous_digest is not None:
        # The deployment id stays: the device reports the old package active for this
        # deployment, which is how the hub learns the rollback took.
        desired.package_digest = row.previous_digest
        desired.updated_at = now
        session.add(desired)
    else:
        session.delete(desired)  # the model was new there: the device removes it
    set_state(row, DeviceState.ROLLING_BACK, now, why)
    session.add(row)
    return True
