"""Files that hold secrets: created with mode 0600 from the start, written atomically.

Creating with ``os.open(..., 0o600)`` rather than chmod-after closes the window in which another
local user could open the file.
"""

import os
import secrets
from pathlib import Path

from hub.atomic import write_atomic


def write_secret(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` with mode 0600; refuses to replace a file unless ``overwrite``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return
    write_atomic(path, data, mode=0o600)


def read_or_create_token(path: Path, *, nbytes: int = 32) -> str:
    """The token stored in ``path``, generating it on first use."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(nbytes)
    try:
        write_secret(path, (token + "\n").encode("utf-8"))
    except FileExistsError:
        # Another process created it between our read and write; theirs wins.
        return path.read_text(encoding="utf-8").strip()
    return token
