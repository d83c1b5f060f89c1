"""Creating deployments and reporting their progress."""

import logging
import secrets
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

from sqlmodel import Session, col, select

from agent.protocol.messages import TERMINAL_STEPS, Step
from hub.blobs import BlobStore
from hub.database import utcnow
from hub.deployments.desired import Director
from hub.deployments.models import (
    TIMED_OUT,
    Deployment,
    DeploymentDevice,
    DeviceDesired,
    DeviceEvent,
)
from hub.deployments.schemas import (
    DeploymentDevicePublic,
    DeploymentEventPublic,
    DeploymentPublic,
)
from hub.devices.models import Device
from hub.errors import HubError, InvalidInput, NotFound
from hub.packages.service import ensure_package
from hub.registry.service import get_version
from hub.signing.keystore import KeyStore

logger = logging.getLogger(__name__)

_TERMINAL = frozenset({*(str(s) for s in TERMINAL_STEPS), TIMED_OUT})


def create_deployment(
    *,
    session: Session,
    keys: KeyStore,
    blobs: BlobStore,
    director: Director,
    packages_dir: Path,
    max_package_bytes: int,
    model: str,
    version: int | None,
    devices: list[str],
    device_timeout_s: int = 3600,
) -> Deployment:
    """Point ``devices`` at a package of ``model`` and publish their new desired states."""
    device_ids = list(dict.fromkeys(devices))
    if not device_ids:
        raise InvalidInput("a deployment needs at least one device")
    known = set(session.exec(select(Device.id).where(col(Device.id).in_(device_ids))).all())
    missing = [d for d in device_ids if d not in known]
    if missing:
        raise NotFound(f"unknown devices: {', '.join(missing)}")
    model_version = get_version(
        session=session, name=model, version=version if version is not None else "latest"
    )
    package = ensure_package(
        session=session,
        keys=keys,
        blobs=blobs,
        packages_dir=packages_dir,
        model_version=model_version,
        max_package_bytes=max_package_bytes,
    )
    now = utcnow()
    deployment = Deployment(
        id=f"dep-{secrets.token_hex(6)}",
        model=model_version.name,
        version=model_version.version,
        package_digest=package.digest,
        created_at=now,
        device_timeout_s=device_timeout_s,
    )
    session.add(deployment)
    session.flush()
    for device_id in device_ids:
        _supersede(session=session, device_id=device_id, model=deployment.model, by=deployment.id)
        session.add(
            DeploymentDevice(deployment_id=deployment.id, device_id=device_id, updated_at=now)
        )
        want = session.get(DeviceDesired, (device_id, deployment.model)) or DeviceDesired(
            device_id=device_id,
            model=deployment.model,
            package_digest=package.digest,
            deployment_id=deployment.id,
        )
        want.package_digest = package.digest
        want.deployment_id = deployment.id
        want.updated_at = now
        session.add(want)
    session.commit()
    logger.info(
        "created deployment",
        extra={
            "deployment_id": deployment.id,
            "model": deployment.model,
            "version": deployment.version,
            "devices": len(device_ids),
        },
    )
    try:
        director.publish_many(session=session, device_ids=device_ids)
    except HubError as exc:
        # Each device asks for its desired state on every connect, so it still gets it.
        logger.warning(
            "could not publish desired states",
            extra={"deployment_id": deployment.id, "error": exc.detail},
        )
    return deployment


def _supersede(*, session: Session, device_id: str, model: str, by: str) -> None:
    """End unfinished rows of older deployments of the same model on this device.

    The device now works towards the new package, so the old deployment would otherwise wait
    for it forever.
    """
    rows = session.exec(
        select(DeploymentDevice)
        .join(Deployment, col(Deployment.id) == col(DeploymentDevice.deployment_id))
        .where(DeploymentDevice.device_id == device_id, Deployment.model == model)
        .where(col(DeploymentDevice.step).not_in(list(_TERMINAL)))
    ).all()
    for row in rows:
        row.step = str(Step.FAILED)
        row.detail = f"superseded by deployment {by}"
        row.updated_at = utcnow()
        session.add(row)


def get_deployment(*, session: Session, deployment_id: str) -> DeploymentPublic:
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        raise NotFound(f"deployment {deployment_id} not found")
    rows = session.exec(
        select(DeploymentDevice)
        .where(DeploymentDevice.deployment_id == deployment_id)
        .order_by(col(DeploymentDevice.device_id))
    ).all()
    counts = Counter(r.step for r in rows)
    done = all(r.step in _TERMINAL for r in rows)
    return DeploymentPublic(
        id=deployment.id,
        model=deployment.model,
        version=deployment.version,
        package_digest=deployment.package_digest,
        created_at=deployment.created_at,
        devices=[
            DeploymentDevicePublic(
                device_id=r.device_id,
                step=r.step,
                reason=r.reason,
                detail=r.detail,
                progress=r.progress,
                updated_at=r.updated_at,
            )
            for r in rows
        ],
        counts=dict(counts),
        done=done,
        ok=done and all(r.step == Step.ACTIVE for r in rows),
    )


def expire_overdue_devices(*, session: Session, now: datetime | None = None) -> int:
    """Mark devices of every deployment that are still not done past its device timeout as
    timed out; returns how many. A device that reports later still ends active or failed."""
    now = now or utcnow()
    overdue = session.exec(
        select(DeploymentDevice, Deployment)
        .join(Deployment, col(Deployment.id) == col(DeploymentDevice.deployment_id))
        .where(col(DeploymentDevice.step).not_in(list(_TERMINAL)))
    ).all()
    expired = 0
    for row, deployment in overdue:
        if now - deployment.created_at < timedelta(seconds=deployment.device_timeout_s):
            continue
        row.step = TIMED_OUT
        row.detail = f"not active or failed {deployment.device_timeout_s} s after the start"
        row.updated_at = now
        session.add(row)
        expired += 1
    if expired:
        session.commit()
        logger.warning("devices timed out", extra={"devices": expired})
    return expired


def deployment_events(
    *, session: Session, deployment_id: str, limit: int = 1000
) -> list[DeploymentEventPublic]:
    """The devices' progress events for a deployment, oldest first (the deployment's log)."""
    if session.get(Deployment, deployment_id) is None:
        raise NotFound(f"deployment {deployment_id} not found")
    rows = session.exec(
        select(DeviceEvent)
        .where(DeviceEvent.deployment_id == deployment_id)
        .order_by(col(DeviceEvent.received_at), col(DeviceEvent.id))
        .limit(limit)
    ).all()
    return [
        DeploymentEventPublic(
            device_id=r.device_id,
            seq=r.seq,
            step=r.step,
            reason=r.reason,
            detail=r.detail,
            progress=r.progress,
            sent_at=r.sent_at,
            received_at=r.received_at,
        )
        for r in rows
    ]
