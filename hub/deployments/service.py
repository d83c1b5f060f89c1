"""Creating deployments, the operators' actions on them, and reporting their progress."""

import logging
import secrets
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import func
from sqlmodel import Session, col, select

from agent.protocol.documents import CollectPolicy
from hub.blobs import BlobStore
from hub.database import utcnow
from hub.deployments import engine
from hub.deployments.audit import history, record
from hub.deployments.desired import Director
from hub.deployments.eligibility import Candidate, judge
from hub.deployments.models import (
    ROLLOUT_FINISHED,
    Deployment,
    DeploymentDevice,
    DeviceEvent,
    DeviceState,
    RolloutState,
)
from hub.deployments.policy import assign_waves, order_targets, plan_waves
from hub.deployments.schemas import (
    AuditPublic,
    DeploymentCreate,
    DeploymentDevicePublic,
    DeploymentEventPublic,
    DeploymentPublic,
    DeploymentSummary,
    WavePublic,
)
from hub.devices.models import Device
from hub.errors import HubError, NotFound
from hub.packages.service import ensure_package
from hub.registry.service import get_version
from hub.signing.keystore import KeyStore

logger = logging.getLogger(__name__)

# Device states that are neither finished nor waiting to be released.
_MOVING = frozenset({DeviceState.IN_PROGRESS, DeviceState.SOAKING, DeviceState.ROLLING_BACK})
_NOT_OK = frozenset({DeviceState.FAILED, DeviceState.TIMED_OUT, DeviceState.ROLLED_BACK})
_UNFINISHED_IN_WAVE = (DeviceState.PENDING, DeviceState.IN_PROGRESS, DeviceState.SOAKING)


def publish(director: Director, session: Session, device_ids: Sequence[str], why: str) -> None:
    """Publish new desired states after a commit. A failure is logged, not raised: the commit
    stands, and the rollout engine publishes again to released devices that stay silent
    (``engine.republish_unheard``), besides each device asking on every connect."""
    if not device_ids:
        return
    try:
        director.publish_many(session=session, device_ids=device_ids)
    except HubError as exc:
        logger.warning("could not publish desired states", extra={"why": why, "error": exc.detail})


def create_deployment(
    *,
    session: Session,
    keys: KeyStore,
    blobs: BlobStore,
    director: Director,
    packages_dir: Path,
    max_package_bytes: int,
    body: DeploymentCreate,
    devices: list[str],
    actor: str,
) -> Deployment:
    """Create a deployment of ``body.model`` to ``devices`` and release its first wave."""
    device_ids = list(dict.fromkeys(devices))
    named = list(dict.fromkeys(body.devices))
    known = set(session.exec(select(Device.id).where(col(Device.id).in_(named))).all())
    missing = [d for d in named if d not in known]
    if missing:
        raise NotFound(f"unknown devices: {', '.join(missing)}")
    model_version = get_version(
        session=session, name=body.model, version=body.version if body.version else "latest"
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
        updated_at=now,
        device_timeout_s=body.device_timeout_s,
        policy=body.policy.model_dump(mode="json", exclude_defaults=True),
        priority=body.priority,
        continuous=body.continuous,
        selector=body.selector,
        groups=list(body.groups),
        retry_bad=body.retry_bad,
        data_collection=(
            body.data_collection.model_dump(mode="json")
            if body.data_collection is not None
            else None
        ),
        created_by=actor,
    )
    verdicts = judge(
        session=session,
        candidate=Candidate.of(
            model_version, package.digest, priority=body.priority, retry_bad=body.retry_bad
        ),
        devices=device_ids,
    )
    eligible = order_targets(
        [v.device_id for v in verdicts if v.skip is None], body.policy, seed=deployment.id
    )
    sizes = plan_waves(len(eligible), body.policy)
    deployment.waves = max(1, len(sizes))
    session.add(deployment)
    session.flush()
    waves = assign_waves(eligible, sizes)
    for device_id in eligible:
        session.add(
            DeploymentDevice(
                deployment_id=deployment.id,
                device_id=device_id,
                wave=waves[device_id],
                state_changed_at=now,
                updated_at=now,
            )
        )
    for verdict in verdicts:
        if verdict.skip is not None:
            session.add(
                DeploymentDevice(
                    deployment_id=deployment.id,
                    device_id=verdict.device_id,
                    state=verdict.skip,
                    detail=verdict.why,
                    state_changed_at=now,
                    updated_at=now,
                )
            )
    record(
        session,
        deployment.id,
        actor,
        "created",
        f"{deployment.model}:{deployment.version} to {len(eligible)} device(s)"
        f" in {len(sizes)} wave(s) {sizes}; {len(verdicts) - len(eligible)} skipped",
        now,
    )
    session.flush()
    published = engine.advance(session, deployment.id, now)
    session.commit()
    logger.info(
        "created deployment",
        extra={
            "deployment_id": deployment.id,
            "model": deployment.model,
            "version": deployment.version,
            "devices": len(eligible),
            "waves": sizes,
        },
    )
    publish(director, session, published, f"release of {deployment.id}")
    return deployment


# -- reading -----------------------------------------------------------------------------------


def _get(session: Session, deployment_id: str) -> Deployment:
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        raise NotFound(f"deployment {deployment_id} not found")
    return deployment


def get_deployment(
    *, session: Session, deployment_id: str, with_devices: bool = True
) -> DeploymentPublic:
    """The rollout's view. Counts come from GROUP BY queries, so a poll with ``with_devices``
    False costs about the same for 10 devices as for 10,000."""
    deployment = _get(session, deployment_id)
    of_this = DeploymentDevice.deployment_id == deployment_id
    counts: Counter[str] = Counter(
        dict(
            session.exec(
                select(DeploymentDevice.state, func.count())
                .where(of_this)
                .group_by(col(DeploymentDevice.state))
            ).all()
        )
    )
    steps = dict(
        session.exec(
            select(DeploymentDevice.step, func.count())
            .where(of_this, DeploymentDevice.state == DeviceState.IN_PROGRESS)
            .group_by(col(DeploymentDevice.step))
        ).all()
    )
    by_wave: dict[int, Counter[str]] = {i: Counter() for i in range(deployment.waves)}
    for wave, state, count in session.exec(
        select(DeploymentDevice.wave, DeploymentDevice.state, func.count())
        .where(of_this)
        .where(col(DeploymentDevice.state).not_in([DeviceState.SKIPPED, DeviceState.OVERRIDDEN]))
        .group_by(col(DeploymentDevice.wave), col(DeploymentDevice.state))
    ).all():
        by_wave.setdefault(wave, Counter())[state] = count
    rows = (
        session.exec(
            select(DeploymentDevice)
            .where(of_this)
            .order_by(col(DeploymentDevice.wave), col(DeploymentDevice.device_id))
        ).all()
        if with_devices
        else []
    )
    policy = engine.policy_of(deployment)
    moving = any(counts[s] for s in _MOVING)
    # Done: the rollout ended and no device is still on its way (an aborted rollout is done
    # once the devices it sent back have confirmed, or timed out). A running rollout whose
    # last wave has settled is done too: the engine marks it completed at its next tick.
    ended = deployment.state in ROLLOUT_FINISHED or (
        deployment.state == RolloutState.RUNNING
        and not deployment.continuous
        and deployment.current_wave >= deployment.waves - 1
        and not moving
        and not counts[DeviceState.PENDING]
    )
    done = ended and not moving
    failed_rollout = deployment.state in (RolloutState.ABORTED, RolloutState.ROLLED_BACK)
    return DeploymentPublic(
        id=deployment.id,
        model=deployment.model,
        version=deployment.version,
        package_digest=deployment.package_digest,
        created_at=deployment.created_at,
        created_by=deployment.created_by,
        state=deployment.state,
        state_reason=deployment.state_reason,
        finished_at=deployment.finished_at,
        policy=policy,
        data_collection=(
            CollectPolicy.model_validate(deployment.data_collection)
            if deployment.data_collection is not None
            else None
        ),
        priority=deployment.priority,
        continuous=deployment.continuous,
        selector=deployment.selector,
        groups=deployment.groups,
        device_timeout_s=deployment.device_timeout_s,
        current_wave=deployment.current_wave,
        waves=[
            WavePublic(
                index=index,
                name=engine.wave_name(index, policy),
                devices=sum(wave_counts.values()),
                counts=dict(wave_counts),
                released=index <= deployment.current_wave,
                finished=not any(wave_counts[s] for s in _UNFINISHED_IN_WAVE),
            )
            for index, wave_counts in sorted(by_wave.items())
        ],
        total=sum(counts.values()),
        counts={state: n for state, n in counts.items() if n},
        steps=steps,
        devices=[_device_public(r) for r in rows] if with_devices else None,
        done=done,
        ok=done and not failed_rollout and not any(counts[s] for s in _NOT_OK),
    )


def _device_public(r: DeploymentDevice) -> DeploymentDevicePublic:
    return DeploymentDevicePublic(
        device_id=r.device_id,
        state=r.state,
        wave=r.wave,
        step=r.step,
        reason=r.reason,
        detail=r.detail,
        progress=r.progress,
        released_at=r.released_at,
        activated_at=r.activated_at,
        state_changed_at=r.state_changed_at,
        updated_at=r.updated_at,
    )


def list_deployments(
    *, session: Session, model: str | None = None, state: str | None = None, limit: int = 100
) -> list[DeploymentSummary]:
    """Newest first."""
    query = select(Deployment).order_by(col(Deployment.created_at).desc()).limit(limit)
    if model:
        query = query.where(Deployment.model == model)
    if state:
        query = query.where(Deployment.state == state)
    out = []
    for d in session.exec(query).all():
        counts = engine.state_counts(session, d.id)
        out.append(
            DeploymentSummary(
                id=d.id,
                model=d.model,
                version=d.version,
                state=d.state,
                state_reason=d.state_reason,
                priority=d.priority,
                continuous=d.continuous,
                created_at=d.created_at,
                created_by=d.created_by,
                total=sum(counts.values()),
                counts=dict(counts),
            )
        )
    return out


def deployment_history(*, session: Session, deployment_id: str) -> list[AuditPublic]:
    _get(session, deployment_id)
    return [
        AuditPublic(at=a.at, actor=a.actor, action=a.action, detail=a.detail)
        for a in history(session, deployment_id)
    ]


def deployment_events(
    *, session: Session, deployment_id: str, limit: int = 1000
) -> list[DeploymentEventPublic]:
    """The devices' progress events for a deployment, oldest first (the deployment's log)."""
    _get(session, deployment_id)
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
