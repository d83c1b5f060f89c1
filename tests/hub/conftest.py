"""Hub fixtures: a hub app on real SQLite files in tmp_path, with a recording publisher in place
of MQTT, and sessions on a migrated database for service-level tests."""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from hub.context import HubContext
from hub.database import make_engine
from hub.main import create_app
from hub.messaging.publisher import RecordingPublisher
from hub.migrations.runner import upgrade
from hub.settings import HubSettings
from hub.signing.keystore import KeyStore
from tests.support.postgres import pg_available, pg_schema

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel


@pytest.fixture
def hub_settings(tmp_path: Path) -> HubSettings:
    return HubSettings(data_dir=tmp_path / "hub")


@dataclass
class RunningHub:
    """A hub app with its lifespan running; ``client`` carries the admin token."""

    client: TestClient
    publisher: RecordingPublisher
    ctx: HubContext
    settings: HubSettings

    def register_iris(self, iris: "IrisModel", name: str = "iris", **form: Any) -> Any:
        with (
            iris.model.open("rb") as model,
            iris.sample_input.open("rb") as sample,
            iris.expected_output.open("rb") as expected,
        ):
            response = self.client.post(
                "/api/v1/models",
                data={"name": name, "framework": "onnx", **form},
                files=[
                    ("files", ("model.onnx", model)),
                    ("sample_input", ("sample_input.json", sample)),
                    ("expected_output", ("expected_output.json", expected)),
                ],
            )
        return response

    def enroll(self, name: str | None = None) -> dict[str, Any]:
        token = self.client.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()["token"]
        response = self.client.post("/api/v1/enroll", json={"token": token, "name": name})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body


@contextlib.contextmanager
def hub_app(settings: HubSettings) -> Iterator[RunningHub]:
    """``create_app`` with a RecordingPublisher (no broker), lifespan entered."""
    publisher = RecordingPublisher()
    app = create_app(settings, publisher=publisher)
    with TestClient(app) as client:
        ctx: HubContext = app.state.hub
        client.headers["Authorization"] = f"Bearer {ctx.admin_token}"
        yield RunningHub(client=client, publisher=publisher, ctx=ctx, settings=settings)


@pytest.fixture
def running_hub(hub_settings: HubSettings) -> Iterator[RunningHub]:
    with hub_app(hub_settings) as hub:
        yield hub


@pytest.fixture
def pg_hub(tmp_path: Path) -> Iterator[RunningHub]:
    """The same hub on PostgreSQL, in a schema of its own."""
    if not pg_available():
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    with pg_schema() as url:
        settings = HubSettings(data_dir=tmp_path / "hub", database_url=url)
        with hub_app(settings) as hub:
            yield hub
            hub.ctx.engine.dispose()


@pytest.fixture
def engine(hub_settings: HubSettings) -> Iterator[Engine]:
    """A migrated SQLite database file."""
    hub_settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(hub_settings.resolved_database_url)
    eng = make_engine(hub_settings.resolved_database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as s:
        yield s


@pytest.fixture
def keys(hub_settings: HubSettings) -> KeyStore:
    store = KeyStore(hub_settings.keys_dir)
    store.init(keyring_ttl_days=30)
    return store


@dataclass
class ServedHub:
    """A hub served over real HTTP by uvicorn in a thread (for the CLI)."""

    url: str
    token: str
    publisher: RecordingPublisher
    ctx: HubContext
    settings: HubSettings


@pytest.fixture
def served_hub(hub_settings: HubSettings) -> Iterator[ServedHub]:
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    publisher = RecordingPublisher()
    app = create_app(hub_settings, publisher=publisher)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="test-hub", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "hub server exited during startup"
        assert time.monotonic() < deadline, "hub server did not start"
        time.sleep(0.02)
    ctx: HubContext = app.state.hub
    try:
        yield ServedHub(
            url=f"http://127.0.0.1:{port}",
            token=ctx.admin_token,
            publisher=publisher,
            ctx=ctx,
            settings=hub_settings,
        )
    finally:
        server.should_exit = True
        thread.join(10)
