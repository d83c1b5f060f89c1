"""The rollout engine: advances running deployments wave by wave.

Each tick, for every deployment this hub holds the lease of, it judges soaking devices, aborts
on the failure threshold, moves to the next wave when the current one is finished, releases
pending devices up to the download cap, enlists devices that joined a continuous deployment's
target, and marks the deployment completed. Everything it knows is in the database, so a hub
that restarts (or another replica that takes the lease over) carries on where it stopped.
"""

import hashlib
import logging
import socket
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, or_, update
from sqlmodel import Session, col, select

from agent.protocol.messages import Step
from hub.database import utcnow
from hub.deployments.audit import record
from hub.deployments.models import (
    DEVICE_FAILURES,
    Deployment,
    DeploymentDevice,
    DeviceState,
    RolloutState,
)
from hub.deployments.policy import RolloutPolicy
from hub.deployments.release import release, revert, set_state
from hub.deployments.targets import target_ids
from hub.devices.models import Device

logger = logging.getLogger(__name__)

LEASE_S = 15.0
# A released device that has not reported a step for this long may never have received its
# desired state: the hub died between committing the release and publishing it, or the device's
# request for it reached no hub. Its desired state is published again, at most this often.
REPUBLISH_AFTER_S = 20.0
ENGINE_ACTOR = "rollout"
# Device steps that still fetch the package: what the download cap counts.
_FETCHING = (str(Step.QUEUED), str(Step.DOWNLOADING))
# States that keep a wave from being finished.
_MOVING = (DeviceState.PENDING, DeviceState.IN_PROGRESS, DeviceState.SOAKING)


def default_owner(data_dir: str) -> str:
    """A lease owner name that stays the same when this hub restarts, so a restarted hub takes
    its rollouts back at once instead of waiting for its own old lease to run out."""
    digest = hashlib.sha256(data_dir.encode()).hexdigest()[:12]
    return f"{socket.gethostname()[:40]}:{digest}"


def lock(session: Session, deployment_id: str, now: datetime) -> Deployment | None:
    """Open a write transaction on the deployment and read it fresh.

    The UPDATE is the serialisation point between the engine and operator actions on the same
    deployment: SQLite takes its write lock, PostgreSQL a row lock; what is read after it is
    current until the commit.
    """
    session.execute(
        update(Deployment).where(col(Deployment.id) == deployment_id).values(updated_at=now)
    )
    return session.get(Deployment, deployment_id, populate_existing=True)


def policy_of(deployment: Deployment) -> RolloutPolicy:
    return RolloutPolicy.model_validate(deployment.policy)


@dataclass
class Tick:
    """What one tick did, for logs and tests."""

    published: list[str] = field(default_factory=list)  # devices whose desired state changed
    expired: int = 0
    driven: list[str] = field(default_factory=list)  # deployments this hub advanced


@dataclass
class RolloutEngine:
    owner: str
    lease_s: float = LEASE_S

    def tick(self, session: Session, now: datetime | None = None) -> Tick:
        """Advance every unfinished deployment this hub holds (or can take) the lease of.
        The caller publishes ``Tick.published`` after this returns (it is committed)."""
        now = now or utcnow()
        tick = Tick()
        ids = session.exec(
            select(Deployment.id).where(
                col(Deployment.state).in_([RolloutState.RUNNING, RolloutState.PAUSED])
            )
        ).all()
        for deployment_id in ids:
            if not self._take_lease(session, deployment_id, now):
                continue
            tick.driven.append(deployment_id)
            tick.published += advance(session, deployment_id, now)
            session.commit()
        tick.expired = expire_overdue_devices(session=session, now=now)
        tick.published += republish_unheard(session, now)
        return tick

    def _take_lease(self, session: Session, deployment_id: str, now: datetime) -> bool:
        taken = session.execute(
            update(Deployment)
            .where(col(Deployment.id) == deployment_id)
            .where(
                or_(
                    col(Deployment.lease_owner).is_(None),
                    col(Deployment.lease_owner) == self.owner,
                    col(Deployment.lease_expires_at) < now,
                )
            )
            .values(lease_owner=self.owner, lease_expires_at=now + timedelta(seconds=self.lease_s))
        )
        session.commit()
        return bool(taken.rowcount)  # type: ignore[attr-defined]

    def release_leases(self, session: Session) -> None:
        """Give up this hub's leases (on a clean stop), so another replica need not wait."""
        session.execute(
            update(Deployment)
            .where(col(Deployment.lease_owner) == self.owner)
            .values(lease_owner=None, lease_expires_at=None)
        )
        session.commit()


def advance(session: Session, deployment_id: str, now: datetime) -> list[str]:
    """One step of one rollout; returns the devices to publish. The caller commits."""
    deployment = lock(session, deployment_id, now)
    if deployment is None or deployment.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
        return []
    policy = policy_of(deployment)
    _finish_soaks(session, deployment, policy, now)
    if deployment.continuous and deployment.state == RolloutState.RUNNING:
        _enlist_newcomers(session, deployment, now)
    counts = state_counts(session, deployment.id)
    failures = sum(counts[s] for s in DEVICE_FAILURES)
    finished = failures + counts[DeviceState.SUCCEEDED]
    breach = policy.breach(failures=failures, finished=finished)
    if breach is not None:
        return abort(
            session=session,
            deployment=deployment,
            actor=ENGINE_ACTOR,
            why=f"failure threshold: {breach}",
            rollback=policy.rollback_on_abort,
            now=now,
        )
    if deployment.state != RolloutState.RUNNING:
        return []
    _next_wave_if_done(session, deployment, policy, now)
    if deployment.state != RolloutState.RUNNING:
        return []  # paused after the canary
    published = release_pending(session, deployment, policy, now)
    complete_if_done(session, deployment, now)
    return published


def state_counts(session: Session, deployment_id: str) -> Counter[str]:
    return Counter(
        dict(
            session.exec(
                select(DeploymentDevice.state, func.count())
                .where(DeploymentDevice.deployment_id == deployment_id)
                .group_by(col(DeploymentDevice.state))
            ).all()
        )
    )


def _finish_soaks(
    session: Session, deployment: Deployment, policy: RolloutPolicy, now: datetime
) -> None:
    """Soaking devices that stayed healthy for the soak time and are online now succeed (one
    that is offline at the end of its soak is judged when it is back)."""
    if policy.soak_s <= 0:
        return
    due = now - timedelta(seconds=policy.soak_s)
    rows = session.exec(
        select(DeploymentDevice)
        .join(Device, col(Device.id) == col(DeploymentDevice.device_id))
        .where(
            DeploymentDevice.deployment_id == deployment.id,
            DeploymentDevice.state == DeviceState.SOAKING,
            col(DeploymentDevice.activated_at) <= due,
            col(Device.online).is_(True),
        )
    ).all()
    for row in rows:
        set_state(row, DeviceState.SUCCEEDED, now, "")
        row.detail = f"healthy for {policy.soak_s} s"
        session.add(row)


def _enlist_newcomers(session: Session, deployment: Deployment, now: datetime) -> None:
    """Devices that match a continuous deployment's target since it started join its last
    wave (released at once when the rollout has reached it)."""
    have = set(
        session.exec(
            select(DeploymentDevice.device_id).where(
                DeploymentDevice.deployment_id == deployment.id
            )
        ).all()
    )
    newcomers = [
        d
        for d in target_ids(
            session=session, devices=[], selector=deployment.selector, groups=deployment.groups
        )
        if d not in have
    ]
    if not newcomers:
        return
    wave = max(deployment.current_wave, deployment.waves - 1)
    for device_id in newcomers:
        session.add(
            DeploymentDevice(
                deployment_id=deployment.id,
                device_id=device_id,
                wave=wave,
                state=DeviceState.PENDING,
                state_changed_at=now,
                updated_at=now,
            )
        )
    record(
        session,
        deployment.id,
        ENGINE_ACTOR,
        "enlisted",
        f"{len(newcomers)} new device(s) match the target: {', '.join(newcomers[:5])}"
        + (" ..." if len(newcomers) > 5 else ""),
        now,
    )
    session.flush()


def _wave_moving(session: Session, deployment_id: str, wave: int) -> int:
    return session.exec(
        select(func.count()).where(
            DeploymentDevice.deployment_id == deployment_id,
            DeploymentDevice.wave == wave,
            col(DeploymentDevice.state).in_(_MOVING),
        )
    ).one()


def _next_wave_if_done(
    session: Session, deployment: Deployment, policy: RolloutPolicy, now: datetime
) -> None:
    while deployment.current_wave < deployment.waves - 1:
        if _wave_moving(session, deployment.id, deployment.current_wave):
            return
        finished = deployment.current_wave
        deployment.current_wave += 1
        session.add(deployment)
        if finished == 0 and policy.pause_after_canary:
            deployment.state = RolloutState.PAUSED
            deployment.state_reason = "the canary finished; promote or resume to go on"
            record(session, deployment.id, ENGINE_ACTOR, "paused", deployment.state_reason, now)
            return
        record(
            session,
            deployment.id,
            ENGINE_ACTOR,
            "wave",
            f"{wave_name(finished, policy)} finished; {wave_name(deployment.current_wave, policy)}"
            " started",
            now,
        )


def wave_name(index: int, policy: RolloutPolicy) -> str:
    if policy.has_canary:
        return "canary" if index == 0 else f"wave {index}"
    return f"wave {index + 1}"


def release_pending(
    session: Session, deployment: Deployment, policy: RolloutPolicy, now: datetime
) -> list[str]:
    """Release the pending devices of the waves reached so far, within the download cap."""
    query = (
        select(DeploymentDevice)
        .where(
            DeploymentDevice.deployment_id == deployment.id,
            DeploymentDevice.state == DeviceState.PENDING,
            DeploymentDevice.wave <= deployment.current_wave,
        )
        .order_by(col(DeploymentDevice.wave), col(DeploymentDevice.id))
    )
    if policy.max_concurrent is not None:
        fetching = session.exec(
            select(func.count()).where(
                DeploymentDevice.deployment_id == deployment.id,
                DeploymentDevice.state == DeviceState.IN_PROGRESS,
                col(DeploymentDevice.step).in_(_FETCHING),
            )
        ).one()
        room = policy.max_concurrent - fetching
        if room <= 0:
            return []
        query = query.limit(room)
    rows = session.exec(query).all()
    if not rows:
        return []
    return release(session=session, deployment=deployment, rows=rows, now=now)


def complete_if_done(session: Session, deployment: Deployment, now: datetime) -> bool:
    """Mark a running rollout completed once its last wave is released and settled.

    Called by the engine's tick and by the handlers when a device finishes, so the rollout says
    "completed" in the same commit as its last device's report. The state changes only from
    running (a conditional UPDATE), so two callers never complete it twice.
    """
    if (
        deployment.continuous
        or deployment.state != RolloutState.RUNNING
        or deployment.current_wave < deployment.waves - 1
    ):
        return False
    session.flush()
    counts = state_counts(session, deployment.id)
    if any(counts[s] for s in (*_MOVING, DeviceState.ROLLING_BACK)):
        return False
    reason = summary(counts)
    taken = session.execute(
        update(Deployment)
        .where(col(Deployment.id) == deployment.id, col(Deployment.state) == RolloutState.RUNNING)
        .values(state=RolloutState.COMPLETED, state_reason=reason, finished_at=now)
    )
    if not taken.rowcount:  # type: ignore[attr-defined]
        return False
    # Keep the loaded object in step, so a later flush does not write the old state back.
    deployment.state = RolloutState.COMPLETED
    deployment.state_reason = reason
    deployment.finished_at = now
    record(session, deployment.id, ENGINE_ACTOR, "completed", reason, now)
    return True


def summary(counts: Counter[str]) -> str:
    parts = [f"{counts[s]} {s.replace('_', ' ')}" for s in DeviceState if counts[s]]
    return ", ".join(parts) or "no devices"


def abort(
    *,
    session: Session,
    deployment: Deployment,
    actor: str,
    why: str,
    rollback: bool,
    now: datetime,
) -> list[str]:
    """Stop the rollout: pending devices are cancelled, devices still installing are sent back,
    and with ``rollback`` so are the devices it already updated. Returns devices to publish."""
    deployment.state = RolloutState.ABORTED
    deployment.state_reason = why
    deployment.finished_at = now
    session.add(deployment)
    record(
        session, deployment.id, actor, "aborted", why + ("; rolling back" if rollback else ""), now
    )
    undo = [DeviceState.IN_PROGRESS]
    if rollback:
        undo += [DeviceState.SOAKING, DeviceState.SUCCEEDED, DeviceState.TIMED_OUT]
    return _send_back(session, deployment, undo, why, now)


def rollback(
    *, session: Session, deployment: Deployment, actor: str, why: str, now: datetime
) -> list[str]:
    """Send every device the deployment updated (or is updating) back to what it ran before."""
    deployment.state = RolloutState.ROLLED_BACK
    deployment.state_reason = why
    deployment.finished_at = now
    session.add(deployment)
    record(session, deployment.id, actor, "rolled_back", why, now)
    undo = [
        DeviceState.IN_PROGRESS,
        DeviceState.SOAKING,
        DeviceState.SUCCEEDED,
        DeviceState.TIMED_OUT,
    ]
    return _send_back(session, deployment, undo, why, now)


def _send_back(
    session: Session, deployment: Deployment, undo: list[DeviceState], why: str, now: datetime
) -> list[str]:
    rows = session.exec(
        select(DeploymentDevice).where(
            DeploymentDevice.deployment_id == deployment.id,
            col(DeploymentDevice.state).in_([DeviceState.PENDING, *undo]),
        )
    ).all()
    published = []
    for row in rows:
        if row.state == DeviceState.PENDING:
            set_state(row, DeviceState.CANCELLED, now, f"never released: {why}")
            session.add(row)
        elif revert(session=session, deployment=deployment, row=row, now=now, why=why):
            published.append(row.device_id)
    return published


def republish_unheard(session: Session, now: datetime) -> list[str]:
    """Devices released (or sent back) that have said nothing since: their desired state is
    published again (the caller publishes, after this commits)."""
    quiet_since = now - timedelta(seconds=REPUBLISH_AFTER_S)
    rows = session.exec(
        select(DeploymentDevice)
        .where(col(DeploymentDevice.updated_at) <= quiet_since)
        .where(
            or_(
                (col(DeploymentDevice.state) == DeviceState.IN_PROGRESS)
                & (col(DeploymentDevice.step) == str(Step.QUEUED)),
                col(DeploymentDevice.state) == DeviceState.ROLLING_BACK,
            )
        )
    ).all()
    for row in rows:
        row.updated_at = now  # not again before REPUBLISH_AFTER_S
        session.add(row)
    if rows:
        session.commit()
        logger.info("publishing desired states again", extra={"devices": len(rows)})
    return list(dict.fromkeys(row.device_id for row in rows))


def expire_overdue_devices(*, session: Session, now: datetime | None = None) -> int:
    """Devices still installing, or rolling back, past their deployment's device timeout end
    timed_out (no device stays "in progress" forever: hawkBit #693, Greengrass #1203). A device
    that reports later still ends where its report puts it (see progress.on_event)."""
    now = now or utcnow()
    waiting = [DeviceState.IN_PROGRESS, DeviceState.ROLLING_BACK]
    # Per deployment, since each has its own timeout; the query filters in SQL so a tick over
    # a large rollout does not load every waiting row.
    timeouts = session.exec(
        select(Deployment.id, Deployment.device_timeout_s).where(
            col(Deployment.id).in_(
                select(DeploymentDevice.deployment_id)
                .where(col(DeploymentDevice.state).in_(waiting))
                .distinct()
            )
        )
    ).all()
    overdue: list[tuple[DeploymentDevice, Deployment]] = []
    for deployment_id, timeout_s in timeouts:
        rows = session.exec(
            select(DeploymentDevice, Deployment)
            .join(Deployment, col(Deployment.id) == col(DeploymentDevice.deployment_id))
            .where(
                DeploymentDevice.deployment_id == deployment_id,
                col(DeploymentDevice.state).in_(waiting),
                col(DeploymentDevice.state_changed_at) <= now - timedelta(seconds=timeout_s),
            )
        ).all()
        overdue += rows
    expired = 0
    for row, deployment in overdue:
        if now - row.state_changed_at < timedelta(seconds=deployment.device_timeout_s):
            continue
        doing = "rolled back" if row.state == DeviceState.ROLLING_BACK else "active or failed"
        set_state(
            row,
            DeviceState.TIMED_OUT,
            now,
            f"not {doing} {deployment.device_timeout_s} s after it was released",
        )
        session.add(row)
        expired += 1
    if expired:
        session.commit()
        logger.warning("devices timed out", extra={"devices": expired})
    return expired
