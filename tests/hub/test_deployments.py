"""Deployments end to end through the API with a recording publisher, and the MQTT handlers
called as plain functions on a Session (no broker)."""

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from sqlmodel import Session, select

from agent.protocol.documents import DesiredState, Role
from agent.protocol.keys import verify_signature
from agent.protocol.messages import (
    AckBody,
    ChunkRequestBody,
    DesiredBody,
    DesiredRequestBody,
    EventBody,
    ModelStatus,
    Reason,
    StateBody,
    StatusBody,
    Step,
    decode,
    encode,
)
from agent.protocol.topics import Channel
from hub.deployments.engine import expire_overdue_devices
from hub.deployments.models import DeviceEvent
from hub.devices.models import Device
from hub.messaging.chunks import ChunkScheduler, publish_chunks
from hub.messaging.handlers import Handlers, handle_message
from hub.packages.service import package_path

from .conftest import RunningHub

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel


def _desired(hub: RunningHub, device_id: str) -> list[DesiredState]:
    topic = hub.ctx.topics.device(device_id, Channel.DESIRED)
    out = []
    for msg in hub.publisher.on(topic):
        assert (msg.qos, msg.retain) == (1, True)
        body = decode(msg.payload).body
        assert isinstance(body, DesiredBody)
        keyring = hub.ctx.keys.keyring_document()
        sig = body.desired.signatures[0]
        assert sig.keyid in keyring.roles[Role.DIRECTOR].keyids
        assert verify_signature(keyring.keys[sig.keyid].public, sig.sig, body.desired.signed)
        assert body.keyring == hub.ctx.keys.keyring()
        out.append(DesiredState.model_validate(body.desired.signed))
    return out


@pytest.fixture
def deployed(running_hub: RunningHub, iris_model: "IrisModel") -> dict[str, Any]:
    assert running_hub.register_iris(iris_model).status_code == 201
    devices = [running_hub.enroll()["device_id"] for _ in range(2)]
    response = running_hub.client.post(
        "/api/v1/deployments", json={"model": "iris", "version": None, "devices": devices}
    )
    assert response.status_code == 201, response.text
    return {"devices": devices, "deployment": response.json()}


def _handlers(hub: RunningHub) -> Handlers:
    return Handlers(
        director=hub.ctx.director(),
        publisher=hub.publisher,
        topics=hub.ctx.topics,
        packages_dir=hub.settings.packages_dir,
        # No waiting: these tests publish by hand (test_chunks.py covers the timing).
        chunks=ChunkScheduler(gather_s=0, first_gather_max_s=0, min_interval_s=0),
    )


def _send(hub: RunningHub, device_id: str, channel: Channel, body: Any) -> None:
    with Session(hub.ctx.engine, expire_on_commit=False) as session:
        handle_message(
            session=session,
            handlers=_handlers(hub),
            topic=hub.ctx.topics.device(device_id, channel),
            payload=encode(body),
        )


def _event(dep: dict[str, Any], seq: int, step: Step, **kw: Any) -> EventBody:
    return EventBody(
        seq=seq,
        deployment_id=dep["id"],
        model="iris",
        version=1,
        digest=dep["package_digest"],
        step=step,
        **kw,
    )


def test_deploy_publishes_signed_desired_state(
    running_hub: RunningHub, deployed: dict[str, Any]
) -> None:
    dep = deployed["deployment"]
    assert dep["id"].startswith("dep-")
    assert (dep["model"], dep["version"], dep["done"], dep["ok"]) == ("iris", 1, False, False)
    assert dep["counts"] == {"in_progress": 2}
    assert dep["steps"] == {"queued": 2}
    for device_id in deployed["devices"]:
        [state] = _desired(running_hub, device_id)
        assert state.device_id == device_id
        assert state.counter == 1
        assert (state.expires_at - state.issued_at).total_seconds() == 7 * 24 * 3600
        [ref] = state.packages
        assert (ref.model, ref.version, ref.digest) == ("iris", 1, dep["package_digest"])
        assert ref.deployment_id == dep["id"]
        archive = package_path(running_hub.settings.packages_dir, ref.digest).read_bytes()
        assert ref.size == len(archive)

    again = running_hub.client.post(
        "/api/v1/deployments", json={"model": "iris", "devices": deployed["devices"][:1]}
    ).json()
    # Same version: the package is reused, the counter moves on, the old deployment is ended.
    assert again["package_digest"] == dep["package_digest"]
    assert [s.counter for s in _desired(running_hub, deployed["devices"][0])] == [1, 2]
    old = running_hub.client.get(f"/api/v1/deployments/{dep['id']}").json()
    superseded = next(d for d in old["devices"] if d["device_id"] == deployed["devices"][0])
    assert superseded["state"] == "superseded"
    assert "superseded" in superseded["detail"]


def test_deploy_refuses_unknown_devices_and_models(
    running_hub: RunningHub, deployed: dict[str, Any]
) -> None:
    bad_device = running_hub.client.post(
        "/api/v1/deployments", json={"model": "iris", "devices": ["dev-000000000000"]}
    )
    assert bad_device.status_code == 404
    assert "dev-000000000000" in bad_device.json()["detail"]
    bad_model = running_hub.client.post(
        "/api/v1/deployments", json={"model": "nope", "devices": deployed["devices"]}
    )
    assert bad_model.status_code == 404


def test_events_move_the_deployment_and_are_acked(
    running_hub: RunningHub, deployed: dict[str, Any]
) -> None:
    dep = deployed["deployment"]
    a, b = deployed["devices"]
    _send(running_hub, a, Channel.EVT, _event(dep, 1, Step.DOWNLOADING, progress=0.5))
    _send(running_hub, a, Channel.EVT, _event(dep, 1, Step.DOWNLOADING, progress=0.5))  # dup
    _send(running_hub, a, Channel.EVT, _event(dep, 3, Step.ACTIVE))  # seq 2 not yet here
    acks = [decode(m.payload).body for m in running_hub.publisher.on(f"outpost/d/{a}/ack")]
    assert acks == [AckBody(stream="evt", seq=1)] * 3
    _send(running_hub, a, Channel.EVT, _event(dep, 2, Step.VERIFIED))
    last = decode(running_hub.publisher.on(f"outpost/d/{a}/ack")[-1].payload).body
    assert last == AckBody(stream="evt", seq=3)

    _send(
        running_hub,
        b,
        Channel.EVT,
        _event(dep, 1, Step.FAILED, reason=Reason.HEALTH_CHECK, detail="label differs"),
    )
    view = running_hub.client.get(f"/api/v1/deployments/{dep['id']}").json()
    by_id = {d["device_id"]: d for d in view["devices"]}
    # seq 2 (verified) arrived after seq 3 (active): a finished row stays finished.
    assert by_id[a]["step"] == "active"
    assert by_id[b]["step"] == "failed"
    assert (by_id[b]["reason"], by_id[b]["detail"]) == ("E_HEALTH_CHECK", "label differs")
    assert (view["done"], view["ok"], view["counts"]) == (
        True,
        False,
        {"succeeded": 1, "failed": 1},
    )


def test_event_for_another_deployment_does_not_touch_this_one(
    running_hub: RunningHub, deployed: dict[str, Any]
) -> None:
    dep = deployed["deployment"]
    a = deployed["devices"][0]
    other = {**dep, "id": "dep-000000000000"}
    _send(running_hub, a, Channel.EVT, _event(other, 1, Step.FAILED, reason=Reason.HASH))
    view = running_hub.client.get(f"/api/v1/deployments/{dep['id']}").json()
    assert {d["step"] for d in view["devices"]} == {"queued"}


def test_state_reporting_the_package_active_completes_the_deployment(
    running_hub: RunningHub, deployed: dict[str, Any]
) -> None:
    dep = deployed["deployment"]
    a = deployed["devices"][0]
    state = StateBody(
        seq=1,
        agent_version="0.1.0",
        device_class="generic",
        active=[ModelStatus(model="iris", version=1, digest=dep["package_digest"])],
    )
    _send(running_hub, a, Channel.STATE, state)
    _send(running_hub, a, Channel.STATUS, StatusBody(online=True))
    view = running_hub.client.get(f"/api/v1/deployments/{dep['id']}").json()
    assert next(d for d in view["devices"] if d["device_id"] == a)["step"] == "active"
    device = running_hub.client.get(f"/api/v1/devices/{a}").json()
    assert device["online"] is True
    assert device["last_seen"] is not None
    assert device["reported_state"]["active"][0]["digest"] == dep["package_digest"]


def test_desired_request_republishes_with_a_new_counter_even_when_empty(
    running_hub: RunningHub,
) -> None:
    device_id = running_hub.enroll()["device_id"]
    _send(running_hub, device_id, Channel.REQ, DesiredRequestBody())
    _send(running_hub, device_id, Channel.REQ, DesiredRequestBody(have_counter=1))
    states = _desired(running_hub, device_id)
    assert [s.counter for s in states] == [1, 2]
    assert all(s.packages == [] for s in states)


def test_chunk_requests_share_one_publish_and_a_device_that_missed_it_gets_another(
    running_hub: RunningHub, deployed: dict[str, Any]
) -> None:
    dep = deployed["deployment"]
    a, b = deployed["devices"]
    digest = dep["package_digest"]
    archive = package_path(running_hub.settings.packages_dir, digest).read_bytes()
    handlers = _handlers(running_hub)
    topic = running_hub.ctx.topics.chunk(digest, 0)

    def send(device_id: str, channel: Channel, body: Any) -> None:
        with Session(running_hub.ctx.engine) as session:
            handle_message(
                session=session,
                handlers=handlers,
                topic=running_hub.ctx.topics.device(device_id, channel),
                payload=encode(body),
            )

    def request(device_id: str, chunks: list[int], digest: str = digest) -> None:
        send(device_id, Channel.REQ, ChunkRequestBody(digest=digest, chunks=chunks))

    def publish() -> int:
        return publish_chunks(
            chunks=handlers.chunks.take(),
            publisher=running_hub.publisher,
            topics=running_hub.ctx.topics,
            packages_dir=running_hub.settings.packages_dir,
        )

    request(a, [0, 999_999])  # the out-of-range index is ignored
    request(b, [0])  # while chunk 0 is pending: folded into the same publish
    assert running_hub.publisher.on(topic) == [], "nothing goes out before the gather window"
    assert handlers.chunks.waiting
    assert publish() == 1
    published = running_hub.publisher.on(topic)
    assert len(published) == 1
    assert published[0].payload == archive[: 256 * 1024]
    assert published[0].retain is False
    assert running_hub.publisher.on(running_hub.ctx.topics.chunk(digest, 999_999)) == []

    # Both were subscribed before that publish: asking again changes nothing, it is on its way.
    request(b, [0])
    assert not handlers.chunks.waiting
    # After a reconnect (an online status without uptime) b's subscription is new: it missed
    # the publish, so it gets another one.
    send(b, Channel.STATUS, StatusBody(online=True))
    request(b, [0])
    assert publish() == 1
    assert len(running_hub.publisher.on(topic)) == 2
    assert (handlers.chunks.requested, handlers.chunks.folded) == (4, 2)

    # A digest the device was not told to fetch gets nothing.
    before = len(running_hub.publisher.messages)
    request(a, [0], digest="0" * 64)
    assert publish() == 0
    assert len(running_hub.publisher.messages) == before


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("outpost/d/{id}/evt", b"not json"),
        ("outpost/d/{id}/evt", b"[]"),
        ("outpost/d/{id}/evt", encode(StatusBody(online=True))),  # wrong channel for kind
        ("outpost/d/{id}/desired", encode(DesiredRequestBody())),  # hub-to-device channel
        ("outpost/d/UPPER/evt", encode(DesiredRequestBody())),
        ("other/d/{id}/req", encode(DesiredRequestBody())),
        ("outpost/d/dev-ffffffffffff/req", encode(DesiredRequestBody())),  # not enrolled
    ],
)
def test_malformed_messages_are_counted_and_dropped(
    running_hub: RunningHub, topic: str, payload: bytes
) -> None:
    device_id = running_hub.enroll()["device_id"]
    handlers = _handlers(running_hub)
    with Session(running_hub.ctx.engine) as session:
        handle_message(
            session=session,
            handlers=handlers,
            topic=topic.format(id=device_id),
            payload=payload,
        )
    assert handlers.stats.handled == 0
    assert handlers.stats.malformed + handlers.stats.unknown_device == 1
    assert running_hub.publisher.messages == []
    with Session(running_hub.ctx.engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        assert device.desired_counter == 0


def test_event_times_are_stored_utc(running_hub: RunningHub, deployed: dict[str, Any]) -> None:
    dep = deployed["deployment"]
    _send(running_hub, deployed["devices"][0], Channel.EVT, _event(dep, 1, Step.DOWNLOADING))
    with Session(running_hub.ctx.engine) as session:
        row = session.exec(select(DeviceEvent)).one()
        assert row.received_at.tzinfo is not None
        assert row.received_at <= datetime.now(UTC)


def test_devices_not_done_by_the_device_timeout_end_timed_out_not_in_progress(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    assert running_hub.register_iris(iris_model).status_code == 201
    silent, answering = (running_hub.enroll()["device_id"] for _ in range(2))
    created = running_hub.client.post(
        "/api/v1/deployments",
        json={"model": "iris", "devices": [silent, answering], "device_timeout_s": 60},
    )
    assert created.status_code == 201, created.text
    dep = created.json()
    started = datetime.fromisoformat(dep["created_at"])
    _send(running_hub, answering, Channel.EVT, _event(dep, 1, Step.DOWNLOADING))

    with Session(running_hub.ctx.engine) as session:
        assert expire_overdue_devices(session=session, now=started + timedelta(seconds=59)) == 0
        assert expire_overdue_devices(session=session, now=started + timedelta(seconds=61)) == 2
    body = running_hub.client.get(f"/api/v1/deployments/{dep['id']}").json()
    assert body["counts"] == {"timed_out": 2}
    assert (body["done"], body["ok"]) == (True, False)
    assert "60 s" in body["devices"][0]["detail"]

    # A device that does finish later is recorded as it ended, not left timed out.
    _send(running_hub, answering, Channel.EVT, _event(dep, 2, Step.ACTIVE))
    body = running_hub.client.get(f"/api/v1/deployments/{dep['id']}").json()
    assert body["counts"] == {"timed_out": 1, "succeeded": 1}


def test_device_timeout_is_checked(running_hub: RunningHub, iris_model: "IrisModel") -> None:
    assert running_hub.register_iris(iris_model).status_code == 201
    device = running_hub.enroll()["device_id"]
    for bad in (0, -5, 31 * 24 * 3600):
        response = running_hub.client.post(
            "/api/v1/deployments",
            json={"model": "iris", "devices": [device], "device_timeout_s": bad},
        )
        assert response.status_code == 422, response.text
        assert "device_timeout_s" in response.text


def test_a_tag_selector_targets_every_device_with_all_the_tags(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    assert running_hub.register_iris(iris_model).status_code == 201
    token = running_hub.client.post("/api/v1/enrollment-tokens", json={"uses": 4}).json()["token"]
    tags = [
        {"site": "plant-3", "hw": "rpi4"},
        {"site": "plant-3", "hw": "jetson"},
        {"site": "plant-1", "hw": "rpi4"},
        {"site": "plant-3", "hw": "rpi4"},
    ]
    response = running_hub.client.post(
        "/api/v1/enroll/bulk",
        json={"token": token, "devices": [{"tags": t} for t in tags]},
    )
    assert response.status_code == 201, response.text
    ids = [d["device_id"] for d in response.json()["devices"]]

    dry = running_hub.client.post(
        "/api/v1/deployments/dry-run", json={"model": "iris", "selector": "site=plant-3,hw=rpi4"}
    )
    assert [d["device_id"] for d in dry.json()["targeted"]] == [ids[0], ids[3]]
    created = running_hub.client.post(
        "/api/v1/deployments",
        json={"model": "iris", "selector": "site=plant-3, hw=rpi4", "devices": [ids[2]]},
    )
    assert created.status_code == 201, created.text
    assert sorted(d["device_id"] for d in created.json()["devices"]) == sorted(
        [ids[0], ids[2], ids[3]]
    )

    for body, status, message in [
        ({"model": "iris", "selector": "site=mars"}, 422, "no device matches"),
        ({"model": "iris", "selector": "site"}, 422, "not key=value"),
        ({"model": "iris"}, 422, "name the target"),
    ]:
        refused = running_hub.client.post("/api/v1/deployments", json=body)
        assert refused.status_code == status, refused.text
        assert message in refused.text
