"""Assembling a package from chunks that arrive in any order, any number of times.

Each chunk is checked against the hash the director signed before it is written at its offset
in ``<digest>.part``. What has been received is not kept in a separate record: on resume (after
a reconnect or a restart) each chunk's region of the part file is hashed again, so the file is
its own journal and a torn write only costs that chunk. The finished archive is checked against
the package digest, then renamed into place; a half-written file is never promoted. The digest
is computed as the chunks arrive (they mostly come in order), so checking it does not read the
whole archive again.
"""

import errno
import hashlib
import logging
import os
from pathlib import Path

from agent.atomic import fsync_dir
from agent.errors import AgentError, IntegrityError, NoSpaceError, TooLargeError
from agent.protocol.documents import PackageRef
from agent.protocol.messages import Reason

logger = logging.getLogger(__name__)

# A chunk that keeps arriving corrupt is not line noise: the package being served does not
# match the hashes the director signed. Give up with a reason instead of asking forever.
MAX_CORRUPT_PER_CHUNK = 3


class ChunkAssembler:
    """Collects one package's chunks into ``<dir>/<digest>.part``."""

    def __init__(self, ref: PackageRef, directory: Path, *, max_package_bytes: int) -> None:
        if ref.size > max_package_bytes:
            raise TooLargeError(f"package of {ref.size} bytes exceeds {max_package_bytes}")
        expected_chunks = -(-ref.size // ref.chunk_bytes)
        if len(ref.chunks) != expected_chunks:
            raise IntegrityError(
                f"{len(ref.chunks)} chunk hashes for {expected_chunks} chunks",
                reason=Reason.LENGTH,
            )
        self.ref = ref
        self.directory = directory
        self.part_path = directory / f"{ref.digest}.part"
        self.final_path = directory / f"{ref.digest}.tar"
        self.corrupt_chunks = 0
        self.duplicate_chunks = 0
        self.failure: AgentError | None = None
        self._corrupt_by_index: dict[int, int] = {}
        self._missing: set[int] = set(range(len(ref.chunks)))
        # The package digest over the leading chunks held so far (chunks 0 .. _hashed - 1).
        self._digest = hashlib.sha256()
        self._hashed = 0
        directory.mkdir(parents=True, exist_ok=True)
        if self.final_path.exists():
            self._missing.clear()
            return
        self._open_part()

    def _open_part(self) -> None:
        # Free space is the caller's to check before a download starts (Agent._check_space,
        # which uses the device's disk as the simulator shapes it).
        if self.part_path.exists() and self.part_path.stat().st_size:
            self._resume()

    @property
    def bytes_on_disk(self) -> int:
        """What this package already takes in the downloads directory."""
        for path in (self.final_path, self.part_path):
            if path.exists():
                return path.stat().st_size
        return 0

    def _resume(self) -> None:
        with self.part_path.open("rb") as part:
            for index in sorted(self._missing):
                start, end = self._range(index)
                part.seek(start)
                data = part.read(end - start)
                if len(data) == end - start and self._chunk_ok(index, data):
                    self._missing.discard(index)
        logger.info(
            "resuming download",
            extra={"digest": self.ref.digest, "have": len(self.ref.chunks) - len(self._missing)},
        )

    def _range(self, index: int) -> tuple[int, int]:
        start = index * self.ref.chunk_bytes
        return start, min(start + self.ref.chunk_bytes, self.ref.size)

    def _chunk_ok(self, index: int, data: bytes) -> bool:
        return hashlib.sha256(data).hexdigest() == self.ref.chunks[index]

    @property
    def done(self) -> bool:
        return not self._missing

    def lacks(self, index: int) -> bool:
        return index in self._missing

    def missing(self) -> list[int]:
        return sorted(self._missing)

    @property
    def progress(self) -> float:
        return 1.0 - len(self._missing) / max(1, len(self.ref.chunks))

    def add(self, index: int, data: bytes) -> bool:
        """Store one chunk if it is wanted and intact; returns whether it was new."""
        if index not in self._missing:
            if 0 <= index < len(self.ref.chunks):
                self.duplicate_chunks += 1
            return False
        start, end = self._range(index)
        if len(data) != end - start or not self._chunk_ok(index, data):
            self.corrupt_chunks += 1
            times = self._corrupt_by_index.get(index, 0) + 1
            self._corrupt_by_index[index] = times
            logger.warning("dropping corrupt chunk %d of %s", index, self.ref.digest[:12])
            if times >= MAX_CORRUPT_PER_CHUNK:
                raise IntegrityError(
                    f"chunk {index} arrived corrupt {times} times: the package served does not"
                    " match the chunk hashes in the signed desired state"
                )
            return False
        flags = os.O_WRONLY | os.O_CREAT
        try:
            fd = os.open(self.part_path, flags, 0o600)
            try:
                os.pwrite(fd, data, start)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise NoSpaceError("disk full while writing a chunk") from None
            raise
        self._missing.discard(index)
        if index == self._hashed:
            self._digest.update(data)
            self._hashed += 1
            self._hash_held_chunks()
        return True

    def _hash_held_chunks(self) -> None:
        """Extend the running digest over the chunks after it that are already on disk."""
        if self._hashed >= len(self.ref.chunks) or self._hashed in self._missing:
            return
        with self.part_path.open("rb") as part:
            while self._hashed < len(self.ref.chunks) and self._hashed not in self._missing:
                start, end = self._range(self._hashed)
                part.seek(start)
                self._digest.update(part.read(end - start))
                self._hashed += 1

    def finish(self) -> Path:
        """Check the whole archive against its digest and move it into place."""
        if self.final_path.exists():
            return self.final_path
        if self._missing:
            raise IntegrityError(f"{len(self._missing)} chunks still missing")
        self._hash_held_chunks()
        with self.part_path.open("rb") as part:
            size = os.fstat(part.fileno()).st_size
            os.fsync(part.fileno())
        if size != self.ref.size or self._digest.hexdigest() != self.ref.digest:
            self.discard()
            raise IntegrityError("assembled package does not match its digest")
        self.part_path.replace(self.final_path)
        fsync_dir(self.directory)
        return self.final_path

    def discard(self) -> None:
        for path in (self.part_path, self.final_path):
            path.unlink(missing_ok=True)
        self._missing = set(range(len(self.ref.chunks)))
        self._digest = hashlib.sha256()
        self._hashed = 0
