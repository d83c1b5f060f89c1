"""One telemetry interval's figures: this process, its device, and each model's scoring calls.

Readings come from the standard library, /proc and /sys, and are None where the platform has
none: the agent takes no dependency (psutil) for figures a small device may not even offer.
"""

import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from agent.protocol.messages import ModelStats

# Latencies kept per model and interval. Past this, a uniform sample stands for all the calls:
# a busy model costs bounded memory, and its percentiles stay unbiased.
RESERVOIR_SIZE = 4096
MAX_MODELS = 100  # what a TelemetryRecord holds
PROC_STATM = Path("/proc/self/statm")
THERMAL_ROOT = Path("/sys/class/thermal")

Health = Literal["ok", "degraded"]
ModelKey = tuple[str, int]  # name, version


class WorkerFigures(Protocol):
    """An entry script's worker as its runtime counts it (``agent.runtimes.script``): the
    state now, and totals since the runtime started."""

    @property
    def state(self) -> str: ...
    @property
    def restarts(self) -> int: ...
    @property
    def timeouts(self) -> int: ...
    @property
    def crashes(self) -> int: ...


class Reservoir:
    """A uniform sample of at most ``size`` of the values added (Vitter's algorithm R)."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self.seen = 0
        self.values: list[float] = []
        self._rng = rng

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
            return
        slot = int(self._rng.random() * self.seen)  # randrange costs ~4x as much a call
        if slot < self.size:
            self.values[slot] = value


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank); the one definition
    the agent's telemetry, the simulator's report and the benchmarks share."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


@dataclass
class _Calls:
    latencies: Reservoir
    inferences: int = 0
    errors: int = 0


class ModelCalls:
    """Each model version's scoring calls over the current interval; fed by ``/score``."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._calls: dict[ModelKey, _Calls] = {}
        # Each entry-script worker's totals at the end of the last interval.
        self._worker_totals: dict[ModelKey, tuple[int, int, int]] = {}

    def record(self, model: str, version: int, latency_ms: float, *, failed: bool) -> None:
        """One call that reached the model; ``failed`` when it raised (bad input included)."""
        calls = self._calls.get((model, version))
        if calls is None:
            calls = self._calls[(model, version)] = _Calls(Reservoir(RESERVOIR_SIZE, self._rng))
        calls.inferences += 1
        calls.errors += failed
        calls.latencies.add(latency_ms)

    def take(
        self,
        active: Iterable[ModelKey],
        workers: Mapping[ModelKey, WorkerFigures] | None = None,
    ) -> list[ModelStats]:
        """The interval's figures of every active model (zero when not called) and of every
        model called during it (one replaced mid-interval, say); starts the next interval.

        ``workers`` are the entry-script models' workers: their totals become the interval's
        restarts, timeouts and crashes."""
        calls, self._calls = self._calls, {}
        workers = workers or {}
        keys = list(dict.fromkeys([*active, *sorted(calls)]))[:MAX_MODELS]
        stats = []
        for model, version in keys:
            found = calls.get((model, version))
            fields: dict[str, Any] = {"model": model, "version": version}
            if found is None or not found.latencies.values:
                fields.update(inferences=0, errors=0)
            else:
                latencies = found.latencies.values
                p50, p95, p99 = (round(percentile(latencies, q), 3) for q in (0.50, 0.95, 0.99))
                fields.update(
                    inferences=found.inferences,
                    errors=found.errors,
                    p50_ms=p50,
                    p95_ms=p95,
                    p99_ms=p99,
                )
            worker = workers.get((model, version))
            if worker is not None:
                fields.update(self._worker_fields((model, version), worker))
            stats.append(ModelStats(**fields))
        for gone in set(self._worker_totals) - set(workers):
            del self._worker_totals[gone]
        return stats

    def _worker_fields(self, key: ModelKey, worker: WorkerFigures) -> dict[str, Any]:
        totals = (worker.restarts, worker.timeouts, worker.crashes)
        before = self._worker_totals.get(key, (0, 0, 0))
        self._worker_totals[key] = totals
        if any(now < then for now, then in zip(totals, before, strict=True)):
            before = (0, 0, 0)  # a new runtime for the same version (reinstalled): from zero
        restarts, timeouts, crashes = (now - then for now, then in zip(totals, before, strict=True))
        return {
            "worker": str(worker.state),
            "restarts": restarts,
            "timeouts": timeouts,
            "crashes": crashes,
        }


class ProcessProbe:
    """Readings of this process and its device; None where the platform gives none."""

    def __init__(self, thermal_root: Path = THERMAL_ROOT) -> None:
        self._thermal_root = thermal_root

    def cpu_seconds(self) -> float:
        """User and system CPU time of this process so far."""
        times = os.times()
        return times.user + times.system

    def rss_bytes(self) -> int | None:
        """Resident memory of this process (Linux)."""
        try:
            pages = int(PROC_STATM.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return None
        return pages * os.sysconf("SC_PAGE_SIZE")

    def temperature_c(self) -> float | None:
        """The hottest thermal zone: it is the one that throttles the device."""
        readings = []
        for zone in self._thermal_root.glob("thermal_zone*"):
            try:
                readings.append(int((zone / "temp").read_text().strip()) / 1000)
            except (OSError, ValueError):
                continue  # some zones refuse reads while their sensor sleeps
        return max(readings) if readings else None


@dataclass
class IntervalMeter:
    """Turns cumulative readings into one interval's record; ``take`` ends an interval."""

    calls: ModelCalls
    probe: ProcessProbe = field(default_factory=ProcessProbe)
    monotonic: Callable[[], float] = time.monotonic
    _started: float = 0.0
    _last_at: float = 0.0
    _last_cpu_s: float = 0.0
    _last_connects: int = 0

    def start(self) -> None:
        """The agent starts: uptime and the first interval count from now."""
        self._started = self._last_at = self.monotonic()
        self._last_cpu_s = self.probe.cpu_seconds()
        self._last_connects = 0

    def take(
        self,
        *,
        at: datetime,
        health: Health,
        connects: int,
        outbox_backlog: int,
        outbox_dropped: int,
        disk_free_bytes: int | None,
        active: Iterable[ModelKey],
        workers: Mapping[ModelKey, WorkerFigures] | None = None,
    ) -> dict[str, Any]:
        """The fields of a ``TelemetryRecord`` (all but its seq) for the interval ending now.

        ``connects`` is the link's count of successful connects since start; the first is not
        a reconnect.
        """
        now = self.monotonic()
        cpu_s = self.probe.cpu_seconds()
        interval_s = max(now - self._last_at, 0.001)  # a record's interval is never zero
        cpu_percent = max(0.0, (cpu_s - self._last_cpu_s) / interval_s * 100)
        reconnects = max(0, connects - max(self._last_connects, 1))
        self._last_at, self._last_cpu_s, self._last_connects = now, cpu_s, connects
        return {
            "at": at,
            "interval_s": max(round(interval_s, 3), 0.001),
            "health": health,
            "uptime_s": round(now - self._started, 3),
            "cpu_percent": round(cpu_percent, 2),
            "memory_bytes": self.probe.rss_bytes(),
            "disk_free_bytes": disk_free_bytes,
            "temperature_c": self.probe.temperature_c(),
            "reconnects": reconnects,
            "outbox_backlog": outbox_backlog,
            "outbox_dropped": outbox_dropped,
            "models": self.calls.take(active, workers),
        }
