"""Content-addressed file storage: a blob's name is the sha256 of its bytes.

Writes go to a temporary file in the same directory and are renamed into place, so a reader
never sees half a file and two writers of the same content cannot corrupt each other.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from hub.atomic import write_atomic
from hub.errors import CorruptStorage

_COPY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size: int


class BlobStore:
    """Blobs under ``root/ab/abcdef...``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> StoredBlob:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if not target.exists():
            write_atomic(target, data)
        return StoredBlob(sha256=digest, size=len(data))

    def read(self, sha256: str) -> bytes:
        """The blob's bytes, checked against its name: a package is never built from bytes
        that changed on disk after they were registered."""
        data = self.path(sha256).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptStorage(f"stored file {sha256[:16]} no longer matches its sha256")
        return data
