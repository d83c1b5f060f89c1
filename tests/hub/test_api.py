"""The app as a whole: health, auth, error mapping, and (integration) the real embedded broker
started by the app's lifespan with a device talking MQTT to the hub."""

import hashlib
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.documents import DesiredState
from agent.protocol.messages import (
    AckBody,
    ChunkRequestBody,
    DesiredBody,
    DesiredRequestBody,
    EventBody,
    Step,
    decode,
    encode,
)
from agent.protocol.topics import Channel, Topics
from hub.main import create_app
from hub.settings import HubSettings

from .conftest import RunningHub

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel


def test_healthz_needs_no_token(running_hub: RunningHub) -> None:
    response = running_hub.client.get("/healthz", headers={"Authorization": ""})
    assert response.json() == {"status": "ok"}


def test_errors_map_to_codes(running_hub: RunningHub) -> None:
    missing = running_hub.client.get("/api/v1/models/ghost/1")
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"
    bad_name = running_hub.client.get("/api/v1/models/Ghost/1")
    assert bad_name.status_code == 422
    assert running_hub.client.get("/api/v1/deployments/dep-x").status_code == 404


def test_release_key_offline_gives_503_on_new_package(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    from hub.signing.keystore import OfflineRole

    assert running_hub.register_iris(iris_model).status_code == 201
    device = running_hub.enroll()["device_id"]
    running_hub.ctx.keys.remove(OfflineRole.RELEASE, yes=True)
    response = running_hub.client.post(
        "/api/v1/deployments", json={"model": "iris", "devices": [device]}
    )
    assert response.status_code == 503
    assert "release key is offline" in response.json()["detail"]


def test_startup_creates_secrets_0600(running_hub: RunningHub) -> None:
    for path in (running_hub.settings.admin_token_path, running_hub.settings.keys_dir / "root.pem"):
        assert path.stat().st_mode & 0o777 == 0o600


class Device:
    """A minimal MQTT device: enough to check what the hub sends it."""

    def __init__(self, enrolment: dict[str, Any]) -> None:
        self.id = enrolment["device_id"]
        self.topics = Topics(enrolment["topic_root"])
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.id
        )
        broker = enrolment["broker"]
        self.client.username_pw_set(broker["username"], broker["password"])
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, bytes(m.payload)))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect(broker["host"], broker["port"])
        self.client.loop_start()
        self.client.subscribe(
            [
                (self.topics.device(self.id, Channel.DESIRED), 1),
                (self.topics.device(self.id, Channel.ACK), 1),
                (f"{self.topics.root}/pkg/#", 1),
            ]
        )
        assert subscribed.wait(10), "device subscriptions not confirmed"

    def send(self, channel: Channel, body: Any) -> None:
        self.client.publish(self.topics.device(self.id, channel), encode(body), qos=1)

    def expect(self, predicate: Any, timeout_s: float = 10.0) -> tuple[str, bytes]:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("expected message did not arrive")
            try:
                topic, payload = self.inbox.get(timeout=remaining)
            except queue.Empty:
                continue
            if predicate(topic, payload):
                return topic, payload

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _desired(payload: bytes) -> DesiredState:
    body = decode(payload).body
    assert isinstance(body, DesiredBody)
    return DesiredState.model_validate(body.desired.signed)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed")
def test_hub_with_embedded_broker(tmp_path: Path, iris_model: "IrisModel") -> None:
    settings = HubSettings(data_dir=tmp_path / "hub")
    app = create_app(settings)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {app.state.hub.admin_token}"
        token = client.post("/api/v1/enrollment-tokens", json={}).json()["token"]
        enrolment = client.post("/api/v1/enroll", json={"token": token}).json()
        # The password works at once: enrolment reloaded the broker's users.
        device = Device(enrolment)
        try:
            device.send(Channel.REQ, DesiredRequestBody())
            _, payload = device.expect(
                lambda t, p: t.endswith("/desired") and _desired(p).counter >= 1
            )
            assert _desired(payload).packages == []

            with (
                iris_model.model.open("rb") as m,
                iris_model.sample_input.open("rb") as s,
                iris_model.expected_output.open("rb") as e,
            ):
                assert (
                    client.post(
                        "/api/v1/models",
                        data={"name": "iris", "framework": "onnx"},
                        files=[
                            ("files", ("model.onnx", m)),
                            ("sample_input", s),
                            ("expected_output", e),
                        ],
                    ).status_code
                    == 201
                )
            dep = client.post(
                "/api/v1/deployments", json={"model": "iris", "devices": [device.id]}
            ).json()
            _, payload = device.expect(
                lambda t, p: t.endswith("/desired") and bool(_desired(p).packages)
            )
            ref = _desired(payload).packages[0]
            assert ref.deployment_id == dep["id"]

            device.send(Channel.REQ, ChunkRequestBody(digest=ref.digest, chunks=[0]))
            topic, chunk = device.expect(lambda t, p: "/pkg/" in t)
            assert topic == device.topics.chunk(ref.digest, 0)
            assert hashlib.sha256(chunk).hexdigest() == ref.chunks[0]

            device.send(
                Channel.EVT,
                EventBody(
                    seq=1,
                    deployment_id=dep["id"],
                    model="iris",
                    version=1,
                    digest=ref.digest,
                    step=Step.ACTIVE,
                ),
            )
            _, ack = device.expect(lambda t, p: t.endswith("/ack"))
            assert decode(ack).body == AckBody(stream="evt", seq=1)
            view = client.get(f"/api/v1/deployments/{dep['id']}").json()
            assert view["ok"] is True
        finally:
            device.close()
        broker = app.state.hub.broker
        assert broker is not None
        assert broker.is_running()
    # Leaving the app stops mosquitto: no stray broker after the hub.
    assert not broker.is_running()
