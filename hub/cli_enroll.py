"""``outpost-hub device tokens|pending|accept|disable|enable``: serial-bound enrolment tokens
for manufacturing, the devices waiting for approval, and a device's broker access.

``hub.cli`` registers these on its ``device`` group; this module imports ``hub.cli_client``,
never ``hub.cli``, so there is no import cycle.
"""

import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from hub.cli_client import client
from hub.devices.schemas import MAX_BULK_DEVICES, check_device_id


def read_serials(lines: Sequence[str], *, source: str) -> list[str]:
    """Serial numbers, one a line; blank lines and ``#`` comments skipped. Each is checked as
    a device id, and a bad one is named with its line, so a file is fixed in one pass."""
    serials: list[str] = []
    problems: list[str] = []
    for number, raw in enumerate(lines, start=1):
        text = raw.split("#", 1)[0].strip()  # '#' is never part of a serial
        if not text:
            continue
        try:
            serials.append(check_device_id(text))
        except ValueError as exc:
            problems.append(f"{source}:{number}: {exc}")
    if problems:
        shown = "\n".join(problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise click.BadParameter(f"{len(problems)} bad serial number(s):\n{shown}{more}")
    return serials


@click.command("tokens")
@click.option(
    "--serials",
    "serials_file",
    type=click.File("r", encoding="utf-8"),
    help="a file of serial numbers, one a line ('-' for standard input)",
)
@click.option("--serial", "serial_args", multiple=True, help="a serial number; repeatable")
@click.option("--ttl-s", type=int, default=7 * 24 * 3600, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="write the CSV here (mode 0600) instead of standard output",
)
@click.pass_context
def device_tokens(
    ctx: click.Context,
    serials_file: Any,
    serial_args: tuple[str, ...],
    ttl_s: int,
    out: Path | None,
) -> None:
    """One single-use enrolment token per serial number, as CSV (serial,token,expires_at).

    Each token enrols only the device whose id is its serial, once. The tokens are shown once:
    keep the CSV as you would keep passwords."""
    serials = list(serial_args)
    if serials_file is not None:
        serials += read_serials(serials_file.readlines(), source=serials_file.name)
    else:
        serials = read_serials(serials, source="--serial")
    if not serials:
        raise click.UsageError("no serial numbers: give --serials FILE or --serial SN")
    if len(serials) > MAX_BULK_DEVICES:
        raise click.UsageError(
            f"{len(serials)} serial numbers; at most {MAX_BULK_DEVICES} at once: split the file"
        )
    body = client(ctx).json(
        "POST", "/api/v1/enrollment-tokens/serials", json={"serials": serials, "ttl_s": ttl_s}
    )
    rows = [(t["serial"], t["token"], t["expires_at"]) for t in body["tokens"]]
    if out is None:
        _write_csv(sys.stdout, rows)
    else:
        out.touch(mode=0o600, exist_ok=True)
        out.chmod(0o600)
        with out.open("w", encoding="utf-8", newline="") as f:
            _write_csv(f, rows)
    click.echo(f"{len(rows)} token(s), each for one serial, valid once", err=True)


def _write_csv(stream: Any, rows: list[tuple[str, str, str]]) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(("serial", "token", "expires_at"))
    writer.writerows(rows)


def _change(ctx: click.Context, device_id: str, action: str) -> None:
    try:
        check_device_id(device_id)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="DEVICE_ID") from None
    body = client(ctx).json("POST", f"/api/v1/devices/{device_id}/{action}")
    click.echo(f"{device_id}: {body['device']['status']}")
    cancelled = body.get("cancelled_deployments") or []
    if cancelled:
        click.echo(f"cancelled its unfinished work in: {', '.join(cancelled)}")


@click.command("accept")
@click.argument("device_id")
@click.pass_context
def device_accept(ctx: click.Context, device_id: str) -> None:
    """Let a device waiting for approval (pending) onto the broker."""
    _change(ctx, device_id, "accept")


@click.command("disable")
@click.argument("device_id")
@click.pass_context
def device_disable(ctx: click.Context, device_id: str) -> None:
    """Revoke a device's broker access now: its connection is dropped, reconnects are refused
    and its unfinished deployment work is cancelled."""
    _change(ctx, device_id, "disable")


@click.command("enable")
@click.argument("device_id")
@click.pass_context
def device_enable(ctx: click.Context, device_id: str) -> None:
    """Give a disabled device its broker access back."""
    _change(ctx, device_id, "enable")


@click.command("pending")
@click.pass_context
def device_pending(ctx: click.Context) -> None:
    """Devices waiting for approval (``devices.approval_required``), oldest first."""
    devices = client(ctx).json("GET", "/api/v1/devices", params={"status": "pending"})
    for d in devices:
        click.echo(
            f"{d['id']:<24} {d['name'] or '-':<16} {d['device_class']:<12} {d['enrolled_at']}"
        )
    click.echo(f"{len(devices)} pending; accept with: outpost-hub device accept ID", err=True)


ENROLL_COMMANDS = (device_tokens, device_pending, device_accept, device_disable, device_enable)
