"""Named crash points on the install path, so a crash at every step can be tested on purpose.

After FreeBSD's fail(9) and the ``fail`` crate: the code calls ``failpoints.hit(name)`` at each
point where a crash would leave something half done, and the point does nothing unless it was
armed. Tests and the simulator arm them deterministically instead of killing at a random time
(THREATS.md: Mender skipped its abort-during-download test as too timing-dependent).

Armed from the environment, e.g. ``OUTPOST_FAILPOINT=after_unpack:kill`` or several separated by
commas. ``kill`` sends SIGKILL to the agent's own process, as a power cut would; ``crash``
raises ``FailpointCrash``, which stops one in-process agent (the simulator's devices share one
process) without running any clean-up, and leaves its files as a kill would. ``segv`` and
``hang`` stand for a runtime's native code crashing or never returning (a SIGSEGV sent to the
process; a sleep of ``HANG_S``).
"""

import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Mapping
from enum import StrEnum

logger = logging.getLogger(__name__)

ENV_VAR = "OUTPOST_FAILPOINT"
HANG_S = 600.0  # past any time limit the tests set, and still bounded


class Failpoint(StrEnum):
    """The points, in the order an install passes them."""

    AFTER_DOWNLOAD = "after_download"  # the archive is complete on disk
    AFTER_UNPACK = "after_unpack"  # verified and unpacked into the staging directory
    AFTER_RENAME = "after_rename"  # staging renamed to its versioned directory
    AFTER_LOAD = "after_load"  # the runtime loaded the new model
    AFTER_HEALTH = "after_health"  # the health check passed, pointer not switched yet
    AFTER_SWITCH = "after_switch"  # the active pointer names the new version
    # In the trial process that loads a model before the agent does (agent.runtimes.trial).
    IN_TRIAL_LOAD = "in_trial_load"


# The points an install passes in the agent's own process, in order (the trial load's point is
# in a child process: agent.runtimes.trial).
INSTALL_PATH = tuple(point for point in Failpoint if point is not Failpoint.IN_TRIAL_LOAD)


class Action(StrEnum):
    KILL = "kill"
    CRASH = "crash"
    SEGV = "segv"
    HANG = "hang"


class FailpointCrash(Exception):
    """Raised by a ``crash`` failpoint; the agent lets it through every handler and stops."""

    def __init__(self, point: Failpoint) -> None:
        super().__init__(f"simulated crash at {point}")
        self.point = point


class FailpointError(ValueError):
    """A failpoint specification that names an unknown point or action."""


class Failpoints:
    """The armed points of one agent, each firing ``times`` times (then disarmed)."""

    def __init__(self, armed: Mapping[Failpoint, Action] | None = None, *, times: int = 1) -> None:
        self._armed = dict(armed or {})
        self._left = {point: times for point in self._armed}
        self.fired: Counter[Failpoint] = Counter()

    @classmethod
    def parse(cls, spec: str) -> "Failpoints":
        """``"after_unpack:kill,after_load:crash"``; an empty string arms nothing."""
        armed: dict[Failpoint, Action] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, action = item.partition(":")
            try:
                armed[Failpoint(name)] = Action(action or Action.KILL)
            except ValueError:
                points = ", ".join(p.value for p in Failpoint)
                raise FailpointError(
                    f"bad failpoint {item!r}: expected POINT[:{'|'.join(Action)}],"
                    f" POINT one of {points}"
                ) from None
        return cls(armed)

    @classmethod
    def from_env(cls) -> "Failpoints":
        return cls.parse(os.environ.get(ENV_VAR, ""))

    @property
    def armed(self) -> dict[Failpoint, Action]:
        return {p: a for p, a in self._armed.items() if self._left.get(p, 0) > 0}

    def hit(self, point: Failpoint) -> None:
        action = self._armed.get(point)
        if action is None or self._left[point] <= 0:
            return
        self._left[point] -= 1
        self.fired[point] += 1
        logger.warning("failpoint %s fired: %s", point, action)
        if action is Action.KILL:
            os.kill(os.getpid(), signal.SIGKILL)
        if action is Action.SEGV:
            os.kill(os.getpid(), signal.SIGSEGV)
        if action is Action.HANG:
            time.sleep(HANG_S)
        raise FailpointCrash(point)
