"""Waves: a staged rollout of one package to a fleet, against the same fleet all at once.

    python -m bench.waves [--devices 1000] [--mib 5] [--canary 50] [--wave-percent 25]
                          [--max-concurrent N]

Both runs use the same hub (``outpost-hub serve``: SQLite, embedded Mosquitto, in a child
process), the same fleet of real agents in this process and a package of the same size:

- floor: one deployment of v1 to every device at once (what ``bench.rollout`` measures), timed
  from ``POST /api/v1/deployments`` until every agent serves v1;
- project: a second, fresh fleet of as many devices (the first one stopped and removed, so both
  runs are first installs of as many bytes on an idle broker) gets v2 under a rollout policy (a
  canary, then waves, optionally a cap on concurrent downloads), timed the same way.

The ratio is what staging costs in time. Also reported: each wave's span (from the release of
its first device until its last device was active), the most devices installing at once, and
how many times the hub published the package's chunks (each wave's devices subscribe at their
release, so a wave that starts after the last publish needs its own).
"""

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.hub import HubProcess
from bench.machine import Machine, peak_rss_bytes, raise_fd_limit
from bench.model import build_mlp
from bench.options import finish, fleet_parser, ramp_s
from bench.results import RESULTS_PATH, Figure, Report
from bench.rollout import MIB, ProjectRun, RolloutConfig, enroll, register, run_project
from bench.testbed import quiet_agents, scratch_parent
from outpost_sim.fleet import device_dirs

# How long the fleet keeps running after every device is active, for the hub to get the last
# events and call the rollout done (its per-wave times come from there).
SETTLE_S = 60.0


@dataclass(frozen=True)
class Wave:
    name: str
    devices: int
    span_s: float  # first release of the wave until its last device was active


@dataclass(frozen=True)
class WavesMeasured:
    all_at_once: ProjectRun
    staged: ProjectRun
    waves: list[Wave]
    peak_in_progress: int  # most devices released and not yet active at one moment
    state: str  # the staged rollout's final state, as the hub says
    counts: dict[str, int]
    model_bytes: int
    peak_rss: dict[str, int]


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def wave_spans(view: dict[str, Any]) -> tuple[list[Wave], int]:
    """Each wave's span, and the most devices in progress at once, from the deployment's
    per-device release and activation times."""
    waves = []
    intervals: list[tuple[datetime, datetime]] = []
    for wave in view["waves"]:
        rows = [d for d in view["devices"] if d["wave"] == wave["index"]]
        released = [t for d in rows if (t := _time(d["released_at"])) is not None]
        active = [t for d in rows if (t := _time(d["activated_at"])) is not None]
        span = (max(active) - min(released)).total_seconds() if released and active else 0.0
        waves.append(Wave(wave["name"], wave["devices"], span))
        for d in rows:
            start, end = _time(d["released_at"]), _time(d["activated_at"])
            if start is not None and end is not None:
                intervals.append((start, end))
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = running = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    return waves, peak


def measure(cfg: RolloutConfig, policy: dict[str, Any]) -> WavesMeasured:
    root = Path(tempfile.mkdtemp(prefix="outpost-bench-waves-", dir=cfg.work_dir))
    try:
        model = build_mlp(root / "model", target_bytes=int(cfg.mib * MIB))
        with HubProcess(root / "hub") as hub:
            v1 = register(hub, model)
            v2 = register(hub, model)
            enroll(hub, root / "first", cfg.devices)
            first = device_dirs(root / "first", cfg.devices)
            all_at_once = asyncio.run(run_project(cfg, hub, first, v1))
            # A fleet whose models were wiped would fetch v1 again (its desired state still
            # names it) while v2 rolls out; a new fleet starts as the first one did.
            shutil.rmtree(root / "first")
            enroll(hub, root / "second", cfg.devices)
            state_dirs = device_dirs(root / "second", cfg.devices)
            staged = asyncio.run(
                run_project(cfg, hub, state_dirs, v2, policy=policy, settle_s=SETTLE_S)
            )
            view = hub.call("GET", f"/api/v1/deployments/{staged.deployment_id}")
            mosquitto = hub.mosquitto_pid
            peak_rss = {
                "simulator (this process)": peak_rss_bytes(),
                "hub": peak_rss_bytes(hub.pid) if hub.pid else 0,
                "Mosquitto": peak_rss_bytes(mosquitto) if mosquitto else 0,
            }
        waves, peak = wave_spans(view)
        return WavesMeasured(
            all_at_once=all_at_once,
            staged=staged,
            waves=waves,
            peak_in_progress=peak,
            state=view["state"],
            counts=view["counts"],
            model_bytes=model.size_bytes,
            peak_rss=peak_rss,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def build_report(cfg: RolloutConfig, policy: dict[str, Any], m: WavesMeasured) -> Report:
    s, a = m.staged, m.all_at_once
    figures = [
        Figure("time until every device is active", "s", s.last_s, a.last_s),
        Figure("first device active", "s", s.first_s, a.first_s),
        Figure("median device active", "s", s.median_s, a.median_s),
        Figure("devices active", "", s.active, a.active, str(cfg.devices)),
        Figure("devices failed", "", s.failed, a.failed, "0"),
        Figure("package chunk publishes by the hub", "", s.chunk_publishes, a.chunk_publishes),
        Figure("most devices released and not yet active at once", "", m.peak_in_progress),
        Figure("deployment request (POST) answered after", "s", s.request_s, a.request_s),
    ]
    for wave in m.waves:
        figures.append(Figure(f"{wave.name} ({wave.devices} devices): span", "s", wave.span_s))
    for name, rss in m.peak_rss.items():
        figures.append(Figure(f"peak RSS over both runs, {name}", "MiB", rss / MIB))
    return Report(
        bench="waves",
        title=f"{cfg.devices:,} devices × {m.model_bytes / MIB:.2f} MiB, policy {policy}",
        figures=figures,
        notes=[
            "project: a staged rollout of v2 under the policy in the title; floor: v1 all at "
            "once, in the same run, on the same hub and broker, to a fleet of as many devices. "
            "Each run is a fresh fleet's first install of a package of the same size (the first "
            "fleet is stopped and removed before the second starts). Timed from "
            "POST /api/v1/deployments until every agent serves the version.",
            f"the staged rollout ended {m.state}: {m.counts}. A wave starts when every device "
            "of the wave before has finished, so the waves add their tails up; the span of a "
            "wave is from its first release to its last device active.",
        ],
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = fleet_parser("bench.waves", __doc__, devices=1000, scratch_for="hub and devices")
    parser.add_argument("--mib", type=float, default=5.0, help="model (and package) size")
    parser.add_argument("--canary", type=int, default=50, help="devices in the canary wave")
    parser.add_argument("--wave-percent", type=float, default=25.0, help="each later wave")
    parser.add_argument("--max-concurrent", type=int, default=None, help="download cap")
    parser.add_argument("--rollout-timeout-s", type=float, default=900.0)
    parser.add_argument("--quick", action="store_true", help="50 devices × 1 MiB")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, results_path: Path = RESULTS_PATH) -> Report:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.quick:
        args.devices, args.mib, args.canary = 50, 1.0, 5
    policy: dict[str, Any] = {"canary": args.canary, "wave_percent": args.wave_percent}
    if args.max_concurrent is not None:
        policy["max_concurrent"] = args.max_concurrent
    cfg = RolloutConfig(
        devices=args.devices,
        mib=args.mib,
        ramp_s=ramp_s(args),
        connect_timeout_s=args.connect_timeout_s,
        rollout_timeout_s=args.rollout_timeout_s,
        floor_rounds=0,
        work_dir=args.work_dir or scratch_parent(int(args.devices * args.mib * MIB * 2)),
    )
    machine = Machine.describe(raise_fd_limit())
    quiet_agents()
    measured = measure(cfg, policy)
    return finish(
        build_report(cfg, policy, measured),
        module="bench.waves",
        argv=argv,
        args=args,
        machine=machine,
        results_path=results_path,
    )


if __name__ == "__main__":
    main()
