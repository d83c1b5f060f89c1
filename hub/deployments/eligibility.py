"""Which devices of a target a deployment would reach, and why it leaves the others alone.

One judgement for the dry run, for the deployment itself and for devices that join a continuous
deployment later, so the dry run never promises what the rollout then does differently.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from agent.protocol.documents import ANY_DEVICE_CLASS
from hub.deployments.models import Deployment, DeviceDesired, DeviceState, RolloutState
from hub.devices.models import Device, DeviceStatus
from hub.registry.models import ModelVersion
from hub.registry.service import device_classes_of

# Deployments that no longer hold the devices they reached: a lower priority may take them.
_LET_GO = frozenset({RolloutState.ABORTED, RolloutState.ROLLED_BACK})


@dataclass(frozen=True)
class Verdict:
    device_id: str
    skip: DeviceState | None  # SKIPPED or OVERRIDDEN; None: the deployment reaches the device
    why: str  # for a skip the reason; for a reached device anything worth knowing


@dataclass(frozen=True)
class Candidate:
    """What is being deployed, as far as eligibility goes."""

    model: str
    version: int
    digest: str | None  # None: not packaged yet (a dry run before the first deploy)
    framework: str
    device_classes: Sequence[str]
    priority: int = 0
    retry_bad: bool = False  # try again where this version was marked bad
    deployment_id: str | None = None  # the deployment itself, once it exists

    @classmethod
    def of(
        cls,
        model_version: ModelVersion,
        digest: str | None,
        *,
        priority: int,
        retry_bad: bool,
        deployment_id: str | None = None,
    ) -> "Candidate":
        return cls(
            model=model_version.name,
            version=model_version.version,
            digest=digest,
            framework=model_version.framework,
            device_classes=device_classes_of(model_version),
            priority=priority,
            retry_bad=retry_bad,
            deployment_id=deployment_id,
        )


def judge(*, session: Session, candidate: Candidate, devices: Sequence[str]) -> list[Verdict]:
    """A verdict per device, in the order given; unknown ids are skipped, named as such."""
    wanted = list(dict.fromkeys(devices))
    rows = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(wanted)))}
    owners = _owners(session, candidate.model, wanted)
    return [
        _judge_one(rows.get(device_id), device_id, candidate, owners.get(device_id))
        for device_id in wanted
    ]


def _owners(session: Session, model: str, devices: list[str]) -> dict[str, Deployment]:
    """The deployment each device's desired state follows for ``model``."""
    found = session.exec(
        select(DeviceDesired.device_id, Deployment)
        .join(Deployment, col(Deployment.id) == col(DeviceDesired.deployment_id))
        .where(DeviceDesired.model == model, col(DeviceDesired.device_id).in_(devices))
    ).all()
    return {device_id: deployment for device_id, deployment in found}


def _judge_one(
    device: Device | None, device_id: str, candidate: Candidate, owner: Deployment | None
) -> Verdict:
    if device is None:
        return Verdict(device_id, DeviceState.SKIPPED, "unknown device")
    if device.status != DeviceStatus.ACTIVE:
        # Off the broker: it could never answer, and the rollout would wait out its timeout.
        return Verdict(device_id, DeviceState.SKIPPED, f"device is {device.status}")
    classes = candidate.device_classes
    if ANY_DEVICE_CLASS not in classes and device.device_class not in classes:
        return Verdict(
            device_id,
            DeviceState.SKIPPED,
            f"incompatible: device class {device.device_class!r},"
            f" the model is for {', '.join(classes)}",
        )
    reported: dict[str, Any] = device.reported_state or {}
    # Agents list the runtimes they can load; a device that has not reported yet is given the
    # benefit of the doubt (it refuses an unusable package itself, E_INCOMPATIBLE).
    runtimes = reported.get("runtimes") or []
    if runtimes and candidate.framework not in runtimes:
        return Verdict(
            device_id,
            DeviceState.SKIPPED,
            f"incompatible: no {candidate.framework} runtime there (it has {', '.join(runtimes)})",
        )
    if (
        owner is not None
        and owner.id != candidate.deployment_id
        and owner.priority > candidate.priority
        and owner.state not in _LET_GO
    ):
        return Verdict(
            device_id,
            DeviceState.OVERRIDDEN,
            f"overridden by {owner.id} (priority {owner.priority} > {candidate.priority})",
        )
    running = [m for m in reported.get("active", []) if m.get("model") == candidate.model]
    if running and (
        running[0].get("digest") == candidate.digest
        or (candidate.digest is None and running[0].get("version") == candidate.version)
    ):
        return Verdict(device_id, DeviceState.SKIPPED, f"already runs v{candidate.version}")
    marked_bad = candidate.digest is not None and candidate.digest in reported.get("bad", [])
    if marked_bad and not candidate.retry_bad:
        return Verdict(
            device_id,
            DeviceState.SKIPPED,
            f"v{candidate.version} is marked bad there (it failed before); retry_bad tries it"
            " again",
        )
    notes = []
    if marked_bad:
        notes.append(f"v{candidate.version} failed there before; tried again (retry_bad)")
    if not device.online:
        notes.append("offline: it gets the package when it connects")
    return Verdict(device_id, None, "; ".join(notes))
