"""Enrolment tokens, enrolment and the device list."""

import re
from datetime import timedelta
from pathlib import Path

from alembic import command
from sqlalchemy import text
from sqlmodel import Session, select

from agent.protocol.documents import Keyring
from agent.protocol.keys import verify_signature
from hub.broker.passwords import verify_password
from hub.database import make_engine, utcnow
from hub.devices.models import Device, EnrollmentToken
from hub.migrations.runner import alembic_config, upgrade

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
    assert set(body) == {
        "device_id",
        "broker",
        "topic_root",
        "root_public_key",
        "keyring",
        "status",
    }
    assert body["status"] == "active"
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
    assert all((d["group"], d["follows"]) == (None, None) for d in listing)
    shown = running_hub.client.get(f"/api/v1/devices/{a}").json()
    assert (shown["name"], shown["online"], shown["last_seen"]) == ("a", False, None)
    # Only a single device says which deployments its models follow (none yet).
    assert (shown["group"], shown["follows"]) == (None, [])
    assert running_hub.client.get("/api/v1/devices/dev-000000000000").status_code == 404


def test_single_enrolment_stores_and_shows_tags(running_hub: RunningHub) -> None:
    token = running_hub.client.post("/api/v1/enrollment-tokens", json={}).json()["token"]
    tags = {"site": "plant-3", "hw": "rpi4", "zone.a": "A_1:b"}
    response = running_hub.client.post("/api/v1/enroll", json={"token": token, "tags": tags})
    assert response.status_code == 201, response.text
    device_id = response.json()["device_id"]
    assert running_hub.client.get(f"/api/v1/devices/{device_id}").json()["tags"] == tags


def test_devices_enrolled_before_tags_existed_get_none_and_the_migration_reverts(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url, "0001")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO device (id, device_class, password_hash, enrolled_at,"
                " desired_counter, online, evt_acked_seq)"
                " VALUES ('dev-000000000001', 'generic', 'x', '2026-01-01 00:00:00', 0, 0, 0)"
            )
        )
    upgrade(url)
    with Session(engine) as s:
        device = s.get(Device, "dev-000000000001")
        assert device is not None
        assert device.tags == {}
    command.downgrade(alembic_config(url), "0001")
    with engine.connect() as conn:
        columns = {row[1] for row in conn.execute(text("PRAGMA table_info(device)"))}
    assert "tags" not in columns
    assert "password_hash" in columns
    engine.dispose()


def test_enrolment_tokens_never_look_like_command_line_options(running_hub: RunningHub) -> None:
    # A token starting with "-" made `outpost-agent enroll --token <it>` fail (seen in the demo).
    for _ in range(50):
        body = running_hub.client.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()
        assert body["token"].startswith("et_")
