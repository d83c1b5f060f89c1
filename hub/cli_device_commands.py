"""``outpost-hub device logs|ping``: one-off commands to a device. The hub signs and publishes
the command; the CLI waits for the device's answer with a deadline, polling the hub.

Exit codes: 0 the device answered; 1 it refused or failed the command (the reason code and
detail are printed); 2 the hub refused the request; 3 no answer in time (the command stays
pending at the hub until it expires, and is sent again if the device comes back online).

``hub.cli`` registers these on its ``device`` group; this module imports ``hub.cli_client``,
never ``hub.cli``, so there is no import cycle.
"""

import itertools
import json
import math
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from agent.protocol.messages import MAX_LOG_ENTRIES, LogEntry, LogsResult
from hub.cli_client import EXIT_FAILED, EXIT_TIMEOUT, HubClient, client
from hub.commands.schemas import DEFAULT_TTL_S, LOG_LEVELS, MAX_TTL_S

DEFAULT_TIMEOUT_S = 30.0
# A device on a good link answers in milliseconds: poll soon, then back off.
POLL_S = (0.05, 0.1, 0.2, 0.3, 0.5)
CONTINUATION = "    "  # indents the second and later lines of a multi-line log message
_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, *, now: datetime) -> datetime:
    """An ISO-8601 time (UTC when it names no offset) or a duration back from ``now``: 30s,
    10m, 2h, 1d, 1w. ValueError otherwise."""
    text = text.strip()
    duration = _DURATION.match(text.lower())
    if duration is not None:
        return now - timedelta(seconds=int(duration[1]) * _UNIT_S[duration[2]])
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO time (2026-12-03T17:00:00Z) nor a duration back from"
            " now (30s, 10m, 2h, 1d, 1w)"
        ) from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _since_option(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_since(value, now=datetime.now(UTC))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


class Spinner:
    """``| waiting for dev-1  2s`` redrawn in place on stderr while a terminal watches; nothing
    otherwise (a script reading stdout must get the entries only)."""

    def __init__(self, what: str, *, enabled: bool) -> None:
        self.what = what
        self.enabled = enabled
        self._frames = itertools.cycle("|/-\\")
        self._started = time.monotonic()
        self._width = 0

    def tick(self) -> None:
        if not self.enabled:
            return
        line = f"{next(self._frames)} {self.what}  {time.monotonic() - self._started:.0f}s"
        click.echo("\r" + line.ljust(self._width), nl=False, err=True)
        self._width = len(line)

    def end(self) -> None:
        if self.enabled and self._width:
            click.echo("\r" + " " * self._width + "\r", nl=False, err=True)
        self._width = 0


def _ttl_for(timeout_s: float) -> int:
    """The command lives at least as long as the CLI waits for it."""
    return min(MAX_TTL_S, max(DEFAULT_TTL_S, math.ceil(timeout_s)))


def run_command(
    api: HubClient, device_id: str, body: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """Create the command and poll it until it is no longer pending or ``timeout_s`` passed;
    the command as the hub last showed it."""
    command: dict[str, Any] = api.json("POST", f"/api/v1/devices/{device_id}/commands", json=body)
    path = f"/api/v1/devices/{device_id}/commands/{command['id']}"
    deadline = time.monotonic() + timeout_s
    spinner = Spinner(f"waiting for {device_id}", enabled=sys.stderr.isatty())
    pauses = itertools.chain(POLL_S, itertools.repeat(POLL_S[-1]))
    try:
        while command["state"] == "pending":
            left = deadline - time.monotonic()
            if left <= 0:
                break
            spinner.tick()
            time.sleep(min(next(pauses), left))
            command = api.json("GET", path)
    finally:
        spinner.end()
    return command


def _outcome(api: HubClient, device_id: str, command: dict[str, Any], timeout_s: float) -> int:
    """Say on stderr why there is no result; the exit code. 0 when the command succeeded."""
    state = command["state"]
    if state == "succeeded":
        return 0
    if state == "failed":
        why = ": ".join(p for p in (command["reason"], command["detail"]) if p)
        click.echo(
            f"device {device_id} did not run the {command['action']} command:"
            f" {why or 'no reason given'}",
            err=True,
        )
        return EXIT_FAILED
    if state == "pending":
        device = api.json("GET", f"/api/v1/devices/{device_id}")
        where = (
            "it is online but has not answered"
            if device["online"]
            else f"it may be offline (last seen {device['last_seen'] or 'never'})"
        )
        click.echo(
            f"no answer from {device_id} within {timeout_s:g}s: {where}. The command stays"
            f" pending until {command['expires_at']}, and is sent again if the device comes"
            " online before then.",
            err=True,
        )
    else:
        click.echo(f"device {device_id} did not answer before the command expired", err=True)
    return EXIT_TIMEOUT


def format_entry(entry: LogEntry) -> str:
    """``2026-12-03T17:03:26.123Z WARNING agent.core: message``, later lines indented."""
    at = entry.at.astimezone(UTC)
    stamp = f"{at:%Y-%m-%dT%H:%M:%S}.{at.microsecond // 1000:03d}Z"
    first, *rest = entry.message.splitlines() or [""]
    lines = [f"{stamp} {entry.level.upper()} {entry.logger}: {first}"]
    lines += [CONTINUATION + line for line in rest]
    return "\n".join(lines)


timeout_option = click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1, max=MAX_TTL_S),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="seconds to wait for the device's answer",
)


@click.command("logs")
@click.argument("device_id")
@click.option(
    "--tail",
    type=click.IntRange(1, MAX_LOG_ENTRIES),
    default=100,
    show_default=True,
    help="the newest N entries",
)
@click.option(
    "--since", callback=_since_option, help="from this time: ISO (UTC) or 10m, 2h, 1d back"
)
@click.option(
    "--level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    help="only entries at this level or above",
)
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.pass_context
def device_logs(
    ctx: click.Context,
    device_id: str,
    tail: int,
    since: datetime | None,
    level: str | None,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Fetch the device's recent log entries (oldest first): `device logs dev-1 --since 10m
    --level warning`."""
    args: dict[str, Any] = {"tail": tail}
    if since is not None:
        args["since"] = since.isoformat()
    if level is not None:
        args["level"] = level.lower()
    api = client(ctx)
    body = {"action": "logs", "args": args, "ttl_s": _ttl_for(timeout_s)}
    command = run_command(api, device_id, body, timeout_s)
    code = _outcome(api, device_id, command, timeout_s)
    if code:
        ctx.exit(code)
    logs = LogsResult.model_validate(command["result"])
    if as_json:
        click.echo(json.dumps(logs.model_dump(mode="json")))
    else:
        for entry in logs.entries:
            click.echo(format_entry(entry))
        if not logs.entries:
            click.echo("no log entries match", err=True)
    if logs.more:
        hint = (
            f"ask for more with --tail (up to {MAX_LOG_ENTRIES}) or narrow with --since or --level"
            if tail < MAX_LOG_ENTRIES
            else "narrow with --since or --level"
        )
        click.echo(f"older matching entries were left out; {hint}", err=True)


@click.command("ping")
@click.argument("device_id")
@timeout_option
@click.pass_context
def device_ping(ctx: click.Context, device_id: str, timeout_s: float) -> None:
    """Check that the device hears commands, and how fast it answers."""
    api = client(ctx)
    started = time.monotonic()
    body = {"action": "ping", "ttl_s": _ttl_for(timeout_s)}
    command = run_command(api, device_id, body, timeout_s)
    code = _outcome(api, device_id, command, timeout_s)
    if code:
        ctx.exit(code)
    # The hub's measure (publish to answer stored) leaves out this CLI's polling.
    round_trip_ms = command["round_trip_ms"]
    if round_trip_ms is None:
        round_trip_ms = (time.monotonic() - started) * 1000
    click.echo(f"{device_id} answered in {round_trip_ms:.0f} ms")
