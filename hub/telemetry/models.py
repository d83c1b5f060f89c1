"""Telemetry and data-collection tables, the per-stream ack cursors, and dead letters.

A record's primary key is ``(device_id, seq)``: the device numbers the records of each stream,
so the key is what drops a QoS 1 redelivery or an outbox resend. There is no foreign key to
``device``: these rows expire by retention, and must not stand in the way of removing a device
(ingest checks that the device exists before it stores anything).
"""

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, LargeBinary
from sqlmodel import Field, SQLModel

from hub.database import UTCDateTime, utcnow


class Stream(StrEnum):
    """The device → hub record streams the hub acknowledges through ``ingest_cursor``."""

    TM = "tm"
    DC = "dc"


class TelemetryPoint(SQLModel, table=True):
    """One device's measurements over one interval (``agent.protocol.messages.TelemetryRecord``)."""

    __tablename__ = "telemetry_point"
    __table_args__ = (
        Index("ix_telemetry_point_device_at", "device_id", "at"),
        Index("ix_telemetry_point_at", "at"),
        Index("ix_telemetry_point_received_at", "received_at"),
    )

    device_id: str = Field(primary_key=True, max_length=63)
    seq: int = Field(primary_key=True, sa_type=BigInteger)
    at: datetime = Field(sa_type=UTCDateTime)  # the end of the interval, on the device's clock
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    interval_s: float
    health: str = Field(max_length=16)
    uptime_s: float
    cpu_percent: float | None = None
    memory_bytes: int | None = Field(default=None, sa_type=BigInteger)
    disk_free_bytes: int | None = Field(default=None, sa_type=BigInteger)
    temperature_c: float | None = None
    reconnects: int = Field(default=0, sa_type=BigInteger)
    outbox_backlog: int = Field(default=0, sa_type=BigInteger)
    outbox_dropped: int = Field(default=0, sa_type=BigInteger)
    # Sums over ``models``, kept as columns so the fleet view aggregates in SQL alone.
    inferences: int = Field(default=0, sa_type=BigInteger)
    errors: int = Field(default=0, sa_type=BigInteger)
    # [ModelStats as JSON]: read per device only, where a range holds few enough rows.
    models: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )


class CollectedRecord(SQLModel, table=True):
    """One sampled scoring call (``agent.protocol.messages.CollectedRecord``)."""

    __tablename__ = "collected_record"
    __table_args__ = (
        Index("ix_collected_record_model_at", "model", "version", "at"),
        Index("ix_collected_record_at", "at"),
        Index("ix_collected_record_received_at", "received_at"),
    )

    device_id: str = Field(primary_key=True, max_length=63)
    seq: int = Field(primary_key=True, sa_type=BigInteger)
    at: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    model: str = Field(max_length=63)
    version: int = Field(sa_type=BigInteger)
    deployment_id: str | None = Field(default=None, max_length=40)
    correlation_id: str | None = Field(default=None, max_length=200)
    latency_ms: float
    inputs: Any = Field(default=None, sa_column=Column(JSON))
    outputs: Any = Field(default=None, sa_column=Column(JSON))


class IngestCursor(SQLModel, table=True):
    """How far the hub has acknowledged one device's stream: every seq up to ``seq`` is stored,
    or was given up by the device (below the ``first_kept`` of a batch)."""

    __tablename__ = "ingest_cursor"

    device_id: str = Field(primary_key=True, max_length=63)
    stream: str = Field(primary_key=True, max_length=8)  # Stream
    seq: int = Field(default=0, sa_type=BigInteger)
    # The highest seq of the stream stored or refused so far. Above ``seq`` only when records
    # came out of order (a gap waits for a resend): only then must a later store walk the
    # stored seqs in the database to move the cursor; otherwise it moves it in memory.
    stored_max: int = Field(default=0, sa_type=BigInteger)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class IngestRefused(SQLModel, table=True):
    """A record seq the hub refused to store (a value the database cannot hold), kept aside in
    full as a dead letter. The ack cursor passes it as if stored: the device would otherwise
    send the same record for ever and every later record of the stream would wait behind it.
    Rows go once the cursor has passed them (or by retention)."""

    __tablename__ = "ingest_refused"

    device_id: str = Field(primary_key=True, max_length=63)
    stream: str = Field(primary_key=True, max_length=8)  # Stream
    seq: int = Field(primary_key=True, sa_type=BigInteger)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)


class DeadLetter(SQLModel, table=True):
    """A device message the hub could not take (any channel), kept so an operator can see what
    a device sends and why it was refused. The payload is truncated to a configured bound."""

    __tablename__ = "dead_letter"

    id: int | None = Field(default=None, primary_key=True)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    topic: str = Field(max_length=255)
    # From the topic, when it names a valid device id; never from the payload.
    device_id: str | None = Field(default=None, max_length=63)
    reason: str = Field(max_length=1000)
    # Bytes, not text: garbage may be invalid UTF-8 or hold NUL, which PostgreSQL text refuses.
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    payload_bytes: int  # the size of the whole payload as received
