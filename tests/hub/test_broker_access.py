"""Broker access: the shared topic rules, the HTTP authentication and authorization endpoint an
external broker (EMQX) asks, and, against the hub's real Mosquitto, disabling a connected
device (dropped at once, refused after, back when enabled) and approval mode."""

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.core import utc_now
from agent.enroll import enroll
from agent.state import StateDir
from hub.broker.config import render_acl
from hub.broker.rules import device_grants, may_publish, may_receive, may_subscribe
from hub.broker.supervisor import BrokerError
from hub.settings import HubSettings
from tests.support.agents import AgentThread, fast_settings, make_agent
from tests.support.live_hub import LiveHub, live_hub_with
from tests.support.waiting import wait_until

from .conftest import RunningHub, hub_app

if TYPE_CHECKING:
    from conftest import BrokerHandle

ROOT = "outpost"
A, B = "dev-aaaa", "dev-bbbb"
DIGEST = "ab" * 32
SECRET = "s3cret-broker-header-value"
DISCONNECT_DEADLINE_S = 5.0


# -- the rules ----------------------------------------------------------------------------------

PUBLISH_CASES = [
    (f"{ROOT}/d/{A}/state", True),
    (f"{ROOT}/d/{A}/status", True),
    (f"{ROOT}/d/{A}/tm", True),
    (f"{ROOT}/d/{A}/req", True),
    (f"{ROOT}/d/{A}/desired", False),  # its own, but hub -> device
    (f"{ROOT}/d/{A}/cmd", False),
    (f"{ROOT}/d/{A}/ack", False),
    (f"{ROOT}/d/{B}/state", False),  # another device's
    (f"{ROOT}/d/{B}/status", False),  # a Will there would mark B offline
    (f"{ROOT}/pkg/{DIGEST}/c/0", False),  # forging a package chunk
    (f"{ROOT}/d/{A}/state/x", False),
    (f"{ROOT}/d/+/state", False),
    (f"{ROOT}/d/{A}/#", False),
    ("$SYS/broker/uptime", False),
    ("$CONTROL/dynamic-security/v1", False),
    (f"other/d/{A}/state", False),
    (f"{ROOT}/d/{A}/state\x00", False),
    ("", False),
]

SUBSCRIBE_CASES = [
    (f"{ROOT}/d/{A}/desired", True),
    (f"{ROOT}/d/{A}/cmd", True),
    (f"{ROOT}/d/{A}/ack", True),
    (f"{ROOT}/pkg/{DIGEST}/c/+", True),
    (f"{ROOT}/pkg/#", True),
    (f"{ROOT}/d/{A}/state", False),  # device -> hub: nothing for it to read
    (f"{ROOT}/d/{B}/cmd", False),
    (f"{ROOT}/d/{B}/desired", False),
    (f"{ROOT}/d/+/cmd", False),
    (f"{ROOT}/d/{A}/+", False),  # would cover its up channels too
    (f"{ROOT}/d/#", False),
    (f"{ROOT}/#", False),
    ("#", False),
    ("+/d/+/cmd", False),
    ("$SYS/#", False),
    (f"$share/g/{ROOT}/d/{A}/cmd", False),
    (f"{ROOT}/pkg/#/x", False),  # not a filter at all
    (f"{ROOT}/pkg/a#", False),
]


@pytest.mark.parametrize(("topic", "allowed"), PUBLISH_CASES)
def test_publish_rules(topic: str, allowed: bool) -> None:
    assert may_publish(ROOT, A, topic) is allowed


@pytest.mark.parametrize(("topic_filter", "allowed"), SUBSCRIBE_CASES)
def test_subscribe_rules(topic_filter: str, allowed: bool) -> None:
    assert may_subscribe(ROOT, A, topic_filter) is allowed


def test_delivery_rules_and_bad_identities() -> None:
    assert may_receive(ROOT, A, f"{ROOT}/d/{A}/cmd")
    assert not may_receive(ROOT, A, f"{ROOT}/d/{B}/cmd")
    # A user name with wildcards never matches anything (CVE-2017-7650).
    for name in ("+", "#", "a/+", "a/#", "%u", "$SYS"):
        assert not may_publish(ROOT, name, f"{ROOT}/d/{name}/state")
        assert not may_subscribe(ROOT, name, f"{ROOT}/d/{name}/cmd")
    with pytest.raises(ValueError, match="cannot be used in a broker ACL"):
        device_grants("site%u")


# -- the EMQX endpoint --------------------------------------------------------------------------


@pytest.fixture
def emqx_hub(tmp_path: Path) -> Iterator[tuple[RunningHub, dict[str, str]]]:
    settings = HubSettings(data_dir=tmp_path / "hub", broker={"http_auth_secret": SECRET})
    with hub_app(settings) as hub:
        devices = {}
        for _ in range(3):
            body = hub.enroll()
            devices[body["device_id"]] = body["broker"]["password"]
        disabled = sorted(devices)[2]
        assert hub.client.post(f"/api/v1/devices/{disabled}/disable").status_code == 200
        yield hub, devices


def _ask(hub: RunningHub, path: str, body: dict[str, Any], secret: str | None = SECRET) -> Any:
    headers = {"Authorization": ""}
    if secret is not None:
        headers["X-Outpost-Broker-Secret"] = secret
    return hub.client.post(f"/api/v1/broker/{path}", json=body, headers=headers)


def test_emqx_authentication_and_authorization_table(
    emqx_hub: tuple[RunningHub, dict[str, str]],
) -> None:
    hub, devices = emqx_hub
    a, b, off = sorted(devices)
    pw_a, pw_off = devices[a], devices[off]
    authn = [
        ({"username": a, "password": pw_a, "clientid": a}, "allow"),
        ({"username": a, "password": pw_a + "x", "clientid": a}, "deny"),  # wrong password
        ({"username": a, "password": "", "clientid": a}, "deny"),
        ({"username": a, "password": pw_a, "clientid": b}, "deny"),  # B's client id: takeover
        ({"username": a, "password": pw_a, "clientid": "other"}, "deny"),
        ({"username": b, "password": pw_a, "clientid": b}, "deny"),  # A's password for B
        ({"username": off, "password": pw_off, "clientid": off}, "deny"),  # disabled
        ({"username": "dev-unknown", "password": "x", "clientid": "dev-unknown"}, "deny"),
        ({"username": "outpost_hub", "password": "x", "clientid": "h"}, "ignore"),  # not ours
        ({"username": "a/#", "password": "x", "clientid": "a/#"}, "ignore"),
        ({}, "ignore"),
    ]
    for body, expected in authn:
        response = _ask(hub, "authn", body)
        assert response.status_code == 200, response.text
        assert response.json() == {"result": expected, "is_superuser": False}, body

    authz = [
        (a, a, f"{ROOT}/d/{a}/state", "publish", "allow"),
        (a, a, f"{ROOT}/d/{a}/cmd", "subscribe", "allow"),
        (a, a, f"{ROOT}/pkg/{DIGEST}/c/+", "subscribe", "allow"),
        (a, a, f"{ROOT}/d/{b}/state", "publish", "deny"),  # another device's topic
        (a, a, f"{ROOT}/d/{b}/status", "publish", "deny"),  # its Will, say
        (a, a, f"{ROOT}/d/{b}/cmd", "subscribe", "deny"),
        (a, a, f"{ROOT}/d/+/cmd", "subscribe", "deny"),
        (a, a, "#", "subscribe", "deny"),
        (a, a, "$SYS/#", "subscribe", "deny"),
        (a, a, f"{ROOT}/d/{a}/cmd", "publish", "deny"),
        (a, a, f"{ROOT}/d/{a}/state", "retain", "deny"),  # an action it does not know
        (a, b, f"{ROOT}/d/{a}/state", "publish", "deny"),  # under B's client id
        (off, off, f"{ROOT}/d/{off}/state", "publish", "deny"),  # disabled
        ("outpost_hub", "h", f"{ROOT}/d/{a}/cmd", "publish", "ignore"),
    ]
    for username, clientid, topic, action, expected in authz:
        body = {"username": username, "clientid": clientid, "topic": topic, "action": action}
        response = _ask(hub, "authz", body)
        assert response.status_code == 200, response.text
        assert response.json() == {"result": expected}, body


def test_emqx_endpoint_needs_its_secret(emqx_hub: tuple[RunningHub, dict[str, str]]) -> None:
    hub, devices = emqx_hub
    a = sorted(devices)[0]
    body = {"username": a, "password": devices[a], "clientid": a}
    for secret in (None, "", "wrong-secret-value-xx", SECRET + "x", SECRET[:-1]):
        response = _ask(hub, "authn", body, secret=secret)
        # EMQX reads anything but 200/204 as "ignore", and its chain then ends in a denial.
        assert response.status_code == 401, (secret, response.text)
        assert "X-Outpost-Broker-Secret" in response.json()["detail"]
    assert _ask(hub, "authz", {"username": a}, secret="nope").status_code == 401


def test_emqx_endpoint_is_off_without_a_secret(running_hub: RunningHub) -> None:
    response = _ask(running_hub, "authn", {"username": "dev-aaaa"})
    assert response.status_code == 404
    assert "http_auth_secret" in response.json()["detail"]
    with pytest.raises(ValueError, match="at least 16 characters"):
        HubSettings(broker={"http_auth_secret": "changeme"})


# -- against the hub's Mosquitto ----------------------------------------------------------------


class DeviceLink:
    """A device's own MQTT connection, recording when the broker drops it."""

    def __init__(self, identity: Any) -> None:
        self.connack = threading.Event()
        self.refused: Any = None
        self.dropped_at: float | None = None
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=identity.device_id)
        self.client.username_pw_set(identity.broker.username, identity.broker.password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.connect(identity.broker.host, identity.broker.port, keepalive=10)
        self.client.loop_start()
        assert self.connack.wait(10), "no CONNACK"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.refused = rc if rc.is_failure else None
        self.connack.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if self.dropped_at is None:
            self.dropped_at = time.monotonic()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _enrol(hub: LiveHub, name: str) -> Any:
    with hub.api as client:
        token = client.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()["token"]
    state = StateDir(hub.tmp / f"agent-{name}")
    enroll(hub_url=hub.url, token=token, state=state, now=utc_now(), name=name)
    return state


def test_disable_drops_a_connected_device_at_once_and_enable_lets_it_back(
    tmp_path: Path,
) -> None:
    with live_hub_with(tmp_path) as hub:
        assert hub.ctx.broker is not None
        victim = _enrol(hub, "victim").load_identity()
        agent_state = _enrol(hub, "agent")
        runner = AgentThread(make_agent(fast_settings(agent_state.root)))
        runner.start()
        hub.agents.append(runner)
        agent_id = agent_state.load_identity().device_id
        hub.wait_until(lambda: hub.device(agent_id)["online"], 20, "the agent online")
        link = DeviceLink(victim)
        assert link.refused is None
        try:
            with hub.api as client:
                for device_id in (victim.device_id, agent_id):
                    started = time.monotonic()
                    response = client.post(f"/api/v1/devices/{device_id}/disable")
                    assert response.status_code == 200, response.text
                    assert response.json()["device"]["status"] == "disabled"
                    if device_id == victim.device_id:
                        hub.wait_until(
                            lambda: link.dropped_at is not None,
                            DISCONNECT_DEADLINE_S,
                            "the broker to drop the disabled device",
                        )
                        assert link.dropped_at is not None
                        print(f"disabled device dropped {link.dropped_at - started:.3f} s after")
            # Its Will marked the agent's device offline, and it stays out.
            hub.wait_until(lambda: not hub.device(agent_id)["online"], 10, "the agent offline")
            again = DeviceLink(victim)
            assert again.refused is not None
            assert "authori" in str(again.refused).lower()
            again.close()
            assert victim.device_id not in hub.ctx.broker.password_file.read_text()
            assert f"user {victim.device_id}\ntopic deny #" in hub.ctx.broker.acl_file.read_text()

            with hub.api as client:
                for device_id in (victim.device_id, agent_id):
                    response = client.post(f"/api/v1/devices/{device_id}/enable")
                    assert response.status_code == 200, response.text
            back = DeviceLink(victim)
            assert back.refused is None
            back.close()
            hub.wait_until(lambda: hub.device(agent_id)["online"], 20, "the agent back online")
        finally:
            link.close()


def test_a_pending_device_stays_off_the_broker_until_accepted(tmp_path: Path) -> None:
    with live_hub_with(tmp_path, devices={"approval_required": True}) as hub:
        assert hub.ctx.broker is not None
        identity = _enrol(hub, "waiting").load_identity()
        assert hub.device(identity.device_id)["status"] == "pending"
        text = hub.ctx.broker.password_file.read_text()
        assert identity.device_id not in text
        # The password file holds $7$ hashes only, never a password.
        for line in text.splitlines():
            user, _, hashed = line.partition(":")
            assert hashed.startswith("$7$101$"), user
        assert identity.broker.password not in text

        pending = DeviceLink(identity)
        assert pending.refused is not None  # cannot connect, so cannot publish
        pending.close()

        with hub.api as client:
            response = client.post(f"/api/v1/devices/{identity.device_id}/accept")
            assert response.status_code == 200, response.text
        accepted = DeviceLink(identity)
        assert accepted.refused is None
        accepted.close()
        assert identity.device_id in hub.ctx.broker.password_file.read_text()


def test_the_hub_can_drop_a_connection_the_password_reload_would_not(
    mosquitto: "BrokerHandle",
) -> None:
    # A device logged in by certificate keeps its connection through the reload; taking its
    # client id over on the hub's listener drops it. Shown here on a device whose password
    # still works, so only the take-over can have dropped it.
    password = mosquitto.add_device("dev-cert-like")
    identity = SimpleNamespace(
        device_id="dev-cert-like",
        broker=SimpleNamespace(
            host=mosquitto.host, port=mosquitto.port, username="dev-cert-like", password=password
        ),
    )
    link = DeviceLink(identity)
    assert link.refused is None
    broker = mosquitto.broker
    with pytest.raises(BrokerError, match="password is not set"):
        broker.disconnect_client("dev-cert-like")
    broker.hub_password = mosquitto.hub_password
    broker.disconnect_client("dev-cert-like")
    try:
        wait_until(lambda: link.dropped_at is not None, DISCONNECT_DEADLINE_S, "the kick")
    finally:
        link.close()
    broker.hub_password = "wrong"
    with pytest.raises(BrokerError, match="refused the hub account"):
        broker.disconnect_client("dev-cert-like")


def test_the_manufacturing_and_approval_flow_through_the_cli(tmp_path: Path) -> None:
    with live_hub_with(tmp_path, devices={"approval_required": True}) as hub:
        serials = tmp_path / "batch.txt"
        serials.write_text("# line 4, batch 17\nsn-1000\n\nsn-1001  # spare\nSN 1002\nsn/1003\n")
        refused = hub.cli("device", "tokens", "--serials", str(serials))
        assert refused.exit_code == 2
        assert "2 bad serial number(s)" in refused.output
        assert f"{serials}:5: 'SN 1002' is not a device id" in refused.output
        assert f"{serials}:6: 'sn/1003'" in refused.output

        serials.write_text("# line 4, batch 17\nsn-1000\n\nsn-1001  # spare\n")
        out = tmp_path / "tokens.csv"
        made = hub.cli("device", "tokens", "--serials", str(serials), "--out", str(out))
        assert made.exit_code == 0, made.output
        assert out.stat().st_mode & 0o777 == 0o600
        rows = out.read_text().splitlines()
        assert rows[0] == "serial,token,expires_at"
        assert [r.split(",")[0] for r in rows[1:]] == ["sn-1000", "sn-1001"]
        token = rows[1].split(",")[1]

        state = StateDir(tmp_path / "sn-1000")
        identity = enroll(
            hub_url=hub.url, token=token, state=state, now=utc_now(), serial="sn-1000"
        )
        assert identity.device_id == "sn-1000"
        pending = hub.cli("device", "pending")
        assert pending.exit_code == 0
        assert pending.output.startswith("sn-1000")

        assert hub.cli("device", "enable", "sn-1000").exit_code != 0  # accept, not enable
        accepted = hub.cli("device", "accept", "sn-1000")
        assert accepted.exit_code == 0, accepted.output
        assert "sn-1000: active" in accepted.output
        assert hub.cli("device", "disable", "sn-1000").output.startswith("sn-1000: disabled")
        assert "sn-1000: active" in hub.cli("device", "enable", "sn-1000").output
        bad = hub.cli("device", "disable", "a/#")
        assert bad.exit_code == 2
        assert "is not a device id" in bad.output


def test_a_denied_account_loses_every_topic_on_a_live_connection(
    mosquitto: "BrokerHandle",
) -> None:
    # What a certificate login (no password line to remove) relies on until it is dropped:
    # the reloaded ACL's `topic deny #` applies to connections already open.
    password = mosquitto.add_device("dev-denied")
    broker = mosquitto.broker
    identity = SimpleNamespace(
        device_id="dev-denied",
        broker=SimpleNamespace(
            host=mosquitto.host, port=mosquitto.port, username="dev-denied", password=password
        ),
    )
    seen: list[tuple[str, bytes]] = []
    hub = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-hub-observer")
    hub.username_pw_set(mosquitto.hub_username, mosquitto.hub_password)
    hub.on_message = lambda c, u, m: seen.append((m.topic, bytes(m.payload)))
    subscribed = threading.Event()
    hub.on_subscribe = lambda *a: subscribed.set()
    hub.connect(broker.hub_host, broker.hub_port)
    hub.loop_start()
    link = DeviceLink(identity)
    try:
        hub.subscribe(f"{ROOT}/#", qos=1)
        assert subscribed.wait(5), "no SUBACK"
        state = f"{ROOT}/d/dev-denied/state"
        link.client.publish(state, b"before", qos=1).wait_for_publish(5)
        wait_until(lambda: (state, b"before") in seen, 5, "the allowed publish")

        acl = render_acl(ROOT, mosquitto.hub_username, ["dev-denied"])
        broker.acl_file.write_text(acl)
        offset = broker.log_file.stat().st_size
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGHUP)
        wait_until(
            lambda: b"Reloading config" in broker.log_file.read_bytes()[offset:], 5, "the reload"
        )
        link.client.publish(state, b"after", qos=1).wait_for_publish(5)
        link.client.publish(state, b"sentinel-check", qos=1).wait_for_publish(5)
        # The hub's own message on the same topic arrives; the device's never did.
        hub.publish(state, b"from-hub", qos=1).wait_for_publish(5)
        wait_until(lambda: (state, b"from-hub") in seen, 5, "the hub's control message")
        assert link.client.is_connected()
        assert (state, b"after") not in seen
        assert (state, b"sentinel-check") not in seen
    finally:
        link.close()
        hub.loop_stop()
        hub.disconnect()
