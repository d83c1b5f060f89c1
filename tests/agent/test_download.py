"""The chunk assembler: any order, any number of copies, resume from the part file, and the
package digest checked at the end (computed as the chunks arrive)."""

import hashlib
import random
from pathlib import Path

import pytest

from agent.download import MAX_CORRUPT_PER_CHUNK, ChunkAssembler
from agent.errors import IntegrityError
from agent.protocol.documents import PackageRef

CHUNK = 1024


def _package(
    size: int = 10 * CHUNK + 300, *, digest: str | None = None
) -> tuple[bytes, PackageRef]:
    data = random.Random(size).randbytes(size)
    chunks = [data[i : i + CHUNK] for i in range(0, size, CHUNK)]
    ref = PackageRef(
        model="m",
        version=1,
        digest=digest or hashlib.sha256(data).hexdigest(),
        size=size,
        chunk_bytes=CHUNK,
        chunks=[hashlib.sha256(c).hexdigest() for c in chunks],
        deployment_id="dep-1",
    )
    return data, ref


def _chunk(data: bytes, index: int) -> bytes:
    return data[index * CHUNK : (index + 1) * CHUNK]


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled"])
def test_chunks_in_any_order_with_copies_make_the_archive(tmp_path: Path, order: str) -> None:
    data, ref = _package()
    indexes = list(range(len(ref.chunks)))
    if order == "reversed":
        indexes.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(indexes)
    assembler = ChunkAssembler(ref, tmp_path, max_package_bytes=1 << 20)
    for index in indexes:
        assert assembler.add(index, _chunk(data, index))
        assert not assembler.add(index, _chunk(data, index)), "a copy is not new"
    assert assembler.done
    assert assembler.duplicate_chunks == len(indexes)
    assert assembler.finish().read_bytes() == data


def test_a_digest_that_the_chunks_do_not_make_is_refused_and_nothing_kept(tmp_path: Path) -> None:
    # Every chunk matches its signed hash, but the signed digest names other bytes.
    data, ref = _package(digest="0" * 64)
    assembler = ChunkAssembler(ref, tmp_path, max_package_bytes=1 << 20)
    for index in range(len(ref.chunks)):
        assembler.add(index, _chunk(data, index))
    with pytest.raises(IntegrityError, match="digest"):
        assembler.finish()
    assert list(tmp_path.iterdir()) == []
    assert not assembler.done


def test_a_restart_resumes_from_the_part_file(tmp_path: Path) -> None:
    data, ref = _package()
    first = ChunkAssembler(ref, tmp_path, max_package_bytes=1 << 20)
    for index in (1, 3, 4, 0):
        first.add(index, _chunk(data, index))
    again = ChunkAssembler(ref, tmp_path, max_package_bytes=1 << 20)
    assert again.missing() == [2, *range(5, len(ref.chunks))]
    for index in again.missing():
        again.add(index, _chunk(data, index))
    assert again.finish().read_bytes() == data


def test_a_chunk_that_keeps_arriving_corrupt_fails_the_download(tmp_path: Path) -> None:
    data, ref = _package()
    assembler = ChunkAssembler(ref, tmp_path, max_package_bytes=1 << 20)
    bad = bytes(b ^ 0xFF for b in _chunk(data, 2))
    for _ in range(MAX_CORRUPT_PER_CHUNK - 1):
        assert not assembler.add(2, bad)
    with pytest.raises(IntegrityError, match="arrived corrupt 3 times"):
        assembler.add(2, bad)
    assert assembler.corrupt_chunks == MAX_CORRUPT_PER_CHUNK
