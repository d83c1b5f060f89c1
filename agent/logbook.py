"""The agent's recent log entries, kept on disk for the hub's ``logs`` command (``get_logs()``).

Each agent writes its own entries as JSON lines under ``<state_dir>/logs``, in a file that is
rotated once at a size bound (one previous file kept), so the entries survive the restart that
an operator most often wants to look behind, and never fill the disk.

Whose entry is it: the simulator runs thousands of agents in one process, all logging through
the same module loggers. One handler on the root logger routes each record to the log book in
the context it was emitted from (``current_logbook``); each agent sets it in ``Agent.run``, and
every task and thread it starts inherits it (asyncio copies the context into tasks and
``to_thread``). Records emitted outside any agent (the hub in a test, say) go nowhere.
"""

import logging
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from agent.errors import AgentError
from agent.protocol.messages import LogEntry, LogsResult

LOG_FILE = "agent.log"
_MAX_MESSAGE_CHARS = 4000  # a runaway message (a huge repr) is cut, not stored whole

current_logbook: ContextVar["LogBook | None"] = ContextVar("outpost_logbook", default=None)


@dataclass(frozen=True)
class LogQuery:
    tail: int = 100
    since: datetime | None = None
    min_level: int = logging.DEBUG


class LogBook:
    """One agent's log entries: appended from any thread, read for a ``logs`` command."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self._dir = directory
        self._path = directory / LOG_FILE
        self._previous = directory / f"{LOG_FILE}.1"
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._size: int | None = None
        # Entries that could not be written (full or read-only disk). Logging must never fail
        # the code that logs, and must not log about itself (that would recurse).
        self.write_errors = 0

    def append(self, entry: LogEntry) -> None:
        line = (entry.model_dump_json() + "\n").encode("utf-8")
        with self._lock:
            try:
                if self._size is None:
                    self._dir.mkdir(parents=True, exist_ok=True)
                    self._size = self._path.stat().st_size if self._path.exists() else 0
                if self._size + len(line) > self._max_bytes // 2:
                    # Two files of half the bound each: the bound holds, and a read right after
                    # a rotation still finds the last half of the entries.
                    self._path.replace(self._previous)
                    self._size = 0
                # Opened per entry: a simulated fleet of thousands holds no descriptor per
                # device, and entries are a few per minute.
                with self._path.open("ab") as f:
                    f.write(line)
                self._size += len(line)
            except OSError:
                self.write_errors += 1
                self._size = None

    def read(self, query: LogQuery, *, max_bytes: int) -> LogsResult:
        """The newest entries that match, oldest first, within ``query.tail`` and about
        ``max_bytes`` of JSON; ``more`` says older matching entries were left out."""
        with self._lock:
            lines = _read_lines(self._previous) + _read_lines(self._path)
        picked: list[LogEntry] = []
        size = 0
        more = False
        for line in reversed(lines):
            entry = _parse(line)
            if entry is None or not _matches(entry, query):
                continue
            if len(picked) == query.tail or size + len(line) > max_bytes:
                more = True
                break
            picked.append(entry)
            size += len(line)
        picked.reverse()
        return LogsResult(entries=picked, more=more)


def _read_lines(path: Path) -> list[bytes]:
    try:
        return path.read_bytes().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return []  # nothing was ever written there
    except OSError as exc:
        raise AgentError(f"cannot read the log book: {exc}") from None


def _parse(line: bytes) -> LogEntry | None:
    try:
        return LogEntry.model_validate_json(line)
    except ValidationError:
        return None  # a line torn by a crash or power loss mid-write: skip it, keep the rest


def _matches(entry: LogEntry, query: LogQuery) -> bool:
    if query.since is not None and entry.at < query.since:
        return False
    number = logging.getLevelName(entry.level)
    # A custom level's name reads back as "Level N": keep such entries rather than guess.
    return not isinstance(number, int) or number >= query.min_level


class LogBookHandler(logging.Handler):
    """Routes each record to the log book of the agent it was emitted for, if any."""

    def emit(self, record: logging.LogRecord) -> None:
        book = current_logbook.get()
        if book is None:
            return
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        book.append(
            LogEntry(
                at=datetime.fromtimestamp(record.created, UTC),
                level=record.levelname[:16],
                logger=record.name[:200],
                message=message[:_MAX_MESSAGE_CHARS],
            )
        )


_install_lock = threading.Lock()


def install_handler(level: int) -> None:
    """Put the routing handler on the root logger once per process; the lowest level asked
    for wins (each agent's loggers still filter by their own level first)."""
    root = logging.getLogger()
    with _install_lock:
        for handler in root.handlers:
            if isinstance(handler, LogBookHandler):
                handler.setLevel(min(handler.level, level))
                return
        handler = LogBookHandler(level)
        root.addHandler(handler)


def level_number(name: str) -> int:
    """``"warning"`` → ``logging.WARNING``; ValueError for a name logging does not know."""
    number = logging.getLevelName(name.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {name!r} (debug, info, warning, error, critical)")
    return number
