"""A scratch directory with a bench Mosquitto and N device identities, and a Fleet running on
the caller's loop: what the scale and storm benchmarks stand on."""

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.settings import AgentSettings
from bench.bare import Account
from bench.broker import BenchBroker
from bench.devices import device_id_of, planned_dirs, provision
from outpost_sim.fleet import Fleet

FLEET_STOP_S = 120.0
# Agents started per second by default. The agent's connect path (tasks, CONNACK handling,
# subscribe, a state publish with an fsync'd progress file) tops out at ~1,500-1,700 a second
# in one process here; starting them faster only piles connects up behind Mosquitto's listen
# backlog of 100, where a dropped SYN stalls a blocking connect, and the whole loop, for 1 s.
DEFAULT_RAMP_PER_S = 1500.0
DEVICE_SCRATCH_BYTES = 64 * 1024  # an idle device's state directory, generously
# Simulated devices' disks live in memory by default: a real fleet's devices do not share one
# disk, and thousands of them fsyncing on one would time the host's disk, not the project.
MEMORY_DIR = Path("/dev/shm")


def scratch_parent(needed_bytes: int) -> Path:
    """/dev/shm when it has room for ``needed_bytes`` with margin, else the temp dir."""
    if MEMORY_DIR.is_dir() and shutil.disk_usage(MEMORY_DIR).free > 2 * needed_bytes:
        return MEMORY_DIR
    return Path(tempfile.gettempdir())


@dataclass(frozen=True)
class Testbed:
    root: Path
    state_dirs: list[Path]
    broker: BenchBroker

    @property
    def device_ids(self) -> list[str]:
        return [device_id_of(d) for d in self.state_dirs]

    def provision(self) -> None:
        """Write the device identities (only the agents need them; bare clients do not)."""
        provision(
            self.state_dirs,
            host=self.broker.host,
            port=self.broker.port,
            password=self.broker.device_password,
        )

    def accounts(self) -> list[Account]:
        password = self.broker.device_password
        return [Account(d, d, password) for d in self.device_ids]


@contextmanager
def open_testbed(devices: int, *, work_dir: Path | None = None) -> Iterator[Testbed]:
    """A fresh broker with accounts for ``devices`` devices; everything removed afterwards.

    ``work_dir`` holds the scratch directory (default: ``scratch_parent``).
    """
    parent = work_dir if work_dir is not None else scratch_parent(devices * DEVICE_SCRATCH_BYTES)
    root = Path(tempfile.mkdtemp(prefix="outpost-bench-", dir=parent))
    try:
        dirs = planned_dirs(root / "devices", devices)
        broker = BenchBroker(root / "broker", [device_id_of(d) for d in dirs])
        broker.start()
        try:
            yield Testbed(root, dirs, broker)
        finally:
            broker.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def quiet_agents() -> None:
    """Thousands of devices logging each refused connect would cost more than they measure."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("agent", "outpost_sim", "hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def bench_settings(**mqtt: Any) -> AgentSettings:
    """Agent settings for bench devices: no scoring endpoint (thousands would fight over ports)
    and no telemetry (each device's outbox holds three files open: 10,000 devices in one
    process would pass the file limit), MQTT as given; everything else the agent's defaults."""
    return AgentSettings(scoring={"enabled": False}, telemetry={"enabled": False}, mqtt=mqtt)


@asynccontextmanager
async def running(fleet: Fleet, *, stop_timeout_s: float = FLEET_STOP_S) -> AsyncIterator[Fleet]:
    """The fleet running on this loop for the body of the ``async with``, then stopped."""
    stop = asyncio.Event()
    task = asyncio.create_task(fleet.run(stop), name="bench-fleet")
    try:
        yield fleet
    finally:
        stop.set()
        async with asyncio.timeout(stop_timeout_s):
            await task
