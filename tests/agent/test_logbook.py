"""The agent's log book: bounded on disk, read back by tail, time and level, and routed to the
right agent when many share one process (the simulator)."""

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.logbook import (
    LOG_FILE,
    LogBook,
    LogQuery,
    current_logbook,
    install_handler,
    level_number,
)
from agent.protocol.messages import LogEntry

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _entry(i: int, level: str = "INFO") -> LogEntry:
    return LogEntry(at=T0 + timedelta(seconds=i), level=level, logger="agent.core", message=f"m{i}")


def test_tail_since_and_level_pick_the_newest_matching_entries_oldest_first(
    tmp_path: Path,
) -> None:
    book = LogBook(tmp_path, max_bytes=1024 * 1024)
    for i in range(50):
        book.append(_entry(i, "WARNING" if i % 10 == 0 else "INFO"))

    tail = book.read(LogQuery(tail=3), max_bytes=10_000)
    assert [e.message for e in tail.entries] == ["m47", "m48", "m49"]
    assert tail.more

    since = book.read(LogQuery(tail=100, since=T0 + timedelta(seconds=45)), max_bytes=10_000)
    assert [e.message for e in since.entries] == ["m45", "m46", "m47", "m48", "m49"]
    assert not since.more

    warnings = book.read(LogQuery(tail=100, min_level=logging.WARNING), max_bytes=10_000)
    assert [e.message for e in warnings.entries] == ["m0", "m10", "m20", "m30", "m40"]


def test_the_answer_stays_under_its_byte_bound(tmp_path: Path) -> None:
    book = LogBook(tmp_path, max_bytes=1024 * 1024)
    for i in range(200):
        book.append(_entry(i))
    result = book.read(LogQuery(tail=1000), max_bytes=2_000)
    assert 0 < len(result.entries) < 200
    assert result.more
    assert sum(len(e.model_dump_json()) for e in result.entries) <= 2_000
    assert result.entries[-1].message == "m199"


def test_files_rotate_within_the_bound_and_keep_the_newest_entries(tmp_path: Path) -> None:
    book = LogBook(tmp_path, max_bytes=16 * 1024)
    for i in range(2_000):
        book.append(_entry(i))
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total <= 16 * 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOG_FILE, f"{LOG_FILE}.1"]
    kept = book.read(LogQuery(tail=1000), max_bytes=1024 * 1024).entries
    assert kept[-1].message == "m1999"
    numbers = [int(e.message[1:]) for e in kept]
    assert numbers == list(range(numbers[0], 2_000)), "a contiguous run of the newest entries"
    assert len(kept) > 50


def test_a_torn_line_from_a_crash_is_skipped_and_the_rest_is_read(tmp_path: Path) -> None:
    book = LogBook(tmp_path, max_bytes=1024 * 1024)
    book.append(_entry(1))
    with (tmp_path / LOG_FILE).open("ab") as f:
        f.write(b'{"at": "2026-12-03T12:00:02Z", "lev')  # power lost mid-write
    book2 = LogBook(tmp_path, max_bytes=1024 * 1024)
    with (tmp_path / LOG_FILE).open("ab") as f:
        f.write(b"\n")
    book2.append(_entry(3))
    assert [e.message for e in book2.read(LogQuery(), max_bytes=10_000).entries] == ["m1", "m3"]


def test_a_disk_that_refuses_writes_is_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_bytes(b"")  # a file where the directory should be
    book = LogBook(blocker, max_bytes=1024 * 1024)
    book.append(_entry(1))
    book.append(_entry(2))
    assert book.write_errors == 2
    assert book.read(LogQuery(), max_bytes=10_000).entries == []


async def _log_as(book: LogBook, name: str, logger: logging.Logger) -> None:
    current_logbook.set(book)

    async def in_a_task() -> None:
        logger.warning("from %s in a task", name)

    await asyncio.create_task(in_a_task())
    await asyncio.to_thread(logger.warning, "from %s in a thread", name)


def test_records_go_to_the_book_of_the_agent_they_were_emitted_for(tmp_path: Path) -> None:
    install_handler(logging.INFO)
    install_handler(logging.INFO)  # idempotent: one handler, or each entry would be kept twice
    books = {name: LogBook(tmp_path / name, max_bytes=1024 * 1024) for name in ("a", "b")}
    logger = logging.getLogger("agent.test_logbook")

    async def both() -> None:
        await asyncio.gather(*(_log_as(book, name, logger) for name, book in books.items()))

    asyncio.run(both())
    logger.warning("outside any agent")  # goes nowhere
    for name, book in books.items():
        messages = [e.message for e in book.read(LogQuery(), max_bytes=10_000).entries]
        assert messages == [f"from {name} in a task", f"from {name} in a thread"]


def test_level_names() -> None:
    assert level_number("warning") == logging.WARNING
    assert level_number("ERROR") == logging.ERROR
    with pytest.raises(ValueError, match="debug, info"):
        level_number("loud")
