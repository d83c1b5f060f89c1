"""A fleet of real agents on one event loop, started with a ramp-up so the broker isn't flooded.

Every device is an ``agent.core.Agent`` with its own state directory, wrapped in a
``SimulatedDevice`` that gives it a profile and its faults. The agents own no threads, so N
devices cost N sets of tasks and sockets on the running loop, not N threads. The only threads
are the loop's default executor, which the agents use for installs (bounded by ``io_threads``).
"""

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.aio import wait_set
from agent.core import Agent
from agent.install import HealthChecker
from agent.runtimes.health import check_health
from agent.settings import AgentSettings
from outpost_sim.device import SimulatedDevice
from outpost_sim.faults import FaultPlan
from outpost_sim.profiles import DeviceProfile
from outpost_sim.runtimes import SharedRuntimes

logger = logging.getLogger(__name__)

DEFAULT_IO_THREADS = 4


def device_dir(base_dir: Path, index: int) -> Path:
    """The state directory of the ``index``-th simulated device (1-based)."""
    return base_dir / f"sim-{index:05d}"


def device_dirs(base_dir: Path, count: int) -> list[Path]:
    return [device_dir(base_dir, i) for i in range(1, count + 1)]


def ramp_delays(count: int, ramp_s: float, rng: random.Random) -> list[float]:
    """Start times spread over ``ramp_s``: one jittered slot per device.

    Stratified rather than purely random, so no second of the ramp gets a burst of connects
    bigger than the broker's listen backlog, yet devices don't tick like a metronome either.
    """
    if count <= 0:
        return []
    slot_s = max(ramp_s, 0.0) / count
    return [(i + rng.random()) * slot_s for i in range(count)]


@dataclass(frozen=True)
class FleetSummary:
    """What the fleet looks like now, counted over its devices."""

    devices: int
    started: int
    connected: int
    active: dict[str, int] = field(default_factory=dict)  # "model:version" -> devices
    failed: int = 0  # devices with a version marked bad
    rejected: int = 0  # devices whose last desired state was refused
    crashed: int = 0  # devices whose agent stopped with an unexpected error (a bug)
    simulated_crashes: int = 0  # crashes injected at a failpoint, each followed by a restart
    malformed_received: int = 0
    events_dropped: int = 0
    runtimes_loaded: int = 0  # distinct models loaded, shared by every device running them

    def line(self) -> str:
        active = ", ".join(f"{k}={v}" for k, v in sorted(self.active.items())) or "none"
        return (
            f"started {self.started}/{self.devices}  connected {self.connected}"
            f"  active [{active}]  failed {self.failed}  rejected {self.rejected}"
            f"  crashed {self.crashed}  malformed {self.malformed_received}"
            f"  simulated-crashes {self.simulated_crashes}"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Fleet:
    """N simulated devices, one per state directory, run concurrently on the caller's loop."""

    def __init__(
        self,
        *,
        state_dirs: Sequence[Path],
        settings: AgentSettings,
        ramp_s: float = 10.0,
        io_threads: int = DEFAULT_IO_THREADS,
        runtimes: SharedRuntimes | None = None,
        check_health: HealthChecker = check_health,
        rng: random.Random | None = None,
        profiles: Sequence[DeviceProfile] | None = None,
        fault_plan: FaultPlan | None = None,
    ) -> None:
        """``settings`` is the template for every device; each gets its own ``state_dir``.

        ``profiles`` gives each device its profile (default: a generic device on a perfect
        link); ``fault_plan`` its faults, by position (0-based). ``runtimes`` (a cache over
        the real loader by default) is shared by every device; it counts the real loads.
        """
        if profiles is not None and len(profiles) != len(state_dirs):
            raise ValueError(f"{len(profiles)} profiles for {len(state_dirs)} devices")
        self.settings = settings
        self.ramp_s = ramp_s
        self.io_threads = io_threads
        self._rng = rng or random.Random()
        self.runtimes = runtimes or SharedRuntimes()
        self.fault_plan = fault_plan or FaultPlan(seed=0, devices={})
        self.devices: list[SimulatedDevice] = [
            SimulatedDevice(
                index=index,
                state_dir=state_dir,
                settings=settings,
                profile=profiles[index] if profiles is not None else DeviceProfile(),
                faults=self.fault_plan.for_device(index),
                runtimes=self.runtimes,
                check_health=check_health,
            )
            for index, state_dir in enumerate(state_dirs)
        ]
        self.started: set[str] = set()
        self.crashed: dict[str, str] = {}  # device id -> why (unexpected errors only)
        self.started_at: float | None = None  # time.monotonic() when ``run`` began
        self.at_stop: FleetSummary | None = None  # the summary taken when ``stop`` was set

    @property
    def agents(self) -> list[Agent]:
        """Each device's current agent (a new one after a simulated crash and restart)."""
        return [device.agent for device in self.devices]

    async def run(self, stop: asyncio.Event) -> None:
        """Run every device until ``stop`` is set, starting them over ``ramp_s`` seconds.

        Installs the bounded executor as the running loop's default one, since the agents run
        their installs with ``asyncio.to_thread``.
        """
        loop = asyncio.get_running_loop()
        loop.set_default_executor(
            ThreadPoolExecutor(max_workers=self.io_threads, thread_name_prefix="outpost-sim-io")
        )
        self.started_at = time.monotonic()
        delays = ramp_delays(len(self.devices), self.ramp_s, self._rng)
        logger.info("starting %d devices over %.1f s", len(self.devices), self.ramp_s)
        # The agents stop on their own event, set only after the fleet's state at the moment
        # of stopping was taken: once they shut down nobody is connected any more.
        devices_stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            runs = [
                group.create_task(self._run_one(d, delay, devices_stop), name=str(d.index))
                for d, delay in zip(self.devices, delays, strict=True)
            ]
            stopper = group.create_task(stop.wait(), name="fleet-stop")
            # Also ends when every device has stopped by itself (all crashed).
            waiters: list[asyncio.Future[Any]] = [stopper, asyncio.gather(*runs)]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            self.at_stop = self.summary()
            devices_stop.set()
            stopper.cancel()

    async def _run_one(self, device: SimulatedDevice, delay_s: float, stop: asyncio.Event) -> None:
        if await wait_set(stop, delay_s):
            return  # stopped during the ramp-up: never started
        self.started.add(device.device_id)
        assert self.started_at is not None
        try:
            await device.run(stop, self.started_at)
        except Exception as exc:
            # One broken device must not take the fleet down: count it and keep the rest going.
            self.crashed[device.device_id] = f"{type(exc).__name__}: {exc}"
            logger.exception("device %s stopped with an error", device.device_id)

    def summary(self) -> FleetSummary:
        """Counts over the fleet, from memory. Call it on the fleet's event loop (the agents
        live there); it is cheap enough to call every second with 10,000 devices."""
        active: Counter[str] = Counter()
        failed = rejected = 0
        for agent in self.agents:
            for name in agent.names():
                model = agent.get(name)
                if model is not None:
                    active[f"{model.name}:{model.version}"] += 1
            if agent.last_rejection:
                rejected += 1
            if agent.bad_versions:
                failed += 1
        agents = self.agents
        return FleetSummary(
            devices=len(agents),
            started=len(self.started),
            connected=sum(1 for a in agents if a.connected),
            active=dict(active),
            failed=failed,
            rejected=rejected,
            crashed=len(self.crashed),
            simulated_crashes=sum(d.record.crashes for d in self.devices),
            malformed_received=sum(a.malformed_received for a in agents),
            events_dropped=sum(a.events_dropped for a in agents),
            runtimes_loaded=self.runtimes.loads,
        )
