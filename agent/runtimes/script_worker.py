"""The worker process of an entry script: imports ``score.py``, runs ``init()`` once, then
answers ``run(raw_data)`` calls from the agent (``agent.runtimes.script``) one at a time.

    python -P script_worker.py ENTRY_SCRIPT LIFELINE_FD

Started by the agent as a file, not a module: ``-m agent.runtimes.script_worker`` would import the
agent package (and pydantic) into every worker. It imports only the standard library, so user
code finds the interpreter as a plain ``python score.py`` would; ``-P`` keeps this file's folder
off ``sys.path`` (user code importing ``onnx`` must not get ``agent/runtimes/onnx.py``), and the
package's files folder (the working directory) goes first on it, so a script imports its helpers.

Protocol, over two private pipes: each frame is a 4-byte big-endian length and its bytes.

    agent  -> worker   b"t" or b"b", then the body       run(body, decoded as UTF-8 after b"t")
    worker -> agent    {"ready": true}                   once, after init() returned
                       {"init_error": ERROR}             instead, then the worker exits
                       b"=", then run's return as JSON   the answer, passed on to the caller as is
                       {"ok": false, "error": ERROR}     run raised, or returned what JSON cannot
    ERROR = {"type", "message", "where", "traceback"}, and "phase" ("import" or "init")
            in an init_error; "type" is empty when the worker itself says what is wrong

The pipes are duplicates of the worker's original stdin and stdout; fd 0 then reads /dev/null and
fd 1 writes to stderr, so ``print()``, ``input()`` and C libraries writing to stdout never touch
the protocol. The agent reads stderr into its log.

The agent also holds the write end of the lifeline pipe: when the agent dies, however it dies,
reading the lifeline ends and the worker kills its whole process group, so no worker outlives its
agent even while user code is stuck.
"""

import importlib.util
import json
import os
import signal
import struct
import sys
import threading
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

FRAME_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 256 * 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024  # a pipe holds no more than this on Linux
ANSWER = b"="  # first byte of a frame holding run's answer; every other frame is a JSON object
MAX_MESSAGE_CHARS = 2000
TRACEBACK_LINES = 12


class _ScriptError(Exception):
    """The entry script cannot be served; the message says why."""


class FrameTooLarge(Exception):
    """A frame's header announces more than ``MAX_FRAME_BYTES``."""

    def __init__(self, size: int) -> None:
        super().__init__(f"a frame of {size} bytes is over {MAX_FRAME_BYTES}")
        self.size = size


def take_frame(buffer: bytearray) -> bytes | None:
    """A whole frame off the front of ``buffer``, or None while it is not all there (both ends
    of the protocol read through this)."""
    if len(buffer) < FRAME_HEADER.size:
        return None
    (size,) = FRAME_HEADER.unpack_from(buffer)
    if size > MAX_FRAME_BYTES:
        raise FrameTooLarge(size)
    end = FRAME_HEADER.size + size
    if len(buffer) < end:
        return None
    frame = bytes(buffer[FRAME_HEADER.size : end])
    del buffer[:end]
    return frame


def whole_frame(chunk: bytes) -> bytes | None:
    """The frame when ``chunk``, one read's worth, is exactly one whole frame: the usual case,
    since each end writes a frame in one go and waits for the answer. None otherwise (then the
    chunk goes through a buffer and `take_frame`). Saves the buffer's copies on every call."""
    if len(chunk) < FRAME_HEADER.size:
        return None
    (size,) = FRAME_HEADER.unpack_from(chunk)
    return chunk[FRAME_HEADER.size :] if size == len(chunk) - FRAME_HEADER.size else None


class FrameReader:
    """Frames from a pipe, read as they come: one ``read`` a call when a frame fits the pipe
    (the agent writes each frame whole), instead of one for the header and one for the rest."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()

    def next(self) -> bytes | None:
        """The next frame, or None when the agent closed the pipe first."""
        while (frame := take_frame(self._buffer)) is None:
            chunk = os.read(self._fd, READ_CHUNK_BYTES)
            if not chunk:
                return None
            if not self._buffer and (whole := whole_frame(chunk)) is not None:
                return whole  # the usual case, without the buffer's copies
            self._buffer += chunk
        return frame


def write_frame(fd: int, payload: bytes) -> None:
    data = FRAME_HEADER.pack(len(payload)) + payload
    written = os.write(fd, data)  # all of it, for any frame that fits the pipe
    if written == len(data):
        return
    view = memoryview(data)[written:]
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _json_default(value: Any) -> Any:
    # NumPy arrays and scalars, without importing numpy: both have tolist().
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# Made once: json.dumps with options builds an encoder on every call. allow_nan=False: JSON
# has no NaN, and a script returning one gets a clear 500.
_VALUES = json.JSONEncoder(default=_json_default, allow_nan=False)


def _describe(exc: BaseException, script: str) -> dict[str, str]:
    """An exception as the agent reports it: type, message, and where in the script it was."""
    if isinstance(exc, _ScriptError):
        return {"type": "", "message": str(exc), "where": "", "traceback": ""}
    report = traceback.TracebackException.from_exception(exc)
    # The worker's own frames (its loop calling run) are noise to the script's author.
    own = Path(__file__).resolve()
    while report.stack and Path(report.stack[0].filename).resolve() == own:
        report.stack.pop(0)
    in_script = [f for f in report.stack if Path(f.filename).name == script] or list(report.stack)
    where = ""
    if in_script:
        last = in_script[-1]
        where = f"{Path(last.filename).name}, line {last.lineno}, in {last.name}"
    lines = "".join(report.format()).splitlines()
    return {
        "type": type(exc).__name__,
        "message": str(exc)[:MAX_MESSAGE_CHARS],
        "where": where,
        "traceback": "\n".join(lines[-TRACEBACK_LINES:]),
    }


def _watch_lifeline(fd: int) -> None:
    """Block until the agent's end of the lifeline closes, then take the process group down."""
    while os.read(fd, 1):
        pass
    if os.getpgrp() == os.getpid():  # the agent made this process a group leader
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(1)


def _private_channels() -> tuple[int, int]:
    """The protocol's read and write fds; fds 0 and 1 are pointed away from them."""
    requests = os.dup(0)  # os.dup gives non-inheritable fds: user subprocesses don't get them
    replies = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return requests, replies


def _load(entry: Path) -> ModuleType:
    name = entry.stem if entry.stem.isidentifier() else "score"
    spec = importlib.util.spec_from_file_location(name, entry)
    if spec is None or spec.loader is None:
        raise _ScriptError(f"{entry.name} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    for function in ("init", "run"):
        if not callable(getattr(module, function, None)):
            signature = "run(raw_data)" if function == "run" else "init()"
            raise _ScriptError(f"{entry.name} defines no {signature} function")
    return module


def _serve(module: ModuleType, entry: Path, requests: int, replies: int) -> None:
    run = module.run
    reader = FrameReader(requests)
    while True:
        # One frame a call (kind byte, then the body): one write and one wake-up per call.
        frame = reader.next()
        if frame is None:
            return  # the agent closed the pipe: it is done with this worker
        raw: str | bytes = frame[1:].decode("utf-8") if frame[:1] == b"t" else frame[1:]
        try:
            encoded = ANSWER + _VALUES.encode(run(raw)).encode("utf-8")
        except Exception as exc:
            encoded = json.dumps({"ok": False, "error": _describe(exc, entry.name)}).encode()
        if len(encoded) > MAX_FRAME_BYTES:
            too_big = _ScriptError(
                f"run returned {len(encoded)} bytes of JSON, over the limit of {MAX_FRAME_BYTES}"
            )
            encoded = json.dumps({"ok": False, "error": _describe(too_big, entry.name)}).encode()
        write_frame(replies, encoded)


def main(argv: list[str]) -> int:
    entry, lifeline = Path(argv[1]).resolve(), int(argv[2])
    threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True).start()
    requests, replies = _private_channels()
    sys.path.insert(0, str(Path.cwd()))
    phase = "import"
    try:
        module = _load(entry)
        phase = "init"
        module.init()
    except BaseException as exc:  # even SystemExit from init is reported
        error = {**_describe(exc, entry.name), "phase": phase}
        write_frame(replies, json.dumps({"init_error": error}).encode())
        return 1
    write_frame(replies, b'{"ready": true}')
    try:
        _serve(module, entry, requests, replies)
    except BrokenPipeError:
        return 0  # the agent went away mid-reply
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
