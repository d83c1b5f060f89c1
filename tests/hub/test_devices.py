"""Enrolment tokens, enrolment and the device list."""

import re
from datetime import timedelta

from sqlmodel import Session, select

from agent.protocol.documents import Keyring
from agent.protocol.keys import verify_signature
from hub.broker.passwords import verify_password
from hub.database import utcnow
from hub.devices.models import Device, EnrollmentToken

from .conftest import RunningHub


def test_enroll_returns_identity_credentials_and_trust_root(running_hub: RunningHub) -> None:
    synced: list[int] = []
    running_hub.ctx.on_credentials_changed = lambda: synced.append(1)
    created = running_hub.client.post("/api/v1/enrollment-tokens", json={"uses": 2, "ttl_s": 600})
    assert created.status_code == 201
    token = created.json()["token"]

    response = running_hub.client.post(
        "/api/v1/enroll",
        json={"token": token, "name": "cam-1", "device_class": "rpi4"},
        headers={"Authorization": ""},  # no admin token: the enrolment token is the credential
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"device_id", "broker", "topic_root", "root_public_key", "keyring"}
    assert re.fullmatch(r"dev-[0-9a-f]{12}", body["device_id"])
    assert body["broker"]["username"] == body["device_id"]
    assert body["topic_root"] == "outpost"
    assert body["root_public_key"] == running_hub.ctx.keys.root_public_b64()
    keyring = body["keyring"]
    Keyring.model_validate(keyring["signed"])
    assert verify_signature(
        body["root_public_key"], keyring["signatures"][0]["sig"], keyring["signed"]
    )
    assert synced == [1]

    with Session(running_hub.ctx.engine) as s:
        device = s.get(Device, body["device_id"])
        assert device is not None
        assert device.device_class == "rpi4"
        # Only the mosquitto hash is stored, and it matches the password handed out.
        assert body["broker"]["password"] not in device.password_hash
        assert verify_password(body["broker"]["password"], device.password_hash)
        stored = s.exec(select(EnrollmentToken)).one()
        assert stored.token_hash != token
        assert stored.uses == 1


def test_token_uses_run_out(running_hub: RunningHub) -> None:
    token = running_hub.client.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()["token"]
    assert running_hub.client.post("/api/v1/enroll", json={"token": token}).status_code == 201
    again = running_hub.client.post("/api/v1/enroll", json={"token": token})
    assert again.status_code == 401
    assert running_hub.client.post("/api/v1/enroll", json={"token": "nope"}).status_code == 401


def test_expired_token_is_refused(running_hub: RunningHub) -> None:
    token = running_hub.client.post("/api/v1/enrollment-tokens", json={"uses": 5}).json()["token"]
    with Session(running_hub.ctx.engine) as s:
        row = s.exec(select(EnrollmentToken)).one()
        row.expires_at = utcnow() - timedelta(seconds=1)
        s.add(row)
        s.commit()
    assert running_hub.client.post("/api/v1/enroll", json={"token": token}).status_code == 401


def test_creating_tokens_needs_the_admin_token(running_hub: RunningHub) -> None:
    response = running_hub.client.post(
        "/api/v1/enrollment-tokens", json={}, headers={"Authorization": ""}
    )
    assert response.status_code == 401


def test_device_list_and_show(running_hub: RunningHub) -> None:
    a = running_hub.enroll("a")["device_id"]
    b = running_hub.enroll("b")["device_id"]
    listing = running_hub.client.get("/api/v1/devices").json()
    assert [d["id"] for d in listing] == [a, b]
    shown = running_hub.client.get(f"/api/v1/devices/{a}").json()
    assert (shown["name"], shown["online"], shown["last_seen"]) == ("a", False, None)
    assert running_hub.client.get("/api/v1/devices/dev-000000000000").status_code == 404
