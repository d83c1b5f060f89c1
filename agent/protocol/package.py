"""The package archive layout and how a package is cut into chunks for MQTT.

A package is an uncompressed tar archive holding ``manifest.json``, ``manifest.sig`` and the
model's files under ``files/``. Its digest is the sha256 of the whole archive; it travels as
fixed-size chunks whose hashes the director names in the desired state, so a device can check
each chunk as it arrives and ask again for exactly the ones it lacks.
"""

import hashlib
from dataclasses import dataclass

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
FILES_DIR = "files"
DEFAULT_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    size: int
    chunk_bytes: int
    chunks: tuple[str, ...]

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.size)


def plan_chunks(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ChunkPlan:
    """Cut an archive into chunks and hash each one."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    hashes = tuple(
        hashlib.sha256(data[i : i + chunk_bytes]).hexdigest()
        for i in range(0, len(data), chunk_bytes)
    )
    return ChunkPlan(size=len(data), chunk_bytes=chunk_bytes, chunks=hashes)
