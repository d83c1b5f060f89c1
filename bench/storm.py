"""Reconnect storm (THREATS B10): a connected fleet, the broker restarted under it.

    python -m bench.storm [--devices 10000] [--signal term|kill]

Two runs, each in a fresh process against a fresh Mosquitto (the project's config), each with
every device connected and stable first:

- project: the agent's reconnect backoff with full jitter (``backoff_jitter=True``, the default);
- floor: the same agents with ``backoff_jitter=False``: paho-style doubling, every device
  waiting exactly as long as the others (the baseline B10 compares against).

The broker is taken down with SIGTERM (stopped and started again on the same port and config)
or SIGKILL (the hub's supervisor starts it again). Reported: the peak of reconnects per second,
the time until 50/95/99/100 % are back (from the moment the broker accepts again), failed
attempts, and Mosquitto's CPU over the storm.
"""

import argparse
import asyncio
import contextlib
import itertools
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.mqtt import MqttLink
from bench.isolation import run_isolated
from bench.machine import Machine, cpu_seconds, listen_overflows, raise_fd_limit
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
from bench.timing import BenchTimeout, peak_rate, per_bin, wait_until
from outpost_sim.fleet import Fleet

DEFAULT_DEVICES = 10_000
POLL_S = 0.2  # reconnect times come from each link's CONNACK time, not from this poll
CPU_SAMPLE_S = 0.25
SIGNALS = {"term": signal.SIGTERM, "kill": signal.SIGKILL}


@dataclass(frozen=True)
class StormConfig:
    devices: int
    ramp_s: float
    connect_timeout_s: float
    reconnect_timeout_s: float
    settle_s: float
    signal_name: str
    work_dir: Path


@dataclass(frozen=True)
class StormRun:
    jitter: bool
    devices: int
    reconnected: int
    outage_s: float  # from the signal until the broker accepted connections again
    peak_per_s: float  # most reconnects in one second
    peak_per_s_100ms: float  # the same in 100 ms bins, as a rate
    # From the broker accepting again until that share of the fleet had reconnected; None if
    # that share never did within the timeout.
    t50_s: float | None
    t95_s: float | None
    t99_s: float | None
    t100_s: float | None
    failed_attempts: int
    broker_cpu_s: float
    broker_peak_cpu_percent: float
    process_cpu_s: float
    per_second: list[int]  # reconnects in each second after the broker accepted again
    listen_overflows: int  # SYNs dropped at a full listen queue during the storm (machine-wide)


async def _sample_cpu(pid: int, samples: list[tuple[float, float]]) -> None:
    # A sampling timer: it runs until cancelled, so it sleeps between reads.
    while True:
        try:
            samples.append((time.monotonic(), cpu_seconds(pid)))
        except OSError:
            return  # the broker went away
        await asyncio.sleep(CPU_SAMPLE_S)


def _peak_percent(samples: list[tuple[float, float]]) -> float:
    rates = [
        (c1 - c0) / (t1 - t0) * 100 for (t0, c0), (t1, c1) in itertools.pairwise(samples) if t1 > t0
    ]
    return max(rates, default=0.0)


def _share_time(times: list[float], devices: int, fraction: float, start: float) -> float | None:
    needed = int(-(-devices * fraction // 1))  # ceil without floats drifting
    if len(times) < needed or needed == 0:
        return None
    return sorted(times)[needed - 1] - start


async def _storm(cfg: StormConfig, bed: Testbed, jitter: bool) -> StormRun:
    fleet = Fleet(
        state_dirs=bed.state_dirs,
        settings=bench_settings(backoff_jitter=jitter),
        ramp_s=cfg.ramp_s,
    )
    links = [a.link for a in fleet.agents]
    async with running(fleet):
        await wait_until(
            lambda: all(link.connected for link in links),
            timeout_s=cfg.ramp_s + cfg.connect_timeout_s,
            poll_s=0.1,
            what=f"{cfg.devices} agents connected",
        )
        # A link up for STABLE_AFTER_S starts its backoff from the first step again, as every
        # device of a fleet that has been connected for a while would (one that needed a few
        # tries to connect at first would otherwise carry its attempt count into the storm).
        last = max(link.connected_at or 0.0 for link in links)
        await wait_until(
            lambda: time.monotonic() - last >= cfg.settle_s,
            timeout_s=cfg.settle_s + 1.0,
            poll_s=0.1,
            what="links stable",
        )
        before = [link.connects for link in links]
        failures_before = sum(link.connect_failures for link in links)
        cpu_before = cpu_seconds()
        overflows_before = listen_overflows()
        restart = await asyncio.to_thread(bed.broker.restart, SIGNALS[cfg.signal_name])
        pid = bed.broker.pid
        samples: list[tuple[float, float]] = []
        sampler = asyncio.create_task(_sample_cpu(pid, samples)) if pid else None

        def back() -> list[float]:
            return [
                link.connected_at
                for link, n in zip(links, before, strict=True)
                if link.connects > n and link.connected and link.connected_at is not None
            ]

        # A fleet that does not all come back is reported as the share that did.
        with contextlib.suppress(BenchTimeout):
            await wait_until(
                lambda: len(back()) == cfg.devices,
                timeout_s=cfg.reconnect_timeout_s,
                poll_s=POLL_S,
                what="every device reconnected",
            )
        times = back()
        process_cpu = cpu_seconds() - cpu_before
        overflows = listen_overflows() - overflows_before
        broker_cpu = cpu_seconds(pid) if pid else 0.0
        if sampler is not None:
            sampler.cancel()
        failures = sum(link.connect_failures for link in links) - failures_before
    start = restart.up_at
    return StormRun(
        jitter=jitter,
        devices=cfg.devices,
        reconnected=len(times),
        outage_s=restart.outage_s,
        peak_per_s=peak_rate(times, start),
        peak_per_s_100ms=peak_rate(times, start, bin_s=0.1),
        t50_s=_share_time(times, cfg.devices, 0.50, start),
        t95_s=_share_time(times, cfg.devices, 0.95, start),
        t99_s=_share_time(times, cfg.devices, 0.99, start),
        t100_s=_share_time(times, cfg.devices, 1.0, start),
        failed_attempts=failures,
        broker_cpu_s=broker_cpu,
        broker_peak_cpu_percent=_peak_percent(samples),
        process_cpu_s=process_cpu,
        per_second=per_bin(times, start),
        listen_overflows=overflows,
    )


def run_storm(cfg: StormConfig, jitter: bool) -> StormRun:
    """One storm, in its own process, against its own broker."""
    raise_fd_limit()
    quiet_agents()
    with open_testbed(cfg.devices, work_dir=cfg.work_dir) as bed:
        bed.provision()
        return asyncio.run(_storm(cfg, bed, jitter))


def _seconds(value: float | None) -> float:
    # A share that never came back within the timeout shows as the timeout's worth of nothing.
    return float("nan") if value is None else value


def _histogram(counts: list[int]) -> str:
    return " ".join(f"{n:,}" for n in counts) or "none"


def build_report(cfg: StormConfig, jitter: StormRun, plain: StormRun) -> Report:
    return Report(
        bench="storm",
        title=f"{cfg.devices:,} devices, broker restarted with SIG{cfg.signal_name.upper()}",
        figures=[
            Figure("peak reconnects per second", "/s", jitter.peak_per_s, plain.peak_per_s, "< 1×"),
            Figure(
                "peak reconnect rate in 100 ms bins",
                "/s",
                jitter.peak_per_s_100ms,
                plain.peak_per_s_100ms,
            ),
            Figure("time to 50 % reconnected", "s", _seconds(jitter.t50_s), _seconds(plain.t50_s)),
            Figure("time to 95 % reconnected", "s", _seconds(jitter.t95_s), _seconds(plain.t95_s)),
            Figure("time to 99 % reconnected", "s", _seconds(jitter.t99_s), _seconds(plain.t99_s)),
            Figure(
                "time to 100 % reconnected", "s", _seconds(jitter.t100_s), _seconds(plain.t100_s)
            ),
            Figure("devices reconnected", "", jitter.reconnected, plain.reconnected),
            Figure("failed connect attempts", "", jitter.failed_attempts, plain.failed_attempts),
            Figure("broker outage", "s", jitter.outage_s, plain.outage_s),
            Figure(
                "connects dropped at the full listen queue",
                "",
                jitter.listen_overflows,
                plain.listen_overflows,
            ),
            Figure("Mosquitto CPU over the storm", "s", jitter.broker_cpu_s, plain.broker_cpu_s),
            Figure(
                "Mosquitto peak CPU",
                "% of a core",
                jitter.broker_peak_cpu_percent,
                plain.broker_peak_cpu_percent,
            ),
            Figure("simulator CPU over the storm", "s", jitter.process_cpu_s, plain.process_cpu_s),
        ],
        notes=[
            "project = the agent's full-jitter backoff (default); floor = the same agents with "
            "backoff_jitter=False (paho-style doubling, no jitter), the B10 baseline. Times run "
            "from the moment the restarted broker accepted connections again.",
            f"each run: the fleet started over a {cfg.ramp_s:.1f} s ramp, then held connected "
            f"for {cfg.settle_s:g} s (a link counts as stable after "
            f"{MqttLink.STABLE_AFTER_S:g} s, and then starts its backoff from the first step).",
            f"broker and device state directories under {cfg.work_dir}.",
            "reconnects in each second after the broker accepted again, with jitter: "
            + _histogram(jitter.per_second)
            + "; without: "
            + _histogram(plain.per_second)
            + ".",
        ],
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = fleet_parser(
        "bench.storm", __doc__, devices=DEFAULT_DEVICES, scratch_for="broker and devices"
    )
    parser.add_argument("--signal", choices=sorted(SIGNALS), default="term")
    parser.add_argument("--reconnect-timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--settle-s",
        type=float,
        default=MqttLink.STABLE_AFTER_S + 0.5,
        help="hold the fleet connected this long before the restart",
    )
    parser.add_argument("--quick", action="store_true", help="200 devices")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, results_path: Path = RESULTS_PATH) -> Report:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.quick:
        args.devices = 200
    cfg = StormConfig(
        devices=args.devices,
        ramp_s=ramp_s(args),
        connect_timeout_s=args.connect_timeout_s,
        reconnect_timeout_s=args.reconnect_timeout_s,
        settle_s=args.settle_s,
        signal_name=args.signal,
        work_dir=args.work_dir or scratch_parent(args.devices * DEVICE_SCRATCH_BYTES),
    )
    machine = Machine.describe(raise_fd_limit())
    budget_s = cfg.ramp_s + cfg.connect_timeout_s + cfg.reconnect_timeout_s + 300.0
    plain = run_isolated(run_storm, cfg, False, timeout_s=budget_s)
    jitter = run_isolated(run_storm, cfg, True, timeout_s=budget_s)
    return finish(
        build_report(cfg, jitter, plain),
        module="bench.storm",
        argv=argv,
        args=args,
        machine=machine,
        results_path=results_path,
    )


if __name__ == "__main__":
    main()
