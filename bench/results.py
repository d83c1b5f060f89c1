"""Figures with their floor and ratio: printed as a table and appended to ``bench/RESULTS.md``."""

import math
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.machine import Machine

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
_HEADER = (
    "# Benchmark results\n\n"
    "Appended by each benchmark in `bench/` (`make bench`); each section is one run, with the\n"
    "project and its floor measured in that same run. See `bench/README.md`.\n"
)


@dataclass(frozen=True)
class Figure:
    """One measured quantity, for the project and (when there is one) for its floor."""

    name: str
    unit: str
    project: float
    floor: float | None = None
    target: str = ""  # what the issue asks for, e.g. "≤ 1.5×"

    @property
    def ratio(self) -> float | None:
        """project / floor; None without a floor or when the floor measured zero."""
        if self.floor is None or self.floor == 0 or math.isnan(self.floor + self.project):
            return None
        return self.project / self.floor


def format_value(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "–"
    magnitude = abs(value)
    if magnitude >= 100 or value == int(value):
        text = f"{value:,.0f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def format_ratio(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


@dataclass
class Report:
    """What one benchmark run measured."""

    bench: str  # "rollout", "scale", "storm"
    title: str  # sizes, e.g. "1,000 devices × 5 MiB"
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def figure(self, name: str) -> Figure:
        for f in self.figures:
            if f.name == name:
                return f
        raise KeyError(name)

    def table(self) -> str:
        rows = [
            "| figure | project | floor | project / floor | target |",
            "|---|---:|---:|---:|---|",
        ]
        for f in self.figures:
            rows.append(
                f"| {f.name} | {format_value(f.project, f.unit)} | "
                f"{format_value(f.floor, f.unit)} | {format_ratio(f.ratio)} | {f.target} |"
            )
        return "\n".join(rows)

    def text(self) -> str:
        parts = [f"{self.bench}: {self.title}", "", self.table()]
        if self.notes:
            parts += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(parts)


def command_line(module: str, argv: Sequence[str]) -> str:
    """The command that reproduces this run, with the interpreter as the user would type it."""
    try:
        python = os.path.relpath(sys.executable)
    except ValueError:
        python = sys.executable
    return shlex.join([python, "-m", module, *argv])


def record(report: Report, *, machine: Machine, command: str, path: Path = RESULTS_PATH) -> None:
    """Append the run as a dated section of ``path`` (created with a header if missing)."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join(
        [
            "",
            f"## {now}: {report.bench}, {report.title}",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {machine.line()}",
            "",
            report.table(),
            *([""] + [f"- {n}" for n in report.notes] if report.notes else []),
            "",
        ]
    )
    if not path.exists():
        path.write_text(_HEADER, encoding="utf-8")
    with path.open("a", encoding="utf-8") as out:
        out.write(section)
