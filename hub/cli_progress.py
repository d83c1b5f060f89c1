"""Following a rollout from the CLI: a progress bar while it runs, then its outcome, the
devices that failed and an exit code (``deploy --wait``, ``deployment wait``)."""

import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

from hub.cli_client import EXIT_FAILED, EXIT_TIMEOUT, HubClient
from hub.deployments.models import DeviceState, RolloutState

POLL_S = 0.5
# A rollout this large is polled less often: each poll makes the hub count every device row.
LARGE_ROLLOUT = 1000
LARGE_POLL_S = 2.0
BAR_WIDTH = 20
# Per-device lines printed at the end of a wait; the rest is counted (`deployment show` has all).
MAX_LISTED = 50

# Devices a rollout still moves, ones that ended, and ones it never took on.
_MOVING = (DeviceState.PENDING, DeviceState.IN_PROGRESS, DeviceState.SOAKING)
_SETTLED = (
    DeviceState.SUCCEEDED,
    DeviceState.FAILED,
    DeviceState.TIMED_OUT,
    DeviceState.ROLLED_BACK,
    DeviceState.CANCELLED,
    DeviceState.SUPERSEDED,
)
OUT_OF_PLAY = (DeviceState.SKIPPED, DeviceState.OVERRIDDEN)
FAILURES = (DeviceState.FAILED, DeviceState.TIMED_OUT)
_NOT_OK = (*FAILURES, DeviceState.ROLLED_BACK, DeviceState.ROLLING_BACK)


def count(counts: dict[str, int], *states: str) -> int:
    return sum(counts.get(s, 0) for s in states)


def label(state: str) -> str:
    return state.replace("_", " ")


def progress_line(dep: dict[str, Any]) -> str:
    """One line of a rollout's progress from its summary (``?devices=false``), e.g.
    ``[#########-----------] 120/200 succeeded  failed 3  wave 2/4  soaking 10``."""
    counts: dict[str, int] = dep["counts"]
    in_play = dep["total"] - count(counts, *OUT_OF_PLAY)
    settled = count(counts, *_SETTLED)
    filled = BAR_WIDTH if in_play == 0 else BAR_WIDTH * settled // in_play
    parts = [
        f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}]"
        f" {counts.get(DeviceState.SUCCEEDED, 0)}/{in_play} succeeded"
    ]
    for state in (
        DeviceState.FAILED,
        DeviceState.TIMED_OUT,
        DeviceState.ROLLED_BACK,
        DeviceState.CANCELLED,
        DeviceState.SUPERSEDED,
    ):
        if counts.get(state):
            parts.append(f"{label(state)} {counts[state]}")
    if len(dep["waves"]) > 1:
        parts.append(f"wave {dep['current_wave'] + 1}/{len(dep['waves'])}")
    # Devices on their way: installing (by the step they last reported), soaking, going back,
    # and those in waves not released yet.
    for step, n in sorted(dep["steps"].items()):
        parts.append(f"{step} {n}")
    for state in (DeviceState.SOAKING, DeviceState.ROLLING_BACK, DeviceState.PENDING):
        if counts.get(state):
            parts.append(f"{label(state)} {counts[state]}")
    if dep["state"] != RolloutState.RUNNING and not dep["done"]:
        reason = f": {dep['state_reason']}" if dep["state_reason"] else ""
        parts.append(f"{dep['state']}{reason}")
    return "  ".join(parts)


class ProgressDisplay:
    """Shows progress lines: on a terminal one line redrawn in place, otherwise (a log, a
    pipe) a new line only when it changed."""

    def __init__(self, *, interactive: bool) -> None:
        self.interactive = interactive
        self._last = ""

    def show(self, line: str) -> None:
        if self.interactive:
            # A line wider than the terminal wraps, and \r would then redraw only its tail.
            width = max(shutil.get_terminal_size().columns - 1, BAR_WIDTH + 2)
            line = line[:width]
            # Pad so that a shorter line erases the longer one before it.
            click.echo("\r" + line.ljust(len(self._last)), nl=False)
        elif line != self._last:
            click.echo(line)
        self._last = line

    def end(self) -> None:
        if self.interactive and self._last:
            click.echo()
        self._last = ""


def _caught_up(dep: dict[str, Any]) -> bool:
    """A continuous rollout never ends by itself; waiting on it ends once every wave is
    released and no device of its current target is still on its way."""
    return (
        dep["continuous"]
        and dep["state"] == RolloutState.RUNNING
        and all(w["released"] and w["finished"] for w in dep["waves"])
        and not count(dep["counts"], DeviceState.ROLLING_BACK)
    )


def _device_why(d: dict[str, Any]) -> str:
    return f"{d['reason'] or d['state']} {d['detail']}".rstrip()


def _print_devices(devices: Sequence[dict[str, Any]], what: str) -> None:
    for d in devices[:MAX_LISTED]:
        click.echo(f"  {d['device_id']}: {_device_why(d)}")
    if len(devices) > MAX_LISTED:
        click.echo(f"  ... and {len(devices) - MAX_LISTED} more {what}")


def _others(counts: dict[str, int]) -> str:
    """The devices that neither succeeded nor failed, e.g. "1 skipped, 2 superseded"."""
    return ", ".join(
        f"{counts[s]} {label(s)}"
        for s in DeviceState
        if counts.get(s) and s not in (DeviceState.SUCCEEDED, *FAILURES)
    )


def _report_end(dep: dict[str, Any]) -> int:
    """The outcome of a finished rollout (``dep`` with its devices); the exit code."""
    counts: dict[str, int] = dep["counts"]
    succeeded = counts.get(DeviceState.SUCCEEDED, 0)
    others = _others(counts)
    # The hub calls a continuous rollout ok only once it ended; caught up and with nothing
    # that went wrong is ok for the wait.
    following = not dep["done"] and _caught_up(dep)
    if dep["ok"] or (following and not count(counts, *_NOT_OK)):
        line = f"deployment {dep['id']}: all {succeeded} succeeded"
        if following:
            line += " so far; it goes on to devices that join its target"
        click.echo(line + (f"; {others}" if others else ""))
        return 0
    click.echo(
        f"deployment {dep['id']}: {counts.get(DeviceState.FAILED, 0)} failed,"
        f" {counts.get(DeviceState.TIMED_OUT, 0)} timed out, {succeeded} succeeded"
        + (f", {others}" if others else "")
    )
    if dep["state_reason"]:
        click.echo(f"  {dep['state']}: {dep['state_reason']}")
    devices = dep["devices"] or []
    _print_devices([d for d in devices if d["state"] in FAILURES], "failed")
    return EXIT_FAILED


def _report_timeout(dep: dict[str, Any], deployment_id: str, timeout_s: float) -> int:
    devices = dep["devices"] or []
    moving = [d["device_id"] for d in devices if d["state"] in (*_MOVING, DeviceState.ROLLING_BACK)]
    listed = ", ".join(moving[:MAX_LISTED]) + (
        f" and {len(moving) - MAX_LISTED} more" if len(moving) > MAX_LISTED else ""
    )
    reason = f": {dep['state_reason']}" if dep["state_reason"] else ""
    click.echo(
        f"timed out after {timeout_s:g}s waiting for {deployment_id} ({dep['state']}{reason});"
        f" still pending: {listed or 'none'}"
    )
    _print_devices([d for d in devices if d["state"] in FAILURES], "failed")
    return EXIT_TIMEOUT


def wait_for(api: HubClient, deployment_id: str, timeout_s: float) -> int:
    """Follow a rollout with a progress bar until it is done; 0 when it went well,
    EXIT_FAILED when not, EXIT_TIMEOUT after ``timeout_s``."""
    path = f"/api/v1/deployments/{deployment_id}"
    deadline = time.monotonic() + timeout_s
    display = ProgressDisplay(interactive=sys.stdout.isatty())
    while True:
        # The summary only: a 10,000-device rollout must not send every row each poll.
        dep = api.json("GET", path, params={"devices": "false"})
        display.show(progress_line(dep))
        if dep["done"] or _caught_up(dep):
            display.end()
            return _report_end(api.json("GET", path))
        if time.monotonic() > deadline:
            display.end()
            return _report_timeout(api.json("GET", path), deployment_id, timeout_s)
        time.sleep(LARGE_POLL_S if dep["total"] >= LARGE_ROLLOUT else POLL_S)
