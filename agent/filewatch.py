"""Knowing that a file may have changed without a system call per look: Linux inotify on the
file's folder, its events read by the asyncio loop.

The scoring endpoint checks its key file on every request. A ``stat`` each time was measured at
~10-25 µs of a request's latency on a cold VM (a system call the bare server does not make);
with a watch, a request reads one attribute, and only a request after an event pays the
``stat``. Where inotify is not there (not Linux, no libc, the folder cannot be watched, no event
loop running), ``FileWatch`` says "look" every time, which is the ``stat`` per request again.

Events of every kind that can change what a ``stat`` sees are watched: a file renamed over the
watched one (``outpost-agent key rotate``), written in place, touched or removed, and the
folder itself going away or the event queue overflowing (then every look is a real one).
"""

import asyncio
import ctypes
import logging
import os
import struct
from pathlib import Path

logger = logging.getLogger(__name__)

_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_WATCHED = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
)
_WATCH_LOST = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED  # the folder's watch is over
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_READ_BYTES = 64 * 1024


class FileWatch:
    """Whether ``path`` may have changed since the last ``look()`` said so.

    ``start()`` (on the loop that is to read the events) turns the watch on; until it is on,
    and after it is lost, every ``look()`` is True. Not thread-safe beyond the flag itself:
    meant for one event loop's thread.
    """

    def __init__(self, path: Path) -> None:
        self._folder = path.parent
        self._name = os.fsencode(path.name)
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty = True

    @property
    def watching(self) -> bool:
        """Whether events are being read (else every look is a real one)."""
        return self._fd is not None and self._loop is not None and self._loop.is_running()

    def look(self) -> bool:
        """True when the file may have changed since the last True (and always while not
        watching): the caller then looks at the file itself."""
        if self._dirty or not self.watching:
            self._dirty = False
            return True
        return False

    def start(self) -> bool:
        """Watch from the running loop; False (and looks stay real) when that cannot be."""
        if self._fd is not None:
            return self.watching
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        fd = _inotify_watch(self._folder)
        if fd is None:
            return False
        self._fd, self._loop = fd, loop
        loop.add_reader(fd, self._events)
        self._dirty = True  # what changed before the watch began is looked at once
        return True

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(fd)
        os.close(fd)

    def _events(self) -> None:
        assert self._fd is not None
        lost = False
        while True:
            try:
                data = os.read(self._fd, _READ_BYTES)
            except BlockingIOError:
                break
            at = 0
            while at + _EVENT.size <= len(data):
                _wd, mask, _cookie, size = _EVENT.unpack_from(data, at)
                name = data[at + _EVENT.size : at + _EVENT.size + size].rstrip(b"\0")
                at += _EVENT.size + size
                if mask & _IN_Q_OVERFLOW or name == self._name:
                    self._dirty = True
                if mask & _WATCH_LOST:
                    lost = True
        if lost:
            logger.warning("stopped watching %s; its files are checked on every use", self._folder)
            self._dirty = True
            self.close()


def _inotify_watch(folder: Path) -> int | None:
    """A non-blocking inotify descriptor watching ``folder``, or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add_watch = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    fd = int(init(os.O_NONBLOCK | os.O_CLOEXEC))
    if fd < 0:
        return None
    if int(add_watch(fd, os.fsencode(folder), _WATCHED)) < 0:
        logger.info(
            "cannot watch %s (%s); checking its files on every use",
            folder,
            os.strerror(ctypes.get_errno()),
        )
        os.close(fd)
        return None
    return fd
