"""Telemetry, data-collection and dead-letter API shapes."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from agent.protocol.messages import ModelStats


class TelemetryPointPublic(BaseModel):
    """One telemetry record as the device sent it."""

    seq: int
    at: datetime  # the end of the interval, on the device's clock
    received_at: datetime
    interval_s: float
    health: str
    uptime_s: float
    cpu_percent: float | None
    memory_bytes: int | None
    disk_free_bytes: int | None
    temperature_c: float | None
    reconnects: int
    outbox_backlog: int
    outbox_dropped: int
    models: list[ModelStats]


class ModelInterval(BaseModel):
    """One model (and version) on one device over one interval."""

    model: str
    version: int
    inferences: int  # summed over the interval's points
    errors: int  # summed
    max_p95_ms: float | None  # the worst point's p95; None when no point had calls


class DeviceInterval(BaseModel):
    """A device's points whose ``at`` falls in [start, end), aggregated."""

    start: datetime
    end: datetime
    points: int
    degraded: int  # points that reported health "degraded"
    avg_cpu_percent: float | None  # over the points that reported it
    max_memory_bytes: int | None
    min_disk_free_bytes: int | None
    max_temperature_c: float | None
    reconnects: int  # summed
    max_outbox_backlog: int
    max_outbox_dropped: int  # the device's count since install, at its highest in the interval
    models: list[ModelInterval]


class DeviceTelemetry(BaseModel):
    """``points`` without ``interval_s``; ``intervals`` with it (only intervals with points)."""

    device_id: str
    since: datetime
    until: datetime
    interval_s: int | None
    points: list[TelemetryPointPublic] | None
    intervals: list[DeviceInterval] | None


class FleetInterval(BaseModel):
    """Every device's points whose ``at`` falls in [start, end), aggregated."""

    start: datetime
    end: datetime
    devices: int  # devices that sent at least one point
    points: int
    degraded: int  # points that reported health "degraded"
    avg_cpu_percent: float | None  # over the points that reported it
    avg_memory_bytes: float | None
    inferences: int  # summed over every model of every device
    errors: int
    reconnects: int


class FleetTelemetry(BaseModel):
    since: datetime
    until: datetime
    interval_s: int
    intervals: list[FleetInterval]  # only intervals with points, oldest first


class CollectedRecordPublic(BaseModel):
    device_id: str
    seq: int
    at: datetime  # the device's clock
    received_at: datetime
    model: str
    version: int
    deployment_id: str | None
    correlation_id: str | None
    latency_ms: float
    inputs: Any
    outputs: Any


class DataPage(BaseModel):
    """Newest first; pass ``next_cursor`` as ``cursor`` for the next page (None: the last)."""

    records: list[CollectedRecordPublic]
    next_cursor: str | None


class DeadLetterPublic(BaseModel):
    id: int
    received_at: datetime
    topic: str
    device_id: str | None  # from the topic, when it names a valid device id
    reason: str
    payload: str  # the stored bytes as text, undecodable bytes escaped (\\xNN)
    payload_bytes: int  # the whole payload's size; ``payload`` may be cut short
