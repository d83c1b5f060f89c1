"""``outpost-hub data export``: collected scoring records (inputs, outputs, latency) out of the
hub as CSV, JSON Lines or Parquet, read page by page from ``GET /api/v1/data``.

Imports ``hub.cli_client``, never ``hub.cli``, so there is no import cycle.
"""

import csv
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import click

from hub.cli_client import client, fail

PAGE = 1000
FORMATS = ("csv", "jsonl", "parquet")
COLUMNS = (
    "device_id",
    "seq",
    "at",
    "received_at",
    "model",
    "version",
    "deployment_id",
    "correlation_id",
    "latency_ms",
    "inputs",
    "outputs",
)


@click.group()
def data() -> None:
    """Collected data (the sampled scoring calls of deployments with a collection policy)."""


def _format_of(out: Path, given: str | None) -> str:
    if given:
        return given
    suffix = out.suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    if suffix == "json":
        return "jsonl"
    fail(f"cannot tell the format from {out.name!r}: give --format {'|'.join(FORMATS)}")


def _pages(ctx: click.Context, params: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    hub = client(ctx)
    cursor: str | None = None
    while True:
        query = params if cursor is None else {**params, "cursor": cursor}
        page = hub.json("GET", "/api/v1/data", params=query)
        yield page["records"]
        cursor = page["next_cursor"]
        if cursor is None:
            return


def _row(record: dict[str, Any]) -> dict[str, Any]:
    # Inputs and outputs stay JSON text in every format: their shapes differ between models.
    return {
        c: json.dumps(record[c]) if c in ("inputs", "outputs") else record.get(c) for c in COLUMNS
    }


def _write_csv(stream: TextIO, rows: Iterator[dict[str, Any]]) -> int:
    writer = csv.DictWriter(stream, fieldnames=COLUMNS)
    writer.writeheader()
    count = 0
    for row in rows:
        writer.writerow(row)
        count += 1
    return count


def _write_jsonl(stream: TextIO, records: Iterator[dict[str, Any]]) -> int:
    count = 0
    for record in records:
        stream.write(json.dumps({c: record.get(c) for c in COLUMNS}) + "\n")
        count += 1
    return count


def _write_parquet(out: Path, rows: Iterator[dict[str, Any]]) -> int:
    try:
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
    except ImportError:
        fail("Parquet needs pyarrow: pip install 'outpost[hub]' (or pyarrow)")
    table = pa.Table.from_pylist(list(rows))
    pq.write_table(table, out)
    return int(table.num_rows)


@data.command("export")
@click.option("--out", "out", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="default: from --out's suffix")
@click.option("--model", help="only this model")
@click.option("--version", type=click.IntRange(1), help="only this version (with --model)")
@click.option("--device", help="only this device")
@click.option(
    "--since",
    type=click.DateTime(),
    help="from this UTC time (default: 7 days ago), by the device's clock",
)
@click.option("--until", type=click.DateTime(), help="up to this UTC time (default: now)")
@click.pass_context
def data_export(
    ctx: click.Context,
    out: Path,
    fmt: str | None,
    model: str | None,
    version: int | None,
    device: str | None,
    since: datetime | None,
    until: datetime | None,
) -> None:
    """Write collected records to OUT, newest first: `data export --out iris.parquet --model
    iris --since 2026-11-01`."""
    if version is not None and model is None:
        fail("--version needs --model")
    fmt = _format_of(out, fmt)
    start = since.replace(tzinfo=UTC) if since else datetime.now(UTC) - timedelta(days=7)
    params: dict[str, Any] = {"limit": PAGE, "since": start.isoformat()}
    if until is not None:
        params["until"] = until.replace(tzinfo=UTC).isoformat()
    for name, value in (("model", model), ("version", version), ("device", device)):
        if value is not None:
            params[name] = value
    records = (r for page in _pages(ctx, params) for r in page)
    # Written to a temporary name and renamed, so a failed export leaves no half file behind.
    partial = out.with_name(out.name + ".partial")
    try:
        if fmt == "parquet":
            count = _write_parquet(partial, (_row(r) for r in records))
        else:
            with partial.open("w", encoding="utf-8", newline="") as stream:
                if fmt == "csv":
                    count = _write_csv(stream, (_row(r) for r in records))
                else:
                    count = _write_jsonl(stream, records)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    click.echo(f"wrote {count} record(s) to {out} ({fmt})")
