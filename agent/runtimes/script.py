"""Entry scripts: a package's ``score.py`` with ``init()`` and ``run(raw_data)`` (the Azure ML
scoring-script contract), run in a worker process of its own so that user code that crashes or
hangs never takes the agent down.

The worker (``agent.runtimes.script_worker``) gets the package's files folder as its working
directory and first on ``sys.path``, and in ``OUTPOST_MODEL_DIR`` and ``AZUREML_MODEL_DIR`` (the
cloud workflow's name for it), so a scoring script written for Azure ML runs unchanged.

Supervision, after Erlang's and systemd's:

- ``init()`` runs once per worker start within ``init_timeout_ms``. At install a failure is a
  ``ModelLoadError`` (the install rolls back); later it counts as a failed restart.
- Calls go to the worker one at a time. A caller waits at most ``timeout_ms`` for its turn (then
  503, busy) and the script at most ``timeout_ms`` for its answer: past that the worker's whole
  process group is killed (504) and a new worker started in the background.
- A worker that dies (an exit, a signal such as SIGSEGV) answers its caller 503 naming the exit
  code or signal, and is restarted after a backoff that doubles from 0.5 s to 30 s.
- ``crash_loop_failures`` crashes, timeouts or failed restarts within ``crash_loop_window_s``
  put the model in crash loop: calls get 503 at once, restarts are tried at the longest backoff,
  and the agent reports the state (telemetry, degraded health, an ERROR log line) until the
  window holds fewer failures again.

The worker's stderr (``print()`` included) goes to the agent's log, each line bounded, and its
last lines go into the errors that a crash or a failed ``init()`` produces.
"""

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.errors import ModelCallError, ModelLoadError
from agent.jsonvalues import JsonText
from agent.protocol.documents import Manifest, ModelSignature
from agent.runtimes import script_worker
from agent.runtimes.options import ScriptOptions
from agent.runtimes.requirements import check_requirements
from agent.scoring_body import is_json

logger = logging.getLogger(__name__)

MODEL_DIR_VARIABLES = ("OUTPOST_MODEL_DIR", "AZUREML_MODEL_DIR")
WORKER_FILE = Path(script_worker.__file__).resolve()
STDERR_TAIL_LINES = 20
MAX_STDERR_LINE_BYTES = 2000
TAIL_IN_ERRORS = 5  # of the stderr lines kept, how many an error message quotes
EXIT_WAIT_S = 2.0  # for a worker whose pipe closed to finish exiting, and its threads to end
READ_CHUNK_BYTES = 64 * 1024  # a pipe holds no more than this on Linux
# A call from the event loop must never wait to write: a frame up to this fits an empty pipe
# (64 KiB on Linux) in one write. Larger bodies go through a thread.
NOWAIT_MAX_BODY_BYTES = 60 * 1024
# A call from the event loop to a script that answered its last call within QUICK_REPLY_S is
# waited for in place, holding the loop for at most IN_PLACE_WAIT_S: its answer then costs one
# wake-up of the agent instead of a trip through the loop (a reader, a future, a task: ~110 µs
# a call here). Built-in runtimes hold the loop for their whole call; this bounds a script's
# hold. The bound is above the scheduler's tick on purpose: a poll whose timeout is the next
# timer due re-arms the CPU's timer twice a call, measured at ~25 µs on a VM.
QUICK_REPLY_S = 0.002
IN_PLACE_WAIT_S = 0.005


@dataclass(frozen=True)
class Supervision:
    """How a crashed or hung worker is restarted, and when that becomes a crash loop."""

    backoff_first_s: float = 0.5
    backoff_max_s: float = 30.0
    crash_loop_failures: int = 5
    crash_loop_window_s: float = 60.0


class WorkerState(StrEnum):
    OK = "ok"  # a worker is up and answering
    RESTARTING = "restarting"  # the worker died or hung; a new one is on its way
    CRASH_LOOP = "crash_loop"  # too many failures lately: calls are refused, restarts slowed
    CLOSED = "closed"  # the model stopped serving


@dataclass(frozen=True)
class WorkerStats:
    """The worker's state and its troubles since the runtime started."""

    state: WorkerState
    restarts: int  # workers started after the first, successful or not
    timeouts: int  # calls that ran past timeout_ms (their worker was killed)
    crashes: int  # workers that died, or failed to start again


class _Timeout(Exception):
    """The deadline passed."""


class _Gone(Exception):
    """The worker closed its end of the protocol: it exited or is exiting."""


class _Broken(Exception):
    """The worker sent something the protocol does not allow."""


class _StartFailed(Exception):
    """A worker did not get as far as a successful ``init()``; the message says why."""


def _start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    # In a copy of the caller's context: the agent's log book is found through a context
    # variable (agent.logbook), so the worker's output lands in its own agent's log.
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(target,), name=name, daemon=True)
    thread.start()
    return thread


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Worker:
    """One worker process: its protocol pipes, its lifeline and the tail of its stderr."""

    def __init__(
        self,
        proc: "subprocess.Popen[bytes]",
        lifeline: int,
        *,
        label: str,
        on_line: Callable[[str], None],
        on_exit: Callable[["_Worker"], None],
    ) -> None:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        self.proc = proc
        self.pid = proc.pid
        self.failed = False  # set once, under the runtime's condition
        self._to_worker = proc.stdin.fileno()
        self._from_worker = proc.stdout.fileno()
        os.set_blocking(self._to_worker, False)
        os.set_blocking(self._from_worker, False)
        self._lifeline = lifeline
        self._buffer = bytearray()
        self._replies = select.poll()  # not select(): the agent may hold over 1024 descriptors
        self._replies.register(self._from_worker, select.POLLIN)
        self._tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._tail_lock = threading.Lock()
        self._on_line = on_line
        self._on_exit = on_exit
        self._release_lock = threading.Lock()
        self._released = False
        self._stderr_thread = _start_thread(self._drain_stderr, f"{label}-stderr-{self.pid}")

    # -- stderr -------------------------------------------------------------------------------

    def _drain_stderr(self) -> None:
        stream = self.proc.stderr
        assert stream is not None
        while True:
            line = stream.readline(MAX_STDERR_LINE_BYTES)
            if not line:
                break
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            with self._tail_lock:
                self._tail.append(text)
            self._on_line(text)
        stream.close()
        self._on_exit(self)

    def tail(self, lines: int = TAIL_IN_ERRORS) -> str:
        """The last lines the worker wrote to stderr, joined with " | "; empty when none."""
        with self._tail_lock:
            kept = list(self._tail)[-lines:]
        return " | ".join(line.strip() for line in kept if line.strip())

    # -- the protocol -------------------------------------------------------------------------

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise _Timeout
        poller = select.poll()  # not select(): the agent may hold more than 1024 descriptors
        poller.register(fd, event)
        poller.poll(remaining_s * 1000)

    def _write_some(self, data: bytes | memoryview) -> int:
        try:
            return os.write(self._to_worker, data)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ValueError, OSError):
            raise _Gone from None

    def _write(self, frame: bytes, deadline: float) -> None:
        """Write a whole frame (header included): one write for any frame the pipe holds."""
        written = self._write_some(frame)
        if written == len(frame):
            return
        rest = memoryview(frame)[written:]
        while rest:
            self._wait(self._to_worker, select.POLLOUT, deadline)
            rest = rest[self._write_some(rest) :]

    def _read_frame(self, deadline: float) -> bytes:
        while True:
            frame = self._take_frame()
            if frame is not None:
                return frame
            if not self._read_some():
                self._wait(self._from_worker, select.POLLIN, deadline)

    def read_frame_within(self, wait_s: float) -> bytes | None:
        """A whole frame if one is there within ``wait_s``, else None (a part that came stays
        buffered for whoever reads on). Raises ``_Gone`` when the worker closed its pipe."""
        deadline = time.monotonic() + wait_s
        if not self._buffer:
            # The usual case: nothing half-read, and the reply comes in one read. Kept apart
            # from the loop below on purpose: the loop's buffer and clock checks before the
            # first poll cost ~2 µs a call (measured), on the core the worker waits for.
            if not self._replies.poll(wait_s * 1000):
                return None
            chunk = self._read_chunk()
            if chunk is not None:
                whole = script_worker.whole_frame(chunk)
                if whole is not None:
                    return whole
                self._buffer += chunk
        while True:
            frame = self._take_frame()
            if frame is not None:
                return frame
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or not self._replies.poll(remaining_s * 1000):
                return None
            self._read_some()

    def _read_chunk(self) -> bytes | None:
        """What the reply pipe holds; None when it holds nothing yet. Raises ``_Gone`` when
        the worker closed it."""
        try:
            chunk = os.read(self._from_worker, READ_CHUNK_BYTES)
        except BlockingIOError:
            return None
        except (ValueError, OSError):
            raise _Gone from None
        if not chunk:
            raise _Gone
        return chunk

    def _read_some(self) -> bool:
        """Add what the reply pipe holds to the buffer; False when it held nothing yet.
        Raises ``_Gone`` when the worker closed it."""
        chunk = self._read_chunk()
        if chunk is None:
            return False
        self._buffer += chunk
        return True

    def _take_frame(self) -> bytes | None:
        """A whole frame from what has been read, or None while it is not all there."""
        try:
            return script_worker.take_frame(self._buffer)
        except script_worker.FrameTooLarge as exc:
            raise _Broken(f"a frame of {exc.size} bytes") from None

    async def read_frame_async(self, deadline: float) -> bytes:
        """The next frame, read on the event loop: the pipe is watched by the loop, so a call
        costs no thread hand-over. The caller holds the call lock (it owns the pipes)."""
        frame = self._take_frame()
        if frame is None:
            loop = asyncio.get_running_loop()
            arrived: asyncio.Future[bytes] = loop.create_future()

            def readable() -> None:
                if arrived.done():
                    return
                try:
                    whole = self._take_frame() if self._read_some() else None
                except (_Gone, _Broken) as exc:
                    arrived.set_exception(exc)
                    return
                if whole is not None:
                    arrived.set_result(whole)

            loop.add_reader(self._from_worker, readable)
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                    frame = await arrived
            except TimeoutError:
                raise _Timeout from None
            finally:
                loop.remove_reader(self._from_worker)
        return frame

    def read_message(self, deadline: float) -> dict[str, Any]:
        return self.decode(self._read_frame(deadline))

    @staticmethod
    def decode(frame: bytes) -> dict[str, Any]:
        try:
            message = json.loads(frame)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Broken(f"a frame that is not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise _Broken("a frame that is not a JSON object")
        return message

    def send(self, text: bool, body: bytes, deadline: float) -> None:
        """One frame a call (kind byte, then the body): one write and one wake-up."""
        kind = b"t" if text else b"b"
        self._write(script_worker.FRAME_HEADER.pack(len(body) + 1) + kind + body, deadline)

    def call(self, text: bool, body: bytes, deadline: float) -> bytes:
        """The reply frame to one call."""
        self.send(text, body, deadline)
        return self._read_frame(deadline)

    # -- ending -------------------------------------------------------------------------------
    #
    # Any thread may terminate() and reap() a worker. Only the thread that owns its pipes (the
    # caller holding the runtime's call lock, or the thread starting it) may release() them:
    # a descriptor closed under another thread's read could be reused by an unrelated file
    # before that read runs.

    def terminate(self) -> None:
        """SIGKILL the worker's process group: user code's own children go with it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def reap(self) -> int | None:
        """The exit status, once the process has ended (None if it still runs after a wait)."""
        try:
            return self.proc.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            return None

    def release(self) -> None:
        """Close the protocol pipes and the lifeline (once; by the owner of the pipes)."""
        with self._release_lock:
            if self._released:
                return
            self._released = True
        with contextlib.suppress(OSError):
            os.close(self._lifeline)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def kill(self) -> None:
        """Terminate, reap and release: the owner is done with this worker."""
        self.terminate()
        if self.reap() is None:
            logger.error("worker %d did not end after SIGKILL", self.pid)
        self.release()

    def describe_exit(self) -> str:
        """How the worker ended, once its protocol pipe closed ("exited with code 3")."""
        code = self.reap()
        # Whatever it left running in its group goes too (and a worker that closed its pipe
        # but lives on is ended).
        self.terminate()
        if code is None:
            code = self.reap()
            if code is None:
                return "closed its protocol pipe and would not end"
            return "closed its protocol pipe and was killed"
        self.join()  # so the tail holds its last words
        return _exit_words(code)

    def join(self) -> None:
        if threading.current_thread() is not self._stderr_thread:
            self._stderr_thread.join(EXIT_WAIT_S)


class ScriptRuntime:
    """A model served by its entry script in a supervised worker process."""

    def __init__(
        self,
        *,
        model: str,
        files_dir: Path,
        entry: Path,
        signature: ModelSignature,
        options: ScriptOptions,
        supervision: Supervision,
    ) -> None:
        self._model = model
        self._files_dir = files_dir
        self._entry = entry
        self._script = entry.name
        self._signature = signature
        self._timeout_s = options.timeout_ms / 1000
        self._timeout_ms = options.timeout_ms
        self._init_timeout_ms = options.init_timeout_ms
        self._supervision = supervision
        self._call_lock = threading.Lock()  # one call at a time per worker
        self._cond = threading.Condition()  # guards everything below
        self._worker: _Worker | None = None
        self._starting: _Worker | None = None
        self._closed = False
        self._failures: deque[float] = deque()  # monotonic times within the window
        self._in_crash_loop = False
        self._backoff_s = supervision.backoff_first_s
        self._restart_due: float | None = None
        self._last_failure = ""
        self._restarts = 0
        self._timeouts = 0
        self._crashes = 0
        self._supervisor: threading.Thread | None = None
        self._retired: list[_Worker] = []
        # Whether the script answered its last call from the event loop within QUICK_REPLY_S:
        # then the next one is waited for in place (see QUICK_REPLY_S). Read and written by
        # the holder of the call lock.
        self._answers_quickly = True

    @classmethod
    def start(
        cls,
        model_dir: Path,
        manifest: Manifest,
        options: ScriptOptions,
        supervision: Supervision | None = None,
    ) -> "ScriptRuntime":
        """Check the script's requirements, start its worker and run ``init()``.

        Raises ``IncompatibleError`` for unmet requirements, ``ModelLoadError`` when the script
        is missing or its ``init()`` failed or timed out.
        """
        entry = _entry_script(model_dir, manifest)
        check_requirements(manifest.runtime.requirements, needed_by=entry.name)
        runtime = cls(
            model=manifest.model.name,
            files_dir=model_dir,
            entry=entry,
            signature=manifest.signature,
            options=options,
            supervision=supervision or Supervision(),
        )
        try:
            worker = runtime._spawn()
        except _StartFailed as exc:
            raise ModelLoadError(str(exc)) from None
        with runtime._cond:
            runtime._worker = worker
        runtime._supervisor = _start_thread(runtime._supervise, f"{manifest.model.name}-supervisor")
        return runtime

    # -- Runtime ------------------------------------------------------------------------------

    def signature(self) -> ModelSignature:
        return self._signature

    def predict(self, data: Any) -> dict[str, Any]:
        """``run`` on ``{"data": data}`` as JSON: its dict of outputs, else ``{"result": value}``.

        A string that holds JSON (Azure scripts often ``return json.dumps(...)``) counts as the
        value it encodes, so the health check compares values rather than text.
        """
        value = self.run_raw(json.dumps({"data": data}).encode(), "application/json")
        if isinstance(value, str):
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            return value
        return {"result": value}

    @staticmethod
    def _as_text(body: bytes, content_type: str) -> bool:
        """Whether ``run`` gets the body as text (JSON and text bodies, checked to be UTF-8)."""
        text = is_json(content_type)
        if text:
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise ModelCallError(
                    400,
                    f"the body is not UTF-8 text ({content_type or 'no content type'});"
                    " send binary data as application/octet-stream",
                ) from None
        return text

    def run_raw_nowait(
        self, body: bytes, content_type: str
    ) -> "JsonText | asyncio.Future[JsonText] | None":
        """The call made from the event loop, when it can be made at once: the worker is free
        and the body fits the pipe in one write. None otherwise; then ``run_json`` from a
        thread.

        A script that answered its last call within ``QUICK_REPLY_S`` is waited for in place,
        up to ``IN_PLACE_WAIT_S``: its answer is then returned as it is, and the endpoint
        answers without a future or a task. Otherwise the answer comes from a task that owns
        the call to its end: cancelling whoever awaits it must not leave a reply in the pipe
        for the next call, so callers shield it. Either way the call costs no thread hand-over
        (~85 µs a call here).
        """
        text = self._as_text(body, content_type)
        if len(body) > NOWAIT_MAX_BODY_BYTES or not self._call_lock.acquire(blocking=False):
            return None
        try:
            with self._cond:
                if self._closed or self._failures or self._in_crash_loop or self._worker is None:
                    self._refuse_unless_serving()  # the full check, only when it may refuse
                # Retired workers are reaped by the next caller, which may wait: from a thread.
                worker = None if self._retired else self._worker
            if worker is None:
                self._call_lock.release()
                return None
            return self._call_from_loop(worker, text, body)
        except BaseException:
            self._call_lock.release()
            raise

    def _call_from_loop(
        self, worker: "_Worker", text: bool, body: bytes
    ) -> "JsonText | asyncio.Future[JsonText]":
        """Send the call, and wait for its answer in place if the script is a quick one; the
        call lock is held, and released when the answer is there."""
        sent_at = time.monotonic()
        deadline = sent_at + self._timeout_s
        in_place: bytes | None = None  # the reply frame, when it came while waiting here
        failed: Exception | None = None
        try:
            worker.send(text, body, deadline)
            if self._answers_quickly:
                in_place = worker.read_frame_within(IN_PLACE_WAIT_S)
        except (_Timeout, _Gone, _Broken) as exc:
            failed = exc
        self._answers_quickly = in_place is not None and (
            time.monotonic() - sent_at < QUICK_REPLY_S
        )
        if in_place is not None and in_place[:1] == script_worker.ANSWER:
            try:
                return self._answer(worker, in_place)
            finally:
                self._call_lock.release()

        async def finish() -> JsonText:
            try:
                if failed is not None:
                    # Killing and reaping the worker may wait for it to end: not on the loop.
                    raise await asyncio.to_thread(self._call_failed, worker, failed)
                try:
                    frame = (
                        in_place
                        if in_place is not None
                        else await worker.read_frame_async(deadline)
                    )
                except (_Timeout, _Gone, _Broken) as exc:
                    raise await asyncio.to_thread(self._call_failed, worker, exc) from None
                self._answers_quickly = time.monotonic() - sent_at < QUICK_REPLY_S
                if frame[:1] == script_worker.ANSWER:
                    return self._answer(worker, frame)
                # run raised, or the reply breaks the protocol and the worker is killed,
                # which may wait: from a thread (a failed call need not be quick).
                return await asyncio.to_thread(self._answer, worker, frame)
            finally:
                self._call_lock.release()

        return asyncio.ensure_future(finish())

    def run_raw(self, body: bytes, content_type: str) -> Any:
        """``run(raw_data)`` with the body as it came: a str for JSON and text, else bytes;
        ``run``'s answer as a value."""
        return self.run_json(body, content_type).value()

    def run_json(self, body: bytes, content_type: str) -> JsonText:
        """``run_raw``, with the answer as the JSON text the worker wrote."""
        text = self._as_text(body, content_type)
        with self._cond:
            self._refuse_unless_serving()
        if not self._call_lock.acquire(timeout=self._timeout_s):
            raise ModelCallError(
                503,
                f"{self._script} is busy: earlier calls held it past {self._timeout_ms} ms",
            )
        try:
            return self._call(text, body)
        finally:
            self._call_lock.release()

    def stats(self) -> WorkerStats:
        with self._cond:
            return WorkerStats(
                state=self._state(),
                restarts=self._restarts,
                timeouts=self._timeouts,
                crashes=self._crashes,
            )

    @property
    def worker_pid(self) -> int | None:
        """The current worker's process id (None while there is none)."""
        with self._cond:
            return self._worker.pid if self._worker is not None else None

    def close(self) -> None:
        """Stop serving: let a call in flight finish (within its time limit), then kill the
        worker and end the threads. Safe to call more than once."""
        with self._cond:
            self._closed = True
            starting = self._starting
            self._cond.notify_all()
        if starting is not None:
            starting.terminate()  # the thread starting it sees the pipe close and cleans up
        got_turn = self._call_lock.acquire(timeout=self._timeout_s + EXIT_WAIT_S)
        try:
            with self._cond:
                worker, self._worker = self._worker, None
                workers, self._retired = self._retired, []
            if worker is not None:
                workers.append(worker)
            for each in workers:
                each.terminate()
                if got_turn:  # else the call still running owns the pipes, and releases them
                    each.reap()
                    each.release()
        finally:
            if got_turn:
                self._call_lock.release()
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(self._init_timeout_ms / 1000 + 2 * EXIT_WAIT_S)
        for each in workers:
            each.join()

    # -- calls --------------------------------------------------------------------------------

    def _refuse_unless_serving(self) -> None:
        """Raise the 503 that says why no worker can take a call now (with the condition)."""
        state = self._state()
        if state is WorkerState.CLOSED:
            raise ModelCallError(
                503, "the model stopped serving (replaced, removed, or the agent is stopping)"
            )
        if state is WorkerState.CRASH_LOOP:
            failures = self._supervision.crash_loop_failures
            window = self._supervision.crash_loop_window_s
            raise ModelCallError(
                503,
                f"{self._script} is in a crash loop ({failures} failures within {window:g} s,"
                f" the last: {self._last_failure}); calls are refused until it recovers",
            )
        if state is WorkerState.RESTARTING:
            raise ModelCallError(
                503,
                f"{self._script}'s worker is restarting ({self._last_failure}); try again shortly",
            )

    def _call(self, text: bool, body: bytes) -> JsonText:
        """One call, with the call lock held (which makes this thread the pipes' owner)."""
        worker = self._begin_call()
        try:
            frame = worker.call(text, body, time.monotonic() + self._timeout_s)
        except (_Timeout, _Gone, _Broken) as exc:
            raise self._call_failed(worker, exc) from None
        return self._answer(worker, frame)

    def _begin_call(self) -> "_Worker":
        """The worker to call, after releasing retired workers' pipes (the lock holder owns
        them); raises the 503 that says why there is none."""
        with self._cond:
            retired, self._retired = self._retired, []
        for old in retired:
            old.reap()
            old.release()
        with self._cond:
            self._refuse_unless_serving()
            worker = self._worker
        assert worker is not None
        return worker

    def _call_failed(self, worker: "_Worker", failure: Exception) -> ModelCallError:
        """What the caller is told when a call did not get its reply; the worker is dealt
        with (killed, released) and its failure counted."""
        if isinstance(failure, _Timeout):
            with self._cond:
                self._worker_failed(
                    worker, timed_out=True, why=f"a call ran past {self._timeout_ms} ms"
                )
            worker.kill()
            return ModelCallError(
                504,
                f"{self._script} did not answer within {self._timeout_ms} ms;"
                " its worker is being restarted",
            )
        if isinstance(failure, _Gone):
            how = worker.describe_exit()
            worker.release()
            with self._cond:
                closed = self._closed
                self._worker_failed(worker, timed_out=False, why=f"its worker {how}")
            if closed:
                return ModelCallError(
                    503, "the model stopped serving while the call ran (replaced or stopping)"
                )
            return ModelCallError(
                503,
                f"{self._script}'s worker {how} during the call{self._quote(worker)};"
                " it is being restarted",
            )
        with self._cond:
            self._worker_failed(worker, timed_out=False, why=f"it sent {failure}")
        worker.kill()
        return ModelCallError(
            503, f"{self._script}'s worker broke the protocol ({failure}); it is being restarted"
        )

    def _answer(self, worker: "_Worker", frame: bytes) -> JsonText:
        """``run``'s answer from a reply frame, kept as the JSON text the worker wrote (the
        endpoint writes it out as it is). Raises the 500 of a ``run`` that raised, or the 503
        of a reply that breaks the protocol, after killing the worker (which may wait)."""
        if frame[:1] == script_worker.ANSWER:
            first_s = self._supervision.backoff_first_s
            if self._backoff_s != first_s:  # a restart's backoff ends with a served call
                with self._cond:
                    self._backoff_s = first_s
            return JsonText(frame[1:])
        try:
            error = worker.decode(frame).get("error")
        except _Broken:
            error = None
        if not isinstance(error, dict):
            with self._cond:
                self._worker_failed(worker, timed_out=False, why="it sent a reply without a result")
            worker.kill()
            raise ModelCallError(503, f"{self._script}'s worker broke the protocol")
        logger.warning(
            "%s raised in run: %s",
            self._script,
            error.get("traceback") or error.get("message"),
            extra={"model": self._model},
        )
        raise ModelCallError(500, self._raised(error, what=self._script))

    @staticmethod
    def _quote(worker: _Worker) -> str:
        tail = worker.tail()
        return f" (its last output: {tail})" if tail else ""

    @staticmethod
    def _raised(error: dict[str, Any], *, what: str) -> str:
        kind, message, where = error.get("type"), error.get("message", ""), error.get("where")
        if not kind:
            return str(message)
        text = f"{what} raised {kind}: {message}" if message else f"{what} raised {kind}"
        return f"{text} ({where})" if where else text

    # -- supervision --------------------------------------------------------------------------

    def _state(self) -> WorkerState:
        """The state now (with the condition held); notices when a crash loop has ended."""
        if self._closed:
            return WorkerState.CLOSED
        self._forget_old_failures(time.monotonic())
        if len(self._failures) >= self._supervision.crash_loop_failures:
            return WorkerState.CRASH_LOOP
        if self._in_crash_loop:
            self._in_crash_loop = False
            self._backoff_s = self._supervision.backoff_first_s
            logger.warning(
                "%s is out of its crash loop", self._script, extra={"model": self._model}
            )
        return WorkerState.OK if self._worker is not None else WorkerState.RESTARTING

    def _forget_old_failures(self, now: float) -> None:
        while self._failures and self._failures[0] <= now - self._supervision.crash_loop_window_s:
            self._failures.popleft()

    def _worker_failed(self, worker: _Worker, *, timed_out: bool, why: str) -> None:
        """Count a worker's failure once and plan its restart (with the condition held)."""
        if worker.failed:
            return
        worker.failed = True
        if self._worker is worker:
            self._worker = None
        self._retired.append(worker)
        if self._closed:
            return
        if timed_out:
            self._timeouts += 1
        else:
            self._crashes += 1
        self._plan_restart(why)

    def _plan_restart(self, why: str) -> None:
        now = time.monotonic()
        self._failures.append(now)
        self._forget_old_failures(now)
        self._last_failure = why
        supervision = self._supervision
        if len(self._failures) >= supervision.crash_loop_failures:
            delay_s = supervision.backoff_max_s
            if not self._in_crash_loop:
                self._in_crash_loop = True
                logger.error(
                    "%s is in a crash loop: %d failures within %g s, the last: %s;"
                    " calls are refused and restarts tried every %g s",
                    self._script,
                    len(self._failures),
                    supervision.crash_loop_window_s,
                    why,
                    delay_s,
                    extra={"model": self._model},
                )
        else:
            delay_s = self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, supervision.backoff_max_s)
            logger.warning(
                "%s failed (%s); restarting its worker in %g s",
                self._script,
                why,
                delay_s,
                extra={"model": self._model},
            )
        self._restart_due = now + delay_s
        self._cond.notify_all()

    def _on_worker_exit(self, worker: _Worker) -> None:
        """The worker's stderr closed: if it died on its own between calls, restart it now
        rather than fail the next caller."""
        with self._cond:
            if worker is not self._worker or worker.failed:
                return
        how = worker.describe_exit()  # its pipes are released by the next call, or close()
        with self._cond:
            self._worker_failed(
                worker, timed_out=False, why=f"its worker {how}{self._quote(worker)}"
            )

    def _supervise(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    due = self._restart_due
                    if due is not None and due <= time.monotonic():
                        break
                    self._cond.wait(None if due is None else due - time.monotonic())
                if self._closed:
                    return
                self._restart_due = None
            try:
                worker = self._spawn()
            except _StartFailed as exc:
                with self._cond:
                    self._restarts += 1
                    if not self._closed:
                        self._crashes += 1
                        self._plan_restart(f"a restart failed: {exc}")
                continue
            with self._cond:
                self._restarts += 1
                stale = self._closed
                if not stale:
                    self._worker = worker
            if stale:
                worker.kill()
                worker.join()
                return
            logger.info(
                "%s restarted (worker %d)", self._script, worker.pid, extra={"model": self._model}
            )

    def _spawn(self) -> _Worker:
        """Start a worker and wait for its ``init()``; ``_StartFailed`` saying why it did not
        get there."""
        lifeline_read, lifeline_write = os.pipe()
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # the verified folder stays as is
        for variable in MODEL_DIR_VARIABLES:
            env[variable] = str(self._files_dir)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", str(WORKER_FILE), str(self._entry), str(lifeline_read)],
                cwd=self._files_dir,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(lifeline_read,),
                start_new_session=True,  # its own process group: one kill takes all of it
            )
        except OSError as exc:
            os.close(lifeline_write)
            raise _StartFailed(f"cannot start a worker for {self._script}: {exc}") from None
        finally:
            os.close(lifeline_read)
        worker = _Worker(
            proc,
            lifeline_write,
            label=self._model,
            on_line=self._log_line,
            on_exit=self._on_worker_exit,
        )
        with self._cond:
            closed = self._closed
            if not closed:
                self._starting = worker
        if closed:
            worker.kill()
            raise _StartFailed("the model stopped serving")
        try:
            return self._await_init(worker)
        finally:
            with self._cond:
                self._starting = None

    def _await_init(self, worker: _Worker) -> _Worker:
        try:
            message = worker.read_message(time.monotonic() + self._init_timeout_ms / 1000)
        except _Timeout:
            worker.kill()
            raise _StartFailed(
                f"{self._script}'s init() did not finish within {self._init_timeout_ms} ms"
                f" (init_timeout_ms){self._quote(worker)}"
            ) from None
        except _Gone:
            how = worker.describe_exit()
            worker.release()
            raise _StartFailed(
                f"{self._script}'s worker {how} before init() finished{self._quote(worker)}"
            ) from None
        except _Broken as exc:
            worker.kill()
            raise _StartFailed(f"{self._script}'s worker sent {exc} while starting") from None
        error = message.get("init_error")
        if isinstance(error, dict):
            worker.kill()  # it exits by itself after saying so; this reaps it
            if error.get("traceback"):
                logger.warning(
                    "%s failed to start: %s",
                    self._script,
                    error["traceback"],
                    extra={"model": self._model},
                )
            what = f"importing {self._script}" if error.get("phase") == "import" else "init()"
            raise _StartFailed(self._raised(error, what=what))
        if message.get("ready") is not True:
            worker.kill()
            raise _StartFailed(f"{self._script}'s worker sent {message!r} instead of ready")
        logger.info(
            "%s started (worker %d)", self._script, worker.pid, extra={"model": self._model}
        )
        return worker

    def _log_line(self, line: str) -> None:
        logger.info("%s %s: %s", self._model, self._script, line, extra={"model": self._model})


def _entry_script(files_dir: Path, manifest: Manifest) -> Path:
    """The entry script's path among the package's files; ``ModelLoadError`` when it is not."""
    name = manifest.runtime.entry_script
    if not name:
        raise ModelLoadError("the package's runtime is a script, but it names no entry_script")
    root = files_dir.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ModelLoadError(f"entry script {name!r} is outside the package's files")
    if not path.is_file():
        raise ModelLoadError(f"entry script {name!r} is not among the package's files")
    return path
