"""The content-addressed store refuses bytes that changed after they were stored."""

from pathlib import Path

import pytest

from hub.blobs import BlobStore
from hub.errors import CorruptStorage


def test_blob_changed_on_disk_is_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    blob = store.put(b"model bytes")
    assert store.read(blob.sha256) == b"model bytes"
    store.path(blob.sha256).write_bytes(b"model bytez")
    with pytest.raises(CorruptStorage, match="no longer matches"):
        store.read(blob.sha256)
