"""Bulk enrolment: give every simulated device that lacks one an identity from the hub.

It goes through ``agent.enroll.enroll_many``: one request to the hub's bulk endpoint per batch,
the same identities a real device gets, and one broker reload per batch instead of one per
device. Devices whose state directory already holds an identity are skipped, so a fleet can be
stopped and started again, or grown, with the same command.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.core import utc_now
from agent.enroll import DeviceRequest, enroll_many
from agent.errors import EnrollmentError
from agent.state import StateDir
from outpost_sim.fleet import device_dirs

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (devices done, devices to enrol)
BATCH = 1_000  # devices per request: bounded request bodies, and progress to show


@dataclass(frozen=True)
class EnrollmentReport:
    enrolled: int
    skipped: int


@dataclass(frozen=True)
class DeviceToEnroll:
    state_dir: Path
    request: DeviceRequest


def is_enrolled(state_dir: Path) -> bool:
    return (state_dir / "identity.json").exists()


def enroll_missing(
    *,
    hub_url: str,
    token: str,
    base_dir: Path,
    count: int,
    device_class: str = "generic",
    on_progress: ProgressCallback | None = None,
) -> EnrollmentReport:
    """Enrol devices 1..``count`` under ``base_dir`` (``sim-00001``...) that lack an identity."""
    devices = [
        DeviceToEnroll(d, DeviceRequest(name=d.name, device_class=device_class))
        for d in device_dirs(base_dir, count)
    ]
    return enroll_devices(hub_url=hub_url, token=token, devices=devices, on_progress=on_progress)


def enroll_devices(
    *,
    hub_url: str,
    token: str,
    devices: Sequence[DeviceToEnroll],
    clock: Callable[[], datetime] = utc_now,
    on_progress: ProgressCallback | None = None,
    timeout_s: float = 120.0,
) -> EnrollmentReport:
    """Enrol the ``devices`` that have no identity yet, ``BATCH`` per request.

    Stops at the first refusal and raises ``EnrollmentError`` saying how far it got; the devices
    enrolled so far keep their identity.
    """
    missing = [d for d in devices if not is_enrolled(d.state_dir)]
    skipped = len(devices) - len(missing)
    enrolled = 0
    for start in range(0, len(missing), BATCH):
        batch = missing[start : start + BATCH]
        try:
            enroll_many(
                hub_url=hub_url,
                token=token,
                devices=[(StateDir(d.state_dir), d.request) for d in batch],
                now=clock(),
                timeout_s=timeout_s,
            )
        except EnrollmentError as exc:
            raise EnrollmentError(
                f"enrolment stopped after {enrolled} of {len(missing)} new devices"
                f" ({skipped} already were): {exc.detail}"
            ) from exc
        enrolled += len(batch)
        if on_progress is not None:
            on_progress(enrolled, len(missing))
    logger.info("enrolment done", extra={"enrolled": enrolled, "skipped": skipped})
    return EnrollmentReport(enrolled=enrolled, skipped=skipped)
