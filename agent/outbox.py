"""The outbox: a bounded on-disk queue, per stream, of records waiting for the hub's ack.

One SQLite file (``outbox.db``, WAL) holds every stream. ``append`` gives each record the next
seq of its stream; ``batch`` reads the oldest; ``ack`` deletes up to a seq the hub says it has
stored. The kept seqs of a stream are always one contiguous run ``first_kept .. next_seq - 1``:
records leave only from the old end (acked, or dropped by the bound), so the hub can acknowledge
everything below ``first_kept`` without waiting for records that will never come.

Durability: ``synchronous=FULL``, so an append has reached the disk when it returns. A SIGKILL
loses nothing appended (NORMAL would give that too: the WAL is in the page cache), and a power
cut loses only the commit under way, on storage that honours fsync (cheap SD cards may not).
FULL is chosen over NORMAL because NORMAL lets a power cut roll back commits whose records the
hub may already hold: the counter would then hand their seqs out again, and the hub,
de-duplicating by ``(device_id, seq)``, would silently throw the new records away. The cost is an
fsync per commit; commits are few (one telemetry record an interval, one data-collection flush
at a time), and the agent makes every call from a worker thread, so the fsync never stalls the
event loop or ``/score``.

A corrupt or unreadable file is moved aside (``outbox.db.corrupt``, the latest only) and a new
one started; the records it held are lost and counted as dropped when known (found while
running), and the reset is counted.

Seqs are never reused, not even when a corrupt file is replaced by an empty one: blocks of seqs
are reserved in a small side file (``outbox.seq.json``, written atomically) before any seq of the
block is committed, and a new file starts after the reservation.

Records are stored without their seq (it is the key) and get it back when read: see ``stored``
and ``restored``.
"""

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from agent.atomic import write_atomic

logger = logging.getLogger(__name__)

Stream = Literal["tm", "dc"]
STREAMS: tuple[Stream, ...] = ("tm", "dc")
# Seqs reserved per write of the side file: one fsync'd write per this many records.
SEQ_BLOCK = 10_000
PAGE_BYTES = 4096

_R = TypeVar("_R", bound=BaseModel)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    name TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS records (
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS notes (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class OutboxError(Exception):
    """The outbox cannot be opened, not even as a new empty file: records are dropped."""


@dataclass(frozen=True)
class OutboxLimits:
    """The bound of each stream; the oldest records go first when it is hit."""

    max_records: int
    max_bytes: int  # of stored record JSON
    # A hard cap on the file itself (SQLite's max_page_count), whatever the accounting says.
    max_file_bytes: int | None = None


@dataclass(frozen=True)
class StoredRecord:
    seq: int
    data: bytes  # the record's JSON without its seq


@dataclass(frozen=True)
class Batch:
    first_kept: int  # the oldest seq the stream still holds
    records: list[StoredRecord]

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq


@dataclass
class _StreamState:
    """The in-memory mirror of a stream, read without the lock (stale by one commit at most)."""

    next_seq: int = 1
    first_kept: int = 1
    count: int = 0
    bytes: int = 0
    dropped: int = 0  # persisted: bound drops, and records a full disk refused


def stored(record_type: type[_R], fields: dict[str, Any]) -> bytes:
    """A record's JSON as the outbox keeps it: validated now, so nothing the hub would refuse
    enters the outbox, and without the seq, which ``append`` assigns."""
    # Any valid seq does for the validation; it is not what is stored.
    record = record_type.model_validate({**fields, "seq": 1})
    return record.model_dump_json(exclude={"seq"}).encode()


def restored(record_type: type[_R], record: StoredRecord) -> _R:
    """The record as sent, with its seq; raises ``ValueError`` when it no longer validates."""
    try:
        return record_type.model_validate({**json.loads(record.data), "seq": record.seq})
    except (ValueError, TypeError) as exc:  # not JSON, not an object, not valid
        raise ValueError(
            f"stored record {record.seq} is not a valid {record_type.__name__}: {exc}"
        ) from None


class Outbox:
    """The queue itself. Thread-safe: every call takes one lock; the agent calls from a worker
    thread, since a commit waits for the disk."""

    def __init__(self, path: Path, limits: OutboxLimits) -> None:
        """Open ``path``, or move it aside and start a new one when it is corrupt or unreadable.

        Raises ``OutboxError`` when not even a new file can be made (a read-only or full disk).
        """
        self.path = path
        self.limits = limits
        self._seq_file = path.with_name(path.stem + ".seq.json")
        self._lock = threading.Lock()
        self._streams = {s: _StreamState() for s in STREAMS}
        self._reserved: dict[str, int] = {}
        self.resets = 0  # corrupt or unreadable files moved aside, since install
        self._load_reservations()
        self._db = self._open_or_reset()

    # -- what the agent reads -------------------------------------------------------------

    def backlog(self, stream: Stream) -> int:
        """Records waiting for the hub's ack."""
        return self._streams[stream].count

    def backlog_bytes(self, stream: Stream) -> int:
        return self._streams[stream].bytes

    def dropped(self, stream: Stream) -> int:
        """Records lost since install: dropped by the bound, or refused by a full disk."""
        return self._streams[stream].dropped

    def last_seq(self, stream: Stream) -> int:
        """The newest seq handed out (0 before the first)."""
        return self._streams[stream].next_seq - 1

    def first_kept(self, stream: Stream) -> int:
        return self._streams[stream].first_kept

    # -- operations ------------------------------------------------------------------------

    def append(
        self, stream: Stream, records: Sequence[bytes], *, note: tuple[str, str] | None = None
    ) -> list[int]:
        """Store ``records`` (see ``stored``) with the next seqs, and ``note`` in the same commit.

        Returns their seqs, or ``[]`` when they could not be stored (full disk, I/O error): they
        are then counted as dropped and the caller goes on. The oldest records are dropped when
        the stream's bound is hit.
        """
        if not records:
            return []
        with self._lock:
            try:
                return self._append(stream, records, note)
            except sqlite3.DatabaseError as exc:
                if not _is_corruption(exc):
                    self._refused(stream, len(records), exc)
                    return []
                self._reset(exc)
            except OSError as exc:  # writing the side file: a full disk, most likely
                self._refused(stream, len(records), exc)
                return []
            try:  # into the new file
                return self._append(stream, records, note)
            except (sqlite3.DatabaseError, OSError) as exc:
                self._refused(stream, len(records), exc)
                return []

    def batch(
        self, stream: Stream, *, max_records: int, max_bytes: int, record_overhead: int = 0
    ) -> Batch | None:
        """The oldest records of ``stream``: at most ``max_records``, and at most ``max_bytes``
        counting ``record_overhead`` more for each (what a message adds per record), but always
        at least one; None when the stream is empty."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT seq, data FROM records WHERE stream = ? ORDER BY seq LIMIT ?",
                    (stream, max_records),
                )
                records: list[StoredRecord] = []
                size = 0
                for seq, data in rows:
                    size += len(data) + record_overhead
                    if records and size > max_bytes:
                        break
                    records.append(StoredRecord(seq, data))
                rows.close()
            except sqlite3.DatabaseError as exc:
                self._on_error("read", exc)
                return None
            if not records:
                return None
            return Batch(first_kept=records[0].seq, records=records)

    def ack(self, stream: Stream, seq: int) -> int:
        """Delete every record of ``stream`` up to ``seq``; returns how many went."""
        return self._remove(stream, seq, dropped=False)

    def discard(self, stream: Stream, seq: int) -> int:
        """Delete every record up to ``seq`` as dropped (a record that can no longer be sent
        must not hold the stream back)."""
        return self._remove(stream, seq, dropped=True)

    def note(self, name: str) -> str | None:
        """A value stored with ``append(..., note=...)``."""
        with self._lock:
            try:
                row = self._db.execute("SELECT value FROM notes WHERE name = ?", (name,)).fetchone()
            except sqlite3.DatabaseError as exc:
                self._on_error("read", exc)
                return None
            return str(row[0]) if row is not None else None

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

    # -- inside the lock ---------------------------------------------------------------------

    def _append(
        self, stream: Stream, records: Sequence[bytes], note: tuple[str, str] | None
    ) -> list[int]:
        state = self._streams[stream]
        first = state.next_seq
        seqs = list(range(first, first + len(records)))
        new_bytes = sum(len(r) for r in records)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if seqs[-1] > self._reserved.get(stream, 0):
                # On disk before any seq of the block is: a new file never starts below it.
                self._reserve(stream, seqs[-1] + SEQ_BLOCK)
            db.executemany(
                "INSERT INTO records (stream, seq, data) VALUES (?, ?, ?)",
                [(stream, s, r) for s, r in zip(seqs, records, strict=True)],
            )
            if note is not None:
                db.execute("INSERT OR REPLACE INTO notes (name, value) VALUES (?, ?)", note)
            count, size = state.count + len(seqs), state.bytes + new_bytes
            first_kept = state.first_kept if state.count else first
            cut, cut_bytes = self._over_bound(stream, count, size)
            if cut:
                db.execute(
                    "DELETE FROM records WHERE stream = ? AND seq < ?", (stream, first_kept + cut)
                )
            db.execute(
                "UPDATE streams SET next_seq = ?, dropped = ? WHERE name = ?",
                (seqs[-1] + 1, state.dropped + cut, stream),
            )
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        state.next_seq = seqs[-1] + 1
        state.first_kept = first_kept + cut
        state.count = count - cut
        state.bytes = size - cut_bytes
        if cut:
            state.dropped += cut
            logger.warning(
                "outbox bound hit: dropped the oldest %d %s records",
                cut,
                stream,
                extra={"stream": stream, "dropped": cut, "total_dropped": state.dropped},
            )
        return seqs

    def _over_bound(self, stream: Stream, count: int, size: int) -> tuple[int, int]:
        """How many of the oldest records to drop, and their bytes, to get within the bound.

        The records just appended may go too when one append is over the bound by itself, but
        the newest record always stays, even alone over the byte bound.
        """
        limits = self.limits
        cut, cut_bytes = 0, 0
        if count <= limits.max_records and size <= limits.max_bytes:
            return cut, cut_bytes
        rows = self._db.execute(
            "SELECT length(data) FROM records WHERE stream = ? ORDER BY seq", (stream,)
        )
        try:
            for (length,) in rows:
                within = count - cut <= limits.max_records and size - cut_bytes <= limits.max_bytes
                if within or cut == count - 1:
                    break
                cut += 1
                cut_bytes += int(length)
        finally:
            rows.close()
        return cut, cut_bytes

    def _remove(self, stream: Stream, seq: int, *, dropped: bool) -> int:
        with self._lock:
            state = self._streams[stream]
            if state.count == 0 or seq < state.first_kept:
                return 0
            seq = min(seq, state.next_seq - 1)
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    gone, gone_bytes = db.execute(
                        "SELECT count(*), coalesce(sum(length(data)), 0) FROM records"
                        " WHERE stream = ? AND seq <= ?",
                        (stream, seq),
                    ).fetchone()
                    db.execute("DELETE FROM records WHERE stream = ? AND seq <= ?", (stream, seq))
                    if dropped:
                        db.execute(
                            "UPDATE streams SET dropped = ? WHERE name = ?",
                            (state.dropped + gone, stream),
                        )
                    db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.DatabaseError as exc:
                # Not deleted: the records are sent again and the hub acks them again.
                self._on_error("delete", exc)
                return 0
            state.first_kept = seq + 1
            state.count -= gone
            state.bytes -= gone_bytes
            if dropped:
                state.dropped += gone
            return int(gone)

    def _refused(self, stream: Stream, n: int, exc: Exception) -> None:
        """Records that could not be stored: counted, so the loss is reported, never silent."""
        state = self._streams[stream]
        state.dropped += n
        logger.error(
            "outbox could not store %d %s records, dropped: %s",
            n,
            stream,
            exc,
            extra={"stream": stream, "dropped": n},
        )
        # Persisted when the disk allows; otherwise the count is kept in memory until it does.
        with contextlib.suppress(sqlite3.Error):
            self._db.execute(
                "UPDATE streams SET dropped = ? WHERE name = ?", (state.dropped, stream)
            )

    def _on_error(self, what: str, exc: sqlite3.DatabaseError) -> None:
        if _is_corruption(exc):
            self._reset(exc)
        else:
            logger.error("outbox %s failed: %s", what, exc)

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    # -- the file ----------------------------------------------------------------------------

    def _open_or_reset(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.DatabaseError as exc:
            if not _is_unusable_file(exc):
                # A full disk or an I/O error says nothing against the file: keep it.
                raise OutboxError(f"cannot open the outbox at {self.path}: {exc}") from exc
            self._move_aside(exc)
        try:
            return self._open()
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"cannot create a new outbox at {self.path}: {exc}") from exc

    def _reset(self, exc: sqlite3.DatabaseError) -> None:
        """Corruption found while running: the same as at start-up, without a restart."""
        lost = {s: state.dropped + state.count for s, state in self._streams.items()}
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._move_aside(exc)
        self._streams = {s: _StreamState() for s in STREAMS}
        try:
            self._db = self._open()
            # What the bad file held is lost: it counts as dropped, so the hub hears of it.
            for stream, n in lost.items():
                self._streams[stream].dropped = n
                self._db.execute("UPDATE streams SET dropped = ? WHERE name = ?", (n, stream))
        except (sqlite3.Error, OSError) as err:
            raise OutboxError(f"cannot create a new outbox at {self.path}: {err}") from err

    def _move_aside(self, exc: Exception) -> None:
        """Keep the bad file for a person to look at (only the latest, so a disk that keeps
        corrupting it does not fill up), and count it."""
        aside = self.path.with_name(self.path.name + ".corrupt")
        logger.error(
            "outbox %s is corrupt or unreadable (%s); moved to %s, starting a new one",
            self.path,
            exc,
            aside,
        )
        for suffix in ("", "-wal", "-shm"):
            source = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(FileNotFoundError):
                source.replace(aside.with_name(aside.name + suffix))
        self.resets += 1
        with contextlib.suppress(OSError):
            self._save_reservations()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            # The WAL file shrinks back after a burst instead of keeping its largest size.
            db.execute("PRAGMA journal_size_limit=4194304")
            if self.limits.max_file_bytes is not None:
                db.execute(
                    f"PRAGMA max_page_count={max(8, self.limits.max_file_bytes // PAGE_BYTES)}"
                )
            (check,) = db.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            db.executescript(_SCHEMA)
            for stream in STREAMS:
                # A new file continues after every seq ever reserved, so none is reused.
                db.execute(
                    "INSERT OR IGNORE INTO streams (name, next_seq) VALUES (?, ?)",
                    (stream, self._reserved.get(stream, 0) + 1),
                )
            self._load_streams(db)
        except BaseException:
            db.close()
            raise
        return db

    def _load_streams(self, db: sqlite3.Connection) -> None:
        for name, next_seq, dropped in db.execute("SELECT name, next_seq, dropped FROM streams"):
            if name not in self._streams:
                continue
            count, size, first = db.execute(
                "SELECT count(*), coalesce(sum(length(data)), 0), min(seq) FROM records"
                " WHERE stream = ?",
                (name,),
            ).fetchone()
            self._streams[name] = _StreamState(
                next_seq=next_seq,
                first_kept=first if first is not None else next_seq,
                count=count,
                bytes=size,
                dropped=dropped,
            )
            # A lost or stale side file must not let a later reset go below this file's seqs.
            self._reserved[name] = max(self._reserved.get(name, 0), next_seq - 1)

    def _reserve(self, stream: Stream, up_to: int) -> None:
        before = self._reserved.get(stream, 0)
        self._reserved[stream] = up_to
        try:
            self._save_reservations()
        except BaseException:
            self._reserved[stream] = before
            raise

    def _save_reservations(self) -> None:
        doc = {"reserved": self._reserved, "resets": self.resets}
        write_atomic(self._seq_file, json.dumps(doc, sort_keys=True).encode())

    def _load_reservations(self) -> None:
        try:
            doc = json.loads(self._seq_file.read_bytes())
            self._reserved = {s: int(doc["reserved"].get(s, 0)) for s in STREAMS}
            self.resets = int(doc.get("resets", 0))
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            # The database's own counters still rule; only a reset needs this file.
            logger.error("outbox seq reservations unreadable, using the database's: %s", exc)


def _code(exc: sqlite3.DatabaseError) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF  # the primary code of an extended one


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    code = _code(exc)
    if code is None:
        return type(exc) is sqlite3.DatabaseError  # our own quick_check verdict
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _is_unusable_file(exc: sqlite3.DatabaseError) -> bool:
    """Corrupt, or a file this process cannot open or write: moved aside for a new one."""
    return _is_corruption(exc) or _code(exc) in (
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_READONLY,
    )
