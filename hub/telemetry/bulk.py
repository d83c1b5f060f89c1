"""Inserting many rows through the database driver, skipping rows whose primary key is stored
already (a resend, a QoS 1 redelivery, another replica's insert).

At ingest rates SQLAlchemy's per-row parameter processing (type processors, parameter
construction) cost more than the writes themselves: about two thirds of the hub's time for a
telemetry record. Rows here go to the driver's ``executemany`` as tuples, converted the way the
column types would convert them (the same stored representation, so SQLAlchemy reads them back
unchanged): times as SQLAlchemy's SQLite format or as aware datetimes for PostgreSQL, JSON as
JSON text or psycopg's ``Json``.
"""

import functools
import json
import operator
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Json
from sqlalchemy import JSON, Connection, Table

from hub.database import UTCDateTime

Convert = Callable[[Any], Any]


class RawJson(str):
    """JSON text already serialised (by pydantic, from the message's own models), written as
    it is instead of being parsed and serialised again."""


@functools.lru_cache(maxsize=4096)
def _sqlite_time(value: datetime | None) -> str | None:
    # Cached: every row of a group shares its received_at.
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    # SQLAlchemy's SQLite DATETIME format, microseconds always written: stored times compare
    # as text there, so every writer must use the same one. isoformat is C and several times
    # faster than strftime: "2026-12-03 17:03:26.123000+00:00" without its offset.
    text = value.isoformat(" ")[:-6]
    return text if value.microsecond else text + ".000000"


def _sqlite_json(value: Any) -> str:
    if isinstance(value, RawJson):
        return str(value)
    return json.dumps(value)  # None as JSON null, as SQLAlchemy's JSON type writes it


def _as_is(text: str) -> str:
    return text


def _pg_json(value: Any) -> Json:
    if isinstance(value, RawJson):
        return Json(str(value), dumps=_as_is)
    return Json(value)


_CONVERTERS: dict[str, dict[type, Convert]] = {
    "sqlite": {UTCDateTime: _sqlite_time, JSON: _sqlite_json},
    "postgresql": {JSON: _pg_json},
}


@functools.cache
def _plan(
    dialect: str, table: Table, columns: tuple[str, ...]
) -> tuple[str, tuple[Convert | None, ...]]:
    # Every name comes from the table's own metadata (an unknown column raises KeyError here),
    # never from a message.
    types = [type(table.c[c].type) for c in columns]
    keys = ", ".join(c.name for c in table.primary_key.columns)
    mark = "?" if dialect == "sqlite" else "%s"
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)})"  # noqa: S608 - names from metadata
        f" VALUES ({', '.join([mark] * len(columns))}) ON CONFLICT ({keys}) DO NOTHING"
    )
    by_type = _CONVERTERS.get(dialect)
    if by_type is None:
        raise NotImplementedError(f"telemetry ingest does not support {dialect}")
    converters = tuple(by_type.get(t) for t in types)
    return sql, converters


def insert_ignoring_duplicates(
    connection: Connection, table: Table, rows: Sequence[dict[str, Any]]
) -> None:
    """Insert ``rows`` (all with the same keys) into ``table``, skipping any whose primary key
    is stored already."""
    if not rows:
        return
    columns = tuple(rows[0])
    sql, converters = _plan(connection.dialect.name, table, columns)
    take = operator.itemgetter(*columns)
    convert = [(i, c) for i, c in enumerate(converters) if c is not None]
    params = []
    for row in rows:
        values = list(take(row))
        for i, conv in convert:
            values[i] = conv(values[i])
        params.append(tuple(values))
    connection.exec_driver_sql(sql, params)
