"""Storing telemetry and data-collection batches, advancing the ack cursors, and dead letters.

The ack rule, per (device, stream): the cursor is the highest S such that every seq in
``[max(cursor + 1, first_kept), S]`` is stored. ``first_kept`` is the oldest seq the device still
holds; everything below it was acknowledged already or dropped by the device's bounded outbox, so
the hub skips that gap instead of waiting for records that will never come. Inside the range the
cursor stops at the first hole: the device still holds that record and will send it again.

``prepare`` checks a batch the way the database would (64-bit integers, finite floats, text
PostgreSQL accepts) before anything is written, so a bad value is a dead letter, not a failed
transaction that the device would resend for ever. ``store`` writes and never commits: the caller
commits, possibly several batches at once, and only then sends the acks (``acknowledge``).
"""

import functools
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table, bindparam, delete, select, union, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from agent.protocol.messages import (
    AckBody,
    DataBody,
    MessageError,
    TelemetryBody,
    TelemetryRecord,
    encode,
)
from agent.protocol.messages import CollectedRecord as CollectedRecordBody
from agent.protocol.topics import Channel, Topics
from hub.database import UTCDateTime
from hub.errors import MessagingUnavailable
from hub.messaging.publisher import Publisher
from hub.telemetry.models import (
    CollectedRecord,
    DeadLetter,
    IngestCursor,
    IngestRefused,
    ModelInterval,
    Stream,
    TelemetryPoint,
)

logger = logging.getLogger(__name__)

INT64_MAX = 2**63 - 1
# Stored seqs are read this many at a time while the cursor walks forward.
_CURSOR_SCAN_ROWS = 1000
_REASON_CHARS = 1000
_TOPIC_CHARS = 255
_POINTS: Table = TelemetryPoint.__table__  # type: ignore[attr-defined]
_RECORDS: Table = CollectedRecord.__table__  # type: ignore[attr-defined]
_CURSORS: Table = IngestCursor.__table__  # type: ignore[attr-defined]
_MODEL_INTERVALS: Table = ModelInterval.__table__  # type: ignore[attr-defined]
_REFUSED: Table = IngestRefused.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Batch:
    """One message's records, checked and ready to insert."""

    device_id: str
    stream: Stream
    first_kept: int
    rows: list[dict[str, Any]]
    # Telemetry only: one row per model per record (``model_interval``).
    model_rows: list[dict[str, Any]] = field(default_factory=list)
    # Records with a value the database cannot hold, by seq: why. Not stored; the caller keeps
    # the message as a dead letter, and the ack passes them.
    refused: dict[int, str] = field(default_factory=dict)

    @property
    def table(self) -> Table:
        return _POINTS if self.stream is Stream.TM else _RECORDS


def _check_text(name: str, value: str | None) -> None:
    if value is None:
        return
    # Valid JSON and a valid str (lone surrogates are refused by the message's validation),
    # yet PostgreSQL text cannot hold it.
    if "\x00" in value:
        raise MessageError(f"{name} holds a NUL character")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise MessageError(f"{name} is out of the 64-bit range")
    if isinstance(value, float) and not math.isfinite(value):
        raise MessageError(f"{name} is not a finite number")


def _check_json(name: str, value: Any) -> None:
    # What the JSON column will write: NaN and Infinity are not JSON, and PostgreSQL refuses them.
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"{name} cannot be stored as JSON: {exc}") from None


def _check_row(seq: int, row: Mapping[str, Any]) -> None:
    for name, value in row.items():
        where = f"record {seq}: {name}"
        if isinstance(value, str):
            _check_text(where, value)
        elif isinstance(value, datetime):
            continue
        elif isinstance(value, list | dict):
            _check_json(where, value)
        else:
            _check_number(where, value)


def _utc(seq: int, value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise MessageError(f"record {seq}: time {value!r} is out of range") from None


def prepare(device_id: str, body: TelemetryBody | DataBody) -> Batch:
    """The rows of a telemetry or data-collection batch. A record with a value the database
    cannot store is refused on its own (``Batch.refused``); MessageError when the batch as a
    whole cannot be taken (a seq out of the 64-bit range: no cursor can pass it)."""
    rows: list[dict[str, Any]] = []
    model_rows: list[dict[str, Any]] = []
    refused: dict[int, str] = {}
    if isinstance(body, TelemetryBody):
        stream = Stream.TM
        for r in body.records:
            _check_number(f"record {r.seq}: seq", r.seq)  # no seq, no way to pass it: refuse all
            try:
                row, per_model = _telemetry_rows(device_id, r)
            except MessageError as exc:
                refused[r.seq] = str(exc)
                continue
            rows.append(row)
            model_rows += per_model
    else:
        stream = Stream.DC
        for c in body.records:
            _check_number(f"record {c.seq}: seq", c.seq)
            try:
                rows.append(_collected_row(device_id, c))
            except MessageError as exc:
                refused[c.seq] = str(exc)
    _check_number("first_kept", body.first_kept)
    return Batch(
        device_id=device_id,
        stream=stream,
        first_kept=body.first_kept,
        rows=rows,
        model_rows=model_rows,
        refused=refused,
    )


def _telemetry_rows(
    device_id: str, r: TelemetryRecord
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One telemetry record's row and its per-model rows; MessageError for a value the
    database cannot hold."""
    at = _utc(r.seq, r.at)
    model_rows: list[dict[str, Any]] = []
    for m in {m.model: m for m in r.models}.values():  # one row per model: the key
        model_row = {
            "device_id": device_id,
            "seq": r.seq,
            "model": m.model,
            "version": m.version,
            "at": at,
            "interval_s": r.interval_s,
            "inferences": m.inferences,
            "errors": m.errors,
            "p50_ms": m.p50_ms,
            "p95_ms": m.p95_ms,
            "p99_ms": m.p99_ms,
        }
        _check_row(r.seq, model_row)
        model_rows.append(model_row)
    row = {
        "device_id": device_id,
        "seq": r.seq,
        "at": at,
        "interval_s": r.interval_s,
        "health": r.health,
        "uptime_s": r.uptime_s,
        "cpu_percent": r.cpu_percent,
        "memory_bytes": r.memory_bytes,
        "disk_free_bytes": r.disk_free_bytes,
        "temperature_c": r.temperature_c,
        "reconnects": r.reconnects,
        "outbox_backlog": r.outbox_backlog,
        "outbox_dropped": r.outbox_dropped,
        "inferences": sum(m.inferences for m in r.models),
        "errors": sum(m.errors for m in r.models),
        "models": [m.model_dump(mode="json") for m in r.models],
    }
    _check_row(r.seq, row)
    return row, model_rows


def _collected_row(device_id: str, c: CollectedRecordBody) -> dict[str, Any]:
    """One collected record's row; MessageError for a value the database cannot hold."""
    row = {
        "device_id": device_id,
        "seq": c.seq,
        "at": _utc(c.seq, c.at),
        "model": c.model,
        "version": c.version,
        "deployment_id": c.deployment_id,
        "correlation_id": c.correlation_id,
        "latency_ms": c.latency_ms,
    }
    _check_row(c.seq, row)
    # inputs and outputs may be any JSON, scalars included.
    _check_json(f"record {c.seq}: inputs", c.inputs)
    _check_json(f"record {c.seq}: outputs", c.outputs)
    row["inputs"] = c.inputs
    row["outputs"] = c.outputs
    return row


@functools.cache
def _insert_ignoring_duplicates(dialect: str, table: Table) -> Any:
    """An INSERT that skips a row whose primary key is stored already, instead of failing.

    Executed with every row of a batch at once (executemany): the statement is compiled once
    and cached, where a multi-row VALUES is compiled anew for each batch and cost more than the
    writes themselves."""
    keys = [c.name for c in table.primary_key.columns]
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=keys)
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
    raise NotImplementedError(f"telemetry ingest does not support {dialect}")


# Built once: ingest runs these for every message, and building a statement costs more than
# SQLite takes to run it.
_CURSOR_SEQ = select(_CURSORS.c.seq).where(
    _CURSORS.c.device_id == bindparam("c_device"), _CURSORS.c.stream == bindparam("c_stream")
)
_CURSOR_FORWARD = (
    update(_CURSORS)
    .where(
        _CURSORS.c.device_id == bindparam("c_device"),
        _CURSORS.c.stream == bindparam("c_stream"),
        # Only ever forward: another hub replica may have stored a later batch of the stream.
        _CURSORS.c.seq < bindparam("c_seq"),
    )
    .values(seq=bindparam("c_seq"), updated_at=bindparam("c_at", type_=UTCDateTime()))
)
# The seqs the cursor may pass: stored, or refused (kept as a dead letter). UNION, not UNION
# ALL: a seq both stored and later refused again (a resend) must count once in the walk.
_STORED_SEQS = {
    table.name: union(
        select(table.c.seq).where(
            table.c.device_id == bindparam("w_device"), table.c.seq > bindparam("w_after")
        ),
        select(_REFUSED.c.seq).where(
            _REFUSED.c.device_id == bindparam("w_device"),
            _REFUSED.c.stream == bindparam("w_stream"),
            _REFUSED.c.seq > bindparam("w_after"),
        ),
    )
    .order_by("seq")
    .limit(_CURSOR_SCAN_ROWS)
    for table in (_POINTS, _RECORDS)
}
_FORGET_REFUSED = delete(_REFUSED).where(
    _REFUSED.c.device_id == bindparam("r_device"),
    _REFUSED.c.stream == bindparam("r_stream"),
    _REFUSED.c.seq <= bindparam("r_seq"),
)


def _stored_run(connection: Connection, batch: Batch, after: int) -> int:
    """The highest S such that every seq in [after + 1, S] is stored (``after`` when none is)."""
    last = after
    while True:
        seqs = connection.execute(
            _STORED_SEQS[batch.table.name],
            {"w_device": batch.device_id, "w_stream": str(batch.stream), "w_after": last},
        ).scalars()
        count = 0
        for seq in seqs:
            count += 1
            if seq != last + 1:
                return last
            last = seq
        if count < _CURSOR_SCAN_ROWS:
            return last


def store(session: Session, batch: Batch, now: datetime) -> int:
    """Insert the batch (duplicates dropped) and advance the stream's cursor; no commit.
    Returns the cursor: every seq of the stream up to it is stored or given up by the device."""
    connection = session.connection()
    dialect = connection.dialect.name
    if batch.rows:
        rows = [{**row, "received_at": now} for row in batch.rows]
        connection.execute(_insert_ignoring_duplicates(dialect, batch.table), rows)
    if batch.refused:
        refused = [
            {
                "device_id": batch.device_id,
                "stream": str(batch.stream),
                "seq": seq,
                "received_at": now,
            }
            for seq in batch.refused
        ]
        connection.execute(_insert_ignoring_duplicates(dialect, _REFUSED), refused)
    if batch.model_rows:
        connection.execute(
            _insert_ignoring_duplicates(dialect, _MODEL_INTERVALS),
            [{**row, "received_at": now} for row in batch.model_rows],
        )
    key = {"c_device": batch.device_id, "c_stream": str(batch.stream)}
    cursor = connection.execute(_CURSOR_SEQ, key).scalar()
    acked = cursor if cursor is not None else 0
    # Below first_kept nothing will come again: start the walk there.
    start = max(acked + 1, batch.first_kept)
    new = max(acked, _stored_run(connection, batch, start - 1))
    if cursor is None:
        connection.execute(
            _insert_ignoring_duplicates(dialect, _CURSORS),
            [
                {
                    "device_id": batch.device_id,
                    "stream": str(batch.stream),
                    "seq": new,
                    "updated_at": now,
                }
            ],
        )
    if new > acked:
        connection.execute(_CURSOR_FORWARD, {**key, "c_seq": new, "c_at": now})
    if batch.refused:
        # Passed by the cursor: never looked at again.
        connection.execute(
            _FORGET_REFUSED,
            {"r_device": batch.device_id, "r_stream": str(batch.stream), "r_seq": new},
        )
    return new


def acknowledge(
    *, publisher: Publisher, topics: Topics, device_id: str, stream: Stream, seq: int
) -> None:
    """Tell the device what is stored; call after the commit. A failure is logged only: the
    device sends the records again, and their duplicates are acknowledged then."""
    try:
        publisher.publish(
            topics.device(device_id, Channel.ACK),
            encode(AckBody(stream="tm" if stream is Stream.TM else "dc", seq=seq)),
            qos=1,
            retain=False,
        )
    except MessagingUnavailable as exc:
        logger.warning(
            "could not send an ack",
            extra={"device_id": device_id, "stream": str(stream), "error": exc.detail},
        )


def dead_letter(
    *,
    topic: str,
    device_id: str | None,
    reason: str,
    payload: bytes,
    max_payload_bytes: int,
    now: datetime,
) -> DeadLetter:
    """A row for a message the hub refused, its payload cut to ``max_payload_bytes``."""
    return DeadLetter(
        received_at=now,
        # A topic is whatever the broker let through: keep it readable, bounded and storable.
        topic=_printable(topic)[:_TOPIC_CHARS],
        device_id=device_id,
        reason=_printable(reason)[:_REASON_CHARS],
        payload=payload[:max_payload_bytes],
        payload_bytes=len(payload),
    )


def _printable(text: str) -> str:
    """``text`` with NUL and lone surrogates escaped: PostgreSQL text refuses both."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
