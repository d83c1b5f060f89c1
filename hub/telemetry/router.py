"""Telemetry, collected data and dead-letter routes under /api/v1 (read only)."""

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import AwareDatetime

from agent.protocol.topics import DEVICE_ID_PATTERN
from hub.database import utcnow
from hub.dependencies import AdminDep, SessionDep
from hub.registry.models import MAX_VERSION
from hub.telemetry import service
from hub.telemetry.schemas import DataPage, DeadLetterPublic, DeviceTelemetry, FleetTelemetry

router = APIRouter(prefix="/api/v1", tags=["telemetry"], dependencies=[AdminDep])

MAX_INTERVAL_S = 30 * 24 * 3600
Since = Annotated[
    AwareDatetime | None,
    Query(description="start of the range, with a time zone (default: an hour before until)"),
]
Until = Annotated[
    AwareDatetime | None, Query(description="end of the range, excluded (default: now)")
]
DeviceFilter = Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN.pattern)]


@router.get("/devices/{device_id}/telemetry")
def device_telemetry(
    session: SessionDep,
    device_id: str,
    since: Since = None,
    until: Until = None,
    interval_s: Annotated[
        int | None,
        Query(ge=1, le=MAX_INTERVAL_S, description="aggregate per interval of this length"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="points, without interval_s")] = 1000,
) -> DeviceTelemetry:
    """A device's telemetry by the device's time: its points, oldest first, or with
    ``interval_s`` per interval: points, average CPU, peak memory, lowest free disk, peak
    temperature, summed reconnects, and per model the summed inferences and errors and the
    worst p95. Intervals start at ``since`` (whole seconds); empty ones are left out."""
    span = service.time_range(since=since, until=until, now=utcnow(), interval_s=interval_s)
    return service.device_telemetry(
        session=session, device_id=device_id, span=span, interval_s=interval_s, limit=limit
    )


@router.get("/telemetry/fleet")
def fleet_telemetry(
    session: SessionDep,
    since: Since = None,
    until: Until = None,
    interval_s: Annotated[int, Query(ge=1, le=MAX_INTERVAL_S)] = 300,
) -> FleetTelemetry:
    """Every device's telemetry per interval: devices reporting, points, degraded points,
    average CPU and memory, summed inferences, errors and reconnects. Empty intervals are
    left out."""
    span = service.time_range(since=since, until=until, now=utcnow(), interval_s=interval_s)
    return service.fleet_telemetry(session=session, span=span, interval_s=interval_s)


@router.get("/data")
def data_records(
    session: SessionDep,
    model: Annotated[str | None, Query(max_length=63)] = None,
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION, description="needs model")] = None,
    device: DeviceFilter = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=1000, description="next_cursor")] = None,
) -> DataPage:
    """Collected scoring records (inputs, outputs, latency), newest first by the device's
    time; ``next_cursor`` fetches the next page."""
    span = service.time_range(since=since, until=until, now=utcnow(), interval_s=None)
    return service.data_records(
        session=session,
        span=span,
        model=model,
        version=version,
        device_id=device,
        limit=limit,
        cursor=cursor,
    )


@router.get("/dead-letters")
def dead_letters(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    device: DeviceFilter = None,
) -> list[DeadLetterPublic]:
    """Device messages the hub refused (malformed, on a channel it does not take), newest
    first, with the reason and the start of the payload."""
    return service.dead_letters(session=session, limit=limit, device_id=device)
