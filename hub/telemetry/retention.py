"""Deleting telemetry, data-collection records and dead letters past the retention.

Age is counted from ``received_at``, the hub's clock: a device with a wrong clock must not have
its records deleted on arrival, nor kept for ever. Rows go in chunks, each in its own commit,
and one sweep deletes a bounded number of chunks: the worker that sweeps also stores incoming
messages, so a first sweep over months of data must not hold SQLite's write lock (and ingest)
for minutes. Ack cursors are kept: one row per device and stream, and what tells a device's
later batches where the hub stands.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlmodel import Session, col

from hub.telemetry.models import (
    CollectedRecord,
    DeadLetter,
    IngestRefused,
    TelemetryPoint,
)

logger = logging.getLogger(__name__)

SWEEP_CHUNK_ROWS = 10_000
SWEEP_MAX_CHUNKS = 10


@dataclass(frozen=True)
class Swept:
    deleted: dict[str, int]  # rows deleted, per table
    done: bool  # False: rows past the retention are left for the next sweep


def _delete_older(
    session: Session, model: Any, cutoff: datetime, chunk_rows: int, max_chunks: int
) -> tuple[int, bool]:
    received_at = col(model.received_at)
    deleted = 0
    for _ in range(max_chunks):
        # The received_at of the chunk's last row: everything up to it goes (rows of one batch
        # share a received_at, so a chunk may be a little larger than chunk_rows).
        bound = session.scalars(
            select(received_at)
            .where(received_at < cutoff)
            .order_by(received_at)
            .offset(chunk_rows - 1)
            .limit(1)
        ).first()
        statement = delete(model).where(received_at < cutoff)
        if bound is not None:
            statement = statement.where(received_at <= bound)
        result = session.execute(statement)
        session.commit()
        deleted += int(result.rowcount)  # type: ignore[attr-defined]
        if bound is None:
            return deleted, True
    return deleted, False


def sweep(
    session: Session,
    *,
    retention_days: int,
    now: datetime,
    chunk_rows: int = SWEEP_CHUNK_ROWS,
    max_chunks: int = SWEEP_MAX_CHUNKS,
) -> Swept:
    """Delete telemetry points, collected records and dead letters received more than
    ``retention_days`` before ``now``, at most ``max_chunks`` chunks of each."""
    cutoff = now - timedelta(days=retention_days)
    deleted: dict[str, int] = {}
    done = True
    for model in (TelemetryPoint, CollectedRecord, DeadLetter, IngestRefused):
        count, finished = _delete_older(session, model, cutoff, chunk_rows, max_chunks)
        deleted[str(model.__tablename__)] = count
        done = done and finished
    if any(deleted.values()):
        logger.info(
            "deleted expired telemetry",
            extra={"cutoff": cutoff.isoformat(), "done": done, **deleted},
        )
    return Swept(deleted=deleted, done=done)
