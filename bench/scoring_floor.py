"""The scoring benchmark's floor: a bare loopback HTTP server that makes the raw runtime call.

    python -m bench.scoring_floor --port N --runtime none|onnx|tflite|script|script-worker
        --model PATH
        [--sample sample_input.json] [--script score.py]

Nothing of the agent: an ``asyncio.Protocol`` that finds the end of each request by its
``Content-Length`` and, per request, calls the runtime directly on an input prepared once at
start (``session.run`` for ONNX Runtime; ``set_tensor``/``invoke``/``get_tensor`` for LiteRT;
the entry script's own ``run(raw_data)`` with the request body for a script, in the server's
process or, for ``script-worker``, in a child process over a pipe), then answers
with a fixed two-byte body. So it is what any server must spend on a call: the loopback round
trip and the model, measured in the same place (a server process between requests) as the
agent. Prints ``ready`` once it listens.
"""

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def _onnx_call(model: Path, sample: Any) -> Callable[[bytes], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: np.asarray(sample, dtype=np.float32)}
    outputs = [o.name for o in session.get_outputs()]
    return lambda _body: session.run(outputs, feed)


def _tflite_call(model: Path, sample: Any) -> Callable[[bytes], object]:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model), num_threads=1)
    [detail] = interpreter.get_input_details()
    array = np.asarray(sample, dtype=detail["dtype"])
    if tuple(detail["shape"]) != array.shape:
        interpreter.resize_tensor_input(detail["index"], list(array.shape))
    interpreter.allocate_tensors()
    index = detail["index"]
    outputs = [d["index"] for d in interpreter.get_output_details()]

    def call(_body: bytes) -> object:
        interpreter.set_tensor(index, array)
        interpreter.invoke()
        return [interpreter.get_tensor(i) for i in outputs]

    return call


def _script_call(model: Path, script: Path) -> Callable[[bytes], object]:
    os.environ["OUTPOST_MODEL_DIR"] = str(model.parent)
    os.environ["AZUREML_MODEL_DIR"] = str(model.parent)
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location("score", script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.init()
    run: Callable[[str], object] = module.run
    return lambda body: run(body.decode())


_WORKER = """
import importlib.util, json, os, struct, sys
spec = importlib.util.spec_from_file_location("score", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.init()
run, header = module.run, struct.Struct(">I")
sys.stdout.write("ready\\n")
sys.stdout.flush()
while True:
    size = os.read(0, 4)
    if not size:
        break
    body = os.read(0, header.unpack(size)[0])
    os.write(1, json.dumps(run(body.decode())).encode())
"""


def _script_worker_call(model: Path, script: Path) -> Callable[[bytes], object]:
    """The script's ``run`` in a child process, over a pipe: the least a server isolating
    user code in a process must do (no supervision, no time limit, no error replies)."""
    import struct
    import subprocess

    env = dict(os.environ, OUTPOST_MODEL_DIR=str(model.parent), AZUREML_MODEL_DIR=str(model.parent))
    child = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=script.parent,
        env=env,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    if child.stdout.readline().strip() != b"ready":
        raise RuntimeError("the floor's script worker did not start")
    to_child, from_child = child.stdin.fileno(), child.stdout.fileno()
    header = struct.Struct(">I")

    def call(body: bytes) -> object:
        os.write(to_child, header.pack(len(body)) + body)
        return os.read(from_child, 1 << 16)

    return call


class _Bare:
    """An asyncio protocol (duck-typed, so ``--hold`` never imports asyncio)."""

    def __init__(self, call: Callable[[bytes], object]) -> None:
        self._call = call
        self._buffer = b""
        self._transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def eof_received(self) -> None:
        return None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head = self._buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self._buffer) < end + 4 + length:
                return
            body = self._buffer[end + 4 : end + 4 + length]
            self._buffer = self._buffer[end + 4 + length :]
            self._call(body)
            assert self._transport is not None
            self._transport.write(RESPONSE)


async def _serve(port: int, call: Callable[[bytes], object]) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: cast(Any, _Bare(call)), "127.0.0.1", port)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


# The least an agent on the project's stack imports: its HTTP endpoint and MQTT client on asyncio
# (which imports ssl, and so OpenSSL), paho-mqtt itself, and SQLite for the offline outbox.
STACK_MODULES = ("asyncio", "paho.mqtt.client", "sqlite3")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--runtime", choices=["none", "onnx", "tflite", "script", "script-worker"], required=True
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--sample", type=Path)
    parser.add_argument("--script", type=Path)
    parser.add_argument(
        "--hold",
        action="store_true",
        help="no server: hold the runtime (called once) until stdin closes; the memory floor",
    )
    parser.add_argument(
        "--with-stack",
        action="store_true",
        help="with --hold: also import what any agent on the project's stack must (asyncio "
        "with ssl, paho-mqtt, sqlite3), and nothing of the agent's own",
    )
    args = parser.parse_args(argv)
    sample = json.loads(args.sample.read_text()) if args.sample else None
    if isinstance(sample, dict) and "data" in sample:
        sample = sample["data"]
    call: Callable[[bytes], object]
    if args.runtime == "onnx":
        call = _onnx_call(args.model, sample)
    elif args.runtime == "tflite":
        call = _tflite_call(args.model, sample)
    elif args.runtime == "script":
        call = _script_call(args.model, args.script)
    elif args.runtime == "script-worker":
        call = _script_worker_call(args.model, args.script)
    else:
        call = lambda _body: None  # noqa: E731
    if args.hold:
        call(b'{"data": []}' if args.runtime == "script" else b"")
        if args.with_stack:
            for module in STACK_MODULES:
                importlib.import_module(module)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.read()  # until the bench closes it
        return 0
    import asyncio

    asyncio.run(_serve(args.port, call))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
