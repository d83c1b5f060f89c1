"""The package archive: a deterministic, uncompressed tar of a signed manifest and the files.

Deterministic (sorted entries, mtime 0, uid/gid 0, mode 0644, regular files only) so the same
manifest and files always give the same bytes, hence the same digest.
"""

import hashlib
import io
import tarfile
from collections.abc import Mapping

from agent.protocol.canonical import canonical_bytes
from agent.protocol.documents import DetachedSignatures, Manifest, document_dict
from agent.protocol.keys import Signature
from agent.protocol.package import FILES_DIR, MANIFEST_NAME, SIGNATURE_NAME


def _tar_entry(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def build_archive(
    manifest: Manifest, signatures: list[Signature], files: Mapping[str, bytes]
) -> bytes:
    """The archive bytes for a manifest, its release signatures and the files it lists."""
    listed = {f.path for f in manifest.files}
    if listed != set(files):
        raise ValueError(f"files {sorted(files)} do not match the manifest {sorted(listed)}")
    entries = {
        MANIFEST_NAME: canonical_bytes(document_dict(manifest)),
        SIGNATURE_NAME: canonical_bytes(document_dict(DetachedSignatures(signatures=signatures))),
    }
    for path, data in files.items():
        entries[f"{FILES_DIR}/{path}"] = data
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(entries):
            _tar_entry(tar, name, entries[name])
    return buf.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
