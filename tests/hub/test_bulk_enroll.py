"""Bulk enrolment: many devices for one token in one transaction and one broker reload, with
tags; all or nothing when the token cannot pay for them; and the agent's ``enroll_many`` against
a served hub and against the real embedded Mosquitto."""

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from agent.core import utc_now
from agent.enroll import DeviceRequest, enroll_many
from agent.state import StateDir
from hub.broker.passwords import verify_password
from hub.devices import service
from hub.devices.models import Device, EnrollmentToken
from hub.devices.schemas import DeviceSpec
from hub.errors import Unauthorized
from hub.signing.keystore import KeyStore
from tests.e2e.conftest import LiveHub

# The end-to-end hub fixture (uvicorn, SQLite, embedded Mosquitto), reused rather than copied.
from tests.e2e.conftest import live_hub as live_hub
from tests.support.agents import AgentThread, fast_settings, make_agent

from .conftest import RunningHub, ServedHub

BULK = "/api/v1/enroll/bulk"
NO_AUTH = {"Authorization": ""}  # the enrolment token in the body is the only credential


def _token(hub: RunningHub, uses: int) -> str:
    response = hub.client.post("/api/v1/enrollment-tokens", json={"uses": uses})
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def _count_reloads(ctx: Any) -> list[int]:
    """Replace the hub's broker reload hook with one that counts (and still reloads)."""
    calls: list[int] = []
    original: Callable[[], None] = ctx.on_credentials_changed

    def counting() -> None:
        calls.append(1)
        original()

    ctx.on_credentials_changed = counting
    return calls


def _devices(count: int) -> list[dict[str, Any]]:
    return [
        {"name": f"d{i}", "device_class": "rpi4", "tags": {"site": f"plant-{i % 3}", "hw": "rpi4"}}
        for i in range(count)
    ]


def _stored(hub: RunningHub) -> tuple[list[Device], list[EnrollmentToken]]:
    with Session(hub.ctx.engine) as s:
        return list(s.exec(select(Device)).all()), list(s.exec(select(EnrollmentToken)).all())


def test_500_devices_in_one_request_are_stored_hashed_with_tags_and_reload_the_broker_once(
    running_hub: RunningHub,
) -> None:
    reloads = _count_reloads(running_hub.ctx)
    token = _token(running_hub, 500)

    response = running_hub.client.post(
        BULK, json={"token": token, "devices": _devices(500)}, headers=NO_AUTH
    )

    assert response.status_code == 201, response.text[:500]
    answers = response.json()["devices"]
    assert len(answers) == 500
    assert len({a["device_id"] for a in answers}) == 500
    assert reloads == [1]
    with Session(running_hub.ctx.engine) as s:
        for i, answer in enumerate(answers):  # answers come in the order of the request
            device = s.get(Device, answer["device_id"])
            assert device is not None
            assert (device.name, device.device_class) == (f"d{i}", "rpi4")
            assert device.tags == {"site": f"plant-{i % 3}", "hw": "rpi4"}
            password = answer["broker"]["password"]
            assert password not in device.password_hash
            assert verify_password(password, device.password_hash)
            assert answer["broker"]["username"] == device.id
            assert answer["root_public_key"] == running_hub.ctx.keys.root_public_b64()
        assert s.exec(select(EnrollmentToken)).one().uses == 500


def test_too_few_uses_left_enrols_nothing_and_spends_nothing(running_hub: RunningHub) -> None:
    token = _token(running_hub, 10)
    first = running_hub.client.post(BULK, json={"token": token, "devices": _devices(1)})
    assert first.status_code == 201
    reloads = _count_reloads(running_hub.ctx)

    refused = running_hub.client.post(BULK, json={"token": token, "devices": _devices(10)})

    assert refused.status_code == 401
    assert refused.json()["detail"] == (
        "enrolment token is unknown, expired or has fewer than 10 uses left"
    )
    devices, tokens = _stored(running_hub)
    assert len(devices) == 1
    assert tokens[0].uses == 1
    assert reloads == []
    # Exactly the uses that are left still work.
    rest = running_hub.client.post(BULK, json={"token": token, "devices": _devices(9)})
    assert rest.status_code == 201
    assert len(_stored(running_hub)[0]) == 10
    assert _stored(running_hub)[1][0].uses == 10


def test_racing_bulk_enrolments_cannot_overspend_a_token(
    engine: Engine, keys: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Session(engine) as s:
        token = service.create_token(session=s, uses=10, ttl_s=600).token
    # Hold both requests after the token pre-check (which both pass: 6 <= 10 uses left), so the
    # conditional UPDATE alone has to decide between them.
    both_checked = threading.Barrier(2, timeout=10)
    new_ids = service._new_device_ids

    def ids_after_both_checked(session: Session, count: int) -> list[str]:
        both_checked.wait()
        return new_ids(session, count)

    monkeypatch.setattr(service, "_new_device_ids", ids_after_both_checked)
    outcomes: list[str] = []

    def enrol_six() -> None:
        with Session(engine, expire_on_commit=False) as s:
            try:
                service.enroll(
                    session=s,
                    keys=keys,
                    token=token,
                    devices=[DeviceSpec()] * 6,
                    broker_host="127.0.0.1",
                    broker_port=1883,
                    topic_root="outpost",
                )
                outcomes.append("enrolled")
            except Unauthorized:
                outcomes.append("refused")

    threads = [threading.Thread(target=enrol_six) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["enrolled", "refused"]
    with Session(engine) as s:
        assert len(s.exec(select(Device)).all()) == 6
        assert s.exec(select(EnrollmentToken)).one().uses == 6


def test_unknown_token_gets_the_same_refusal_as_single_enrolment(
    running_hub: RunningHub,
) -> None:
    bulk = running_hub.client.post(BULK, json={"token": "nope", "devices": _devices(1)})
    single = running_hub.client.post("/api/v1/enroll", json={"token": "nope"})
    assert bulk.status_code == single.status_code == 401
    assert bulk.json() == single.json()


@pytest.mark.parametrize(
    ("tags", "named"),
    [
        ({"Site": "plant-1"}, "'Site'"),
        ({"site": "plant 1"}, "'site'"),
        ({"site": ""}, "'site'"),
        ({"k" * 33: "v"}, "'" + "k" * 33 + "'"),
        ({"1site": "x"}, "'1site'"),
        ({"site": "a,b=c"}, "'site'"),
        ({f"t{i}": "v" for i in range(17)}, "at most 16 tags per device, got 17"),
    ],
)
def test_bad_tags_are_refused_naming_the_tag_and_spend_nothing(
    running_hub: RunningHub, tags: dict[str, str], named: str
) -> None:
    token = _token(running_hub, 5)
    devices = [*_devices(2), {"name": "bad", "tags": tags}]
    bulk = running_hub.client.post(BULK, json={"token": token, "devices": devices})
    single = running_hub.client.post("/api/v1/enroll", json={"token": token, "tags": tags})
    for response in (bulk, single):
        assert response.status_code == 422, response.text
        assert named in response.text
    assert bulk.json()["detail"][0]["loc"] == ["body", "devices", 2, "tags"]
    devices_stored, tokens = _stored(running_hub)
    assert devices_stored == []
    assert tokens[0].uses == 0


def test_more_than_10000_devices_or_none_are_refused(running_hub: RunningHub) -> None:
    token = _token(running_hub, 100_000)
    too_many = running_hub.client.post(BULK, json={"token": token, "devices": [{}] * 10_001})
    assert too_many.status_code == 422
    assert "at most 10000 devices per bulk enrolment, got 10001" in too_many.text
    none = running_hub.client.post(BULK, json={"token": token, "devices": []})
    assert none.status_code == 422
    assert _stored(running_hub)[0] == []


def test_an_invalid_device_class_is_refused_naming_the_device(running_hub: RunningHub) -> None:
    token = _token(running_hub, 5)
    devices = [{"name": "ok"}, {"name": "bad", "device_class": "Not Valid"}]
    response = running_hub.client.post(BULK, json={"token": token, "devices": devices})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "devices", 1, "device_class"]
    assert _stored(running_hub)[0] == []


def test_devices_are_listed_with_their_tags_and_filtered_by_them(
    running_hub: RunningHub,
) -> None:
    token = _token(running_hub, 4)
    devices = [
        {"name": "a", "tags": {"site": "plant-1", "hw": "rpi4"}},
        {"name": "b", "tags": {"site": "plant-1", "hw": "jetson"}},
        {"name": "c", "tags": {"site": "plant-2", "hw": "rpi4"}},
        {"name": "d"},
    ]
    assert (
        running_hub.client.post(BULK, json={"token": token, "devices": devices}).status_code == 201
    )

    def names(*selectors: str) -> list[str]:
        response = running_hub.client.get("/api/v1/devices", params=[("tag", s) for s in selectors])
        assert response.status_code == 200, response.text
        return sorted(d["name"] for d in response.json())

    assert names() == ["a", "b", "c", "d"]
    assert names("site=plant-1") == ["a", "b"]
    assert names("site=plant-1", "hw=rpi4") == ["a"]
    assert names("hw=rpi4", "hw=jetson") == []
    assert names("site=plant-9") == []
    listed = {d["name"]: d["tags"] for d in running_hub.client.get("/api/v1/devices").json()}
    assert listed["a"] == {"site": "plant-1", "hw": "rpi4"}
    assert listed["d"] == {}
    bad = running_hub.client.get("/api/v1/devices", params={"tag": "Site=x"})
    assert bad.status_code == 422
    assert "'Site'" in bad.json()["detail"]
    assert running_hub.client.get("/api/v1/devices", params={"tag": "site"}).status_code == 422


def test_agent_enroll_many_against_the_served_hub(served_hub: ServedHub, tmp_path: Path) -> None:
    import httpx

    reloads = _count_reloads(served_hub.ctx)
    token = httpx.post(
        f"{served_hub.url}/api/v1/enrollment-tokens",
        json={"uses": 20},
        headers={"Authorization": f"Bearer {served_hub.token}"},
    ).json()["token"]
    fleet = [
        (StateDir(tmp_path / f"sim-{i}"), DeviceRequest(f"sim-{i}", tags={"fleet": "sim"}))
        for i in range(20)
    ]

    identities = enroll_many(hub_url=served_hub.url, token=token, devices=fleet, now=utc_now())

    assert reloads == [1]
    with Session(served_hub.ctx.engine) as s:
        stored = {d.id: d for d in s.exec(select(Device).where(col(Device.name).is_not(None)))}
    for (state, request), identity in zip(fleet, identities, strict=True):
        assert state.load_identity() == identity
        device = stored[identity.device_id]
        assert (device.name, device.tags) == (request.name, {"fleet": "sim"})
        assert verify_password(identity.broker.password, device.password_hash)


@pytest.mark.e2e
def test_bulk_enrolled_devices_connect_to_the_real_broker(live_hub: LiveHub) -> None:
    reloads = _count_reloads(live_hub.ctx)
    with live_hub.api as client:
        token = client.post("/api/v1/enrollment-tokens", json={"uses": 500}).json()["token"]
    fleet = [
        (StateDir(live_hub.tmp / f"bulk-{i}"), DeviceRequest(f"bulk-{i}", tags={"site": "e2e"}))
        for i in range(500)
    ]

    identities = enroll_many(hub_url=live_hub.url, token=token, devices=fleet, now=utc_now())

    assert reloads == [1]
    broker = live_hub.ctx.broker
    assert broker is not None
    users = {line.split(":", 1)[0] for line in broker.password_file.read_text().splitlines()}
    assert {i.device_id for i in identities} <= users
    # A few of them, started as real agents, log in with the credentials they were given.
    for state, _ in fleet[:3]:
        runner = AgentThread(make_agent(fast_settings(state.root)))
        live_hub.agents.append(runner)  # stopped by the fixture
        runner.start()
    online = [i.device_id for i in identities[:3]]
    live_hub.wait_until(
        lambda: all(live_hub.device(d)["online"] for d in online),
        what=f"devices {online} online",
    )
