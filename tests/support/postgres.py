"""PostgreSQL for tests: the machine's server (127.0.0.1:5432, trust auth, database ``test``),
each test in a schema of its own so parallel runs and other suites never share tables."""

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pg_available() -> bool:
    try:
        probe = create_engine(PG_URL, connect_args={"connect_timeout": 2})
        with probe.connect():
            pass
        probe.dispose()
    except Exception:  # any failure to connect means: skip the PostgreSQL tests
        return False
    return True


@contextmanager
def pg_schema() -> Iterator[str]:
    """A database URL whose search path is a new, empty schema; dropped afterwards."""
    schema = f"hub_test_{secrets.token_hex(4)}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
