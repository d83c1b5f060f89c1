"""agent.httpserver over real sockets: pipelining in order with slow and quick answers, limits,
idle timeout, back-pressure. The scoring routes themselves are in test_scoring.py."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

import pytest

from agent.httpserver import HttpServer, Request, Response, error

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        async with asyncio.timeout(20):
            return await coro

    return asyncio.run(main())


class Echo:
    """``/slow/N`` answers after N ms (as a task); anything else at once; ``/refuse`` is 401."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def check(self, method: str, path: str, headers: dict[bytes, bytes]) -> Response | None:
        if path == "/refuse":
            return error(401, "no")
        return None

    def handle(self, request: Request) -> Response | Awaitable[Response]:
        self.bodies.append(request.body)
        if request.path.startswith("/slow/"):
            delay = int(request.path.rsplit("/", 1)[1]) / 1000

            async def later() -> Response:
                await asyncio.sleep(delay)  # a slow handler, as an entry script is
                return Response(200, {"path": request.path})

            return later()
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        return Response(200, {"path": request.path, "size": len(request.body)})


@asynccontextmanager
async def serving(handler: Echo, **kwargs: float) -> AsyncIterator[HttpServer]:
    server = HttpServer(handler, **kwargs)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def test_pipelined_responses_keep_request_order_when_an_earlier_one_is_slow() -> None:
    async def main() -> None:
        async with serving(Echo()) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            # One write: the slow request first, then two quick ones behind it.
            writer.write(get("/slow/200") + get("/quick-1") + get("/slow/10") + get("/quick-2"))
            await writer.drain()
            paths = []
            for _ in range(4):
                head, body = await read_response(reader)
                assert head.startswith(b"HTTP/1.1 200 ")
                paths.append(body)
            assert paths == [
                b'{"path":"/slow/200"}',
                b'{"path":"/quick-1","size":0}',
                b'{"path":"/slow/10"}',
                b'{"path":"/quick-2","size":0}',
            ]
            writer.close()

    run(main())


def test_a_refusal_without_body_keeps_the_connection() -> None:
    async def main() -> None:
        async with serving(Echo()) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(get("/refuse") + get("/after"))
            await writer.drain()
            head, _ = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 401 ")
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"/after" in body
            writer.close()

    run(main())


def test_a_handler_bug_is_a_500_and_the_connection_goes_on() -> None:
    async def main() -> None:
        async with serving(Echo()) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(get("/boom") + get("/next"))
            await writer.drain()
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 500 ")
            assert b"internal error" in body
            head, _ = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ")
            writer.close()

    run(main())


def test_chunked_body_is_read_whole() -> None:
    async def main() -> None:
        handler = Echo()
        async with serving(handler) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            await writer.drain()
            head, _body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert handler.bodies == [b"hello world"]
            writer.close()

    run(main())


def test_oversized_head_is_431_and_closes() -> None:
    async def main() -> None:
        async with serving(Echo()) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
            await writer.drain()
            reply = await reader.read()
            assert reply.startswith(b"HTTP/1.1 431 ")
            assert b"connection: close" in reply
            writer.close()

    run(main())


def test_connection_close_and_http_1_0_are_honoured() -> None:
    async def main() -> None:
        async with serving(Echo()) as server:
            for request in (
                b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                b"GET /a HTTP/1.0\r\n\r\n",
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(request)
                await writer.drain()
                reply = await reader.read()  # the server closes after answering
                assert reply.startswith(b"HTTP/1.1 200 ")
                assert reply.endswith(b'"size":0}')
                writer.close()

    run(main())


def test_idle_connection_is_closed_after_the_timeout() -> None:
    async def main() -> None:
        async with serving(Echo(), idle_timeout_s=0.3) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(get("/a"))
            await writer.drain()
            await read_response(reader)
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await reader.read() == b""  # EOF: closed by the server
            assert 0.2 <= loop.time() - started < 5
            writer.close()

    run(main())


def test_a_client_that_does_not_read_is_not_read_either() -> None:
    """Back-pressure: the server stops reading a connection whose answers pile up unread, so a
    client pipelining requests without reading cannot make it buffer without bound."""

    def flood(port: int) -> int:
        """Send ~40 MB of pipelined requests without reading; the bytes sent before the
        send stalls for a second."""
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(1.0)
            chunk = get("/" + "p" * 1000) * 1000
            sent = 0
            try:
                for _ in range(40):
                    sock.sendall(chunk)
                    sent += len(chunk)
            except TimeoutError:
                pass
            return sent

    async def main() -> None:
        handler = Echo()
        async with serving(handler) as server:
            sent = await asyncio.to_thread(flood, server.port)
            assert sent < 20 * 1024 * 1024, "the server kept reading though nothing was read"
            assert len(handler.bodies) < 20_000

    run(main())


@pytest.mark.parametrize("path", ["/x?y=1", "/x%2Fy"])
def test_path_is_given_raw_without_the_query(path: str) -> None:
    async def main() -> None:
        async with serving(Echo()) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(get(path))
            await writer.drain()
            _, body = await read_response(reader)
            assert body.startswith(b'{"path":"' + path.split("?")[0].encode() + b'"')
            writer.close()

    run(main())
