"""Scale: devices connected and heartbeating from one simulator process.

    python -m bench.scale [--devices 10000] [--duration-s 60] [--heartbeat-s 10]

Each side runs in a fresh process against a fresh Mosquitto (the project's config):

- project: ``outpost_sim.fleet.Fleet`` of real agents (identities written directly, no hub), so
  every device runs its MQTT link, heartbeat, resend and reconcile tasks;
- floor: bare paho clients on one event loop (``bench.bare``) publishing a heartbeat of the same
  size, topic, QoS and retain flag on the same period.

Reported: connect rate, time until all are connected, memory per device (RSS growth / devices),
CPU per heartbeat and CPU % while heartbeating, and disconnects during the window.
"""

import argparse
import asyncio
import gc
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.protocol.messages import StatusBody, encode
from agent.protocol.topics import Channel, Topics
from bench.bare import BareClients
from bench.isolation import run_isolated
from bench.machine import Machine, cpu_seconds, listen_overflows, raise_fd_limit, rss_bytes
from bench.options import finish, fleet_parser, ramp_s
from bench.results import RESULTS_PATH, Figure, Report
from bench.testbed import (
    DEVICE_SCRATCH_BYTES,
    Testbed,
    bench_settings,
    open_testbed,
    quiet_agents,
    running,
    scratch_parent,
)
from bench.timing import span_rate, wait_until
from outpost_sim.fleet import Fleet

DEFAULT_DEVICES = 10_000
FLOOR_IN_FLIGHT = 100
POLL_S = 0.1
SAMPLE_S = 1.0


@dataclass(frozen=True)
class ScaleConfig:
    devices: int
    duration_s: float
    heartbeat_s: float
    ramp_s: float
    connect_timeout_s: float
    work_dir: Path


@dataclass(frozen=True)
class ScaleRun:
    """One side's figures."""

    devices: int
    connected: int
    connect_rate_per_s: float  # CONNACKs per second, first to last
    connect_s: float  # from the first connect started until all were connected
    rss_delta_bytes: int
    heartbeats: int
    cpu_s: float  # this process's CPU over the heartbeat window
    window_s: float
    broker_cpu_s: float
    min_connected: int  # lowest count seen during the window
    disconnects: int
    listen_overflows: int  # connects dropped at a full listen queue while connecting

    @property
    def kb_per_device(self) -> float:
        return self.rss_delta_bytes / 1024 / self.devices

    @property
    def us_per_heartbeat(self) -> float:
        return self.cpu_s / self.heartbeats * 1e6 if self.heartbeats else 0.0

    @property
    def cpu_percent(self) -> float:
        return self.cpu_s / self.window_s * 100 if self.window_s else 0.0


def _heartbeat_payload() -> bytes:
    """An agent heartbeat as it goes on the wire, so the floor sends the same bytes' worth."""
    return encode(StatusBody(online=True, uptime_s=12345.6))


async def _window(
    duration_s: float, connected: Callable[[], int], broker_pid: int | None
) -> tuple[float, float, float, int]:
    """Sample the connected count each second for ``duration_s``: (wall, cpu, broker cpu, min)."""
    cpu0, wall0 = cpu_seconds(), time.monotonic()
    broker0 = cpu_seconds(broker_pid) if broker_pid else 0.0
    lowest = connected()
    end = wall0 + duration_s
    while (now := time.monotonic()) < end:
        # A measurement window, not a wait for a condition: it lasts ``duration_s``.
        await asyncio.sleep(min(SAMPLE_S, end - now))
        lowest = min(lowest, connected())
    wall = time.monotonic() - wall0
    cpu = cpu_seconds() - cpu0
    broker = (cpu_seconds(broker_pid) - broker0) if broker_pid else 0.0
    return wall, cpu, broker, lowest


# -- the project: real agents ------------------------------------------------------------------


async def _agents(cfg: ScaleConfig, bed: Testbed) -> ScaleRun:
    gc.collect()
    rss0 = rss_bytes()
    fleet = Fleet(
        state_dirs=bed.state_dirs,
        settings=bench_settings(heartbeat_s=cfg.heartbeat_s),
        ramp_s=cfg.ramp_s,
    )
    links = [a.link for a in fleet.agents]

    def connected() -> int:
        return sum(1 for link in links if link.connected)

    overflows_before = listen_overflows()
    async with running(fleet):
        started = time.monotonic()
        all_in = await wait_until(
            lambda: connected() == cfg.devices,
            timeout_s=cfg.ramp_s + cfg.connect_timeout_s,
            poll_s=POLL_S,
            what=f"{cfg.devices} agents connected",
        )
        overflows = listen_overflows() - overflows_before
        gc.collect()
        rss1 = rss_bytes()
        times = [link.connected_at for link in links if link.connected_at is not None]
        beats0 = sum(a.heartbeats_sent for a in fleet.agents)
        drops0 = sum(link.disconnects for link in links)
        wall, cpu, broker_cpu, lowest = await _window(cfg.duration_s, connected, bed.broker.pid)
        beats = sum(a.heartbeats_sent for a in fleet.agents) - beats0
        drops = sum(link.disconnects for link in links) - drops0
    return ScaleRun(
        devices=cfg.devices,
        connected=len(times),
        connect_rate_per_s=span_rate(times),
        connect_s=all_in - started,
        rss_delta_bytes=rss1 - rss0,
        heartbeats=beats,
        cpu_s=cpu,
        window_s=wall,
        broker_cpu_s=broker_cpu,
        min_connected=lowest,
        disconnects=drops,
        listen_overflows=overflows,
    )


def run_agents(cfg: ScaleConfig) -> ScaleRun:
    """The project side, in its own process."""
    raise_fd_limit()
    quiet_agents()
    with open_testbed(cfg.devices, work_dir=cfg.work_dir) as bed:
        bed.provision()
        return asyncio.run(_agents(cfg, bed))


# -- the floor: bare paho clients --------------------------------------------------------------


async def _bare(cfg: ScaleConfig, bed: Testbed) -> ScaleRun:
    gc.collect()
    rss0 = rss_bytes()
    clients = BareClients(host=bed.broker.host, port=bed.broker.port, accounts=bed.accounts())
    started = time.monotonic()
    overflows_before = listen_overflows()
    try:
        await clients.connect_all(in_flight=FLOOR_IN_FLIGHT, timeout_s=cfg.connect_timeout_s)
        all_in = time.monotonic()
        overflows = listen_overflows() - overflows_before
        gc.collect()
        rss1 = rss_bytes()
        topics = Topics("outpost")
        ids = bed.device_ids
        clients.start_heartbeats(
            topic_of=lambda i: topics.device(ids[i], Channel.STATUS),
            payload=_heartbeat_payload(),
            period_s=cfg.heartbeat_s,
            rng=random.Random(1),
        )
        wall, cpu, broker_cpu, lowest = await _window(
            cfg.duration_s, lambda: clients.connected, bed.broker.pid
        )
        beats = clients.heartbeats_sent
    finally:
        clients.abort_all()
    times = [t for t in clients.connected_at if t is not None]
    return ScaleRun(
        devices=cfg.devices,
        connected=len(times),
        connect_rate_per_s=span_rate(times),
        connect_s=all_in - started,
        rss_delta_bytes=rss1 - rss0,
        heartbeats=beats,
        cpu_s=cpu,
        window_s=wall,
        broker_cpu_s=broker_cpu,
        min_connected=lowest,
        disconnects=0,
        listen_overflows=overflows,
    )


def run_floor(cfg: ScaleConfig) -> ScaleRun:
    """The floor side, in its own process."""
    raise_fd_limit()
    with open_testbed(cfg.devices, work_dir=cfg.work_dir) as bed:
        return asyncio.run(_bare(cfg, bed))


# -- the report --------------------------------------------------------------------------------


def build_report(cfg: ScaleConfig, project: ScaleRun, floor: ScaleRun) -> Report:
    return Report(
        bench="scale",
        title=(
            f"{cfg.devices:,} devices, a heartbeat every {cfg.heartbeat_s:g} s, "
            f"{cfg.duration_s:g} s window"
        ),
        figures=[
            Figure("devices connected", "", project.connected, floor.connected, "10,000 (issue)"),
            Figure(
                "connect rate", "connects/s", project.connect_rate_per_s, floor.connect_rate_per_s
            ),
            Figure("time until all connected", "s", project.connect_s, floor.connect_s),
            Figure(
                "connects dropped at the full listen queue",
                "",
                project.listen_overflows,
                floor.listen_overflows,
            ),
            Figure("memory per device", "KB", project.kb_per_device, floor.kb_per_device),
            Figure("CPU per heartbeat", "µs", project.us_per_heartbeat, floor.us_per_heartbeat),
            Figure("CPU while heartbeating", "% of a core", project.cpu_percent, floor.cpu_percent),
            Figure("heartbeats in the window", "", project.heartbeats, floor.heartbeats),
            Figure("Mosquitto CPU in the window", "s", project.broker_cpu_s, floor.broker_cpu_s),
            Figure("disconnects in the window", "", project.disconnects, floor.disconnects),
        ],
        notes=[
            f"project: the agents are started over a {cfg.ramp_s:.1f} s ramp "
            f"({cfg.devices / cfg.ramp_s if cfg.ramp_s else float('inf'):,.0f} starts/s); the "
            f"floor keeps {FLOOR_IN_FLIGHT} connects in flight. The connect rate is CONNACKs per "
            "second from the first to the last.",
            "CPU per heartbeat is the whole process's CPU over the window divided by the "
            "heartbeats sent in it, so it includes keep-alive, the agents' other timers and "
            "the event loop's own overhead.",
            f"lowest connected count seen during the window: project {project.min_connected:,}, "
            f"floor {floor.min_connected:,}.",
            f"broker and device state directories under {cfg.work_dir}.",
        ],
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = fleet_parser(
        "bench.scale", __doc__, devices=DEFAULT_DEVICES, scratch_for="broker and devices"
    )
    parser.add_argument("--duration-s", type=float, default=60.0, help="heartbeat window")
    parser.add_argument("--heartbeat-s", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="200 devices, 15 s window")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, results_path: Path = RESULTS_PATH) -> Report:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.quick:
        args.devices, args.duration_s = 200, 15.0
    cfg = ScaleConfig(
        devices=args.devices,
        duration_s=args.duration_s,
        heartbeat_s=args.heartbeat_s,
        ramp_s=ramp_s(args),
        connect_timeout_s=args.connect_timeout_s,
        work_dir=args.work_dir or scratch_parent(args.devices * DEVICE_SCRATCH_BYTES),
    )
    fd_limit = raise_fd_limit()
    machine = Machine.describe(fd_limit)
    budget_s = cfg.ramp_s + cfg.connect_timeout_s + cfg.duration_s + 300.0
    floor = run_isolated(run_floor, cfg, timeout_s=budget_s)
    project = run_isolated(run_agents, cfg, timeout_s=budget_s)
    return finish(
        build_report(cfg, project, floor),
        module="bench.scale",
        argv=argv,
        args=args,
        machine=machine,
        results_path=results_path,
    )


if __name__ == "__main__":
    main()
