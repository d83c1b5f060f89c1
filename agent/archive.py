"""Safe reading of a package archive: every entry is checked before a single byte is written.

A package is a tar of regular files only. Anything else (links, devices, FIFOs, directories
with odd modes), any absolute or ``..`` path, duplicate or case/normalisation-colliding names,
too many entries or too many bytes reject the whole package before extraction (PEP 706 and
CVE-2007-4559 are why ``tarfile.extractall`` is never used). Extraction then writes each file
fresh inside the staging directory, hashing while it writes, so the bytes on disk are the bytes
that were checked.
"""

import hashlib
import os
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.errors import (
    IntegrityError,
    NoSpaceError,
    RejectedError,
    TooLargeError,
    TrustError,
    UnsafeArchiveError,
)
from agent.protocol.documents import Manifest
from agent.protocol.messages import Reason
from agent.protocol.package import FILES_DIR, MANIFEST_NAME, SIGNATURE_NAME

_COPY_BYTES = 1024 * 1024
_MAX_NAME_BYTES = 255
_MAX_PATH_BYTES = 1024


@dataclass(frozen=True)
class ArchiveLimits:
    max_total_bytes: int = 512 * 1024 * 1024
    max_entries: int = 10_000
    max_manifest_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class PackageEntries:
    """The checked table of contents of a package, and its manifest bytes."""

    manifest_bytes: bytes
    signature_bytes: bytes
    files: dict[str, tarfile.TarInfo]  # path relative to files/ -> member


def check_relative_path(path: str) -> PurePosixPath:
    """Refuse anything that could point outside the directory it is joined to."""
    if not path or "\\" in path or "\x00" in path or path.startswith("/"):
        raise UnsafeArchiveError(f"unsafe path {path!r}")
    if len(path.encode()) > _MAX_PATH_BYTES:
        raise UnsafeArchiveError(f"path too long: {path[:64]!r}...")
    pure = PurePosixPath(path)
    for part in pure.parts:
        if part in ("", ".", "..") or len(part.encode()) > _MAX_NAME_BYTES:
            raise UnsafeArchiveError(f"unsafe path {path!r}")
    return pure


def read_entries(archive: tarfile.TarFile, limits: ArchiveLimits) -> PackageEntries:
    """List and check every member; read the manifest and its signature."""
    files: dict[str, tarfile.TarInfo] = {}
    folded: set[str] = set()
    manifest: tarfile.TarInfo | None = None
    signature: tarfile.TarInfo | None = None
    total = 0
    for count, member in enumerate(archive, start=1):
        if count > limits.max_entries:
            raise UnsafeArchiveError(f"more than {limits.max_entries} entries")
        if not member.isreg():
            raise UnsafeArchiveError(f"{member.name!r} is not a regular file ({member.type!r})")
        if member.mode & 0o7000:
            raise UnsafeArchiveError(f"{member.name!r} has setuid/setgid/sticky bits")
        path = check_relative_path(member.name)
        # Case and Unicode-normalisation collisions would overwrite each other on some file
        # systems; refuse them everywhere so behaviour does not depend on the device.
        key = unicodedata.normalize("NFC", str(path)).casefold()
        if key in folded:
            raise UnsafeArchiveError(f"duplicate entry {member.name!r}")
        folded.add(key)
        total += member.size
        if total > limits.max_total_bytes:
            raise TooLargeError(f"package content exceeds {limits.max_total_bytes} bytes")
        if str(path) == MANIFEST_NAME:
            manifest = member
        elif str(path) == SIGNATURE_NAME:
            signature = member
        elif path.parts[0] == FILES_DIR and len(path.parts) > 1:
            files[str(PurePosixPath(*path.parts[1:]))] = member
        else:
            raise UnsafeArchiveError(f"unexpected entry {member.name!r}")
    if manifest is None:
        raise RejectedError(f"package lacks {MANIFEST_NAME}")
    if signature is None:
        # Unsigned: no release key vouches for it (THREATS.md A1), the same verdict as a
        # signature file with no release signature in it.
        raise TrustError(f"unsigned package: no {SIGNATURE_NAME}", reason=Reason.NOT_RELEASED)
    return PackageEntries(
        manifest_bytes=_read_small(archive, manifest, limits.max_manifest_bytes),
        signature_bytes=_read_small(archive, signature, limits.max_manifest_bytes),
        files=files,
    )


def _read_small(archive: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise TooLargeError(f"{member.name} is over {limit} bytes")
    handle = archive.extractfile(member)
    if handle is None:
        raise UnsafeArchiveError(f"{member.name!r} cannot be read")
    with handle:
        return handle.read(limit + 1)


def check_against_manifest(entries: PackageEntries, manifest: Manifest) -> None:
    """The archive holds exactly the files the signed manifest lists, with their sizes."""
    listed = {f.path: f for f in manifest.files}
    for path in listed:
        check_relative_path(path)
    missing = sorted(set(listed) - set(entries.files))
    extra = sorted(set(entries.files) - set(listed))
    if missing or extra:
        raise IntegrityError(f"files differ from the manifest: missing {missing}, unlisted {extra}")
    for path, member in entries.files.items():
        if member.size != listed[path].size:
            raise IntegrityError(
                f"{path}: {member.size} bytes, manifest says {listed[path].size}",
                reason=Reason.LENGTH,
            )
    for name in (manifest.runtime.model_file, manifest.health_check.input):
        if name not in listed:
            raise RejectedError(f"manifest names {name!r}, which is not among its files")
    if manifest.health_check.expected_output not in listed:
        raise RejectedError("manifest's expected output is not among its files")


def extract_files(
    archive: tarfile.TarFile, entries: PackageEntries, manifest: Manifest, dest: Path
) -> None:
    """Write the manifest's files under ``dest`` (a fresh, empty directory), hashing each."""
    expected = {f.path: f.sha256 for f in manifest.files}
    dest_real = dest.resolve()
    for path, member in sorted(entries.files.items()):
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        # Belt and braces: the path was checked lexically; also check where it lands.
        if not target.parent.resolve().is_relative_to(dest_real):
            raise UnsafeArchiveError(f"{path!r} would land outside the package directory")
        source = archive.extractfile(member)
        if source is None:
            raise UnsafeArchiveError(f"{path!r} cannot be read")
        digest = hashlib.sha256()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(target, flags, 0o644)
        except FileExistsError:
            raise UnsafeArchiveError(f"{path!r} collides with another entry") from None
        try:
            with source, os.fdopen(fd, "wb") as out:
                while block := source.read(_COPY_BYTES):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise NoSpaceError(f"disk full while writing {path}") from None
            raise
        if digest.hexdigest() != expected[path]:
            raise IntegrityError(f"{path}: sha256 does not match the manifest")
