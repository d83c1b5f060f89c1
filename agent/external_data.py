"""The files an ONNX model refers to, checked before any runtime opens it (THREATS.md E6).

A tensor in an ONNX model may keep its bytes in another file named by
``external_data["location"]``. A runtime resolves that name against the model's directory and
reads it, so a signed model could name ``../../keys/device.key`` or ``/etc/shadow`` (onnx
CVE-2022-25882, CVE-2024-27318). onnxruntime checks this itself in recent versions, but only
while loading, after the package was accepted, and not in every version a device may have.
So the install reads the locations from the model's own bytes (the protobuf wire format,
without the ``onnx`` package, which a device does not install) and refuses the package unless
every one is a plain relative path naming a file of the signed manifest.

The walk follows every place a tensor can sit: graph initializers and sparse initializers,
node attributes (tensors, sparse tensors and subgraphs of If/Loop/Scan), training graphs and
model-local functions. Unknown fields are skipped by their wire type, as protobuf does, so a
file the runtime could parse is a file this walk reads entirely.
"""

import mmap
from pathlib import Path, PurePosixPath

from agent.archive import check_relative_path
from agent.errors import ModelLoadError, UnsafeArchiveError
from agent.protocol.documents import Manifest

# Field numbers of onnx.proto (onnx 1.23) that lead to tensors, by message kind.
_MESSAGES: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_EXTERNAL = 1
_MAX_DEPTH = 64  # onnxruntime's protobuf parser stops at 100 nested messages
_ORT_FORMAT_ID = b"ORTM"  # onnxruntime's flatbuffer format: no external data


class _Malformed(Exception):
    pass


class _Reader:
    """Protobuf wire-format fields of one message inside ``buf[start:end]``."""

    def __init__(self, buf: bytes | mmap.mmap, start: int, end: int) -> None:
        self.buf = buf
        self.pos = start
        self.end = end

    def varint(self) -> int:
        value = shift = 0
        while True:
            if self.pos >= self.end or shift > 63:
                raise _Malformed("truncated or overlong varint")
            byte = self.buf[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7

    def skip(self, wire_type: int, field: int, depth: int) -> None:
        if wire_type == 0:
            self.varint()
        elif wire_type == 1:
            self._advance(8)
        elif wire_type == 2:
            self._advance(self.varint())
        elif wire_type == 5:
            self._advance(4)
        elif wire_type == 3:
            self._skip_group(field, depth)
        else:
            raise _Malformed(f"wire type {wire_type}")

    def _skip_group(self, field: int, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _Malformed("groups nested too deep")
        while True:
            key = self.varint()
            if key & 7 == 4:
                if key >> 3 != field:
                    raise _Malformed("mismatched end of group")
                return
            self.skip(key & 7, key >> 3, depth + 1)

    def _advance(self, count: int) -> None:
        if count > self.end - self.pos:
            raise _Malformed("field runs past the end of its message")
        self.pos += count

    def fields(self, depth: int) -> list[tuple[int, int, int]]:
        """(field number, start, end) of each length-delimited field; others skipped."""
        found = []
        while self.pos < self.end:
            key = self.varint()
            field, wire_type = key >> 3, key & 7
            if wire_type == 2:
                length = self.varint()
                start = self.pos
                self._advance(length)
                found.append((field, start, self.pos))
            elif wire_type == 4:
                raise _Malformed("end of group outside a group")
            else:
                if field == _TENSOR_DATA_LOCATION and wire_type == 0:
                    found.append((field, self.varint(), -1))
                    continue
                self.skip(wire_type, field, depth)
        return found


def _entry(buf: bytes | mmap.mmap, start: int, end: int) -> tuple[bytes, bytes]:
    key = value = b""
    for field, s, e in _Reader(buf, start, end).fields(0):
        if field == 1:
            key = bytes(buf[s:e])
        elif field == 2:
            value = bytes(buf[s:e])
    return key, value


def _walk(
    buf: bytes | mmap.mmap, kind: str, start: int, end: int, depth: int, out: list[str]
) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed("messages nested too deep")
    fields = _Reader(buf, start, end).fields(depth)
    if kind == "tensor":
        locations = []
        external = False
        for field, s, e in fields:
            if field == _TENSOR_EXTERNAL_DATA and e >= 0:
                key, value = _entry(buf, s, e)
                if key == b"location":
                    locations.append(value)
            elif field == _TENSOR_DATA_LOCATION and e < 0:
                external = s == _EXTERNAL
        if external and not locations:
            raise _Malformed("a tensor stored externally names no location")
        for raw in locations:
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise UnsafeArchiveError(
                    f"external data location {raw[:64]!r} is not UTF-8"
                ) from None
        return
    children = _MESSAGES[kind]
    for field, s, e in fields:
        child = children.get(field)
        if child is not None and e >= 0:
            _walk(buf, child, s, e, depth + 1, out)


def external_locations(model: bytes | mmap.mmap) -> list[str]:
    """Every ``external_data`` location named anywhere in a serialised ONNX model."""
    if len(model) >= 8 and model[4:8] == _ORT_FORMAT_ID:
        return []
    found: list[str] = []
    try:
        _walk(model, "model", 0, len(model), 0, found)
    except _Malformed as exc:
        raise ModelLoadError(f"not a valid ONNX model: {exc}") from None
    return found


def check_external_data(files_dir: Path, manifest: Manifest) -> None:
    """Refuse a model that refers to any file outside the package's signed files."""
    model_file = manifest.runtime.model_file
    listed = {f.path for f in manifest.files}
    with (files_dir / model_file).open("rb") as handle:
        size = handle.seek(0, 2)
        if size == 0:
            raise ModelLoadError(f"{model_file} is empty")
        # Mapped, not read: a model of hundreds of megabytes is walked without a copy, and
        # its tensor bytes are skipped by length.
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            locations = external_locations(view)
    base = PurePosixPath(model_file).parent
    for location in locations:
        try:
            path = check_relative_path(location)
        except UnsafeArchiveError:
            raise UnsafeArchiveError(
                f"{model_file} keeps tensor data at {location!r}, outside the package"
            ) from None
        if str(base / path) not in listed:
            raise UnsafeArchiveError(
                f"{model_file} keeps tensor data in {location!r}, which is not a signed file"
                " of the package"
            )
