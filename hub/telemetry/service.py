"""Reading telemetry, collected data and dead letters.

Times are the devices' own (``at``): an interval holds what happened in it, even when a device
was offline then and sent it later. Intervals start at ``since`` (taken to the whole second)
and are ``interval_s`` long; only intervals with points are returned.

A device's intervals are aggregated in Python, since per-model figures live in each point's
JSON (one device's range is a few thousand points); the fleet's are aggregated in SQL over
plain columns, so a fleet range costs one GROUP BY whatever its size.
"""

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy import BigInteger, and_, case, cast, extract, func, literal_column, or_
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from agent.protocol.messages import ModelStats
from hub.devices.models import Device
from hub.errors import InvalidInput, NotFound
from hub.telemetry.models import CollectedRecord, DeadLetter, TelemetryPoint
from hub.telemetry.schemas import (
    CollectedRecordPublic,
    DataPage,
    DeadLetterPublic,
    DeviceInterval,
    DeviceTelemetry,
    FleetInterval,
    FleetTelemetry,
    ModelInterval,
    TelemetryPointPublic,
)

DEFAULT_RANGE = timedelta(hours=1)
MAX_INTERVALS = 10_000
# A device's aggregation reads its points into memory; past this, ask for a shorter range.
MAX_AGGREGATED_POINTS = 200_000


@dataclass(frozen=True)
class TimeRange:
    since: datetime
    until: datetime


def time_range(
    *, since: datetime | None, until: datetime | None, now: datetime, interval_s: int | None
) -> TimeRange:
    """The range a query covers (default: the hour before ``until``, which defaults to now);
    raises InvalidInput when it is empty or holds too many intervals."""
    end = (until or now).astimezone(UTC)
    start = (since or end - DEFAULT_RANGE).astimezone(UTC).replace(microsecond=0)
    if start >= end:
        raise InvalidInput("since must be before until")
    if interval_s is not None:
        count = -(-int((end - start).total_seconds()) // interval_s)
        if count > MAX_INTERVALS:
            raise InvalidInput(
                f"{count} intervals of {interval_s} s from since to until; at most "
                f"{MAX_INTERVALS}: make interval_s larger or the range shorter"
            )
    return TimeRange(start, end)


def _in_range(column: Any, span: TimeRange) -> ColumnElement[bool]:
    return and_(col(column) >= span.since, col(column) < span.until)


def _bucket(span: TimeRange, at: datetime, interval_s: int) -> int:
    delta = at - span.since
    return (delta.days * 86400 + delta.seconds) // interval_s


def _bounds(span: TimeRange, bucket: int, interval_s: int) -> tuple[datetime, datetime]:
    start = span.since + timedelta(seconds=bucket * interval_s)
    return start, min(start + timedelta(seconds=interval_s), span.until)


# -- one device ---------------------------------------------------------------------------------


def _point_public(p: TelemetryPoint) -> TelemetryPointPublic:
    return TelemetryPointPublic(
        seq=p.seq,
        at=p.at,
        received_at=p.received_at,
        interval_s=p.interval_s,
        health=p.health,
        uptime_s=p.uptime_s,
        cpu_percent=p.cpu_percent,
        memory_bytes=p.memory_bytes,
        disk_free_bytes=p.disk_free_bytes,
        temperature_c=p.temperature_c,
        reconnects=p.reconnects,
        outbox_backlog=p.outbox_backlog,
        outbox_dropped=p.outbox_dropped,
        models=[ModelStats.model_validate(m) for m in p.models],
    )


def _max(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else max(a, b)


def _min(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else min(a, b)


@dataclass
class _DeviceAcc:
    points: int = 0
    degraded: int = 0
    cpu_sum: float = 0.0
    cpu_points: int = 0
    max_memory: int | None = None
    min_disk: int | None = None
    max_temperature: float | None = None
    reconnects: int = 0
    max_backlog: int = 0
    max_dropped: int = 0
    # (model, version) -> [inferences, errors, max p95]
    models: dict[tuple[str, int], list[Any]] = field(default_factory=dict)

    def add(self, p: TelemetryPoint) -> None:
        self.points += 1
        self.degraded += p.health == "degraded"
        if p.cpu_percent is not None:
            self.cpu_sum += p.cpu_percent
            self.cpu_points += 1
        self.max_memory = _max(self.max_memory, p.memory_bytes)
        self.min_disk = _min(self.min_disk, p.disk_free_bytes)
        self.max_temperature = _max(self.max_temperature, p.temperature_c)
        self.reconnects += p.reconnects
        self.max_backlog = max(self.max_backlog, p.outbox_backlog)
        self.max_dropped = max(self.max_dropped, p.outbox_dropped)
        for m in p.models:
            acc = self.models.setdefault((m["model"], m["version"]), [0, 0, None])
            acc[0] += m.get("inferences", 0)
            acc[1] += m.get("errors", 0)
            acc[2] = _max(acc[2], m.get("p95_ms"))


def device_telemetry(
    *,
    session: Session,
    device_id: str,
    span: TimeRange,
    interval_s: int | None,
    limit: int,
) -> DeviceTelemetry:
    """A device's points in the range (the first ``limit``, oldest first), or with
    ``interval_s`` its aggregates per interval."""
    if session.get(Device, device_id) is None:
        raise NotFound(f"device {device_id} not found")
    query = (
        select(TelemetryPoint)
        .where(TelemetryPoint.device_id == device_id, _in_range(TelemetryPoint.at, span))
        .order_by(col(TelemetryPoint.at), col(TelemetryPoint.seq))
    )
    if interval_s is None:
        points = session.exec(query.limit(limit)).all()
        return DeviceTelemetry(
            device_id=device_id,
            since=span.since,
            until=span.until,
            interval_s=None,
            points=[_point_public(p) for p in points],
            intervals=None,
        )
    rows = session.exec(query.limit(MAX_AGGREGATED_POINTS + 1)).all()
    if len(rows) > MAX_AGGREGATED_POINTS:
        raise InvalidInput(
            f"more than {MAX_AGGREGATED_POINTS} points from since to until: shorten the range"
        )
    buckets: dict[int, _DeviceAcc] = {}
    for p in rows:
        buckets.setdefault(_bucket(span, p.at, interval_s), _DeviceAcc()).add(p)
    intervals = []
    for index, acc in sorted(buckets.items()):
        start, end = _bounds(span, index, interval_s)
        intervals.append(
            DeviceInterval(
                start=start,
                end=end,
                points=acc.points,
                degraded=acc.degraded,
                avg_cpu_percent=acc.cpu_sum / acc.cpu_points if acc.cpu_points else None,
                max_memory_bytes=acc.max_memory,
                min_disk_free_bytes=acc.min_disk,
                max_temperature_c=acc.max_temperature,
                reconnects=acc.reconnects,
                max_outbox_backlog=acc.max_backlog,
                max_outbox_dropped=acc.max_dropped,
                models=[
                    ModelInterval(
                        model=model, version=version, inferences=n, errors=e, max_p95_ms=p95
                    )
                    for (model, version), (n, e, p95) in sorted(acc.models.items())
                ],
            )
        )
    return DeviceTelemetry(
        device_id=device_id,
        since=span.since,
        until=span.until,
        interval_s=interval_s,
        points=None,
        intervals=intervals,
    )


# -- the fleet ----------------------------------------------------------------------------------


def _bucket_sql(session: Session, span: TimeRange, interval_s: int) -> ColumnElement[Any]:
    """floor((at - since) / interval_s) in whole seconds, as ``_bucket`` computes it. The
    numbers are inlined (they are ints): PostgreSQL would not see a GROUP BY expression with
    its own bound parameters as the one selected."""
    at = col(TelemetryPoint.at)
    if session.get_bind().dialect.name == "sqlite":
        seconds = cast(func.strftime("%s", at), BigInteger)
    else:
        seconds = cast(func.floor(extract("epoch", at)), BigInteger)
    since_s = literal_column(str(int(span.since.timestamp())), BigInteger)
    return (seconds - since_s) // literal_column(str(int(interval_s)), BigInteger)


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, Decimal | float | int) else None


def fleet_telemetry(*, session: Session, span: TimeRange, interval_s: int) -> FleetTelemetry:
    """Every device's points aggregated per interval."""
    bucket = _bucket_sql(session, span, interval_s).label("bucket")
    p = TelemetryPoint
    # sqlalchemy's select: sqlmodel's is typed for at most four columns.
    rows = session.execute(
        sa.select(
            bucket,
            func.count(func.distinct(col(p.device_id))),
            func.count(),
            func.sum(case((col(p.health) == "degraded", 1), else_=0)),
            func.avg(col(p.cpu_percent)),
            func.avg(col(p.memory_bytes)),
            func.sum(col(p.inferences)),
            func.sum(col(p.errors)),
            func.sum(col(p.reconnects)),
        )
        .where(_in_range(p.at, span))
        .group_by(bucket)
        .order_by(bucket)
    ).all()
    intervals = []
    for index, devices, points, degraded, cpu, memory, inferences, errors, reconnects in rows:
        start, end = _bounds(span, int(index), interval_s)
        intervals.append(
            FleetInterval(
                start=start,
                end=end,
                devices=devices,
                points=points,
                degraded=int(degraded or 0),
                avg_cpu_percent=_float(cpu),
                avg_memory_bytes=_float(memory),
                inferences=int(inferences or 0),
                errors=int(errors or 0),
                reconnects=int(reconnects or 0),
            )
        )
    return FleetTelemetry(
        since=span.since, until=span.until, interval_s=interval_s, intervals=intervals
    )


# -- collected data -----------------------------------------------------------------------------


def _encode_cursor(r: CollectedRecord) -> str:
    raw = json.dumps([r.at.isoformat(), r.device_id, r.seq]).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _decode_cursor(cursor: str) -> tuple[datetime, str, int]:
    try:
        at, device_id, seq = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
        when = datetime.fromisoformat(at)
        if when.tzinfo is None or not isinstance(device_id, str) or not isinstance(seq, int):
            raise ValueError("wrong types")
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        raise InvalidInput("cursor is not one this API gave out (use next_cursor)") from None
    return when, device_id, seq


def data_records(
    *,
    session: Session,
    span: TimeRange,
    model: str | None,
    version: int | None,
    device_id: str | None,
    limit: int,
    cursor: str | None,
) -> DataPage:
    """Collected records, newest first (by the device's time), a page at a time."""
    if version is not None and model is None:
        raise InvalidInput("version needs model")
    r = CollectedRecord
    query = select(r).where(_in_range(r.at, span))
    if model is not None:
        query = query.where(r.model == model)
    if version is not None:
        query = query.where(r.version == version)
    if device_id is not None:
        query = query.where(r.device_id == device_id)
    if cursor is not None:
        at, after_device, after_seq = _decode_cursor(cursor)
        # Keyset paging on (at, device_id, seq), the order below: stable while records arrive.
        query = query.where(
            or_(
                col(r.at) < at,
                and_(
                    col(r.at) == at,
                    or_(
                        col(r.device_id) < after_device,
                        and_(col(r.device_id) == after_device, col(r.seq) < after_seq),
                    ),
                ),
            )
        )
    rows: Sequence[CollectedRecord] = session.exec(
        query.order_by(col(r.at).desc(), col(r.device_id).desc(), col(r.seq).desc()).limit(
            limit + 1
        )
    ).all()
    page = rows[:limit]
    return DataPage(
        records=[
            CollectedRecordPublic(
                device_id=x.device_id,
                seq=x.seq,
                at=x.at,
                received_at=x.received_at,
                model=x.model,
                version=x.version,
                deployment_id=x.deployment_id,
                correlation_id=x.correlation_id,
                latency_ms=x.latency_ms,
                inputs=x.inputs,
                outputs=x.outputs,
            )
            for x in page
        ],
        next_cursor=_encode_cursor(page[-1]) if len(rows) > limit else None,
    )


# -- dead letters -------------------------------------------------------------------------------


def dead_letters(
    *, session: Session, limit: int, device_id: str | None = None
) -> list[DeadLetterPublic]:
    """The newest dead letters first."""
    query = select(DeadLetter).order_by(col(DeadLetter.id).desc()).limit(limit)
    if device_id is not None:
        query = query.where(DeadLetter.device_id == device_id)
    return [
        DeadLetterPublic(
            id=d.id or 0,
            received_at=d.received_at,
            topic=d.topic,
            device_id=d.device_id,
            reason=d.reason,
            payload=d.payload.decode("utf-8", "backslashreplace"),
            payload_bytes=d.payload_bytes,
        )
        for d in session.exec(query).all()
    ]
