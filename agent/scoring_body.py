"""Reading a scoring request's body: JSON ``{"data": ...}``, or NumPy's ``.npy`` / ``.npz``.

JSON is what clients of the cloud workflow send. A binary body saves the client building and the
agent parsing a JSON array of numbers, which for an image-sized input costs more than the model:
``.npy`` carries one array (the data of a model with one input), ``.npz`` one array per input
name. Neither may hold Python objects (``allow_pickle=False``), and an ``.npz`` is refused
before unpacking when its members would unpack to more than a bound, so a small zip cannot
become a large allocation.
"""

import functools
import io
import zipfile
from typing import Any

import numpy as np
import orjson

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
JSON_TYPES = frozenset({"", "application/json", "text/json", "text/plain"})
NPY_TYPES = frozenset({"application/x-npy", "application/octet-stream"})
NPZ_TYPES = frozenset({"application/x-npz", "application/zip"})
ACCEPTED = "application/json, application/x-npy (one array) or application/x-npz (by input name)"


class BodyError(Exception):
    """A body the endpoint cannot read: ``status`` 400 (malformed) or 415 (unknown type)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@functools.lru_cache(maxsize=256)  # on every request; clients send few distinct values
def media_type(content_type: bytes | str | None) -> str:
    """``application/json`` from ``Application/JSON; charset=utf-8``; empty when not given."""
    if content_type is None:
        return ""
    text = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
    return text.split(";", 1)[0].strip().lower()


def is_json(kind: str) -> bool:
    return kind in JSON_TYPES or kind.endswith("+json")


def request_data(body: bytes, kind: str, *, max_unpacked_bytes: int) -> Any:
    """The data to score: a JSON request's ``data``, an array, or input name -> array."""
    if is_json(kind):
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BodyError(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(request, dict) or "data" not in request:
            raise BodyError(400, 'body must be a JSON object with "data"')
        return request["data"]
    if kind in NPZ_TYPES or (kind in NPY_TYPES and body.startswith(ZIP_MAGIC)):
        return _npz(body, max_unpacked_bytes)
    if kind in NPY_TYPES:
        return _npy(body)
    raise BodyError(415, f"content type {kind!r} is not one the endpoint reads; send {ACCEPTED}")


def _npy(body: bytes) -> np.ndarray[Any, Any]:
    if not body.startswith(NPY_MAGIC):
        raise BodyError(400, "body is not a .npy file (no NumPy magic); save it with numpy.save")
    try:
        array: np.ndarray[Any, Any] = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BodyError(400, f"body is not a valid .npy file: {exc}") from None
    return array


def _npz(body: bytes, max_unpacked_bytes: int) -> dict[str, np.ndarray[Any, Any]]:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            members = archive.infolist()
            unpacked = sum(m.file_size for m in members)
            if unpacked > max_unpacked_bytes:
                raise BodyError(
                    400, f".npz unpacks to {unpacked} bytes, over the limit of {max_unpacked_bytes}"
                )
            arrays: dict[str, np.ndarray[Any, Any]] = {}
            for member in members:
                name = member.filename.removesuffix(".npy")
                with archive.open(member) as handle:
                    data = handle.read(member.file_size + 1)
                if len(data) != member.file_size:
                    raise BodyError(400, f".npz member {member.filename!r} is not its stated size")
                arrays[name] = _npy(data)
            return arrays
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise BodyError(400, f"body is not a valid .npz file: {exc}") from None
