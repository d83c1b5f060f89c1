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

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import Connection, Table, bindparam, case, delete, select, union, update
from sqlmodel import Session

from agent.protocol.messages import (
    AckBody,
    DataBody,
    MessageError,
    ModelStats,
    TelemetryBody,
    TelemetryRecord,
    encode,
)
from agent.protocol.messages import CollectedRecord as CollectedRecordBody
from agent.protocol.topics import Channel, Topics
from hub.database import UTCDateTime
from hub.errors import MessagingUnavailable
from hub.messaging.publisher import Publisher
from hub.telemetry import bulk
from hub.telemetry.models import (
    CollectedRecord,
    DeadLetter,
    IngestCursor,
    IngestRefused,
    Stream,
    TelemetryPoint,
)

logger = logging.getLogger(__name__)

INT64_MAX = 2**63 - 1
_INT64_MIN = -INT64_MAX - 1
# Stored seqs are read this many at a time while the cursor walks forward.
_CURSOR_SCAN_ROWS = 1000
_REASON_CHARS = 1000
_TOPIC_CHARS = 255
_POINTS: Table = TelemetryPoint.__table__  # type: ignore[attr-defined]
_RECORDS: Table = CollectedRecord.__table__  # type: ignore[attr-defined]
_CURSORS: Table = IngestCursor.__table__  # type: ignore[attr-defined]
_REFUSED: Table = IngestRefused.__table__  # type: ignore[attr-defined]
_TABLES = {Stream.TM: _POINTS, Stream.DC: _RECORDS}
_MODEL_LIST = TypeAdapter(list[ModelStats])


@dataclass(frozen=True)
class Batch:
    """One message's records, checked and ready to insert."""

    device_id: str
    stream: Stream
    first_kept: int
    rows: list[dict[str, Any]]
    # Records with a value the database cannot hold, by seq: why. Not stored; the caller keeps
    # the message as a dead letter, and the ack passes them.
    refused: dict[int, str] = field(default_factory=dict)


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
    """Every value of ``row`` as the database can hold it. One pass with exact type checks: it
    runs for every record, and the error message is only built on a failure."""
    for name, value in row.items():
        kind = type(value)
        if kind is float:
            if value - value != 0.0:  # inf - inf and nan - nan are nan: not finite
                _check_number(f"record {seq}: {name}", value)
        elif kind is int:
            if not _INT64_MIN <= value <= INT64_MAX:
                _check_number(f"record {seq}: {name}", value)
        elif kind is str:
            if "\x00" in value:
                _check_text(f"record {seq}: {name}", value)
        elif kind is list or kind is dict:
            _check_json(f"record {seq}: {name}", value)


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
    refused: dict[int, str] = {}
    if isinstance(body, TelemetryBody):
        stream = Stream.TM
        for r in body.records:
            _check_number(f"record {r.seq}: seq", r.seq)  # no seq, no way to pass it: refuse all
            try:
                rows.append(_telemetry_row(device_id, r))
            except MessageError as exc:
                refused[r.seq] = str(exc)
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
        refused=refused,
    )


def _telemetry_row(device_id: str, r: TelemetryRecord) -> dict[str, Any]:
    """One telemetry record's row; MessageError for a value the database cannot hold."""
    at = _utc(r.seq, r.at)
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
        # pydantic's JSON of the message's own models: what the per-model metrics read (in
        # SQL); text any database takes (a non-finite number is written as null).
        "models": bulk.RawJson(_MODEL_LIST.dump_json(r.models).decode()),
    }
    _check_row(r.seq, row)
    return row


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


# Built once: ingest runs these for every message, and building a statement costs more than
# SQLite takes to run it.
# Only ever forward, both figures: another hub replica may have stored a later batch.
_CURSOR_FORWARD = (
    update(_CURSORS)
    .where(
        _CURSORS.c.device_id == bindparam("c_device"),
        _CURSORS.c.stream == bindparam("c_stream"),
    )
    .values(
        seq=case((_CURSORS.c.seq < bindparam("c_seq"), bindparam("c_seq")), else_=_CURSORS.c.seq),
        stored_max=case(
            (_CURSORS.c.stored_max < bindparam("c_max"), bindparam("c_max")),
            else_=_CURSORS.c.stored_max,
        ),
        updated_at=bindparam("c_at", type_=UTCDateTime()),
    )
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


def _stored_run(connection: Connection, key: "StreamKey", after: int) -> int:
    """The highest S such that every seq in [after + 1, S] is stored or refused (``after``
    when none is), walked in the database."""
    device_id, stream = key
    last = after
    while True:
        seqs = connection.execute(
            _STORED_SEQS[_TABLES[stream].name],
            {"w_device": device_id, "w_stream": str(stream), "w_after": last},
        ).scalars()
        count = 0
        for seq in seqs:
            count += 1
            if seq != last + 1:
                return last
            last = seq
        if count < _CURSOR_SCAN_ROWS:
            return last


StreamKey = tuple[str, Stream]  # (device id, stream): what one cursor and one ack are for


@dataclass
class _Arrivals:
    """What one transaction brings for one stream: its seqs and the highest first_kept."""

    seqs: set[int] = field(default_factory=set)
    first_kept: int = 1
    refused: bool = False


def store(session: Session, batch: Batch, now: datetime) -> int:
    """``store_many`` for one batch; returns its stream's cursor."""
    return store_many(session, [batch], now)[(batch.device_id, batch.stream)]


def store_many(session: Session, batches: Sequence[Batch], now: datetime) -> dict[StreamKey, int]:
    """Insert the batches (duplicates dropped) and advance their streams' cursors; no commit.
    Returns each stream's cursor: every seq up to it is stored or given up by the device.

    A few statements for the whole group, whatever its size: one insert per table, one read of
    the cursors, one cursor update. A cursor is advanced in memory through the seqs that
    arrived; only a stream with seqs stored above its cursor (they came out of order: its
    ``stored_max`` says so) is walked in the database."""
    if not batches:
        return {}
    connection = session.connection()
    arrivals: dict[StreamKey, _Arrivals] = {}
    rows: dict[Stream, list[dict[str, Any]]] = {Stream.TM: [], Stream.DC: []}
    refused_rows: list[dict[str, Any]] = []
    for batch in batches:
        arrived = arrivals.setdefault((batch.device_id, batch.stream), _Arrivals())
        arrived.first_kept = max(arrived.first_kept, batch.first_kept)
        for row in batch.rows:
            row["received_at"] = now
            arrived.seqs.add(row["seq"])
        rows[batch.stream] += batch.rows
        for seq in batch.refused:
            arrived.seqs.add(seq)
            arrived.refused = True
            refused_rows.append(
                {
                    "device_id": batch.device_id,
                    "stream": str(batch.stream),
                    "seq": seq,
                    "received_at": now,
                }
            )
    for stream, table_rows in rows.items():
        bulk.insert_ignoring_duplicates(connection, _TABLES[stream], table_rows)
    bulk.insert_ignoring_duplicates(connection, _REFUSED, refused_rows)

    devices = sorted({device_id for device_id, _ in arrivals})
    cursors: dict[StreamKey, tuple[int, int]] = {
        (device_id, Stream(stream)): (seq, stored_max)
        for device_id, stream, seq, stored_max in connection.execute(
            select(
                _CURSORS.c.device_id, _CURSORS.c.stream, _CURSORS.c.seq, _CURSORS.c.stored_max
            ).where(_CURSORS.c.device_id.in_(devices))
        )
    }
    new: dict[StreamKey, int] = {}
    fresh: list[dict[str, Any]] = []
    forward: list[dict[str, Any]] = []
    for key, arrived in arrivals.items():
        acked, stored_max = cursors.get(key, (0, 0))
        # Below first_kept nothing will come again: the run starts there.
        last = max(acked + 1, arrived.first_kept) - 1
        while last + 1 in arrived.seqs:
            last += 1
        if stored_max > last:
            last = _stored_run(connection, key, last)  # seqs stored earlier, out of order
        new[key] = max(acked, last)
        device_id, stream = key
        high = max(stored_max, max(arrived.seqs, default=0))
        if key not in cursors:
            fresh.append(
                {
                    "device_id": device_id,
                    "stream": str(stream),
                    "seq": new[key],
                    "stored_max": high,
                    "updated_at": now,
                }
            )
        forward.append(
            {
                "c_device": device_id,
                "c_stream": str(stream),
                "c_seq": new[key],
                "c_max": high,
                "c_at": now,
            }
        )
    bulk.insert_ignoring_duplicates(connection, _CURSORS, fresh)
    # Also for the fresh ones: another replica may have made the row first.
    connection.execute(_CURSOR_FORWARD, forward)
    forget = [
        {"r_device": d, "r_stream": str(s), "r_seq": new[(d, s)]}
        for (d, s), arrived in arrivals.items()
        if arrived.refused
    ]
    if forget:
        # Passed by the cursor: never looked at again.
        connection.execute(_FORGET_REFUSED, forget)
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
