"""The embedded Mosquitto: password hashes, ACL, reload and supervision, against a real broker.

Whether a message was refused is judged at a privileged subscriber (the hub user), never by a
PUBACK: mosquitto acknowledges a QoS 1 publish that the ACL dropped, on purpose.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from paho.mqtt.client import Client, ConnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from hub.broker import (
    BrokerError,
    BrokerUser,
    EmbeddedBroker,
    MosquittoNotFoundError,
    hash_password,
    render_acl,
    render_passwords,
    verify_password,
)
from hub.broker.supervisor import pid_alive

if TYPE_CHECKING:
    # The conftest's fixture type, for readers and editors; pytest never evaluates annotations.
    from conftest import BrokerHandle

pytestmark = pytest.mark.integration

TIMEOUT_S = 5.0
ROOT = "outpost"
DIGEST = "ab" * 32


class TestClient:
    """A paho client that waits for each acknowledgement with a deadline."""

    __test__ = False  # not a pytest class

    def __init__(self, handle: BrokerHandle, username: str | None, password: str | None) -> None:
        self.client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-{username}-{os.urandom(3).hex()}",
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.handle = handle
        self.connack: ReasonCode | None = None
        self.connected = threading.Event()
        self.suback: dict[int, list[ReasonCode]] = {}
        self.suback_event = threading.Condition()
        self.messages: queue.Queue[MQTTMessage] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(
        self,
        client: Client,
        userdata: Any,
        flags: ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connack = reason_code
        self.connected.set()

    def _on_subscribe(
        self,
        client: Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self.suback_event:
            self.suback[mid] = reason_codes
            self.suback_event.notify_all()

    def _on_message(self, client: Client, userdata: Any, msg: MQTTMessage) -> None:
        self.messages.put(msg)

    def connect(self) -> ReasonCode:
        self.client.connect(self.handle.host, self.handle.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT_S), "no CONNACK"
        assert self.connack is not None
        return self.connack

    def subscribe(self, topic: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic, qos=1)
        with self.suback_event:
            assert self.suback_event.wait_for(lambda: mid in self.suback, TIMEOUT_S), "no SUBACK"
            return self.suback[mid]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT_S)

    def receive_until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including (topic, payload), the sentinel."""
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"sentinel {topic} not received; got {got}"
            try:
                msg = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            got.append((msg.topic, msg.payload))
            if (msg.topic, msg.payload) == (topic, payload):
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[TestClient]]:
    made: list[TestClient] = []
    yield made
    for c in made:
        c.close()


def connect(
    clients: list[TestClient], handle: BrokerHandle, username: str | None, password: str | None
) -> TestClient:
    c = TestClient(handle, username, password)
    clients.append(c)
    rc = c.connect()
    assert not rc.is_failure, f"{username} refused: {rc}"
    return c


def connack_of(handle: BrokerHandle, username: str | None, password: str | None) -> ReasonCode:
    c = TestClient(handle, username, password)
    try:
        return c.connect()
    finally:
        c.close()


def is_granted(codes: list[ReasonCode]) -> bool:
    return all(not code.is_failure for code in codes)


# -- pure parts --------------------------------------------------------------------------------


def test_hash_password_is_mosquitto_7_format_with_fresh_salt() -> None:
    a, b = hash_password("secret"), hash_password("secret")
    assert a != b
    _, kind, iterations, salt, digest = a.split("$")
    assert (kind, iterations) == ("7", "101")
    assert len(salt) == 16  # base64 of 12 bytes
    assert len(digest) == 88  # base64 of 64 bytes
    assert verify_password("secret", a)
    assert not verify_password("Secret", a)
    assert not verify_password("secret", "$6$101$xx$yy")
    assert not verify_password("secret", "garbage")


@pytest.mark.parametrize("username", ["Dev-A", "ab", "dev/a", "dev+a", "#", "-dev", "a:b"])
def test_render_passwords_refuses_non_device_names(username: str) -> None:
    with pytest.raises(ValueError, match="device id"):
        render_passwords([BrokerUser(username, hash_password("x"))], hub_username="outpost_hub")


def test_render_passwords_allows_hub_and_refuses_duplicates() -> None:
    h = hash_password("x")
    text = render_passwords(
        [BrokerUser("outpost_hub", h), BrokerUser("dev-a", h)], hub_username="outpost_hub"
    )
    assert text == f"outpost_hub:{h}\ndev-a:{h}\n"
    with pytest.raises(ValueError, match="duplicate"):
        render_passwords([BrokerUser("dev-a", h), BrokerUser("dev-a", h)])
    with pytest.raises(ValueError, match="hub user name"):
        render_passwords([], hub_username="bad:name")


def test_acl_gives_devices_only_their_own_channels() -> None:
    acl = render_acl("site1/outpost", "outpost_hub")
    assert "user outpost_hub\ntopic readwrite site1/outpost/#" in acl
    assert "pattern write site1/outpost/d/%u/state" in acl
    assert "pattern read site1/outpost/d/%u/desired" in acl
    assert "pattern read site1/outpost/pkg/#" in acl
    assert "pattern readwrite" not in acl


# -- against a real mosquitto ------------------------------------------------------------------


def test_files_are_private(mosquitto: BrokerHandle) -> None:
    assert stat.S_IMODE(mosquitto.broker.password_file.stat().st_mode) == 0o600
    assert mosquitto.broker.url == f"mqtt://127.0.0.1:{mosquitto.port}"


def test_our_hash_is_accepted_and_wrong_or_missing_credentials_refused(
    mosquitto: BrokerHandle,
) -> None:
    assert not connack_of(mosquitto, mosquitto.hub_username, mosquitto.hub_password).is_failure
    assert connack_of(mosquitto, mosquitto.hub_username, "wrong").is_failure
    assert connack_of(mosquitto, None, None).is_failure
    assert connack_of(mosquitto, "nobody-here", "x").is_failure


def test_hub_reads_and_writes_everything_under_root(
    mosquitto: BrokerHandle, clients: list[TestClient]
) -> None:
    hub = connect(clients, mosquitto, mosquitto.hub_username, mosquitto.hub_password)
    assert is_granted(hub.subscribe(f"{ROOT}/#"))
    topics = [f"{ROOT}/d/dev-a/desired", f"{ROOT}/d/dev-b/state", f"{ROOT}/pkg/{DIGEST}/c/0"]
    for t in topics:
        hub.publish(t, b"x")
    hub.publish(f"{ROOT}/end", b"sentinel")
    got = hub.receive_until(f"{ROOT}/end", b"sentinel")
    assert [t for t, _ in got] == [*topics, f"{ROOT}/end"]


def test_device_uses_its_own_topics(mosquitto: BrokerHandle, clients: list[TestClient]) -> None:
    password = mosquitto.add_device("dev-a")
    hub = connect(clients, mosquitto, mosquitto.hub_username, mosquitto.hub_password)
    hub.subscribe(f"{ROOT}/#")
    dev = connect(clients, mosquitto, "dev-a", password)
    for channel in ("desired", "cmd", "ack"):
        assert is_granted(dev.subscribe(f"{ROOT}/d/dev-a/{channel}"))
    assert is_granted(dev.subscribe(f"{ROOT}/pkg/{DIGEST}/c/+"))

    own = [f"{ROOT}/d/dev-a/{c}" for c in ("state", "status", "evt", "tm", "dc", "req")]
    for t in own:
        dev.publish(t, b"up")
    got = hub.receive_until(own[-1], b"up")
    assert [t for t, _ in got] == own

    down = [f"{ROOT}/d/dev-a/{c}" for c in ("desired", "cmd", "ack")] + [f"{ROOT}/pkg/{DIGEST}/c/7"]
    for t in down:
        hub.publish(t, b"down")
    got = dev.receive_until(down[-1], b"down")
    assert [t for t, _ in got] == down


def test_device_cannot_write_other_or_hub_topics(
    mosquitto: BrokerHandle, clients: list[TestClient]
) -> None:
    password = mosquitto.add_device("dev-a")
    mosquitto.add_device("dev-b")
    hub = connect(clients, mosquitto, mosquitto.hub_username, mosquitto.hub_password)
    hub.subscribe(f"{ROOT}/#")
    hub.subscribe("#")  # catches anything written outside the root too, if it got through
    dev = connect(clients, mosquitto, "dev-a", password)
    forbidden = [
        f"{ROOT}/d/dev-b/state",  # another device's topic
        f"{ROOT}/d/dev-b/evt",
        f"{ROOT}/d/dev-a/desired",  # its own, but hub -> device
        f"{ROOT}/d/dev-a/cmd",
        f"{ROOT}/d/dev-a/ack",
        f"{ROOT}/pkg/{DIGEST}/c/0",  # forging a package chunk
        f"{ROOT}/d/dev-a/other",
        "elsewhere/topic",
    ]
    for t in forbidden:
        dev.publish(t, b"evil")
    dev.publish(f"{ROOT}/d/dev-a/state", b"sentinel")
    got = hub.receive_until(f"{ROOT}/d/dev-a/state", b"sentinel")
    assert [m for m in got if m[1] == b"evil"] == []


@pytest.mark.parametrize(
    "pattern",
    [
        f"{ROOT}/d/+/desired",
        f"{ROOT}/d/dev-b/desired",
        "#",
        f"{ROOT}/#",
        "$share/g/outpost/d/+/desired",
    ],
)
def test_device_cannot_read_other_devices(
    mosquitto: BrokerHandle, clients: list[TestClient], pattern: str
) -> None:
    password = mosquitto.add_device("dev-a")
    mosquitto.add_device("dev-b")
    hub = connect(clients, mosquitto, mosquitto.hub_username, mosquitto.hub_password)
    # Retained before the subscription, and live after it: neither may reach dev-a.
    hub.publish(f"{ROOT}/d/dev-b/desired", b"secret-retained", retain=True)
    dev = connect(clients, mosquitto, "dev-a", password)
    dev.subscribe(pattern)
    assert is_granted(dev.subscribe(f"{ROOT}/d/dev-a/desired"))
    hub.publish(f"{ROOT}/d/dev-b/desired", b"secret-live")
    hub.publish(f"{ROOT}/d/dev-b/cmd", b"secret-live")
    hub.publish(f"{ROOT}/d/dev-a/desired", b"sentinel")
    got = dev.receive_until(f"{ROOT}/d/dev-a/desired", b"sentinel")
    assert [m for m in got if m[1].startswith(b"secret")] == []


def test_hub_shared_subscription_receives_device_traffic(
    mosquitto: BrokerHandle, clients: list[TestClient]
) -> None:
    # Mosquitto 2.0 checks the ACL against the topic inside $share/<group>/, so the hub's
    # `readwrite root/#` is enough for shared subscriptions; no `$share/...` ACL line is needed.
    password = mosquitto.add_device("dev-a")
    hub = connect(clients, mosquitto, mosquitto.hub_username, mosquitto.hub_password)
    assert is_granted(hub.subscribe(f"$share/hub/{ROOT}/d/+/state"))
    dev = connect(clients, mosquitto, "dev-a", password)
    dev.publish(f"{ROOT}/d/dev-a/state", b"hello")
    assert hub.receive_until(f"{ROOT}/d/dev-a/state", b"hello")


def test_update_users_reloads_without_restart(
    mosquitto: BrokerHandle, clients: list[TestClient]
) -> None:
    hub = connect(clients, mosquitto, mosquitto.hub_username, mosquitto.hub_password)
    hub.subscribe(f"{ROOT}/#")
    pid = mosquitto.broker.pid
    assert connack_of(mosquitto, "dev-new", "pw").is_failure

    password = mosquitto.add_device("dev-new")

    dev = connect(clients, mosquitto, "dev-new", password)
    assert mosquitto.broker.pid == pid
    # The hub's session survived the reload.
    dev.publish(f"{ROOT}/d/dev-new/state", b"after-reload")
    hub.receive_until(f"{ROOT}/d/dev-new/state", b"after-reload")


def test_supervisor_restarts_a_dead_broker(mosquitto: BrokerHandle) -> None:
    broker = mosquitto.broker
    old_pid = broker.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: broker.restarts == 1 and broker.pid not in (None, old_pid), "a restart")
    assert not connack_of(mosquitto, mosquitto.hub_username, mosquitto.hub_password).is_failure


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_supervisor_gives_up_after_restart_budget(tmp_path: Path) -> None:
    broker = EmbeddedBroker(data_dir=tmp_path, max_restarts_per_minute=1)
    broker.start([BrokerUser("outpost_hub", hash_password("x"))])
    try:
        first = broker.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: broker.pid not in (None, first), "the first restart")
        second = broker.pid
        assert second is not None
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: not broker.supervising, "the supervisor to give up")
        assert broker.restarts == 1
        assert not broker.is_running()
    finally:
        broker.stop()


def test_stop_reaps_and_closes_port(tmp_path: Path) -> None:
    with EmbeddedBroker(data_dir=tmp_path) as broker:
        broker.start([BrokerUser("outpost_hub", hash_password("x"))])
        port = broker.port
        assert broker.is_running()
    assert not broker.is_running()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    assert (tmp_path / "mosquitto.db").exists()  # persistence is on


def test_start_failure_reports_mosquitto_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = EmbeddedBroker(data_dir=tmp_path, port=port, start_timeout_s=2.0)
        with pytest.raises(BrokerError, match="Address already in use"):
            broker.start([BrokerUser("outpost_hub", hash_password("x"))])
        broker.stop()


def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    broker = EmbeddedBroker(data_dir=tmp_path, mosquitto_bin=str(tmp_path / "nope"))
    with pytest.raises(MosquittoNotFoundError):
        broker.start([])


def test_a_restarted_broker_comes_back_on_the_port_devices_were_enrolled_with(
    tmp_path: Path,
) -> None:
    users = [BrokerUser("outpost_hub", hash_password("x"))]
    with EmbeddedBroker(data_dir=tmp_path) as broker:
        broker.start(users)
        first = broker.port
    assert broker.port_file.read_text().strip() == str(first)
    with EmbeddedBroker(data_dir=tmp_path) as again:
        again.start(users)
        assert again.port == first
    # Taken by something else: a clear refusal, not a silent move to another port.
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first))
        squatter.listen()
        blocked = EmbeddedBroker(data_dir=tmp_path, start_timeout_s=3)
        with pytest.raises(BrokerError, match=f"port {first}, the port enrolled devices use"):
            blocked.start(users)
        blocked.stop()


_KILLED_HUB = """
import os, sys
from pathlib import Path
from hub.broker import BrokerUser, EmbeddedBroker, hash_password
broker = EmbeddedBroker(data_dir=Path(sys.argv[1]))
broker.start([BrokerUser("outpost_hub", hash_password("x"))])
print(broker.port, broker.pid, flush=True)
os.kill(os.getpid(), 9)  # the hub dies without stopping its broker
"""


def test_a_broker_left_running_by_a_killed_hub_is_stopped_and_its_port_taken_back(
    tmp_path: Path,
) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_HUB, str(tmp_path)], capture_output=True, timeout=60
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    port, orphan = map(int, killed.stdout.split())
    assert pid_alive(orphan)  # it still holds the port the devices know
    with EmbeddedBroker(data_dir=tmp_path) as broker:
        broker.start([BrokerUser("outpost_hub", hash_password("x"))])
        assert broker.port == port
        assert broker.pid != orphan
    assert not pid_alive(orphan)


def test_a_stale_pid_file_naming_another_process_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "mosquitto.pid").write_text(f"{os.getpid()}\n")
    with EmbeddedBroker(data_dir=tmp_path) as broker:
        broker.start([BrokerUser("outpost_hub", hash_password("x"))])
        assert broker.is_running()
    assert pid_alive(os.getpid())
