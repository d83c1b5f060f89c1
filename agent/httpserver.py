"""A small HTTP/1.1 server on an asyncio protocol, for the device's scoring endpoint.

Why not a framework: a device installs the agent without FastAPI, and a scoring call of a small
model is microseconds of inference inside a loopback round trip of ~100 µs, so the server's own
cost is most of what a caller waits for. Parsing is ``httptools`` (llhttp, the parser of
Node.js and uvicorn: ~2 µs a request against ~60 µs for the pure-Python h11 used before), and a
request whose handler answers at once is answered inside ``data_received``, with one write, no
task and no stream objects in between.

What it does for a handler:
- keep-alive and pipelining (responses leave in request order, also when some are awaited);
- ``check`` sees the method, path and headers before the body is read, so a refused request
  (401, 404, 413) is answered without reading its body, and ``Expect: 100-continue`` is honoured
  only for requests that passed;
- bounded header and body sizes, an idle timeout, back-pressure (a client that does not read
  its responses stops being read), and a linger after refusing a body so the refusal is not
  destroyed by a reset;
- malformed HTTP gets a 400 and the connection closes; the server goes on.
"""

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httptools

from agent.jsonvalues import to_json

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_PIPELINED = 32  # requests read ahead of their responses before reading pauses
LINGER_S = 2.0
LINGER_MAX_BYTES = 4 * 1024 * 1024
STOP_TIMEOUT_S = 5.0

_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(slots=True)
class Response:
    """``body`` is sent as JSON unless it is bytes (then with ``content_type``)."""

    status: int
    body: Any
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False
    content_type: str = "application/json"


def error(status: int, message: str, **kwargs: Any) -> Response:
    return Response(status, {"error": message}, **kwargs)


@dataclass(slots=True)
class Request:
    method: str
    path: str  # as sent (still percent-encoded), without the query
    headers: dict[bytes, bytes]  # names in lower case; a repeated header keeps its last value
    body: bytes = b""


class Handler(Protocol):
    def check(self, method: str, path: str, headers: dict[bytes, bytes]) -> Response | None:
        """A refusal decided from the head alone (routing, auth, size), or None to go on."""
        ...

    def handle(self, request: Request) -> Response | Awaitable[Response]:
        """The answer; awaitable when it takes long (it then runs as a task)."""
        ...


_OK_JSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "


def encode(response: Response) -> bytes:
    """Status line, headers and body as one buffer, so a response is one write."""
    if isinstance(response.body, bytes):
        body = response.body
    else:
        # orjson: ~10x the stdlib's speed, which on this path is most of the agent's own cost.
        # It writes NaN as null, so runtimes refuse non-finite outputs before they get here.
        try:
            body = to_json(response.body)
        except TypeError as exc:
            logger.error("response is not JSON-ready: %s", exc)
            return encode(error(500, "internal error; see the device log", close=True))
    if (
        response.status == 200
        and not response.headers
        and not response.close
        and response.content_type == "application/json"
    ):
        return b"%s%d\r\n\r\n%s" % (_OK_JSON_HEAD, len(body), body)  # every answer that scored
    head = (
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}\r\n"
        f"content-type: {response.content_type}\r\ncontent-length: {len(body)}\r\n"
    )
    for name, value in response.headers:
        head += f"{name}: {value}\r\n"
    if response.close:
        head += "connection: close\r\n"
    return (head + "\r\n").encode("latin-1") + body


class _Slot:
    """One request's place in the connection's response order."""

    __slots__ = ("data", "task")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.task: asyncio.Task[Response] | None = None


class _Connection(asyncio.Protocol):
    def __init__(self, server: "HttpServer") -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._slots: deque[_Slot] = deque()
        self._closing = False  # the last response is queued: flush it, then close
        self._draining = False  # refused a body: discard what still comes, then close
        self._discarded = 0
        self._drain_after = False
        self._in_head = False  # between the first byte of a request and the end of its head
        self._head_began_here = False
        self._paused_for: set[str] = set()
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._begin_message()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections.add(self)
        loop = asyncio.get_running_loop()
        self._last_activity = loop.time()
        self._idle_timer = loop.call_later(self._server.idle_timeout_s, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self._last_activity = time.monotonic()  # the loop's clock, without finding the loop
        if self._draining:
            self._discarded += len(data)
            if self._discarded > LINGER_MAX_BYTES:
                self._close()
            return
        if self._closing:
            return  # a response that closes is queued; nothing after it is read
        self._head_began_here = False
        try:
            self._parser.feed_data(data)
            # llhttp keeps an unfinished head in memory: bound it. The chunk a head began in is
            # not counted (it also holds the requests before it), so the bound is the limit
            # plus one read.
            if self._in_head and not self._head_began_here:
                self._head_bytes += len(data)
                if self._head_bytes > self._server.max_header_bytes:
                    self._finish(error(431, "request head too large", close=True), drain=True)
        except httptools.HttpParserUpgrade:
            self._finish(
                error(400, "bad request: protocol upgrades are not served", close=True), drain=True
            )
        except httptools.HttpParserError as exc:
            self._finish(error(400, f"bad request: {exc}", close=True), drain=True)

    def eof_received(self) -> bool | None:
        if self._draining or not self._slots:
            self._close()
            return None
        self._closing = True  # answer what was asked, then close
        return True  # keep the write side open for those answers

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for slot in self._slots:
            if slot.task is not None:
                slot.task.cancel()
        self._slots.clear()

    def pause_writing(self) -> None:
        self._pause("writing")

    def resume_writing(self) -> None:
        self._resume("writing")

    # -- httptools callbacks ---------------------------------------------------------------

    def _begin_message(self) -> None:
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_bytes = 0  # whole reads since the head began (see data_received)
        self._head_size = 0  # the head's URL and headers as parsed
        self._refusal: Response | None = None
        self._method = ""
        self._path = ""

    def on_message_begin(self) -> None:
        self._begin_message()
        self._in_head = True
        self._head_began_here = True

    # on_url and on_header run several times a request: the head's bound is counted inline.

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self._server.max_header_bytes:
            self._head_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._server.max_header_bytes:
            self._head_too_large()

    def _head_too_large(self) -> None:
        if not self._closing:
            self._finish(error(431, "request head too large", close=True), drain=True)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._closing:
            return
        self._method = self._parser.get_method().decode("ascii", "replace")
        self._path = self._url.decode("latin-1").split("?", 1)[0]
        headers = self._headers
        has_body = b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"
        refusal = self._server.handler.check(self._method, self._path, headers)
        length = headers.get(b"content-length")
        too_long = (
            length is not None and length.isdigit() and int(length) > self._server.max_body_bytes
        )
        if refusal is None and too_long:
            refusal = error(413, f"body over {self._server.max_body_bytes} bytes", close=True)
        if refusal is not None:
            if has_body:
                # Not reading the body of a refused request: answer now and stop parsing.
                refusal.close = True
                self._finish(refusal, drain=True)
                return
            self._refusal = refusal
        elif headers.get(b"expect", b"").lower() == b"100-continue" and not self._slots:
            # Ask for the body only now that the request passed auth and routing.
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._refusal is not None or self._closing:
            return
        self._body_size += len(body)
        if self._body_size > self._server.max_body_bytes:
            self._finish(
                error(413, f"body over {self._server.max_body_bytes} bytes", close=True), drain=True
            )
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closing:
            return
        if not self._parser.should_keep_alive():
            self._closing = True
        if self._refusal is not None:
            answer: Response | Awaitable[Response] = self._refusal
        else:
            request = Request(self._method, self._path, self._headers, b"".join(self._body))
            try:
                answer = self._server.handler.handle(request)
            except Exception:
                logger.exception("scoring endpoint handler failed")
                answer = error(500, "internal error; see the device log")
        if isinstance(answer, Response):
            if answer.close:
                self._closing = True
            if not self._slots:
                # The common case: nothing ahead of it, so it leaves now.
                self._write(encode(answer))
                if self._closing:
                    self._end()
                return
            slot = _Slot()
            slot.data = encode(answer)
        else:
            slot = _Slot()
            slot.task = asyncio.ensure_future(answer)
            slot.task.add_done_callback(lambda _: self._flush())
        self._slots.append(slot)
        if len(self._slots) >= MAX_PIPELINED:
            self._pause("pipeline")
        self._flush()
        if len(self._slots) >= MAX_PIPELINED:
            self._pause("pipeline")
        self._flush()

    # -- writing ---------------------------------------------------------------------------

    def _finish(self, response: Response, *, drain: bool = False) -> None:
        """Queue a last response; after it the connection closes (lingering if ``drain``)."""
        slot = _Slot()
        slot.data = encode(response)
        self._slots.append(slot)
        self._closing = True
        self._drain_after = drain
        self._flush()

    def _flush(self) -> None:
        while self._slots:
            slot = self._slots[0]
            if slot.data is None:
                task = slot.task
                if task is None or not task.done():
                    return
                slot.data = self._task_result(task)
            self._slots.popleft()
            self._write(slot.data)
        if "pipeline" in self._paused_for:
            self._resume("pipeline")
        if self._closing:
            self._end()

    def _task_result(self, task: asyncio.Task[Response]) -> bytes:
        if task.cancelled():
            return encode(error(503, "the call was cancelled", close=True))
        exc = task.exception()
        if exc is not None:
            logger.error("scoring endpoint handler failed", exc_info=exc)
            return encode(error(500, "internal error; see the device log"))
        response = task.result()
        if response.close:
            self._closing = True
        return encode(response)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _end(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._drain_after:
            # Closing with unread input makes the kernel send a reset, which can destroy the
            # response before the client has read it: half-close, discard for a while, close.
            self._draining = True
            if transport.can_write_eof():
                transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_S, self._close)
            return
        self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    # -- flow control and idleness ---------------------------------------------------------

    def _pause(self, why: str) -> None:
        if not self._paused_for and self._transport is not None:
            self._transport.pause_reading()
        self._paused_for.add(why)

    def _resume(self, why: str) -> None:
        self._paused_for.discard(why)
        if not self._paused_for and self._transport is not None:
            with contextlib.suppress(RuntimeError):  # the transport is closing
                self._transport.resume_reading()

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        idle_for = loop.time() - self._last_activity
        if idle_for >= self._server.idle_timeout_s and not self._slots:
            self._close()
            return
        remaining = max(self._server.idle_timeout_s - idle_for, 0.05)
        self._idle_timer = loop.call_later(remaining, self._check_idle)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class HttpServer:
    """Serves ``handler`` on ``host:port`` (port 0 picks a free one; see ``port``)."""

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = 16 * 1024 * 1024,
        max_header_bytes: int = MAX_HEADER_BYTES,
        idle_timeout_s: float = 60.0,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.idle_timeout_s = idle_timeout_s
        self.connections: set[_Connection] = set()
        self._host = host
        self._requested_port = port
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (port 0 was asked: the one picked)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        return self.address[1]

    async def start(self) -> None:
        factory: Callable[[], _Connection] = lambda: _Connection(self)  # noqa: E731
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(factory, self._host, self._requested_port)

    async def stop(self) -> None:
        """Stop accepting, drop open connections (idle keep-alives included) and wait."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = [
            slot.task for conn in self.connections for slot in conn._slots if slot.task is not None
        ]
        for conn in list(self.connections):
            conn.abort()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        await server.wait_closed()
