"""Running real agents in a background event loop from a synchronous test."""

import asyncio
import io
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.core import Agent
from agent.runtimes import load_runtime
from agent.runtimes.health import check_health
from agent.settings import AgentSettings
from agent.state import BrokerCredentials, Identity, StateDir

# The device the agent tests enrol on their Mosquitto (tests/agent/conftest.py).
DEVICE = "dev-000000000001"


def write_identity(
    state_dir: Path,
    *,
    device_id: str,
    host: str,
    port: int,
    password: str,
    root_public_key: str,
    keyring: Any,
) -> None:
    state = StateDir(state_dir)
    state.create()
    state.save_identity(
        Identity(
            device_id=device_id,
            hub_url="http://127.0.0.1:1",
            broker=BrokerCredentials(host=host, port=port, username=device_id, password=password),
            topic_root="outpost",
            root_public_key=root_public_key,
        )
    )
    state.save_keyring(keyring)


def fast_settings(state_dir: Path, **overrides: Any) -> AgentSettings:
    """Settings with short timers so fault tests finish quickly."""
    values: dict[str, Any] = {
        "state_dir": state_dir,
        "event_resend_s": 1.0,
        "scoring": {"enabled": False},
        "mqtt": {"backoff_base_s": 0.05, "backoff_cap_s": 0.5, "keepalive_s": 5},
        "download": {"chunk_timeout_s": 0.5, "window_chunks": 8, "listen_s": 0.05},
    }
    values.update(overrides)
    return AgentSettings(**values)


class AgentThread:
    """One agent (or a factory-built group) on its own event loop in a thread."""

    def __init__(self, make: Callable[[], Agent]) -> None:
        self._make = make
        self.agent: Agent | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def body() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.agent = self._make()
            self._ready.set()
            await self.agent.run(self._stop)

        try:
            asyncio.run(body())
        except BaseException as exc:  # reported to the test by stop()
            self.error = exc
            self._ready.set()

    def start(self) -> Agent:
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("agent did not start")
        if self.error is not None:
            raise self.error
        assert self.agent is not None
        return self.agent

    def again(self) -> "AgentThread":
        """A new thread for the same device (state directory and settings), not started."""
        return AgentThread(self._make)

    def call(self, fn: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        """Run ``fn`` on the agent's loop and return its result."""
        assert self._loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout_s)

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 10.0) -> Any:
        """Run a coroutine on the agent's loop (start a scoring server there, say)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def join(self, timeout_s: float = 20.0) -> None:
        """Wait for the agent to stop by itself; raise what stopped it."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("agent did not stop by itself")
        if self.error is not None:
            raise self.error

    def _where(self) -> str:
        """Where a stuck agent is: its thread's stack and every task still on its loop."""
        out = io.StringIO()
        frame = sys._current_frames().get(self._thread.ident or -1)
        if frame is not None:
            out.write("thread:\n" + "".join(traceback.format_stack(frame)))
        if self._loop is not None:
            # Read from another thread: good enough for a report, not for control.
            for task in list(asyncio.all_tasks(self._loop)):
                out.write(f"task {task.get_name()}:\n")
                task.print_stack(file=out)
        return out.getvalue()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        if self._thread.is_alive():
            raise TimeoutError(f"agent did not stop\n{self._where()}")
        if self.error is not None:
            raise self.error


def make_agent(settings: AgentSettings) -> Callable[[], Agent]:
    return lambda: Agent(settings=settings, load_runtime=load_runtime, check_health=check_health)


@contextmanager
def running_agent(state_dir: Path, **settings: Any) -> Iterator[tuple[AgentThread, Agent]]:
    """A real agent with test-speed timers, stopped (and its errors raised) on exit."""
    runner = AgentThread(make_agent(fast_settings(state_dir, **settings)))
    agent = runner.start()
    try:
        yield runner, agent
    finally:
        runner.stop()
