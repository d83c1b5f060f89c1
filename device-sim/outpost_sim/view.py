"""The live progress view on stderr: redrawn in place on a terminal, one line per tick otherwise."""

import time
from typing import TextIO

from outpost_sim.fleet import Fleet
from outpost_sim.report import ResourceMeter

BAR_WIDTH = 24


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = 0 if total <= 0 else min(width, round(width * done / total))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class ProgressView:
    def __init__(self, stream: TextIO, *, interval_s: float = 1.0) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self.interval_s = interval_s if self._tty else max(interval_s, 2.0)
        self._started = time.monotonic()

    def line(
        self, label: str, fleet: Fleet, meter: ResourceMeter, target: str | None = None
    ) -> str:
        """``target`` ("iris:2"): count the devices serving that version; without one, the
        version most devices serve."""
        summary = fleet.summary()
        devices = summary.devices
        if target is not None:
            active = summary.active.get(target, 0)
        else:
            active = max(summary.active.values(), default=0)
        injected = sum(d.conditions.stats.drops for d in fleet.devices)
        usage = meter.read(devices)
        return (
            f"{time.monotonic() - self._started:6.1f}s {label:<22} {bar(active, devices)}"
            f" {target or 'active'} {active}/{devices}"
            f"  failed {summary.failed}  rejected {summary.rejected}"
            f"  connected {summary.connected}/{devices}  drops {injected}"
            f"  crashes {summary.simulated_crashes}"
            f"  cpu {usage['cpu_percent']:.0f}%  rss {usage['rss_mb']:.0f} MB"
        )

    def show(
        self, label: str, fleet: Fleet, meter: ResourceMeter, target: str | None = None
    ) -> None:
        self.write(self.line(label, fleet, meter, target))

    def write(self, text: str) -> None:
        if self._tty:
            self._stream.write("\r\x1b[K" + text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def done(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()
