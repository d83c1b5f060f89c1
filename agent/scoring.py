"""The device's local scoring endpoint: ``POST /score`` with ``{"data": ...}``, key-authenticated.

Served by ``agent.httpserver`` (asyncio with httptools), because a device installs the agent
without FastAPI and the server's own cost is most of a small model's call. Routes:

    GET  /healthz                 no auth; 200 with the active models, 503 when there are none
    GET  /models                  the active models with version, digest and signature
    GET  /swagger.json            an OpenAPI document of the active models (``agent.openapi``)
    POST /score                   score with the default model
    POST /models/{name}/score     score with a named model

A scoring body is JSON ``{"data": ...}``, or a NumPy ``.npy`` (``application/x-npy``) or
``.npz`` (``application/x-npz``) file (``agent.scoring_body``). Built-in runtimes check the data
against the model's signature (400 saying what was expected) and answer on the event loop; an
entry script gets the body as it came, in its worker process (see ``ScriptRuntime``).

Every error is JSON ``{"error": "..."}``. A key is sent as ``Authorization: Bearer <key>`` or
``x-api-key: <key>``. A caller may name its request with ``X-Correlation-Id``: data collection
keeps it with the record.

Every call that reaches a model is told to an observer (the agent core, for telemetry and data
collection), after the model has answered and on the request path: it must be quick.
"""

import asyncio
import functools
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote

from agent.errors import InputError, ModelCallError
from agent.httpserver import HttpServer, Request, Response, error
from agent.jsonvalues import JsonText, to_json
from agent.openapi import openapi_document
from agent.runtimes.base import ActiveModel, ActiveModels, RawBodyRuntime
from agent.runtimes.tensors import non_finite
from agent.scoring_body import BodyError, is_json, media_type, request_data

logger = logging.getLogger(__name__)

SCRIPT_CALL_THREADS = 16
MAX_SCRIPT_CALLS_WAITING = 8  # per entry-script model, the call being served included
_GET_ROUTES = frozenset({"healthz", "models", "swagger"})
_FIXED_ROUTES = {
    "/healthz": "healthz",
    "/models": "models",
    "/score": "score",
    "/swagger.json": "swagger",
}


class ScoringCall:
    """One call that reached a model (observers read it; none changes it)."""

    # Made on every call: slotted and mutable (a frozen dataclass costs ~1 µs more to make).
    __slots__ = ("_body", "_data", "body_bytes", "correlation_id", "latency_s", "model", "outputs")

    def __init__(
        self,
        *,
        model: ActiveModel,
        data: Any = None,
        body: tuple[bytes, str] | None = None,
        outputs: dict[str, Any] | None,
        latency_s: float,
        correlation_id: str | None,
        body_bytes: int,
    ) -> None:
        self.model = model
        self._data = data
        self._body = body  # (body, media type): data read from it only when asked
        self.outputs = outputs  # None: the model raised
        self.latency_s = latency_s  # of the model's call alone
        self.correlation_id = correlation_id  # the X-Correlation-Id header, when given
        self.body_bytes = body_bytes

    @property
    def data(self) -> Any:
        """The request's ``data`` (an array for a .npy body; None: not readable). An entry
        script's body is parsed for it only when an observer asks, as data collection does
        for the calls it samples: the script itself parses the body, not the agent."""
        if self._body is not None:
            self._data = _logged_data(*self._body)
            self._body = None
        return self._data


@runtime_checkable
class ScoringObserver(Protocol):
    def scored(self, call: ScoringCall) -> None:
        """Called on the request path after every call that reached a model; must be quick."""
        ...


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
        self._max_unpacked_bytes = max_unpacked_bytes  # of an .npz body's arrays
        # Entry-script calls block a thread for up to their time limit: a pool of their own, so
        # callers of a hung script cannot take the threads installs and the outbox use.
        self._script_threads = ThreadPoolExecutor(
            max_workers=SCRIPT_CALL_THREADS, thread_name_prefix="score-script"
        )
        self._script_waiting: dict[str, int] = {}  # package digest -> calls in or waiting
        self._script_calls: set[asyncio.Future[Any]] = set()  # made from the loop, running
        self._http = HttpServer(
            self,
            host=host,
            port=port,
            max_body_bytes=max_body_bytes,
            idle_timeout_s=idle_timeout_s,
        )

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        return self._http.port

    @property
    def address(self) -> tuple[str, int]:
        return self._http.address

    async def start(self) -> None:
        await self._http.start()
        logger.info("scoring endpoint listening", extra={"host": self._host, "port": self.port})

    async def stop(self) -> None:
        """Stop accepting, close open connections (idle keep-alives included) and wait."""
        await self._http.stop()
        # Calls still in a script end by its time limit; nobody waits for their answers now.
        self._script_threads.shutdown(wait=False, cancel_futures=True)

    # -- the HTTP handler -------------------------------------------------------------------

    def check(self, method: str, path: str, headers: dict[bytes, bytes]) -> Response | None:
        """Routing, method and auth, decided from the head alone."""
        route = _match(path)
        if route is None:
            return error(404, f"no route {path}")
        allowed = "GET" if route in _GET_ROUTES else "POST"
        if method != allowed:
            return error(405, f"{path} takes {allowed}", headers=[("allow", allowed)])
        if route != "healthz" and not self._authorized(headers):
            return error(401, "missing or wrong API key", headers=[("www-authenticate", "Bearer")])
        return None

    def handle(self, request: Request) -> Response | Awaitable[Response]:
        route = _match(request.path)
        if route == "healthz":
            active = self._active()
            return Response(
                200 if active else 503,
                {
                    "status": "ok" if active else "unavailable",
                    "models": [{"name": m.name, "version": m.version} for m in active],
                },
            )
        if route == "models":
            return Response(200, [_describe(m) for m in self._active()])
        if route == "swagger":
            return Response(200, openapi_document(self._active()))
        if route == "score":
            model = self._models.get(None)
            if model is None:
                return error(503, "no active model")
        else:
            assert route is not None
            model = self._models.get(route)
            if model is None:
                return error(404, f"no active model named {route!r}")
        kind = media_type(request.headers.get(b"content-type"))
        correlation = request.headers.get(b"x-correlation-id")
        correlation_id = correlation.decode("utf-8", "replace").strip() if correlation else None
        runtime = model.runtime
        if callable(getattr(runtime, "run_raw", None)):
            # An entry script. (A runtime_checkable isinstance costs ~10 µs a call.)
            raw: RawBodyRuntime = runtime  # type: ignore[assignment]
            return self._score_raw(model, raw, request.body, kind, correlation_id or None)
        return self._score(model, request.body, kind, correlation_id or None)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        presented: bytes | None = None
        auth = headers.get(b"authorization")
        if auth is not None and auth[:7].lower() == b"bearer ":
            presented = auth[7:].strip()
        elif b"x-api-key" in headers:
            presented = headers[b"x-api-key"].strip()
        if not presented:
            return False
        matched = False
        for key in self._keys():
            # Compare against every key, so the time taken doesn't reveal which one is close.
            if key and hmac.compare_digest(presented, key.encode()):
                matched = True
        return matched

    def _score(
        self, model: ActiveModel, body: bytes, kind: str, correlation_id: str | None
    ) -> Response:
        """A built-in runtime: the body's data checked against the signature, then the model."""
        try:
            data = request_data(body, kind, max_unpacked_bytes=self._max_unpacked_bytes)
        except BodyError as exc:
            return error(exc.status, exc.detail)
        outputs: dict[str, Any] | None = None
        started = time.perf_counter()
        try:
            # Inline on the event loop: built-in runtimes answer in microseconds, less than a
            # hop to a thread would cost. Entry scripts, which may take long, go to one.
            outputs = model.runtime.predict(data)
            answer = to_json(
                {
                    "result": next(iter(outputs.values()), None),
                    "outputs": outputs,
                    "model": {"name": model.name, "version": model.version},
                }
            )
            # NaN and infinity are written as null; only then is the slower exact check due.
            broken = non_finite(outputs) if b"null" in answer else None
            if broken is not None:
                outputs = None  # a failed call, for telemetry
                return error(500, f"the model produced NaN or infinity in output {broken!r}")
        except Exception as exc:
            return _failure(model, exc)
        finally:
            self._observe(model, data, outputs, started, correlation_id, len(body))
        return Response(200, answer)

    def _score_raw(
        self,
        model: ActiveModel,
        runtime: RawBodyRuntime,
        body: bytes,
        kind: str,
        correlation_id: str | None,
    ) -> Response | Awaitable[Response]:
        """An entry script: ``run(raw_data)`` gets the body as it came, in its worker process.
        A quick script's answer is there at once (see ``ScriptRuntime.run_raw_nowait``);
        otherwise the call is awaited, so a slow or hung script holds up its own callers and
        no one else's."""
        waiting = self._script_waiting.get(model.digest, 0)
        if waiting >= MAX_SCRIPT_CALLS_WAITING:
            # A script answers one call at a time; a queue past this only makes callers wait
            # for a 503 "busy" later, holding threads other scripts need.
            return error(503, f"{model.name} is busy: {waiting} calls are waiting for it")
        started = time.perf_counter()

        def answer(result: Any, failed: Exception | None) -> Response:
            """The response to the finished call, told to the observer."""
            outputs = None if failed is not None else {"result": result}
            self._observe(model, None, outputs, started, correlation_id, len(body), (body, kind))
            if failed is not None:
                return _failure(model, failed)
            return Response(
                200, {"result": result, "model": {"name": model.name, "version": model.version}}
            )

        def settled(call: "asyncio.Future[Any]") -> Response:
            exception = call.exception()
            if exception is not None and not isinstance(exception, Exception):
                raise exception  # SystemExit and the like are not a model's failure
            return answer(None if exception is not None else call.result(), exception)

        try:
            call = self._run_script(runtime, body, kind)
        except Exception as exc:
            return answer(None, exc)
        if isinstance(call, JsonText):  # answered in place
            return answer(call, None)
        if call.done():
            return settled(call)
        return self._await_script(model.digest, call, settled)

    async def _await_script(
        self,
        digest: str,
        call: "asyncio.Future[Any]",
        answer: Callable[["asyncio.Future[Any]"], Response],
    ) -> Response:
        """Wait for a script call that was not answered at once, counted among its waiting."""
        self._script_waiting[digest] = self._script_waiting.get(digest, 0) + 1
        try:
            # Shielded: a caller that goes away must not cut the call short, or its reply
            # would be left in the pipe for the next caller. The call ends by its time limit.
            await asyncio.wait([asyncio.shield(call)])
        finally:
            self._script_waiting[digest] -= 1
            if not self._script_waiting[digest]:
                del self._script_waiting[digest]
        return answer(call)

    def _run_script(
        self, runtime: RawBodyRuntime, body: bytes, kind: str
    ) -> "JsonText | asyncio.Future[Any]":
        """From the event loop when the runtime can take the call at once (no thread
        hand-over; the answer may be there already), else from a thread of the scripts' pool,
        where it may wait its turn."""
        nowait = getattr(runtime, "run_raw_nowait", None)
        call = nowait(body, kind) if nowait is not None else None
        if isinstance(call, JsonText):
            return call
        if call is not None:
            future: asyncio.Future[Any] = asyncio.ensure_future(call)
            if not future.done():
                # Kept referenced while it runs: it ends by its time limit, awaited or not.
                self._script_calls.add(future)
                future.add_done_callback(self._script_calls.discard)
            return future
        # The worker's JSON as it wrote it where the runtime offers it, as from the loop.
        run = getattr(runtime, "run_json", None) or runtime.run_raw
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._script_threads, run, body, kind)

    def _observe(
        self,
        model: ActiveModel,
        data: Any,
        outputs: dict[str, Any] | None,
        started: float,
        correlation_id: str | None,
        body_bytes: int,
        body: tuple[bytes, str] | None = None,
    ) -> None:
        if self._observer is None:
            return
        call = ScoringCall(
            model=model,
            data=data,
            body=body,
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


def _failure(model: ActiveModel, exc: Exception) -> Response:
    """The answer to a call the model did not answer: the caller's fault (400), a reason the
    runtime gives (``ModelCallError``), or a bug, logged with its traceback."""
    if isinstance(exc, InputError):
        return error(400, exc.detail)
    if isinstance(exc, ModelCallError):
        return error(exc.status, exc.detail)
    logger.error(
        "model failed",
        exc_info=exc,
        extra={"model": model.name, "version": model.version},
    )
    return error(500, "the model failed; see the device log")


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


@functools.lru_cache(maxsize=1024)  # asked twice a request (head and body); paths are few
def _match(path: str) -> str | None:
    """ "healthz", "models", "swagger", "score", or a model name for /models/{name}/score."""
    fixed = _FIXED_ROUTES.get(path)
    if fixed is not None:
        return fixed
    parts = path.split("/")
    if len(parts) == 4 and parts[0] == "" and parts[1] == "models" and parts[3] == "score":
        name = unquote(parts[2])
        if name and name not in _FIXED_ROUTES.values():
            return name
    return None


def _describe(model: ActiveModel) -> dict[str, Any]:
    signature = model.signature()
    runtime = model.manifest.runtime
    described: dict[str, Any] = {
        "name": model.name,
        "version": model.version,
        "digest": model.digest,
        "framework": str(model.manifest.model.framework),
        "runtime": runtime.kind,  # "builtin", or "script" for an entry script
        "signature": signature.model_dump(mode="json"),
    }
    if runtime.entry_script is not None:
        described["entry_script"] = runtime.entry_script
    return described
