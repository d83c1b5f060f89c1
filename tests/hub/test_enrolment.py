"""Enrolment for manufacturing and device access through the API: serial-bound tokens (one
device, once, before expiry), approval mode, accept/disable/enable, and device ids with
characters a broker would read as wildcards, separators or system topics (THREATS E3)."""

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
from alembic import command
from sqlalchemy import text, update
from sqlmodel import Session, col, select

from hub.broker.passwords import verify_password
from hub.database import make_engine, utcnow
from hub.deployments.models import DeploymentDevice
from hub.devices import service
from hub.devices.models import EnrollmentToken
from hub.migrations.runner import alembic_config, upgrade
from hub.settings import HubSettings

from .conftest import RunningHub, hub_app

if TYPE_CHECKING:
    from examples.build_example_model import IrisModel

# Each refused in a body (serials, enrolment) and in a path: 3 of the THREATS E3 list and the
# rest of what would reach a broker ACL or a password file line.
BAD_IDS = [
    "+",
    "#",
    "dev/a",
    "dev+a",
    "dev#a",
    "a/#",
    "dev\x00a",
    "dev a",
    "dev\ta",
    "dev\na",
    "dev%ua",
    "%u",
    "$SYS",
    "$dev-a",
    "dev:a",
    "Dev-A",
    "ab",
    "-dev",
    "d" * 64,
    "",
]


def _serial_tokens(hub: RunningHub, serials: list[str], **extra: Any) -> list[dict[str, Any]]:
    response = hub.client.post(
        "/api/v1/enrollment-tokens/serials", json={"serials": serials, **extra}
    )
    assert response.status_code == 201, response.text
    tokens: list[dict[str, Any]] = response.json()["tokens"]
    return tokens


def _enroll(hub: RunningHub, token: str, **body: Any) -> Any:
    return hub.client.post(
        "/api/v1/enroll", json={"token": token, **body}, headers={"Authorization": ""}
    )


def _device_ids(hub: RunningHub) -> set[str]:
    return {d["id"] for d in hub.client.get("/api/v1/devices").json()}


def test_a_serial_token_enrols_its_own_serial_once(running_hub: RunningHub) -> None:
    tokens = _serial_tokens(running_hub, ["sn-0001", "sn-0002", "sn-0003"])
    assert [t["serial"] for t in tokens] == ["sn-0001", "sn-0002", "sn-0003"]
    assert len({t["token"] for t in tokens}) == 3

    first = _enroll(running_hub, tokens[0]["token"], name="line-1")
    assert first.status_code == 201, first.text
    assert first.json()["device_id"] == "sn-0001"
    assert first.json()["broker"]["username"] == "sn-0001"

    # Single use: the same token again is refused, and enrols nothing.
    again = _enroll(running_hub, tokens[0]["token"])
    assert again.status_code == 401
    assert "used up" in again.json()["detail"]

    # The device may say which serial it is; a token for another serial is refused unspent.
    wrong = _enroll(running_hub, tokens[1]["token"], serial="sn-0003")
    assert wrong.status_code == 401
    assert "another serial" in wrong.json()["detail"]
    right = _enroll(running_hub, tokens[1]["token"], serial="sn-0002")
    assert right.status_code == 201, right.text
    assert right.json()["device_id"] == "sn-0002"

    # A serial token enrols exactly one device, even through the bulk route.
    bulk = running_hub.client.post(
        "/api/v1/enroll/bulk",
        json={"token": tokens[2]["token"], "devices": [{}, {}]},
        headers={"Authorization": ""},
    )
    assert bulk.status_code == 401  # two uses asked of a single-use token
    assert _device_ids(running_hub) == {"sn-0001", "sn-0002"}


def test_the_token_is_kept_hashed_and_an_expired_one_is_refused(running_hub: RunningHub) -> None:
    (token,) = _serial_tokens(running_hub, ["sn-0100"], ttl_s=60)
    with Session(running_hub.ctx.engine) as session:
        row = session.exec(
            select(EnrollmentToken).where(EnrollmentToken.device_id == "sn-0100")
        ).one()
        assert row.token_hash == service.hash_token(token["token"])
        assert token["token"] not in row.token_hash
        assert row.max_uses == 1
        session.execute(
            update(EnrollmentToken)
            .where(col(EnrollmentToken.id) == row.id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    expired = _enroll(running_hub, token["token"])
    assert expired.status_code == 401
    assert "expired" in expired.json()["detail"]
    assert _device_ids(running_hub) == set()


def test_serial_tokens_refuse_duplicates_and_enrolled_serials(running_hub: RunningHub) -> None:
    twice = running_hub.client.post(
        "/api/v1/enrollment-tokens/serials", json={"serials": ["sn-0200", "sn-0201", "sn-0200"]}
    )
    assert twice.status_code == 422
    assert "given twice: sn-0200" in twice.text

    (token,) = _serial_tokens(running_hub, ["sn-0200"])
    assert _enroll(running_hub, token["token"]).status_code == 201
    taken = running_hub.client.post(
        "/api/v1/enrollment-tokens/serials", json={"serials": ["sn-0202", "sn-0200"]}
    )
    assert taken.status_code == 409
    assert "enrolled already: sn-0200" in taken.json()["detail"]
    # A general token cannot pick a serial for itself.
    general = running_hub.client.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()
    chosen = _enroll(running_hub, general["token"], serial="sn-0203")
    assert chosen.status_code == 422
    assert "only with the token made for it" in chosen.json()["detail"]


def test_two_tokens_for_one_serial_enrol_it_once(running_hub: RunningHub) -> None:
    (first,) = _serial_tokens(running_hub, ["sn-0300"])
    (second,) = _serial_tokens(running_hub, ["sn-0300"])  # a reprint, say
    assert _enroll(running_hub, first["token"]).status_code == 201
    response = _enroll(running_hub, second["token"])
    assert response.status_code == 409
    assert "enrolled already" in response.json()["detail"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_with_special_characters_are_refused_everywhere(
    running_hub: RunningHub, bad: str
) -> None:
    as_serial = running_hub.client.post(
        "/api/v1/enrollment-tokens/serials", json={"serials": ["sn-0400", bad]}
    )
    assert as_serial.status_code == 422, as_serial.text
    assert "is not a device id: 3-63 of a-z 0-9 -" in as_serial.text
    general = running_hub.client.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()
    claimed = _enroll(running_hub, general["token"], serial=bad)
    assert claimed.status_code == 422, claimed.text
    assert "is not a device id" in claimed.text
    if bad:
        # In a path, percent-encoded as a client must send it. An encoded '/' is decoded
        # before routing, so it reaches no device route at all (404).
        path = quote(bad, safe="")
        expected = 404 if "/" in bad else 422
        shown = running_hub.client.get(f"/api/v1/devices/{path}")
        assert shown.status_code == expected, shown.text
        disabled = running_hub.client.post(f"/api/v1/devices/{path}/disable")
        assert disabled.status_code == expected, disabled.text
        if expected == 422:
            assert "is not a device id" in shown.text
    assert _device_ids(running_hub) == set()


@pytest.fixture
def approval_hub(tmp_path: Path) -> Iterator[RunningHub]:
    settings = HubSettings(data_dir=tmp_path / "hub", devices={"approval_required": True})
    with hub_app(settings) as hub:
        yield hub


def test_in_approval_mode_devices_wait_pending_until_accepted(approval_hub: RunningHub) -> None:
    hub = approval_hub
    (token,) = _serial_tokens(hub, ["sn-0500"])
    enrolled = _enroll(hub, token["token"])
    assert enrolled.status_code == 201, enrolled.text
    assert enrolled.json()["status"] == "pending"
    password = enrolled.json()["broker"]["password"]

    # Pending: enrolled, listed as such, and not an account the broker would let in.
    pending = hub.client.get("/api/v1/devices", params={"status": "pending"}).json()
    assert [d["id"] for d in pending] == ["sn-0500"]
    with Session(hub.ctx.engine) as session:
        (user,) = service.broker_users(session=session)
    assert (user.username, user.active) == ("sn-0500", False)
    assert verify_password(password, user.password_hash)

    synced: list[int] = []
    hub.ctx.on_credentials_changed = lambda: synced.append(1)
    enable = hub.client.post("/api/v1/devices/sn-0500/enable")
    assert enable.status_code == 409
    assert "accept it instead" in enable.json()["detail"]
    accepted = hub.client.post("/api/v1/devices/sn-0500/accept")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["device"]["status"] == "active"
    assert accepted.json()["device"]["status_changed_at"] is not None
    assert synced == [1]  # the broker was told
    with Session(hub.ctx.engine) as session:
        (user,) = service.broker_users(session=session)
    assert user.active
    assert hub.client.get("/api/v1/devices", params={"status": "pending"}).json() == []


def test_disable_cancels_the_devices_unfinished_deployment_work(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    assert running_hub.register_iris(iris_model).status_code == 201
    devices = [running_hub.enroll()["device_id"] for _ in range(2)]
    created = running_hub.client.post(
        "/api/v1/deployments", json={"model": "iris", "version": None, "devices": devices}
    )
    assert created.status_code == 201, created.text
    deployment_id = created.json()["id"]
    synced: list[int] = []
    running_hub.ctx.on_credentials_changed = lambda: synced.append(1)

    disabled = running_hub.client.post(f"/api/v1/devices/{devices[0]}/disable")
    assert disabled.status_code == 200, disabled.text
    body = disabled.json()
    assert body["device"]["status"] == "disabled"
    assert body["device"]["online"] is False
    assert body["cancelled_deployments"] == [deployment_id]
    assert synced == [1]
    with Session(running_hub.ctx.engine) as session:
        states = {
            row.device_id: (row.state, row.detail)
            for row in session.exec(
                select(DeploymentDevice).where(DeploymentDevice.deployment_id == deployment_id)
            )
        }
    assert states[devices[0]] == ("cancelled", "device disabled")
    assert states[devices[1]][0] != "cancelled"  # the other device is untouched

    # Idempotent, and accept is not the way back: enable is.
    again = running_hub.client.post(f"/api/v1/devices/{devices[0]}/disable")
    assert again.status_code == 200
    assert again.json()["cancelled_deployments"] == []
    accept = running_hub.client.post(f"/api/v1/devices/{devices[0]}/accept")
    assert accept.status_code == 409
    assert "enable it instead" in accept.json()["detail"]
    enabled = running_hub.client.post(f"/api/v1/devices/{devices[0]}/enable")
    assert enabled.status_code == 200
    assert enabled.json()["device"]["status"] == "active"
    missing = running_hub.client.post("/api/v1/devices/dev-000000000000/disable")
    assert missing.status_code == 404


def test_a_new_deployment_skips_devices_off_the_broker(
    running_hub: RunningHub, iris_model: "IrisModel"
) -> None:
    """A disabled device could never answer: it is skipped with the reason, not waited for."""
    assert running_hub.register_iris(iris_model).status_code == 201
    devices = [running_hub.enroll()["device_id"] for _ in range(2)]
    running_hub.ctx.on_credentials_changed = lambda: None
    assert running_hub.client.post(f"/api/v1/devices/{devices[0]}/disable").status_code == 200
    created = running_hub.client.post(
        "/api/v1/deployments", json={"model": "iris", "version": None, "devices": devices}
    )
    assert created.status_code == 201, created.text
    with Session(running_hub.ctx.engine) as session:
        states = {
            row.device_id: (row.state, row.detail)
            for row in session.exec(
                select(DeploymentDevice).where(
                    DeploymentDevice.deployment_id == created.json()["id"]
                )
            )
        }
    assert states[devices[0]] == ("skipped", "device is disabled")
    assert states[devices[1]][0] != "skipped"


def test_access_changes_need_an_admin_token(running_hub: RunningHub) -> None:
    device_id = running_hub.enroll()["device_id"]
    for action in ("accept", "disable", "enable"):
        response = running_hub.client.post(
            f"/api/v1/devices/{device_id}/{action}", headers={"Authorization": "Bearer nope"}
        )
        assert response.status_code == 401, (action, response.text)
    refused = running_hub.client.post(
        "/api/v1/enrollment-tokens/serials",
        json={"serials": ["sn-0600"]},
        headers={"Authorization": ""},
    )
    assert refused.status_code == 401


def test_devices_enrolled_before_the_access_migration_keep_their_access(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url, "0007")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO device (id, device_class, password_hash, enrolled_at,"
                " desired_counter, online, evt_acked_seq, tags, command_seq)"
                " VALUES ('dev-000000000001', 'generic', 'x', '2026-01-01 00:00:00', 0, 0, 0,"
                " '{}', 0)"
            )
        )
    upgrade(url, "0008")
    with Session(engine) as session:
        (user,) = service.broker_users(session=session)
        assert (user.username, user.active) == ("dev-000000000001", True)
    command.downgrade(alembic_config(url), "0007")
    with engine.connect() as conn:
        columns = {row[1] for row in conn.execute(text("PRAGMA table_info(device)"))}
    assert "status" not in columns
    engine.dispose()


def test_serial_tokens_and_access_changes_on_postgresql(pg_hub: RunningHub) -> None:
    tokens = _serial_tokens(pg_hub, ["sn-0700", "sn-0701"])
    assert _enroll(pg_hub, tokens[0]["token"]).status_code == 201
    assert _enroll(pg_hub, tokens[0]["token"]).status_code == 401
    assert pg_hub.client.post("/api/v1/devices/sn-0700/disable").status_code == 200
    disabled = pg_hub.client.get("/api/v1/devices", params={"status": "disabled"}).json()
    assert [d["id"] for d in disabled] == ["sn-0700"]
    assert pg_hub.client.post("/api/v1/devices/sn-0700/enable").status_code == 200
    taken = pg_hub.client.post("/api/v1/enrollment-tokens/serials", json={"serials": ["sn-0700"]})
    assert taken.status_code == 409
