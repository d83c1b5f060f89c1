"""Bulk enrolment: give every simulated device that lacks one an identity from the hub.

It goes through ``agent.enroll.enroll``, the same HTTP exchange a real device makes. The hub's
enrolment tokens carry a use count, so one token created with ``uses=N`` enrols a fleet of N.
Devices whose state directory already holds an identity are skipped, so a fleet can be stopped
and started again, or grown, with the same command.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.core import utc_now
from agent.enroll import enroll
from agent.errors import EnrollmentError
from agent.state import StateDir
from outpost_sim.fleet import device_dirs

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (devices done, devices in the fleet)


@dataclass(frozen=True)
class EnrollmentReport:
    enrolled: int
    skipped: int


def is_enrolled(state_dir: Path) -> bool:
    return (state_dir / "identity.json").exists()


def enroll_missing(
    *,
    hub_url: str,
    token: str,
    base_dir: Path,
    count: int,
    device_class: str = "generic",
    clock: Callable[[], datetime] = utc_now,
    on_progress: ProgressCallback | None = None,
    timeout_s: float = 30.0,
) -> EnrollmentReport:
    """Enrol devices 1..``count`` under ``base_dir`` that have no identity yet.

    Stops at the first refusal (an exhausted token refuses every later device too) and raises
    ``EnrollmentError`` saying how far it got; the devices enrolled so far keep their identity.
    """
    enrolled = skipped = 0
    for index, state_dir in enumerate(device_dirs(base_dir, count), start=1):
        if is_enrolled(state_dir):
            skipped += 1
        else:
            try:
                enroll(
                    hub_url=hub_url,
                    token=token,
                    state=StateDir(state_dir),
                    now=clock(),
                    device_class=device_class,
                    name=state_dir.name,
                    timeout_s=timeout_s,
                )
            except EnrollmentError as exc:
                raise EnrollmentError(
                    f"enrolment stopped at device {index} of {count}"
                    f" ({enrolled} enrolled now, {skipped} already were): {exc.detail}"
                ) from exc
            enrolled += 1
        if on_progress is not None:
            on_progress(index, count)
    logger.info("enrolment done", extra={"enrolled": enrolled, "skipped": skipped})
    return EnrollmentReport(enrolled=enrolled, skipped=skipped)
