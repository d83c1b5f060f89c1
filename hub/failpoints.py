"""Named crash points in the hub, as the agent has them (``agent/failpoints.py``): a test arms
one and the hub SIGKILLs itself there, so a crash at the worst moment is tested on purpose
rather than by killing at a random time.

``OUTPOST_HUB_FAILPOINT=after_release_commit`` kills the hub after the rollout engine has
committed a wave's release and before it has published the devices' desired states;
``after_ingest_commit`` after telemetry or data-collection records are committed and before the
devices are told (their ack).
"""

import logging
import os
import signal
from enum import StrEnum

logger = logging.getLogger(__name__)

ENV_VAR = "OUTPOST_HUB_FAILPOINT"


class HubFailpoint(StrEnum):
    AFTER_RELEASE_COMMIT = "after_release_commit"
    AFTER_INGEST_COMMIT = "after_ingest_commit"


def hit(point: HubFailpoint) -> None:
    """SIGKILL this process when ``point`` is the armed one; nothing otherwise."""
    if os.environ.get(ENV_VAR) == point:
        logger.critical("failpoint %s: killing the hub", point)
        os.kill(os.getpid(), signal.SIGKILL)
