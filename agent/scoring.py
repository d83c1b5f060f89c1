"""The device's local scoring endpoint: ``POST /score`` with ``{"data": ...}``, key-authenticated.

Plain asyncio with h11 for HTTP/1.1 (keep-alive, bounded bodies), because a device installs the
agent without FastAPI. Routes:

    GET  /healthz                 no auth; 200 with the active models, 503 when there are none
    GET  /models                  the active models with version, digest and signature
    POST /score                   score with the default model
    POST /models/{name}/score     score with a named model

Every error is JSON ``{"error": "..."}``. A key is sent as ``Authorization: Bearer <key>`` or
``x-api-key: <key>``. A caller may name its request with ``X-Correlation-Id``: data collection
keeps it with the record.

Every call that reaches a model is told to an observer (the agent core, for telemetry and data
collection), after the model has answered and on the request path: it must be quick.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote

import h11

from agent.errors import InputError, ModelCallError
from agent.runtimes.base import ActiveModel, ActiveModels, RawBodyRuntime
from agent.scoring_body import BodyError, is_json, media_type, request_data

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
READ_CHUNK_BYTES = 64 * 1024
LINGER_S = 2.0
STOP_TIMEOUT_S = 5.0
LINGER_MAX_BYTES = 4 * 1024 * 1024


@dataclass
class _Response:
    status: int
    body: Any
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False


def _error(status: int, message: str, **kwargs: Any) -> _Response:
    return _Response(status, {"error": message}, **kwargs)


@dataclass(frozen=True)
class ScoringCall:
    """One call that reached a model."""

    model: ActiveModel
    data: Any  # the request's "data" (an array for a .npy body; None: not readable)
    outputs: dict[str, Any] | None  # None: the model raised
    latency_s: float  # of the model's predict alone
    correlation_id: str | None  # the X-Correlation-Id header, when given
    body_bytes: int


@runtime_checkable
class ScoringObserver(Protocol):
    def scored(self, call: ScoringCall) -> None:
        """Called on the request path after every call that reached a model; must be quick."""
        ...


class _ConnectionClosedError(Exception):
    """The peer closed, went idle or broke the protocol: close the connection quietly."""


class ScoringServer:
    """The local HTTP scoring endpoint over the agent's active models."""

    def __init__(
        self,
        *,
        models: ActiveModels,
        keys: Callable[[], Collection[str]],
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = 16 * 1024 * 1024,
        idle_timeout_s: float = 60.0,
        observer: ScoringObserver | None = None,
        max_unpacked_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        """``observer`` defaults to ``models`` when that is one too (the agent core is both)."""
        self._models = models
        if observer is None and isinstance(models, ScoringObserver):
            observer = models
        self._observer = observer
        self._keys = keys
        self._host = host
        self._requested_port = port
        self._max_body_bytes = max_body_bytes
        self._max_unpacked_bytes = max_unpacked_bytes  # of an .npz body's arrays
        self._idle_timeout_s = idle_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("scoring server not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle_connection, self._host, self._requested_port
        )
        logger.info("scoring endpoint listening", extra={"host": self._host, "port": self.port})

    async def stop(self) -> None:
        """Stop accepting, close open connections (idle keep-alives included) and wait."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Aborting the transport ends a handler at its next read, as if the client had gone;
        # cancelling the handler tasks instead makes asyncio log each one as an error.
        for writer in list(self._connections.values()):
            writer.transport.abort()
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
            for task in pending:
                task.cancel()
        await server.wait_closed()

    # -- connection ---------------------------------------------------------------------------

    async def _handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections[task] = writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Responses are one small write; don't let Nagle hold them back for an ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            while True:
                try:
                    event = await self._next_event(conn, reader)
                    if not isinstance(event, h11.Request):
                        break  # the peer closed between requests
                    response = await self._serve(conn, reader, writer, event)
                except h11.RemoteProtocolError as exc:
                    # Malformed HTTP: answer if the protocol still allows it, then hang up.
                    if conn.our_state is h11.SEND_RESPONSE:
                        await self._send(conn, writer, _error(400, f"bad request: {exc}"))
                    break
                await self._send(conn, writer, response)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (_ConnectionClosedError, ConnectionError):
            pass
        except h11.LocalProtocolError:
            logger.exception("scoring endpoint broke HTTP on a connection")
        finally:
            if task is not None:
                self._connections.pop(task, None)
            if conn.their_state not in (h11.DONE, h11.CLOSED, h11.IDLE):
                await _linger(reader, writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                async with asyncio.timeout(self._idle_timeout_s):
                    data = await reader.read(READ_CHUNK_BYTES)
            except TimeoutError:
                raise _ConnectionClosedError from None
            if not data and conn.their_state is h11.IDLE:
                raise _ConnectionClosedError  # clean close between requests
            conn.receive_data(data)

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, response: _Response
    ) -> None:
        try:
            body = json.dumps(response.body, allow_nan=False).encode()
        except ValueError:
            # JSON has no NaN or Infinity; a model that produced one is broken, not the client.
            logger.error("model output is not valid JSON (NaN or Infinity)")
            response = _error(500, "the model produced a non-finite number")
            body = json.dumps(response.body).encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            *response.headers,
        ]
        if response.close:
            headers.append(("connection", "close"))
        writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)))
        writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    # -- request ------------------------------------------------------------------------------

    async def _read_body(
        self, conn: h11.Connection, reader: asyncio.StreamReader, limit: int
    ) -> bytes | None:
        """The request body, or None once it grows past the limit (the rest stays unread)."""
        parts: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(conn, reader)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    return None
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise _ConnectionClosedError

    async def _serve(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
    ) -> _Response:
        headers = {name.decode("latin-1"): value for name, value in request.headers}
        has_body = "transfer-encoding" in headers or headers.get("content-length", b"0") != b"0"
        response = self._check_request(request, headers)
        if response is not None:
            # Not reading the body of a refused request; the connection can't be reused then.
            response.close = response.close or has_body
            return response

        body = b""
        if has_body:
            if conn.they_are_waiting_for_100_continue:
                # Ask for the body only now that the request passed auth and routing.
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                await writer.drain()
            read = await self._read_body(conn, reader, self._max_body_bytes)
            if read is None:
                return _error(413, f"body over {self._max_body_bytes} bytes", close=True)
            body = read
        else:
            await self._read_body(conn, reader, 0)
        return await self._route(
            request, body, media_type(headers.get("content-type")), headers.get("x-correlation-id")
        )

    def _check_request(self, request: h11.Request, headers: dict[str, bytes]) -> _Response | None:
        """Routing, method, auth and size, decided from the headers alone."""
        method = request.method.decode("ascii", "replace")
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        route = _match(path)
        if route is None:
            return _error(404, f"no route {path}")
        allowed = "GET" if route in ("healthz", "models") else "POST"
        if method != allowed:
            return _error(405, f"{path} takes {allowed}", headers=[("allow", allowed)])
        if route != "healthz" and not self._authorized(headers):
            return _error(401, "missing or wrong API key", headers=[("www-authenticate", "Bearer")])
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body_bytes:
            return _error(413, f"body over {self._max_body_bytes} bytes", close=True)
        return None

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        presented: bytes | None = None
        auth = headers.get("authorization")
        if auth is not None and auth[:7].lower() == b"bearer ":
            presented = auth[7:].strip()
        elif "x-api-key" in headers:
            presented = headers["x-api-key"].strip()
        if not presented:
            return False
        matched = False
        for key in self._keys():
            # Compare against every key, so the time taken doesn't reveal which one is close.
            if key and hmac.compare_digest(presented, key.encode()):
                matched = True
        return matched

    async def _route(
        self, request: h11.Request, body: bytes, kind: str, correlation: bytes | None
    ) -> _Response:
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        route = _match(path)
        if route == "healthz":
            active = self._active()
            status = "ok" if active else "unavailable"
            return _Response(
                200 if active else 503,
                {
                    "status": status,
                    "models": [{"name": m.name, "version": m.version} for m in active],
                },
            )
        if route == "models":
            return _Response(200, [_describe(m) for m in self._active()])
        if route == "score":
            model = self._models.get(None)
            if model is None:
                return _error(503, "no active model")
        else:
            assert route is not None
            model = self._models.get(route)
            if model is None:
                return _error(404, f"no active model named {route!r}")
        correlation_id = correlation.decode("utf-8", "replace").strip() if correlation else None
        if isinstance(model.runtime, RawBodyRuntime):
            return await self._score_raw(model, model.runtime, body, kind, correlation_id or None)
        return self._score(model, body, kind, correlation_id or None)

    def _score(
        self, model: ActiveModel, body: bytes, kind: str, correlation_id: str | None
    ) -> _Response:
        """A built-in runtime: the body's data checked against the signature, then the model."""
        try:
            data = request_data(body, kind, max_unpacked_bytes=self._max_unpacked_bytes)
        except BodyError as exc:
            return _error(exc.status, exc.detail)
        outputs: dict[str, Any] | None = None
        started = time.perf_counter()
        try:
            # Inline on the event loop: built-in runtimes answer in microseconds, less than a
            # hop to a thread would cost. Entry scripts, which may take long, go to one.
            outputs = model.runtime.predict(data)
        except InputError as exc:
            return _error(400, exc.detail)
        except ModelCallError as exc:
            return _error(exc.status, exc.detail)
        except Exception:
            logger.exception("model failed", extra={"model": model.name, "version": model.version})
            return _error(500, "the model failed; see the device log")
        finally:
            self._observe(model, data, outputs, started, correlation_id, len(body))
        first = next(iter(outputs.values()), None)
        return _Response(
            200,
            {
                "result": first,
                "outputs": outputs,
                "model": {"name": model.name, "version": model.version},
            },
        )

    async def _score_raw(
        self,
        model: ActiveModel,
        runtime: RawBodyRuntime,
        body: bytes,
        kind: str,
        correlation_id: str | None,
    ) -> _Response:
        """An entry script: ``run(raw_data)`` gets the body as it came, in a thread, so a slow
        or hung script holds up its own callers and no one else's."""
        outputs: dict[str, Any] | None = None
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(runtime.run_raw, body, kind)
            outputs = {"result": result}
        except ModelCallError as exc:
            return _error(exc.status, exc.detail)
        except Exception:
            logger.exception("model failed", extra={"model": model.name, "version": model.version})
            return _error(500, "the model failed; see the device log")
        finally:
            self._observe(
                model, _logged_data(body, kind), outputs, started, correlation_id, len(body)
            )
        return _Response(
            200, {"result": result, "model": {"name": model.name, "version": model.version}}
        )

    def _observe(
        self,
        model: ActiveModel,
        data: Any,
        outputs: dict[str, Any] | None,
        started: float,
        correlation_id: str | None,
        body_bytes: int,
    ) -> None:
        if self._observer is None:
            return
        call = ScoringCall(
            model=model,
            data=data,
            outputs=outputs,
            latency_s=time.perf_counter() - started,
            correlation_id=correlation_id,
            body_bytes=body_bytes,
        )
        try:
            self._observer.scored(call)
        except Exception:
            # Telemetry and collection must never cost a caller its answer.
            logger.exception("scoring observer failed", extra={"model": call.model.name})

    def _active(self) -> list[ActiveModel]:
        found = (self._models.get(name) for name in self._models.names())
        return [m for m in found if m is not None]


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the client is still sending, for a short while.

    Closing a socket with unread input makes the kernel send a reset, which can destroy our
    response (a 413, say) before the client has read it.
    """
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            discarded = 0
            while discarded < LINGER_MAX_BYTES:
                data = await reader.read(READ_CHUNK_BYTES)
                if not data:
                    break
                discarded += len(data)


def _logged_data(body: bytes, kind: str) -> Any:
    """What data collection records of an entry script's call: the JSON request's ``data`` (or
    the whole JSON body, as a script may take any shape), None for a binary body."""
    if not is_json(kind):
        return None
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(request, dict) and "data" in request:
        return request["data"]
    return request


def _match(path: str) -> str | None:
    """ "healthz", "models", "score", or a model name for /models/{name}/score."""
    if path in ("/healthz", "/models", "/score"):
        return path[1:]
    parts = path.split("/")
    if len(parts) == 4 and parts[0] == "" and parts[1] == "models" and parts[3] == "score":
        name = unquote(parts[2])
        if name and name not in ("healthz", "models", "score"):
            return name
    return None


def _describe(model: ActiveModel) -> dict[str, Any]:
    signature = model.manifest.signature
    runtime_signature = getattr(model.runtime, "signature", None)
    if not (signature.inputs or signature.outputs) and callable(runtime_signature):
        signature = runtime_signature()
    return {
        "name": model.name,
        "version": model.version,
        "digest": model.digest,
        "signature": signature.model_dump(mode="json"),
    }
