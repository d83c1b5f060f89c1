"""What every benchmark's command line has (fleet size, ramp, connect timeout, scratch space,
``--no-record``) and how every run ends (print the report, append it to RESULTS.md)."""

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.machine import Machine
from bench.results import Report, command_line, record
from bench.testbed import DEFAULT_RAMP_PER_S, MEMORY_DIR


def fleet_parser(
    module: str, description: str | None, *, devices: int, scratch_for: str
) -> argparse.ArgumentParser:
    """The parser with the shared options; the benchmark adds its own."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--devices", type=int, default=devices)
    parser.add_argument(
        "--ramp-s",
        type=float,
        default=None,
        help=f"start the agents over this long (default: devices / {DEFAULT_RAMP_PER_S:g})",
    )
    parser.add_argument("--connect-timeout-s", type=float, default=120.0)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help=f"scratch space for {scratch_for} (default: {MEMORY_DIR} if it has room)",
    )
    parser.add_argument("--no-record", action="store_true", help="print only")
    return parser


def ramp_s(args: argparse.Namespace) -> float:
    """The ramp asked for, or one that starts ``DEFAULT_RAMP_PER_S`` agents a second."""
    return float(args.ramp_s) if args.ramp_s is not None else args.devices / DEFAULT_RAMP_PER_S


def finish(
    report: Report,
    *,
    module: str,
    argv: Sequence[str],
    args: argparse.Namespace,
    machine: Machine,
    results_path: Path,
) -> Report:
    """Print the report and, unless ``--no-record``, append it to the results file."""
    print(report.text())
    if not args.no_record:
        record(report, machine=machine, command=command_line(module, argv), path=results_path)
    return report


def in_scratch(prefix: str, parent: Path | None, measure: Callable[[Path], Report]) -> Report:
    """``measure`` run in a fresh scratch folder under ``parent`` (removed afterwards, however
    it ends), with the whole run's time added to its notes."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    started = time.monotonic()
    try:
        report = measure(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.notes.append(f"the whole run took {time.monotonic() - started:.0f} s")
    return report
