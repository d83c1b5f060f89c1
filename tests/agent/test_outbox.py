"""The outbox on real SQLite files: seqs, the bound, acks, corrupt files, a full disk, SIGKILL."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from agent.outbox import SEQ_BLOCK, Outbox, OutboxLimits, restored, stored
from agent.protocol.messages import TelemetryRecord

ROOT = Path(__file__).resolve().parents[2]
ROOMY = OutboxLimits(max_records=1_000_000, max_bytes=1 << 30)


def record(n: int, size: int = 0) -> bytes:
    return json.dumps({"n": n, "pad": "x" * size}).encode()


def numbers(outbox: Outbox, stream: str = "dc") -> list[tuple[int, int]]:
    """(seq, n) of every record the stream holds, oldest first."""
    batch = outbox.batch(stream, max_records=1_000_000, max_bytes=1 << 30)  # type: ignore[arg-type]
    if batch is None:
        return []
    return [(r.seq, json.loads(r.data)["n"]) for r in batch.records]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


def test_seqs_continue_across_reopen_and_are_never_reused(path: Path) -> None:
    outbox = Outbox(path, ROOMY)
    assert outbox.append("dc", [record(1), record(2), record(3)]) == [1, 2, 3]
    assert outbox.append("tm", [record(1)]) == [1]  # each stream counts on its own
    assert outbox.ack("dc", 3) == 3
    outbox.close()

    reopened = Outbox(path, ROOMY)
    assert reopened.backlog("dc") == 0
    assert reopened.first_kept("dc") == 4
    assert reopened.append("dc", [record(4)]) == [4]
    assert reopened.append("tm", [record(2)]) == [2]


def test_ack_deletes_up_to_its_seq_and_ignores_stale_or_future_seqs(path: Path) -> None:
    outbox = Outbox(path, ROOMY)
    outbox.append("dc", [record(n) for n in range(1, 6)])
    assert outbox.ack("dc", 2) == 2
    assert outbox.ack("dc", 1) == 0  # a late duplicate of an older ack
    assert numbers(outbox) == [(3, 3), (4, 4), (5, 5)]
    assert outbox.ack("dc", 99) == 3  # past the newest: everything held
    assert outbox.backlog("dc") == 0
    assert outbox.backlog_bytes("dc") == 0
    assert outbox.append("dc", [record(6)]) == [6]


def test_the_bound_drops_the_oldest_records_and_counts_them_across_restarts(path: Path) -> None:
    limits = OutboxLimits(max_records=5, max_bytes=1 << 30)
    outbox = Outbox(path, limits)
    outbox.append("dc", [record(n) for n in range(1, 4)])
    outbox.append("dc", [record(n) for n in range(4, 9)])
    assert numbers(outbox) == [(s, s) for s in range(4, 9)]
    assert outbox.dropped("dc") == 3
    assert outbox.first_kept("dc") == 4
    outbox.close()

    reopened = Outbox(path, limits)
    assert reopened.dropped("dc") == 3
    reopened.append("dc", [record(9)])
    assert reopened.dropped("dc") == 4
    assert reopened.first_kept("dc") == 5


def test_the_byte_bound_keeps_the_newest_that_fit(path: Path) -> None:
    one = len(record(0, size=100))
    outbox = Outbox(path, OutboxLimits(max_records=1000, max_bytes=3 * one))
    for n in range(1, 8):
        outbox.append("dc", [record(n, size=100)])
    assert [s for s, _ in numbers(outbox)] == [5, 6, 7]
    assert outbox.backlog_bytes("dc") == 3 * one
    assert outbox.dropped("dc") == 4


def test_a_record_alone_over_the_byte_bound_is_still_kept(path: Path) -> None:
    outbox = Outbox(path, OutboxLimits(max_records=1000, max_bytes=50))
    outbox.append("dc", [record(1), record(2, size=200)])
    assert [s for s, _ in numbers(outbox)] == [2]
    assert outbox.dropped("dc") == 1


def test_first_kept_tells_the_hub_where_the_stream_starts_after_drops(path: Path) -> None:
    outbox = Outbox(path, OutboxLimits(max_records=3, max_bytes=1 << 30))
    outbox.append("tm", [record(n) for n in range(1, 11)])
    batch = outbox.batch("tm", max_records=2, max_bytes=1 << 30)
    assert batch is not None
    assert (batch.first_kept, [r.seq for r in batch.records]) == (8, [8, 9])
    outbox.ack("tm", 10)
    assert outbox.first_kept("tm") == 11  # empty: everything below the next seq is done


def test_a_batch_respects_records_and_bytes_but_always_holds_one(path: Path) -> None:
    outbox = Outbox(path, ROOMY)
    outbox.append("dc", [record(n, size=100) for n in range(1, 11)])
    one = len(record(1, size=100))
    by_bytes = outbox.batch("dc", max_records=100, max_bytes=3 * (one + 5), record_overhead=5)
    assert by_bytes is not None
    assert [r.seq for r in by_bytes.records] == [1, 2, 3]
    tiny = outbox.batch("dc", max_records=100, max_bytes=1)
    assert tiny is not None
    assert [r.seq for r in tiny.records] == [1]
    by_count = outbox.batch("dc", max_records=4, max_bytes=1 << 30)
    assert by_count is not None
    assert by_count.last_seq == 4
    assert outbox.batch("tm", max_records=4, max_bytes=1 << 30) is None


def test_a_record_is_stored_without_its_seq_and_read_back_with_it(path: Path) -> None:
    fields = {"at": "2025-01-01T00:00:00Z", "interval_s": 60, "uptime_s": 5}
    data = stored(TelemetryRecord, fields)
    assert "seq" not in json.loads(data)
    outbox = Outbox(path, ROOMY)
    outbox.append("tm", [data, data])
    batch = outbox.batch("tm", max_records=10, max_bytes=1 << 20)
    assert batch is not None
    assert [restored(TelemetryRecord, r).seq for r in batch.records] == [1, 2]


def test_a_file_that_is_not_a_database_is_moved_aside_and_seqs_go_on(path: Path) -> None:
    outbox = Outbox(path, ROOMY)
    outbox.append("dc", [record(n) for n in range(1, 6)])
    outbox.close()
    path.write_bytes(b"this is no SQLite file" * 500)

    reopened = Outbox(path, ROOMY)
    assert reopened.resets == 1
    assert (path.parent / "outbox.db.corrupt").read_bytes().startswith(b"this is no SQLite")
    # The hub holds seqs 1..5 of this device already: new records must come after them.
    (seq,) = reopened.append("dc", [record(6)])
    assert seq > 5
    assert reopened.first_kept("dc") == seq
    reopened.close()
    assert Outbox(path, ROOMY).resets == 1  # counted once, and kept


def test_a_damaged_page_is_found_at_open_and_the_file_replaced(path: Path) -> None:
    outbox = Outbox(path, ROOMY)
    outbox.append("dc", [record(n, size=500) for n in range(1, 200)])
    outbox.close()
    with path.open("r+b") as f:  # scribble over the b-tree pages past the first
        f.seek(2 * 4096)
        f.write(b"\xff" * 4 * 4096)

    reopened = Outbox(path, ROOMY)
    assert reopened.resets == 1
    assert reopened.backlog("dc") == 0
    assert reopened.append("dc", [record(1)])[0] > 199


def test_corruption_found_while_running_replaces_the_file_and_counts_what_it_held(
    path: Path,
) -> None:
    outbox = Outbox(path, ROOMY)
    outbox.append("dc", [record(n, size=500) for n in range(1, 201)])
    with closing(sqlite3.connect(path)) as db:  # the records into the main file, out of the WAL
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with path.open("r+b") as f:
        f.seek(2 * 4096)
        f.write(b"\xff" * 4 * 4096)

    assert outbox.batch("dc", max_records=1000, max_bytes=1 << 30) is None
    assert outbox.resets == 1
    assert outbox.dropped("dc") == 200  # lost with the file, and said so
    assert outbox.append("dc", [record(201)])[0] > 200


def test_an_unopenable_outbox_path_is_moved_aside(path: Path) -> None:
    path.mkdir()  # a directory where the file should be: SQLite cannot open it
    outbox = Outbox(path, ROOMY)
    assert outbox.resets == 1
    assert outbox.append("tm", [record(1)]) == [1]
    assert (path.parent / "outbox.db.corrupt").is_dir()


def test_seqs_go_on_when_the_reservation_file_is_lost(path: Path) -> None:
    outbox = Outbox(path, ROOMY)
    outbox.append("dc", [record(n) for n in range(1, 4)])
    outbox.close()
    (path.parent / "outbox.seq.json").write_text("{not json")
    reopened = Outbox(path, ROOMY)
    assert reopened.append("dc", [record(4)]) == [4]  # the database's own counter rules
    reservations = json.loads((path.parent / "outbox.seq.json").read_text())
    assert reservations["reserved"]["dc"] == 4 + SEQ_BLOCK


def test_a_full_file_drops_and_counts_the_record_and_the_outbox_keeps_working(
    path: Path,
) -> None:
    # SQLite answers SQLITE_FULL at its page cap exactly as on a full disk (ENOSPC).
    outbox = Outbox(path, OutboxLimits(1_000_000, 1 << 30, max_file_bytes=64 * 1024))
    stored_seqs: list[int] = []
    refused = 0
    for n in range(200):
        seqs = outbox.append("dc", [record(n, size=1000)])
        stored_seqs += seqs
        refused += not seqs
    assert refused > 0
    assert outbox.dropped("dc") == refused
    assert stored_seqs == list(range(1, len(stored_seqs) + 1)), "a refused record takes no seq"
    outbox.ack("dc", stored_seqs[-1])  # the hub took what was kept: room again
    assert outbox.append("dc", [record(999, size=1000)]) == [len(stored_seqs) + 1]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs), where a full disk is a real ENOSPC."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        # Lazy: detached even when a failed test left a file open on it.
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_drops_and_counts_records_and_appends_resume_once_space_is_freed(
    small_disk: Path,
) -> None:
    outbox = Outbox(small_disk / "outbox.db", ROOMY)
    outbox.append("dc", [record(0)])
    filler = small_disk / "filler"  # what filled the disk: logs, a model, anything
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 64 * 1024))
    results = [outbox.append("dc", [record(n, size=1000)]) for n in range(1, 101)]
    refused = sum(not seqs for seqs in results)
    assert refused > 0
    assert outbox.dropped("dc") == refused

    filler.unlink()
    (seq,) = outbox.append("dc", [record(101)])
    assert seq == 1 + sum(bool(seqs) for seqs in results) + 1  # no seq was spent on a refusal
    outbox.close()
    reopened = Outbox(small_disk / "outbox.db", ROOMY)
    assert reopened.dropped("dc") == refused  # persisted once the disk had room again
    reopened.close()


_CHILD = """
import sys
from pathlib import Path
from agent.outbox import Outbox, OutboxLimits

outbox = Outbox(Path(sys.argv[1]), OutboxLimits(max_records=10**6, max_bytes=1 << 30))
n = 0
while True:
    n += 1
    (seq,) = outbox.append("dc", [b'{"n": %d}' % n])
    print(seq, n, flush=True)
"""


def test_a_sigkilled_writer_loses_no_record_it_appended(path: Path) -> None:
    confirmed: list[tuple[int, int]] = []
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        try:
            for line in child.stdout:
                seq, n = map(int, line.split())
                confirmed.append((seq, n))
                if len(confirmed) == 300:
                    break
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
    assert child.returncode == -signal.SIGKILL
    assert len(confirmed) == 300

    outbox = Outbox(path, ROOMY)
    held = numbers(outbox)
    # Everything confirmed is there, and anything appended after the last line too.
    assert held[: len(confirmed)] == confirmed
    assert [s for s, _ in held] == list(range(1, len(held) + 1))
    assert outbox.append("dc", [record(0)]) == [len(held) + 1]


def test_the_file_is_in_wal_mode(path: Path) -> None:
    Outbox(path, ROOMY).close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
