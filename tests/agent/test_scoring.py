"""The local scoring endpoint over real HTTP, with the real iris ONNX model."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import numpy as np
import pytest

from agent.errors import InputError, ModelCallError
from agent.protocol.documents import (
    FileEntry,
    Framework,
    HealthCheck,
    Manifest,
    ModelInfo,
    RuntimeSpec,
)
from agent.runtimes.base import ActiveModel, Runtime
from agent.runtimes.onnx import OnnxRuntime
from agent.scoring import ScoringCall, ScoringServer

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel

KEY = "k-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.9, 3.2, 5.7, 2.3]]
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        async with asyncio.timeout(20):
            return await coro

    return asyncio.run(main())


def active(name: str, runtime: Runtime, version: int = 1) -> ActiveModel:
    manifest = Manifest(
        model=ModelInfo(name=name, version=version, framework=Framework.ONNX),
        runtime=RuntimeSpec(model_file="model.onnx"),
        files=[FileEntry(path="model.onnx", size=1, sha256="0" * 64)],
        health_check=HealthCheck(input="in.json", expected_output="out.json"),
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    return ActiveModel(name, version, "d" * 64, manifest, runtime)


class Models:
    """The smallest ActiveModels: a dict, the first entry being the default."""

    def __init__(self, *models: ActiveModel) -> None:
        self.models = {m.name: m for m in models}

    def get(self, name: str | None = None) -> ActiveModel | None:
        if name is None:
            return next(iter(self.models.values()), None)
        return self.models.get(name)

    def names(self) -> list[str]:
        return list(self.models)


class Broken:
    def predict(self, data: Any) -> dict[str, Any]:
        raise RuntimeError("boom")


class Picky:
    def predict(self, data: Any) -> dict[str, Any]:
        raise InputError("input 'x' expects float32 of shape [N, 2]")


@pytest.fixture(scope="module")
def iris(iris_model: IrisModel) -> ActiveModel:
    return active("iris", OnnxRuntime(iris_model.model), version=3)


@asynccontextmanager
async def serving(models: Models, **kwargs: Any) -> AsyncIterator[ScoringServer]:
    server = ScoringServer(models=models, keys=lambda: ["other-key", KEY], **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def with_client(
    models: Models, scenario: Callable[[httpx.AsyncClient], Awaitable[None]], **kwargs: Any
) -> None:
    async def main() -> None:
        async with serving(models, **kwargs) as server:
            base = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient(base_url=base) as client:
                await scenario(client)

    run(main())


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await reader.read()
    finally:
        writer.close()


def test_score_default_and_named_model(iris: ActiveModel) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.post("/score", json={"data": ROWS}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["result"] == [0, 2]
        assert body["outputs"]["label"] == [0, 2]
        assert len(body["outputs"]["probabilities"]) == 2
        assert body["model"] == {"name": "iris", "version": 3}

        r = await client.post("/models/iris/score", json={"data": ROWS}, headers={"x-api-key": KEY})
        assert r.status_code == 200
        assert r.json()["result"] == [0, 2]

    with_client(Models(iris), scenario)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"x-api-key": "nope"},
        {"Authorization": KEY},
        {"Authorization": "Basic Zm9vOmJhcg=="},
    ],
)
def test_missing_or_wrong_key_is_401(iris: ActiveModel, headers: dict[str, str]) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        for path in ("/score", "/models/iris/score"):
            r = await client.post(path, json={"data": ROWS}, headers=headers)
            assert r.status_code == 401
            assert r.json() == {"error": "missing or wrong API key"}
        r = await client.get("/models", headers=headers)
        assert r.status_code == 401

    with_client(Models(iris), scenario)


def test_keys_are_read_on_every_request(iris: ActiveModel) -> None:
    keys = ["old"]

    async def main() -> None:
        server = ScoringServer(models=Models(iris), keys=lambda: keys)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                r = await client.post("/score", json={"data": ROWS}, headers={"x-api-key": "old"})
                assert r.status_code == 200
                keys[:] = ["new"]  # rotated
                r = await client.post("/score", json={"data": ROWS}, headers={"x-api-key": "old"})
                assert r.status_code == 401
        finally:
            await server.stop()

    run(main())


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"rows": []}', 'with "data"'),
        (b"[1, 2]", 'with "data"'),
        (b'{"data": [[1, 2, 3]]}', r"'input' expects float32 of shape [N, 4]"),
        (b'{"data": [["a", "b", "c", "d"]]}', "non-numeric"),
    ],
)
def test_bad_input_is_400_with_reason(iris: ActiveModel, content: bytes, reason: str) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.post("/score", content=content, headers=AUTH)
        assert r.status_code == 400
        assert reason in r.json()["error"]

    with_client(Models(iris), scenario)


def test_not_found_and_method_not_allowed(iris: ActiveModel) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.post("/models/nope/score", json={"data": ROWS}, headers=AUTH)
        assert r.status_code == 404
        assert "nope" in r.json()["error"]
        r = await client.get("/nothing/here", headers=AUTH)
        assert r.status_code == 404
        r = await client.get("/score", headers=AUTH)
        assert r.status_code == 405
        assert r.headers["allow"] == "POST"

    with_client(Models(iris), scenario)


def test_no_active_model_is_503(iris: ActiveModel) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.post("/score", json={"data": ROWS}, headers=AUTH)
        assert r.status_code == 503
        r = await client.get("/healthz")
        assert r.status_code == 503
        assert r.json() == {"status": "unavailable", "models": []}

    with_client(Models(), scenario)


def test_healthz_and_models(iris: ActiveModel) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.get("/healthz")  # no key needed
        assert r.status_code == 200
        assert r.json() == {"status": "ok", "models": [{"name": "iris", "version": 3}]}
        r = await client.get("/models", headers=AUTH)
        assert r.status_code == 200
        [model] = r.json()
        assert (model["name"], model["version"], model["digest"]) == ("iris", 3, "d" * 64)
        assert (model["framework"], model["runtime"]) == ("onnx", "builtin")
        assert "entry_script" not in model
        # The manifest here carries no signature, so the runtime's own is reported.
        assert model["signature"]["inputs"] == [
            {"name": "input", "dtype": "float32", "shape": [None, 4]}
        ]

    with_client(Models(iris), scenario)


def test_runtime_failures_are_500_and_input_errors_400() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.post("/models/broken/score", json={"data": [1]}, headers=AUTH)
        assert r.status_code == 500
        assert "boom" not in r.text  # internals stay in the device log
        r = await client.post("/models/picky/score", json={"data": [1]}, headers=AUTH)
        assert r.status_code == 400
        assert r.json() == {"error": "input 'x' expects float32 of shape [N, 2]"}

    with_client(Models(active("broken", Broken()), active("picky", Picky())), scenario)


def test_body_too_large_is_413_without_reading_it(iris: ActiveModel) -> None:
    async def main() -> None:
        async with serving(Models(iris), max_body_bytes=1000) as server:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                r = await client.post("/score", content=b"x" * 2000, headers=AUTH)
                assert r.status_code == 413

                # Chunked, so the size is only known while reading.
                async def chunks() -> AsyncIterator[bytes]:
                    for _ in range(10):
                        yield b"y" * 500

                r = await client.post("/score", content=chunks(), headers=AUTH)
                assert r.status_code == 413
            # A declared length far over the limit is refused from the headers alone: the server
            # answers though the client never sends a byte of the body.
            reply = await raw_exchange(
                server.port,
                b"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + KEY.encode()
                + b"\r\nContent-Length: 999999999\r\n\r\n",
            )
            assert reply.startswith(b"HTTP/1.1 413 ")

    run(main())


def test_keep_alive_serves_several_requests_on_one_connection(iris: ActiveModel) -> None:
    async def main() -> None:
        async with serving(Models(iris)) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            body = json.dumps({"data": ROWS}).encode()
            request = (
                b"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + KEY.encode()
                + b"\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            for _ in range(3):
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                )
                assert json.loads(await reader.readexactly(length))["result"] == [0, 2]
            writer.close()

    run(main())


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02\xff garbage \r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /" + b"a" * 100_000,  # a request line that never ends
    ],
)
def test_malformed_http_closes_connection_and_server_survives(
    iris: ActiveModel, garbage: bytes
) -> None:
    async def main() -> None:
        async with serving(Models(iris)) as server:
            reply = await raw_exchange(server.port, garbage)
            assert reply == b"" or reply.startswith(b"HTTP/1.1 4")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                r = await client.post("/score", json={"data": ROWS}, headers=AUTH)
                assert r.status_code == 200

    run(main())


def test_stop_closes_idle_keep_alive_connections(iris: ActiveModel) -> None:
    async def main() -> None:
        server = ScoringServer(models=Models(iris), keys=lambda: [KEY])
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        await server.stop()
        rest = await reader.read()  # EOF once the server has closed our idle connection
        assert b"HTTP/1.1" not in rest
        writer.close()

    run(main())


def _npy(array: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npz(**arrays: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def test_npy_and_npz_bodies_score_like_json(iris: ActiveModel) -> None:
    rows = np.asarray(ROWS, dtype=np.float32)

    async def scenario(client: httpx.AsyncClient) -> None:
        expected = (await client.post("/score", json={"data": ROWS}, headers=AUTH)).json()
        for content_type, body in (
            ("application/x-npy", _npy(rows)),
            ("application/octet-stream", _npy(rows.astype(np.float64))),
            ("application/x-npz", _npz(input=rows)),
            ("application/octet-stream", _npz(input=rows)),  # told apart by its zip magic
        ):
            r = await client.post(
                "/score", content=body, headers={**AUTH, "content-type": content_type}
            )
            assert r.status_code == 200, (content_type, r.text)
            assert r.json()["outputs"]["label"] == expected["outputs"]["label"]
            np.testing.assert_allclose(
                r.json()["outputs"]["probabilities"],
                expected["outputs"]["probabilities"],
                rtol=1e-5,
            )

    with_client(Models(iris), scenario)


@pytest.mark.parametrize(
    ("content_type", "body", "status", "reason"),
    [
        ("application/x-npy", b"not numpy at all", 400, "not a .npy file"),
        ("application/x-npy", b"\x93NUMPY\x01\x00garbage", 400, "not a valid .npy file"),
        ("application/x-npy", "OBJECT", 400, "not a valid .npy file"),
        ("application/x-npy", "WRONG_SHAPE", 400, "expects float32 of shape [N, 4]; got shape"),
        ("application/x-npy", "STRINGS", 400, "got non-numeric values"),
        ("application/x-npz", b"PK\x03\x04 broken zip", 400, "not a valid .npz file"),
        ("application/x-npz", "WRONG_NAME", 400, "missing ['input'], unknown ['pixels']"),
        ("application/x-npz", "BOMB", 400, "over the limit of"),
        ("text/csv", b"1,2,3,4", 415, "send application/json, application/x-npy"),
        ("application/json", b'{"data": NaN}', 400, "not valid JSON"),
    ],
)
def test_bad_binary_bodies_are_refused_with_the_reason(
    iris: ActiveModel, content_type: str, body: bytes | str, status: int, reason: str
) -> None:
    made = {
        "OBJECT": lambda: (
            b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, "
            b"'shape': (1,), }" + b" " * 53 + b"\n" + b"\x00" * 8
        ),
        "WRONG_SHAPE": lambda: _npy(np.zeros((2, 3), dtype=np.float32)),
        "STRINGS": lambda: _npy(np.array([["a", "b", "c", "d"]])),
        "WRONG_NAME": lambda: _npz(pixels=np.zeros((1, 4), dtype=np.float32)),
        # 8 MB of zeros compress to a few KB; refused before unpacking (limit set to 1 MB).
        "BOMB": lambda: _npz(input=np.zeros((2_000_000,), dtype=np.float32)),
    }
    content = made[body]() if isinstance(body, str) else body

    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.post(
            "/score", content=content, headers={**AUTH, "content-type": content_type}
        )
        assert r.status_code == status, r.text
        assert reason in r.json()["error"]
        # The model still answers on the same client afterwards.
        ok = await client.post("/score", json={"data": ROWS}, headers=AUTH)
        assert ok.status_code == 200

    with_client(Models(iris), scenario, max_unpacked_bytes=1024 * 1024)


class Stuck:
    """An entry-script runtime whose calls wait until released, as a hung script's do."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()

    def run_raw(self, body: bytes, content_type: str) -> Any:
        with self._lock:
            self.entered += 1
        assert self.release.wait(15)
        return {"echo": len(body)}

    def predict(self, data: Any) -> dict[str, Any]:
        raise AssertionError("the endpoint hands a script the body, not data")

    def signature(self) -> Any:
        raise AssertionError("unused")

    def close(self) -> None:
        self.release.set()


def test_callers_of_a_stuck_script_are_bounded_and_others_are_served(iris: ActiveModel) -> None:
    from agent.scoring import MAX_SCRIPT_CALLS_WAITING

    stuck = Stuck()
    script = active("script", stuck)  # type: ignore[arg-type]

    async def scenario(client: httpx.AsyncClient) -> None:
        calls = [
            asyncio.create_task(
                client.post("/models/script/score", json={"data": [n]}, headers=AUTH, timeout=20)
            )
            for n in range(MAX_SCRIPT_CALLS_WAITING)
        ]
        deadline = asyncio.get_running_loop().time() + 10
        while stuck.entered < MAX_SCRIPT_CALLS_WAITING:  # every call has reached the runtime
            assert asyncio.get_running_loop().time() < deadline, stuck.entered
            await asyncio.sleep(0.01)
        # One more caller than the bound: refused at once, not queued.
        extra = await client.post("/models/script/score", json={"data": [9]}, headers=AUTH)
        assert extra.status_code == 503
        assert "busy" in extra.json()["error"]
        # The built-in model is not held up by the stuck script.
        ok = await client.post("/models/iris/score", json={"data": ROWS}, headers=AUTH)
        assert ok.status_code == 200
        stuck.release.set()
        answers = await asyncio.gather(*calls)
        assert [a.status_code for a in answers] == [200] * MAX_SCRIPT_CALLS_WAITING
        assert answers[0].json()["result"] == {"echo": len(b'{"data":[0]}')}

    with_client(Models(iris, script), scenario)


class Quick:
    """An entry-script runtime that answers from the event loop at once, as a quick script
    does: ``run_raw_nowait`` returns a future that is already done."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def run_raw_nowait(self, body: bytes, content_type: str) -> asyncio.Future[Any]:
        self.bodies.append(body)
        answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if body == b"boom":
            answered.set_exception(ModelCallError(500, "score.py raised ValueError: boom"))
        else:
            answered.set_result({"length": len(body)})
        return answered

    def run_raw(self, body: bytes, content_type: str) -> Any:
        raise AssertionError("a quick call is not made from a thread")

    def predict(self, data: Any) -> dict[str, Any]:
        raise AssertionError("the endpoint hands a script the body, not data")

    def signature(self) -> Any:
        raise AssertionError("unused")

    def close(self) -> None:
        pass


class Recording:
    def __init__(self) -> None:
        self.calls: list[ScoringCall] = []

    def scored(self, call: ScoringCall) -> None:
        self.calls.append(call)


def test_a_quick_scripts_answer_and_failure_are_served_and_observed() -> None:
    """Answered without a task; the observer sees each call, and reads the request's data
    from the body only when it asks (a binary body has none)."""
    quick = Quick()
    observer = Recording()

    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.post("/score", json={"data": ROWS}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "result": {"length": len(quick.bodies[0])},
            "model": {"name": "quick", "version": 1},
        }
        failed = await client.post(
            "/score", content=b"boom", headers={**AUTH, "content-type": "application/octet-stream"}
        )
        assert failed.status_code == 500
        assert failed.json() == {"error": "score.py raised ValueError: boom"}

    with_client(Models(active("quick", quick)), scenario, observer=observer)  # type: ignore[arg-type]
    first, second = observer.calls
    assert first.outputs == {"result": {"length": len(quick.bodies[0])}}
    assert first.data == ROWS  # read from the JSON body on demand
    assert first.body_bytes == len(quick.bodies[0])
    assert second.outputs is None  # a failed call
    assert second.data is None  # a binary body holds no JSON data
