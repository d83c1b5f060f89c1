"""The end-of-run report: what the fleet did, what was injected, what it cost the simulator."""

import resource
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.telemetry import percentile
from outpost_sim.fleet import Fleet

if TYPE_CHECKING:
    # The rollout module builds its report with ``percentiles`` from here.
    from outpost_sim.rollout import RolloutReport


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p95 / max, rounded to the millisecond; None for an empty sample."""
    if not values:
        return {"p50": None, "p95": None, "max": None}
    return {
        "p50": round(percentile(values, 0.50), 3),
        "p95": round(percentile(values, 0.95), 3),
        "max": round(max(values), 3),
    }


class ResourceMeter:
    """CPU and memory of this process, from a starting point."""

    def __init__(self) -> None:
        self._cpu0 = self._cpu()
        self._wall0 = time.monotonic()
        self.rss0_mb = current_rss_mb()

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def read(self, devices: int) -> dict[str, float]:
        cpu = self._cpu() - self._cpu0
        wall = max(time.monotonic() - self._wall0, 1e-9)
        rss = current_rss_mb()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "cpu_s": round(cpu, 2),
            "cpu_percent": round(100 * cpu / wall, 1),
            "rss_mb": round(rss, 1),
            "peak_rss_mb": round(peak, 1),
            "rss_per_device_kb": round(max(rss - self.rss0_mb, 0) * 1024 / max(devices, 1), 1),
        }


def current_rss_mb() -> float:
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * resource.getpagesize() / (1024 * 1024)


@dataclass
class RunReport:
    scenario: str
    seed: int
    devices: int
    elapsed_s: float
    fault_plan: str  # fingerprint of the fault schedule: equal for equal scenario and seed
    connect: dict[str, Any]
    rollouts: list["RolloutReport"]
    failures_by_reason: dict[str, int]
    rejections_by_reason: dict[str, int]
    faults: dict[str, dict[str, int]]
    messages: dict[str, int]
    simulator: dict[str, float]
    unexpected_errors: dict[str, str]
    fleet: dict[str, Any]  # the fleet's counts at the moment the run stopped
    hub_messages: dict[str, int] | None = None  # the hub's counters, when it could be asked

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fault_counts(fleet: Fleet) -> dict[str, dict[str, int]]:
    devices = fleet.devices
    plan = fleet.fault_plan
    hit = plan.counts()
    stats = [d.conditions.stats for d in devices]
    corrupted = sum(s.corrupted_chunks for s in stats)
    caught = sum(a.corrupt_chunks_received for a in fleet.agents)
    counts: dict[str, dict[str, int]] = {
        "connection_drops": {
            "devices": hit.get("connection_drops", 0),
            "scheduled": sum(len(d.faults.drops_at) for d in devices),
            "injected": sum(s.drops for s in stats),
            "reconnects": sum(max(a.link.connects - 1, 0) for a in fleet.agents),
        },
        "offline": {
            "devices": hit.get("offline", 0),
            "windows": sum(s.offline_windows for s in stats),
        },
        "slow_link": {
            "devices": hit.get("slow_link", 0),
            "delayed_messages": sum(s.delayed_messages for s in stats),
        },
        # A corrupted copy of a chunk the device already holds is ignored unread (it is a
        # duplicate); every other one must be caught by the chunk's signed hash.
        "corrupt_chunks": {
            "devices": hit.get("corrupt_chunks", 0),
            "injected": corrupted,
            "caught_by_hash_check": caught,
            "ignored_as_duplicates": corrupted - caught,
        },
        "crash": {
            "devices": hit.get("crash", 0),
            "crashes": sum(d.record.crashes for d in devices),
            "restarts": sum(d.record.restarts for d in devices),
        },
        "disk_full": {"devices": hit.get("disk_full", 0)},
        "health_fail": {"devices": hit.get("health_fail", 0)},
        "clock_skew": {"devices": hit.get("clock_skew", 0)},
        "malformed": {
            "devices": hit.get("malformed", 0),
            "sent": sum(d.record.malformed_sent for d in devices),
        },
    }
    return counts


def run_report(
    *,
    scenario: str,
    seed: int,
    fleet: Fleet,
    rollouts: list["RolloutReport"],
    meter: ResourceMeter,
    elapsed_s: float,
) -> RunReport:
    devices = fleet.devices
    connect_times = [
        first - d.record.started_at
        for d in devices
        if d.record.started_at is not None and (first := d.first_connected_at) is not None
    ]
    failures: Counter[str] = Counter()
    rejections: Counter[str] = Counter()
    for device in devices:
        failures.update(device.record.failures)
        rejections.update(device.agent.rejections)
    sent = sum(d.record.events_sent for d in devices)
    unconfirmed = sum(a.unconfirmed_events for a in fleet.agents)
    outboxes = [a.outbox_figures() for a in fleet.agents]
    lost_in_crashes = sum(d.record.events_lost_in_crashes for d in devices)
    return RunReport(
        scenario=scenario,
        seed=seed,
        devices=len(devices),
        elapsed_s=round(elapsed_s, 3),
        fault_plan=fleet.fault_plan.fingerprint(),
        connect={
            "started": len(fleet.started),
            "connected_once": len(connect_times),
            "time_to_connect_s": percentiles(connect_times),
        },
        rollouts=rollouts,
        failures_by_reason=dict(sorted(failures.items())),
        rejections_by_reason=dict(sorted(rejections.items())),
        faults=_fault_counts(fleet),
        messages={
            "events_sent": sent,
            "events_confirmed": sent - unconfirmed - lost_in_crashes,
            "events_unconfirmed": unconfirmed,
            "events_lost_in_crashes": lost_in_crashes,
            "heartbeats_sent": sum(a.heartbeats_sent for a in fleet.agents),
            "malformed_received": sum(a.malformed_received for a in fleet.agents),
            # Telemetry and data collection through the agents' outboxes to the hub's ack.
            "records_made": sum(o.made for o in outboxes),
            "records_unacked": sum(o.backlog for o in outboxes),
            "records_dropped": sum(o.dropped for o in outboxes),
        },
        simulator=meter.read(len(devices)),
        unexpected_errors=dict(fleet.crashed),
        fleet=(fleet.at_stop or fleet.summary()).as_dict(),
    )


def format_report(report: RunReport) -> str:
    """The report for a human: one block per section."""
    lines = [
        f"scenario {report.scenario} (seed {report.seed}, fault plan {report.fault_plan[:12]})",
        f"  devices {report.devices}, ran {report.elapsed_s:.1f} s",
        f"  connect: {report.connect['connected_once']}/{report.connect['started']} connected,"
        f" time to connect {format_percentiles(report.connect['time_to_connect_s'])}",
    ]
    for rollout in report.rollouts:
        lines += rollout.lines()
    if report.rejections_by_reason:
        lines.append(
            "  desired states refused: "
            + ", ".join(f"{k} {v}" for k, v in report.rejections_by_reason.items())
        )
    injected = {k: v for k, v in report.faults.items() if v.get("devices")}
    for kind, counts in injected.items():
        lines.append(f"  fault {kind}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    m = report.messages
    lines.append(
        f"  events sent {m['events_sent']}, confirmed {m['events_confirmed']},"
        f" unconfirmed {m['events_unconfirmed']}, lost in crashes {m['events_lost_in_crashes']};"
        f" heartbeats {m['heartbeats_sent']}"
    )
    if m["records_made"]:
        lines.append(
            f"  telemetry and data records made {m['records_made']},"
            f" waiting for the hub's ack {m['records_unacked']}, dropped {m['records_dropped']}"
        )
    active = report.fleet.get("active", {})
    lines.append(
        f"  at the end: connected {report.fleet.get('connected')}, serving "
        + (", ".join(f"{k} {v}" for k, v in sorted(active.items())) or "none")
    )
    if report.hub_messages is not None:
        lines.append(
            "  hub messages: " + ", ".join(f"{k} {v}" for k, v in report.hub_messages.items())
        )
    s = report.simulator
    lines.append(
        f"  simulator: cpu {s['cpu_s']} s ({s['cpu_percent']} %), rss {s['rss_mb']} MB"
        f" (peak {s['peak_rss_mb']} MB, {s['rss_per_device_kb']} KB per device)"
    )
    for device_id, why in sorted(report.unexpected_errors.items()):
        lines.append(f"  ERROR {device_id}: {why}")
    return "\n".join(lines)


def format_percentiles(values: Mapping[str, float | None]) -> str:
    if values.get("p50") is None:
        return "n/a"
    return f"p50 {values['p50']} s, p95 {values['p95']} s, max {values['max']} s"
