"""Rollout: one package to a fleet until every device runs it, against the broker's fan-out.

    python -m bench.rollout [--devices 1000] [--mib 5]

- project: a real hub (``outpost-hub serve``: SQLite, embedded Mosquitto) in a child process;
  a ~N MiB ONNX model registered through its API; the devices enrolled through its bulk
  endpoint; a ``Fleet`` of real agents in this process. Timed from ``POST /api/v1/deployments``
  until every agent serves the new version (polled every 50 ms on the fleet's loop).
- floor: against the same Mosquitto, the same device accounts as bare paho subscribers, one
  message of the package's size published once by the hub's account; timed from the publish
  until every subscriber has received and sha256-hashed it (``bench.fanout``).

Also reported: where the project's time went (from the devices' progress events in the hub's
database), the deployment request's own time, and peak memory of the simulator, hub and broker.
"""

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.state import StateDir
from agent.telemetry import percentile
from bench.bare import Account
from bench.fanout import FanoutConfig, FanoutRun, run_fanout
from bench.hub import HubProcess
from bench.isolation import run_isolated
from bench.machine import Machine, peak_rss_bytes, raise_fd_limit
from bench.model import ModelFiles, build_mlp
from bench.observer import ChunkObserver
from bench.options import finish, fleet_parser, ramp_s
from bench.results import RESULTS_PATH, Figure, Report
from bench.testbed import (
    bench_settings,
    quiet_agents,
    running,
    scratch_parent,
)
from bench.timeline import Phase, first_steps, phases
from bench.timing import BenchTimeout, wait_until
from hub.broker import DEFAULT_HUB_USERNAME
from outpost_sim.enrollment import enroll_missing
from outpost_sim.fleet import Fleet, device_dirs

MIB = 1024 * 1024
MODEL_NAME = "bench-mlp"
HUB_USERNAME = DEFAULT_HUB_USERNAME  # the embedded broker's account for the hub
POLL_S = 0.05


@dataclass(frozen=True)
class RolloutConfig:
    devices: int
    mib: float
    ramp_s: float
    connect_timeout_s: float
    rollout_timeout_s: float
    floor_rounds: int
    work_dir: Path


@dataclass(frozen=True)
class ProjectRun:
    devices: int
    active: int  # devices serving the new version when the wait ended
    failed: int  # devices with the version marked bad
    first_s: float
    median_s: float
    last_s: float  # from the request until the last device was active (or the timeout)
    request_s: float  # how long POST /api/v1/deployments itself took
    chunks: int  # distinct package chunks the hub published
    chunk_publishes: int  # how many times it published them
    last_publish_s: float  # from the request until the hub's last chunk publish
    deployment_id: str
    requested_at: datetime


def register(hub: HubProcess, model: ModelFiles) -> int:
    """Register the bench's model (a new version each time)."""
    return hub.register_model(MODEL_NAME, model)


def enroll(hub: HubProcess, base_dir: Path, devices: int) -> float:
    """Enrol the fleet through the hub's bulk endpoint; returns how long it took."""
    token = hub.call("POST", "/api/v1/enrollment-tokens", json={"uses": devices, "ttl_s": 3600})
    started = time.monotonic()
    enroll_missing(hub_url=hub.url, token=token["token"], base_dir=base_dir, count=devices)
    return time.monotonic() - started


async def run_project(
    cfg: RolloutConfig,
    hub: HubProcess,
    state_dirs: list[Path],
    version: int,
    policy: dict[str, Any] | None = None,
    settle_s: float = 0.0,
) -> ProjectRun:
    """Deploy ``version`` to the fleet (under ``policy``: all at once without one) and time it
    until every agent serves it. With ``settle_s``, the fleet then keeps running until the hub
    says the deployment is done (its last events are in), for at most that long."""
    fleet = Fleet(state_dirs=state_dirs, settings=bench_settings(), ramp_s=cfg.ramp_s)
    agents = fleet.agents
    broker = agents[0].identity.broker
    observer = ChunkObserver(
        host=broker.host,
        port=broker.port,
        account=Account("bench-chunk-observer", HUB_USERNAME, hub.broker_password),
        topic_root=agents[0].identity.topic_root,
    )
    device_ids = [a.device_id for a in agents]
    loop = asyncio.get_running_loop()
    async with running(fleet):
        # Idle: connected, and each holds the hub's (empty) desired state, the hub's answer to
        # the last message a device sends on connecting.
        await wait_until(
            lambda: all(a.connected and (a.state.root / "desired.json").exists() for a in agents),
            timeout_s=cfg.ramp_s + cfg.connect_timeout_s,
            poll_s=0.2,
            what=f"{cfg.devices} agents connected and idle",
        )
        await observer.start(cfg.connect_timeout_s)
        done_at: list[float | None] = [None] * len(agents)

        def all_active() -> bool:
            now = time.monotonic()
            for i, agent in enumerate(agents):
                if done_at[i] is None:
                    model = agent.get(MODEL_NAME)
                    if model is not None and model.version == version:
                        done_at[i] = now
            return all(t is not None for t in done_at)

        def request() -> tuple[dict[str, Any], float]:
            body = hub.call(
                "POST",
                "/api/v1/deployments",
                json={
                    "model": MODEL_NAME,
                    "version": version,
                    "devices": device_ids,
                    "policy": policy or {},
                },
            )
            return body, time.monotonic()

        # Its own thread: the fleet's executor is the agents' install pool.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-api") as api:
            requested_at = datetime.now(UTC)
            started = time.monotonic()
            pending = loop.run_in_executor(api, request)
            try:
                ended = await wait_until(
                    all_active,
                    timeout_s=cfg.rollout_timeout_s,
                    poll_s=POLL_S,
                    what=f"{cfg.devices} devices active",
                )
            except BenchTimeout:
                ended = time.monotonic()  # reported as the share that made it
            deployment, answered = await pending
            if settle_s > 0:
                await _hub_done(loop, api, hub, deployment["id"], settle_s)
        observer.stop()
        summary = fleet.summary()
    times = [t - started for t in done_at if t is not None]
    return ProjectRun(
        devices=cfg.devices,
        active=len(times),
        failed=summary.failed,
        first_s=min(times, default=float("nan")),
        median_s=percentile(times, 0.5) if times else float("nan"),
        last_s=ended - started,
        request_s=answered - started,
        chunks=observer.distinct,
        chunk_publishes=observer.total,
        last_publish_s=max(observer.times, default=started) - started,
        deployment_id=deployment["id"],
        requested_at=requested_at,
    )


async def _hub_done(
    loop: asyncio.AbstractEventLoop,
    api: ThreadPoolExecutor,
    hub: HubProcess,
    deployment_id: str,
    timeout_s: float,
) -> None:
    """Wait until the hub has every device's last report (the agents keep running meanwhile)."""
    deadline = time.monotonic() + timeout_s
    path = f"/api/v1/deployments/{deployment_id}?devices=false"
    while time.monotonic() < deadline:
        view = await loop.run_in_executor(api, hub.call, "GET", path)
        if view["done"]:
            return
        await asyncio.sleep(0.2)
    raise BenchTimeout(f"the hub did not call {deployment_id} done within {timeout_s:g} s")


def _accounts(state_dirs: list[Path]) -> list[Account]:
    accounts = []
    for state_dir in state_dirs:
        broker = StateDir(state_dir).load_identity().broker
        accounts.append(Account(broker.username, broker.username, broker.password))
    return accounts


@dataclass(frozen=True)
class Measured:
    project: ProjectRun
    floor: FanoutRun
    phases: list[Phase]
    enrol_s: float
    model_bytes: int
    peak_rss: dict[str, int]
    state_location: Path


def measure(cfg: RolloutConfig) -> Measured:
    root = Path(tempfile.mkdtemp(prefix="outpost-bench-rollout-", dir=cfg.work_dir))
    try:
        model = build_mlp(root / "model", target_bytes=int(cfg.mib * MIB))
        state_dirs = device_dirs(root / "devices", cfg.devices)
        with HubProcess(root / "hub") as hub:
            version = register(hub, model)
            enrol_s = enroll(hub, root / "devices", cfg.devices)
            project = asyncio.run(run_project(cfg, hub, state_dirs, version))
            # Read before the floor runs: its deliveries hold a copy of the message per
            # subscriber in Mosquitto (5 GB for 1,000 × 5 MiB), which is not the project's.
            mosquitto = hub.mosquitto_pid
            peak_rss = {
                "simulator (this process)": peak_rss_bytes(),
                "hub": peak_rss_bytes(hub.pid) if hub.pid else 0,
                "Mosquitto": peak_rss_bytes(mosquitto) if mosquitto else 0,
            }
            broker = StateDir(state_dirs[0]).load_identity().broker
            floor = run_isolated(
                run_fanout,
                FanoutConfig(
                    host=broker.host,
                    port=broker.port,
                    subscribers=_accounts(state_dirs),
                    publisher=Account("bench-floor-publisher", HUB_USERNAME, hub.broker_password),
                    payload_bytes=model.size_bytes,
                    timeout_s=cfg.rollout_timeout_s,
                    rounds=cfg.floor_rounds,
                ),
                timeout_s=(cfg.floor_rounds + 1) * cfg.rollout_timeout_s + cfg.connect_timeout_s,
            )
            steps = first_steps(root / "hub" / "hub.db", project.deployment_id)
        return Measured(
            project=project,
            floor=floor,
            phases=phases(steps, project.requested_at),
            enrol_s=enrol_s,
            model_bytes=model.size_bytes,
            peak_rss=peak_rss,
            state_location=cfg.work_dir,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def build_report(cfg: RolloutConfig, m: Measured) -> Report:
    p, f = m.project, m.floor
    figures = [
        Figure("time until every device is active", "s", p.last_s, f.last_s, "≤ 1.5×"),
        Figure("first device active", "s", p.first_s, f.first_s),
        Figure("median device active", "s", p.median_s, f.median_s),
        Figure("devices active / copies hashed", "", p.active, f.received, str(cfg.devices)),
        Figure("devices failed", "", p.failed),
        Figure("floor: first (cold) delivery, last subscriber done", "s", f.cold.last_s),
        Figure("deployment request (POST) answered after", "s", p.request_s),
        Figure(
            "package chunk publishes by the hub",
            "",
            p.chunk_publishes,
            None,
            f"{p.chunks} (one per chunk)",
        ),
        Figure("last chunk published at", "s", p.last_publish_s),
    ]
    for phase in m.phases:
        figures.append(Figure(f"{phase.name}: median per device", "s", phase.median_s))
        figures.append(Figure(f"{phase.name}: last device done at", "s", phase.last_end_s))
    for name, rss in m.peak_rss.items():
        figures.append(Figure(f"peak RSS during the rollout, {name}", "MiB", rss / MIB))
    return Report(
        bench="rollout",
        title=f"{cfg.devices:,} devices × {m.model_bytes / MIB:.2f} MiB",
        figures=figures,
        notes=[
            "project: real hub (SQLite, embedded Mosquitto) in a child process, real agents in "
            "one simulator process; from POST /api/v1/deployments until every agent serves the "
            "version. floor: the same Mosquitto, the same device accounts as bare paho "
            "subscribers, one message of the model's size published once, until every "
            "subscriber has sha256-hashed it; the floor is the median of "
            f"{len(f.rounds)} deliveries after a warm-up one (each: "
            + ", ".join(f"{d.last_s:.2f} s" for d in f.rounds)
            + "), since the first one pays for the broker's and the subscribers' first touch "
            "of gigabytes of fresh memory.",
            "phases come from the devices' progress events (device clock) in the hub's "
            "database; 'last device done at' counts from the deployment request.",
            f"device state directories under {m.state_location} "
            f"(enrolment of {cfg.devices:,} devices through the bulk endpoint took "
            f"{m.enrol_s:.1f} s, not part of the rollout).",
        ],
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = fleet_parser("bench.rollout", __doc__, devices=1000, scratch_for="hub and devices")
    parser.add_argument("--mib", type=float, default=5.0, help="model (and package) size")
    parser.add_argument("--rollout-timeout-s", type=float, default=600.0)
    parser.add_argument(
        "--floor-rounds", type=int, default=3, help="measured floor deliveries after a warm-up"
    )
    parser.add_argument("--quick", action="store_true", help="50 devices × 1 MiB")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, results_path: Path = RESULTS_PATH) -> Report:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.quick:
        args.devices, args.mib = 50, 1.0
    cfg = RolloutConfig(
        devices=args.devices,
        mib=args.mib,
        ramp_s=ramp_s(args),
        connect_timeout_s=args.connect_timeout_s,
        rollout_timeout_s=args.rollout_timeout_s,
        floor_rounds=args.floor_rounds,
        # Each device holds the archive and the installed copy at its peak.
        work_dir=args.work_dir or scratch_parent(int(args.devices * args.mib * MIB * 2)),
    )
    machine = Machine.describe(raise_fd_limit())
    quiet_agents()
    measured = measure(cfg)
    return finish(
        build_report(cfg, measured),
        module="bench.rollout",
        argv=argv,
        args=args,
        machine=machine,
        results_path=results_path,
    )


if __name__ == "__main__":
    main()
