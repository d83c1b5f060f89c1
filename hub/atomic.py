"""Crash-safe file writes for the hub: temp file, fsync, rename over, fsync the directory.

The agent has the same routine in ``agent/atomic.py``; the hub may import only the agent's
contract, and a device must not depend on hub code, so each side keeps its own copy of these
few lines. Temp names are random here because several hub threads may write one path at once.
"""

import contextlib
import os
import secrets
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: a reader or a crash sees the old or the new file.

    The file is created with ``mode`` from the start (never chmod-after), so a secret is never
    readable by others, not even for a moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
