"""The real hub in-process (uvicorn, SQLite file, its own embedded Mosquitto) and real agents
enrolled through its API: the ``live_hub`` fixture of the end-to-end and simulator tests."""

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import CliRunner, Result

from agent.core import utc_now
from agent.enroll import enroll
from agent.state import StateDir
from hub.cli import main as hub_cli
from hub.context import HubContext
from hub.main import create_app
from hub.settings import HubSettings
from tests.support.agents import AgentThread, fast_settings, make_agent
from tests.support.waiting import wait_until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LiveHub:
    url: str
    token: str
    ctx: HubContext
    settings: HubSettings
    tmp: Path
    agents: list[AgentThread] = field(default_factory=list)
    served: "ServedHub | None" = None

    def restart(self) -> None:
        """Stop the hub and start it again on the same data directory, as after a crash.

        The API comes back on another port; the broker keeps its port (devices know it).
        """
        assert self.served is not None
        self.served.stop()
        self.served = ServedHub(self.settings)
        self.url = self.served.url
        self.ctx = self.served.ctx
        self.token = self.served.ctx.admin_token

    def restart_broker(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        """Take the hub's Mosquitto down with ``sig`` and wait until the hub's supervisor has
        started it again on the same port: SIGTERM as an operator's restart (``systemctl
        restart mosquitto``), SIGKILL as a crash. The hub's own client reconnects by itself."""
        broker = self.ctx.broker
        assert broker is not None, "the hub runs no embedded broker"
        pid, restarts = broker.pid, broker.restarts
        assert pid is not None, "the broker is not running"
        os.kill(pid, sig)
        self.wait_until(
            lambda: broker.restarts > restarts and broker.is_running(),
            timeout_s=timeout_s,
            what="the hub's supervisor to restart mosquitto",
        )

    @property
    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )

    def cli(self, *args: str) -> Result:
        """Run ``outpost-hub`` against this hub, as a user would."""
        return CliRunner().invoke(
            hub_cli,
            ["--hub", self.url, *args],
            env={"OUTPOST_HUB_TOKEN": self.token},
            catch_exceptions=False,
        )

    def message_stats(self) -> dict[str, int]:
        with self.api as client:
            response = client.get("/api/v1/messages/stats")
        assert response.status_code == 200, response.text
        body: dict[str, int] = response.json()
        return body

    def register(self, iris: Any, *, name: str = "iris", model_bytes: bytes | None = None) -> int:
        with self.api as client:
            response = client.post(
                "/api/v1/models",
                data={"name": name, "framework": "onnx"},
                files=[
                    ("files", ("model.onnx", model_bytes or iris.model.read_bytes())),
                    ("sample_input", ("sample_input.json", iris.sample_input.read_bytes())),
                    (
                        "expected_output",
                        ("expected_output.json", iris.expected_output.read_bytes()),
                    ),
                ],
            )
        assert response.status_code == 201, response.text
        version: int = response.json()["version"]
        return version

    def start_agent(self, name: str, **settings: Any) -> AgentThread:
        """Enrol a fresh device through the API and run its agent."""
        with self.api as client:
            token = client.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()["token"]
        state_dir = self.tmp / f"agent-{name}"
        enroll(hub_url=self.url, token=token, state=StateDir(state_dir), now=utc_now(), name=name)
        runner = AgentThread(make_agent(fast_settings(state_dir, **settings)))
        runner.start()
        self.agents.append(runner)
        return runner

    def device(self, device_id: str) -> dict[str, Any]:
        with self.api as client:
            response = client.get(f"/api/v1/devices/{device_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_until(self, predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> None:
        wait_until(predicate, timeout_s, what)


class ServedHub:
    """One hub process's worth of hub: the app served by uvicorn in a thread."""

    def __init__(self, settings: HubSettings) -> None:
        self.app = create_app(settings)
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="e2e-hub", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "hub exited during start-up"
            assert time.monotonic() < deadline, "hub did not start"
            time.sleep(0.02)
        self.ctx: HubContext = self.app.state.hub

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "hub did not shut down"


@pytest.fixture
def live_hub(tmp_path: Path) -> Iterator[LiveHub]:
    with live_hub_with(tmp_path) as hub:
        yield hub


@contextmanager
def live_hub_with(tmp_path: Path, **settings: Any) -> Iterator[LiveHub]:
    """``live_hub`` with settings of the test's own (``devices={"offline_after_s": 5}``)."""
    served = ServedHub(HubSettings(data_dir=tmp_path / "hub", **settings))
    hub = LiveHub(served.url, served.ctx.admin_token, served.ctx, served.ctx.settings, tmp_path)
    hub.served = served
    try:
        yield hub
    finally:
        for runner in hub.agents:
            runner.stop()
        assert hub.served is not None
        hub.served.stop()
