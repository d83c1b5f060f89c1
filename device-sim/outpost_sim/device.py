"""One simulated device: the real agent on simulated hardware, with its faults, across restarts.

The agent is ``agent.core.Agent`` unchanged. The device gives it a clock (with the profile's
offset and any skew), a disk (the profile's size, or a full one), a health checker (that fails
when the fault says so), a link (``SimulatedLink``) and crash points. When a crash point fires,
the agent stops as if killed; the device waits and starts a new agent on the same state
directory, as a supervisor would restart the process.
"""

import asyncio
import functools
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from agent.aio import wait_set
from agent.core import Agent, disk_free_bytes, utc_now
from agent.errors import HealthCheckError
from agent.failpoints import Action, FailpointCrash, Failpoints
from agent.install import HealthChecker, RuntimeLoader
from agent.protocol.documents import HealthCheck, Manifest
from agent.protocol.messages import EventBody, Step
from agent.protocol.topics import Channel, Topics
from agent.runtimes.base import Runtime
from agent.settings import AgentSettings
from outpost_sim.faults import DeviceFaults
from outpost_sim.link import LinkConditions, SimulatedLink
from outpost_sim.profiles import DeviceProfile
from outpost_sim.runtimes import SharedRuntimes

logger = logging.getLogger(__name__)

# What a misbehaving device sends, in turn: not JSON, JSON of no known kind, a body the channel
# does not carry, and a truncated envelope.
MALFORMED_PAYLOADS: tuple[tuple[Channel, bytes], ...] = (
    (Channel.EVT, b"\x00\xffnot json at all"),
    (Channel.STATE, b'{"v": 1, "kind": "no-such-kind", "body": {}}'),
    (Channel.REQ, b'{"v": 1, "id": "x", "sent_at": "2026-01-01T00:00:00Z", "body": {"kind": "ack"'),
    (Channel.STATUS, b"[1, 2, 3]"),
)


CONNECTED_POLL_S = 0.1


@dataclass
class DeploymentTrace:
    """What one device said about one deployment, from its own events (``time.monotonic()``).

    A rollback is reported under the deployment it undoes, with the previous package's digest,
    so installs and switches back are told apart by digest.
    """

    first_event_at: float
    events: int = 0
    actives: list[tuple[str, float]] = field(default_factory=list)  # (digest, when), in order
    failed: str | None = None  # the reason of its last FAILED event

    def installs(self, digest: str) -> int:
        """How many times the device reported ``digest`` active for this deployment."""
        return sum(1 for d, _ in self.actives if d == digest)

    def active_at(self, digest: str) -> float | None:
        """When the device first reported ``digest`` active for this deployment."""
        return next((at for d, at in self.actives if d == digest), None)


@dataclass
class DeviceRecord:
    """What happened on one device, in ``time.monotonic()`` seconds."""

    started_at: float | None = None
    first_connected_at: float | None = None
    deployments: dict[str, DeploymentTrace] = field(default_factory=dict)  # by deployment id
    failures: Counter[str] = field(default_factory=Counter)  # by reason, across deployments
    events_sent: int = 0
    events_lost_in_crashes: int = 0  # unacknowledged when the agent crashed (kept in memory)
    crashes: int = 0
    restarts: int = 0
    malformed_sent: int = 0


def used_bytes(root: Path) -> int:
    """Bytes of the files under ``root``: what the device has put on its simulated disk."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                total += (Path(directory) / name).lstat().st_size
            except FileNotFoundError:
                continue  # removed while we walked
    return total


class SimulatedDevice:
    def __init__(
        self,
        *,
        index: int,
        state_dir: Path,
        settings: AgentSettings,
        profile: DeviceProfile,
        faults: DeviceFaults,
        runtimes: SharedRuntimes,
        check_health: HealthChecker,
    ) -> None:
        self.index = index
        self.state_dir = state_dir
        self.profile = profile
        self.faults = faults
        self.record = DeviceRecord()
        self._settings = settings.model_copy(
            update={"state_dir": state_dir, "device_class": profile.device_class}
        )
        self._runtimes = runtimes
        self._real_check_health = check_health
        self._check_health = self._faulty_health_check if faults.health_fail else check_health
        # A check is handed only the runtime and the files; which version those are is known
        # where they are loaded, just before the check (one install at a time per device).
        self._load_runtime: RuntimeLoader = (
            self._load_noting_version if faults.health_fail_versions else runtimes
        )
        self._versions_loaded: dict[Path, int] = {}  # files directory -> model version
        # One random stream per device (its state is 2.5 KB; 10,000 devices notice three).
        self._rng = random.Random(faults.seed)
        self.conditions = LinkConditions(
            profile=faults.link or profile.link,
            corrupt_probability=faults.corrupt_probability,
            corrupt_limit=faults.corrupt_limit,
            rng=self._rng,
        )
        self._clock_offset = timedelta(seconds=profile.clock_offset_s + faults.clock_offset_s)
        self.agent = self._new_agent(first=True)

    @property
    def device_id(self) -> str:
        return self.agent.device_id

    # -- what the agent runs on -----------------------------------------------------------

    def _new_agent(self, *, first: bool) -> Agent:
        # The crash fault fires once: the restarted agent finds the state the crash left.
        failpoints = Failpoints(
            {self.faults.crash_at: Action.CRASH} if first and self.faults.crash_at else None
        )
        return Agent(
            settings=self._settings,
            load_runtime=self._load_runtime,
            check_health=self._check_health,
            clock=self._clock,
            rng=self._rng,
            failpoints=failpoints,
            disk_free=self._disk_free,
            link_factory=functools.partial(SimulatedLink, conditions=self.conditions),
            on_event=self._on_event,
        )

    def _clock(self) -> datetime:
        return utc_now() + self._clock_offset

    def _disk_free(self, path: Path) -> int:
        if self.faults.disk_free_bytes is not None:
            return self.faults.disk_free_bytes
        if self.profile.disk_mb is None:
            return disk_free_bytes(path)
        return max(0, int(self.profile.disk_mb * 1024 * 1024) - used_bytes(self.state_dir))

    def _load_noting_version(self, files_dir: Path, manifest: Manifest) -> Runtime:
        self._versions_loaded[files_dir] = manifest.model.version
        return self._runtimes(files_dir, manifest)

    def _faulty_health_check(self, runtime: Runtime, files_dir: Path, check: HealthCheck) -> None:
        versions = self.faults.health_fail_versions
        if versions is None or self._versions_loaded.get(files_dir) in versions:
            raise HealthCheckError("simulated fault: the health check fails on this device")
        self._real_check_health(runtime, files_dir, check)

    def _on_event(self, event: EventBody) -> None:
        now = time.monotonic()
        self.record.events_sent += 1
        trace = self.record.deployments.get(event.deployment_id)
        if trace is None:
            trace = self.record.deployments[event.deployment_id] = DeploymentTrace(now)
        trace.events += 1
        if event.step is Step.ACTIVE:
            trace.actives.append((event.digest, now))
        elif event.step is Step.FAILED:
            reason = str(event.reason or "E_INTERNAL")
            trace.failed = reason
            self.record.failures[reason] += 1

    # -- running --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, fleet_started_at: float) -> None:
        """Run the agent until ``stop``, restarting it after a simulated crash."""
        self.record.started_at = time.monotonic()
        faults = asyncio.create_task(self._inject(fleet_started_at), name=f"{self.index}-faults")
        try:
            while not stop.is_set():
                try:
                    await self.agent.run(stop)
                    return
                except FailpointCrash as crash:
                    self._crashed(crash)
                if await wait_set(stop, self.faults.restart_after_s):
                    return
                self.agent = self._new_agent(first=False)
                self.record.restarts += 1
        finally:
            faults.cancel()
            await asyncio.gather(faults, return_exceptions=True)
            self._note_first_connect()

    def _crashed(self, crash: FailpointCrash) -> None:
        logger.info("device %s crashed at %s", self.device_id, crash.point)
        self.record.crashes += 1
        self.record.events_lost_in_crashes += self.agent.unconfirmed_events
        self._note_first_connect()

    def _note_first_connect(self) -> None:
        first = self.agent.link.first_connected_at
        if first is not None and self.record.first_connected_at is None:
            self.record.first_connected_at = first

    @property
    def first_connected_at(self) -> float | None:
        return self.record.first_connected_at or self.agent.link.first_connected_at

    async def _inject(self, fleet_started_at: float) -> None:
        """Fire the scheduled link faults and malformed messages at their offsets."""
        # (offset, needs a connection, action): garbage goes out on a live connection only.
        schedule: list[tuple[float, bool, Callable[[], None]]] = []
        schedule += [(t, False, self._drop) for t in self.faults.drops_at]
        schedule += [
            (start, False, functools.partial(self.go_offline, until - start))
            for start, until in self.faults.offline
        ]
        schedule += [
            (t, True, functools.partial(self._send_malformed, n))
            for n, t in enumerate(self.faults.malformed_at)
        ]
        for offset, needs_link, action in sorted(schedule, key=lambda item: item[0]):
            # The schedule is the fault: waiting for its time is what it means.
            delay = fleet_started_at + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            while needs_link and not self.agent.connected:  # noqa: ASYNC110 - no link event
                await asyncio.sleep(CONNECTED_POLL_S)
            action()

    def _drop(self) -> None:
        link = self.agent.link
        assert isinstance(link, SimulatedLink)
        link.drop()

    def go_offline(self, for_s: float | None = None) -> None:
        """Take the device off the network now, for ``for_s`` s (None: until ``come_back``).
        Call it on the fleet's event loop."""
        link = self.agent.link
        assert isinstance(link, SimulatedLink)
        link.go_offline(for_s)

    def come_back(self) -> None:
        """Put the device back on the network now. Call it on the fleet's event loop."""
        link = self.agent.link
        assert isinstance(link, SimulatedLink)
        link.come_back()

    def _send_malformed(self, n: int) -> None:
        channel, payload = MALFORMED_PAYLOADS[n % len(MALFORMED_PAYLOADS)]
        topic = Topics(self.agent.identity.topic_root).device(self.device_id, channel)
        if self.agent.link.publish(topic, payload):
            self.record.malformed_sent += 1
