"""``outpost-sim``: enrol and run a fleet of simulated devices against a hub. Wiring only.

    outpost-sim run --hub http://127.0.0.1:8780 --token T --devices 200 --state-dir var/sim

enrols the devices that have no identity yet, starts them over ``--ramp-s`` seconds, shows a
live status line on stderr every 2 s, and prints a summary when stopped (Ctrl-C, SIGTERM or
``--duration-s``).
"""

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from agent.errors import AgentError
from agent.settings import AgentSettings
from outpost_sim.enrollment import enroll_missing, is_enrolled
from outpost_sim.fleet import DEFAULT_IO_THREADS, Fleet, FleetSummary, device_dirs

STATUS_INTERVAL_S = 2.0


class StatusLine:
    """One line of live status: redrawn in place on a terminal, appended otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()

    def show(self, text: str) -> None:
        if self._tty:
            self._stream.write("\r\x1b[K" + text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def done(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


def _settings(args: argparse.Namespace) -> AgentSettings:
    # Simulated devices serve no scoring endpoint: thousands of them would fight over ports.
    overrides: dict[str, Any] = {"scoring": {"enabled": False}}
    if args.device_class:
        overrides["device_class"] = args.device_class
    return AgentSettings.load(args.config, **overrides)


def _enroll(args: argparse.Namespace, status: StatusLine) -> None:
    missing = [d for d in device_dirs(args.state_dir, args.devices) if not is_enrolled(d)]
    if not missing:
        return
    if not args.hub or not args.token:
        raise AgentError(f"{len(missing)} devices are not enrolled yet: pass --hub and --token")

    def progress(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            status.show(f"enrolling: {done}/{total}")

    report = enroll_missing(
        hub_url=args.hub,
        token=args.token,
        base_dir=args.state_dir,
        count=args.devices,
        device_class=args.device_class or "generic",
        on_progress=progress,
    )
    status.done()
    print(f"enrolled {report.enrolled} devices ({report.skipped} already were)", file=sys.stderr)


async def _run_fleet(fleet: Fleet, duration_s: float | None, status: StatusLine) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration_s is not None:
        loop.call_later(duration_s, stop.set)

    async def report() -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), STATUS_INTERVAL_S)
            except TimeoutError:
                status.show(fleet.summary().line())

    reporter = asyncio.create_task(report(), name="status")
    try:
        await fleet.run(stop)
    finally:
        stop.set()
        await reporter
        status.done()


def _cmd_run(args: argparse.Namespace) -> int:
    status = StatusLine(sys.stderr)
    _enroll(args, status)
    fleet = Fleet(
        state_dirs=device_dirs(args.state_dir, args.devices),
        settings=_settings(args),
        ramp_s=args.ramp_s,
        io_threads=args.io_threads,
    )
    started = time.monotonic()
    asyncio.run(_run_fleet(fleet, args.duration_s, status))
    # What the fleet looked like while running; after shutdown nobody is connected.
    summary: FleetSummary = fleet.at_stop or fleet.summary()
    if args.json:
        out = summary.as_dict()
        out["elapsed_s"] = round(time.monotonic() - started, 3)
        out["crashed_devices"] = fleet.crashed
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(summary.line())
        for device_id, why in sorted(fleet.crashed.items()):
            print(f"crashed {device_id}: {why}")
    return 1 if fleet.crashed else 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outpost-sim", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every device's steps")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="enrol what is missing, then run the fleet until stopped")
    p.add_argument("--hub", help="hub URL for enrolment, e.g. http://127.0.0.1:8780")
    p.add_argument("--token", help="enrolment token with at least as many uses as new devices")
    p.add_argument("--devices", type=_positive, required=True, help="number of devices")
    p.add_argument("--state-dir", type=Path, required=True, help="one subdirectory per device")
    p.add_argument("--ramp-s", type=_seconds, default=10.0, help="spread connects over S s")
    p.add_argument("--duration-s", type=_seconds, help="stop after S s (default: Ctrl-C)")
    p.add_argument("--device-class", help="device class to enrol and run as (default generic)")
    p.add_argument("--config", type=Path, help="agent TOML config applied to every device")
    p.add_argument(
        "--io-threads", type=_positive, default=DEFAULT_IO_THREADS, help="install threads"
    )
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except AgentError as exc:
        print(f"outpost-sim: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
