"""Where a rollout's time went, from the progress events the devices sent and the hub stored.

Each event carries the device's own send time (``sent_at``), so the phases are the device's
view: when it started downloading, finished, began installing, ran the health check, was
active. Read from the hub's database with the hub's own table model after the run.
"""

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlmodel import Session, select

from agent.protocol.messages import Step
from agent.telemetry import percentile
from hub.database import make_engine
from hub.deployments.models import DeviceEvent

# (phase name, step that starts it, step that ends it); None starts at the deployment request.
PHASES: tuple[tuple[str, Step | None, Step], ...] = (
    ("request → download starts", None, Step.DOWNLOADING),
    ("download", Step.DOWNLOADING, Step.DOWNLOADED),
    ("install (unpack, verify, load)", Step.DOWNLOADED, Step.HEALTH_CHECK),
    ("health check and switch", Step.HEALTH_CHECK, Step.ACTIVE),
)


@dataclass(frozen=True)
class Phase:
    name: str
    devices: int  # devices that went through it
    median_s: float  # per device
    max_s: float  # per device
    last_end_s: float  # when the last device finished it, from the request


def _as_utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def first_steps(database: Path, deployment_id: str) -> dict[str, dict[Step, datetime]]:
    """Per device, the first time (device clock) it reported each step of the deployment."""
    engine = make_engine(f"sqlite:///{database}")
    try:
        with Session(engine) as session:
            rows = session.exec(
                select(DeviceEvent).where(DeviceEvent.deployment_id == deployment_id)
            ).all()
            firsts: dict[str, dict[Step, datetime]] = defaultdict(dict)
            for row in rows:
                step = Step(row.step)
                at = _as_utc(row.sent_at)
                seen = firsts[row.device_id].get(step)
                if seen is None or at < seen:
                    firsts[row.device_id][step] = at
    finally:
        engine.dispose()
    return dict(firsts)


def phases(steps: dict[str, dict[Step, datetime]], requested_at: datetime) -> list[Phase]:
    """Each phase's per-device durations and when the last device finished it."""
    out: list[Phase] = []
    for name, start, end in PHASES:
        durations: list[float] = []
        ends: list[float] = []
        for device_steps in steps.values():
            finished = device_steps.get(end)
            began = requested_at if start is None else device_steps.get(start)
            if finished is None or began is None:
                continue
            durations.append((finished - began).total_seconds())
            ends.append((finished - requested_at).total_seconds())
        if durations:
            out.append(
                Phase(name, len(durations), percentile(durations, 0.5), max(durations), max(ends))
            )
    return out
