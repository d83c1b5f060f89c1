"""Named, seeded faults and the schedule they expand to.

A scenario names faults (``connection_drops``, ``offline``, ...), each with the devices it hits
(a count, a percentage or ``all``, optionally within one fleet group). ``plan_faults`` turns them
into a per-device schedule using only the scenario's seed, so the same scenario and seed give the
same devices the same faults at the same offsets, run after run; ``FaultPlan.fingerprint``
lets a test or a report show that.
"""

import hashlib
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.failpoints import Failpoint
from outpost_sim.profiles import LinkProfile

# No schedule grows without bound: a rate of drops is expanded only this far.
MAX_EVENTS_PER_DEVICE = 1_000


class _Fault(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    devices: int | str = "all"  # a count, "N%" or "all"
    group: str | None = None  # only devices of this fleet group

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 0:
                raise ValueError("devices must not be negative")
            return value
        if value == "all":
            return value
        if value.endswith("%"):
            percent = float(value[:-1])
            if not 0 <= percent <= 100:
                raise ValueError(f"percentage out of range: {value}")
            return value
        raise ValueError(f"devices must be a count, 'N%' or 'all', not {value!r}")


class ConnectionDrops(_Fault):
    """The network drops the connection (no DISCONNECT, so the will fires) at random times."""

    kind: Literal["connection_drops"]
    rate_per_min: float = Field(gt=0)
    start_s: float = Field(default=0.0, ge=0)
    end_s: float | None = Field(default=None, gt=0)


class Offline(_Fault):
    """The device loses its network at ``at_s`` for ``for_s`` seconds, then comes back."""

    kind: Literal["offline"]
    at_s: float = Field(ge=0)
    for_s: float = Field(gt=0)


class SlowLink(_Fault):
    """The device's downstream link is this slow (overrides its profile)."""

    kind: Literal["slow_link"]
    kbps: float = Field(gt=0)
    latency_ms: float = Field(default=0.0, ge=0)


class CorruptChunks(_Fault):
    """Each package chunk reaches the device with a flipped byte with this probability."""

    kind: Literal["corrupt_chunks"]
    probability: float = Field(gt=0, le=1)
    limit: int | None = Field(default=None, ge=1)  # at most this many per device


class Crash(_Fault):
    """The agent crashes at a named install step, once, and is restarted after a pause."""

    kind: Literal["crash"]
    at: Failpoint
    restart_after_s: float = Field(default=1.0, ge=0)


class DiskFull(_Fault):
    """The device's disk has only ``free_mb`` free."""

    kind: Literal["disk_full"]
    free_mb: float = Field(default=0.0, ge=0)


class HealthFail(_Fault):
    """Every health check on the device fails, as a model that is wrong for its hardware;
    with ``versions``, only the checks of those model versions (a bad release, while the
    version before it keeps passing, so a rollback to it works)."""

    kind: Literal["health_fail"]
    versions: list[int] | None = Field(default=None, min_length=1)


class ClockSkew(_Fault):
    """The device's clock is off by ``offset_s`` (positive: ahead)."""

    kind: Literal["clock_skew"]
    offset_s: float


class Malformed(_Fault):
    """The device sends ``count`` malformed messages on its own topics, one every ``every_s``."""

    kind: Literal["malformed"]
    count: int = Field(default=5, ge=1, le=MAX_EVENTS_PER_DEVICE)
    start_s: float = Field(default=0.0, ge=0)
    every_s: float = Field(default=1.0, gt=0)


FaultSpec = Annotated[
    ConnectionDrops
    | Offline
    | SlowLink
    | CorruptChunks
    | Crash
    | DiskFull
    | HealthFail
    | ClockSkew
    | Malformed,
    Field(discriminator="kind"),
]

FAULT_KINDS = (
    "connection_drops",
    "offline",
    "slow_link",
    "corrupt_chunks",
    "crash",
    "disk_full",
    "health_fail",
    "clock_skew",
    "malformed",
)


@dataclass(frozen=True)
class DeviceSlot:
    """A device as the planner sees it: its position in the fleet and its group."""

    index: int
    group: str


@dataclass
class DeviceFaults:
    """Everything that will go wrong on one device; offsets are seconds after the fleet starts."""

    kinds: list[str] = field(default_factory=list)
    drops_at: list[float] = field(default_factory=list)
    offline: list[tuple[float, float]] = field(default_factory=list)  # (from, until)
    link: LinkProfile | None = None
    corrupt_probability: float = 0.0
    corrupt_limit: int | None = None
    crash_at: Failpoint | None = None
    restart_after_s: float = 1.0
    disk_free_bytes: int | None = None
    health_fail: bool = False
    health_fail_versions: list[int] | None = None  # None: every version fails
    clock_offset_s: float = 0.0
    malformed_at: list[float] = field(default_factory=list)
    seed: int = 0  # for the faults decided as messages arrive (which chunk gets corrupted)


def describe(faults: DeviceFaults) -> str:
    """One line for ``outpost-sim plan``: each fault with its times and parameters."""
    parts: list[str] = []
    if faults.drops_at:
        parts.append("drops at " + ", ".join(f"{t:.1f}" for t in faults.drops_at) + " s")
    parts += [f"offline {start:g}-{until:g} s" for start, until in faults.offline]
    if faults.link is not None:
        parts.append(f"link {faults.link.kbps:g} kbit/s +{faults.link.latency_ms:g} ms")
    if faults.corrupt_probability:
        limit = f", at most {faults.corrupt_limit}" if faults.corrupt_limit else ""
        parts.append(f"corrupt chunks p={faults.corrupt_probability:g}{limit}")
    if faults.crash_at is not None:
        parts.append(f"crash at {faults.crash_at}, restart after {faults.restart_after_s:g} s")
    if faults.disk_free_bytes is not None:
        parts.append(f"disk full ({faults.disk_free_bytes / 1024 / 1024:g} MiB free)")
    if faults.health_fail:
        versions = faults.health_fail_versions
        only = f" for v{', v'.join(str(v) for v in versions)}" if versions else ""
        parts.append(f"health check fails{only}")
    if faults.clock_offset_s:
        parts.append(f"clock {faults.clock_offset_s:+g} s")
    if faults.malformed_at:
        parts.append(
            f"{len(faults.malformed_at)} malformed messages from {faults.malformed_at[0]:g} s"
        )
    return "; ".join(parts)


@dataclass(frozen=True)
class FaultPlan:
    seed: int
    devices: dict[int, DeviceFaults]

    def for_device(self, index: int) -> DeviceFaults:
        return self.devices.get(index) or DeviceFaults(seed=_device_seed(self.seed, index))

    def devices_with(self, kind: str) -> int:
        return sum(1 for faults in self.devices.values() if kind in faults.kinds)

    def counts(self) -> dict[str, int]:
        """Devices hit per fault kind."""
        counter: Counter[str] = Counter()
        for faults in self.devices.values():
            counter.update(set(faults.kinds))
        return dict(sorted(counter.items()))

    def fingerprint(self) -> str:
        """A hash of the whole schedule: equal for equal scenarios and seeds."""
        document = {str(i): asdict(f) for i, f in sorted(self.devices.items())}
        canonical = json.dumps(document, sort_keys=True, default=str).encode()
        return hashlib.sha256(canonical).hexdigest()


def _device_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/device/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _chosen(spec: _Fault, slots: Sequence[DeviceSlot], rng: random.Random) -> list[DeviceSlot]:
    pool = [s for s in slots if spec.group is None or s.group == spec.group]
    if spec.devices == "all":
        count = len(pool)
    elif isinstance(spec.devices, int):
        count = min(spec.devices, len(pool))
    else:
        count = round(len(pool) * float(spec.devices[:-1]) / 100)
    return sorted(rng.sample(pool, count), key=lambda s: s.index)


def _poisson_times(rate_per_s: float, start: float, end: float, rng: random.Random) -> list[float]:
    times: list[float] = []
    t = start
    while len(times) < MAX_EVENTS_PER_DEVICE:
        t += rng.expovariate(rate_per_s)
        if t >= end:
            break
        times.append(round(t, 3))
    return times


def plan_faults(
    specs: Sequence[FaultSpec], slots: Sequence[DeviceSlot], *, seed: int, horizon_s: float
) -> FaultPlan:
    """Expand ``specs`` into a per-device schedule; deterministic in ``seed``.

    Each spec draws from its own random stream (seeded by the seed and the spec's position), so
    adding a fault at the end of a scenario does not move the faults before it.
    """
    devices: dict[int, DeviceFaults] = {}
    for position, spec in enumerate(specs):
        rng = random.Random(f"{seed}/fault/{position}/{spec.kind}")
        for slot in _chosen(spec, slots, rng):
            faults = devices.setdefault(
                slot.index, DeviceFaults(seed=_device_seed(seed, slot.index))
            )
            faults.kinds.append(spec.kind)
            _apply(spec, faults, rng, horizon_s)
    return FaultPlan(seed=seed, devices=devices)


def _apply(spec: FaultSpec, faults: DeviceFaults, rng: random.Random, horizon_s: float) -> None:
    if isinstance(spec, ConnectionDrops):
        end = min(spec.end_s or horizon_s, horizon_s)
        faults.drops_at = sorted(
            faults.drops_at + _poisson_times(spec.rate_per_min / 60, spec.start_s, end, rng)
        )
    elif isinstance(spec, Offline):
        faults.offline.append((spec.at_s, spec.at_s + spec.for_s))
    elif isinstance(spec, SlowLink):
        faults.link = LinkProfile(kbps=spec.kbps, latency_ms=spec.latency_ms)
    elif isinstance(spec, CorruptChunks):
        faults.corrupt_probability = spec.probability
        faults.corrupt_limit = spec.limit
    elif isinstance(spec, Crash):
        faults.crash_at = spec.at
        faults.restart_after_s = spec.restart_after_s
    elif isinstance(spec, DiskFull):
        faults.disk_free_bytes = int(spec.free_mb * 1024 * 1024)
    elif isinstance(spec, HealthFail):
        # Two specs on one device fail the union of their versions (None is every version).
        before = faults.health_fail_versions if faults.health_fail else []
        faults.health_fail = True
        if spec.versions is None or before is None:
            faults.health_fail_versions = None
        else:
            faults.health_fail_versions = sorted({*before, *spec.versions})
    elif isinstance(spec, ClockSkew):
        faults.clock_offset_s += spec.offset_s
    else:
        faults.malformed_at += [
            round(spec.start_s + i * spec.every_s, 3) for i in range(spec.count)
        ]
