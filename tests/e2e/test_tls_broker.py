"""The broker's TLS listener for devices with client certificates, against a real Mosquitto
started from the hub's generated config, and a real hub and agent on top (THREATS.md B12, E1).

Every "refused" is judged by the broker's answer (no CONNACK accepted), every "not delivered"
at a privileged subscriber (the hub account), never by a PUBACK: mosquitto acknowledges a QoS 1
publish that its ACL dropped.
"""

import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion

from agent.certificate import request_certificate
from agent.core import utc_now
from agent.enroll import enroll
from agent.state import StateDir
from agent.tlsfiles import TlsConfig
from hub.broker import (
    DEFAULT_HUB_USERNAME,
    BrokerUser,
    EmbeddedBroker,
    MosquittoNotFoundError,
    find_mosquitto,
    hash_password,
)
from hub.broker.kick import take_over_client_id
from hub.security.ca import DeviceCA
from hub.security.listener import prepare_tls_listener
from hub.security.revocation import revoke_device_certificates
from hub.settings import HubSettings
from tests.support.agents import AgentThread, fast_settings, make_agent
from tests.support.live_hub import live_hub_with
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

TIMEOUT_S = 5.0
DAY = timedelta(days=1)
ROOT = "outpost"


@dataclass
class TlsBroker:
    broker: EmbeddedBroker
    ca: DeviceCA
    hub_password: str
    files: Path
    users: list[BrokerUser] = field(default_factory=list)

    @property
    def tls_port(self) -> int:
        assert self.broker.tls is not None
        return self.broker.tls.port

    def credentials(self, device_id: str, *, ca: DeviceCA | None = None) -> TlsConfig:
        """A key made here and a certificate for it from ``ca`` (the hub's by default)."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )
        cert = (ca or self.ca).issue_client(device_id=device_id, csr_pem=csr, validity=DAY)
        return self.files_for(
            device_id,
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    def files_for(self, name: str, cert_pem: bytes, key_pem: bytes) -> TlsConfig:
        directory = self.files / f"{name}-{time.monotonic_ns()}"
        directory.mkdir(parents=True)
        (directory / "device.crt").write_bytes(cert_pem)
        (directory / "device.key").write_bytes(key_pem)
        return TlsConfig(
            ca_file=self.ca.cert_file,
            cert_file=directory / "device.crt",
            key_file=directory / "device.key",
        )

    def reload(self) -> None:
        """SIGHUP, as the hub sends after any change of credentials; returns once it is done."""
        self.broker.update_users(self.users)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """Mosquitto from the hub's generated config with the TLS listener on a free port."""
    try:
        binary = find_mosquitto()
    except MosquittoNotFoundError as exc:
        pytest.skip(f"mosquitto is not installed: {exc}")
    tmp = tmp_path_factory.mktemp("tls")
    settings = HubSettings(data_dir=tmp / "hub", broker={"tls": {"enabled": True}})
    ca = DeviceCA(settings.ca_dir)
    listener = prepare_tls_listener(settings, ca, bind="127.0.0.1")
    broker = EmbeddedBroker(data_dir=settings.broker_dir, mosquitto_bin=binary, tls=listener)
    hub_password = "hub-" + tmp.name
    users = [BrokerUser(DEFAULT_HUB_USERNAME, hash_password(hub_password))]
    broker.start(users)
    try:
        yield TlsBroker(broker, ca, hub_password, tmp / "files", users)
    finally:
        broker.stop()


class Conn:
    """One paho connection; ``accepted`` is the broker's CONNACK verdict (False: refused, or
    the connection was closed before any CONNACK)."""

    def __init__(self, client_id: str) -> None:
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.answered = threading.Event()
        self.accepted = False
        self.error: str | None = None
        self.lost = threading.Event()
        self.messages: queue.Queue[MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue[int] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda c, u, mid, rc, p: self.subacks.put(mid)

    def _on_connect(self, client: Client, userdata: Any, flags: Any, reason: Any, p: Any) -> None:
        self.accepted = not reason.is_failure
        self.answered.set()

    def _on_disconnect(
        self, client: Client, userdata: Any, flags: Any, reason: Any, p: Any
    ) -> None:
        self.lost.set()
        self.answered.set()

    def open(self, host: str, port: int) -> "Conn":
        # paho's own reconnects would muddle "refused"; one attempt, judged once.
        self.client.reconnect_delay_set(60, 60)
        try:
            self.client.connect(host, port, keepalive=30)
        except (OSError, ValueError) as exc:  # a handshake the broker refused (or we did)
            self.error = repr(exc)
            return self
        self.client.loop_start()
        self.answered.wait(TIMEOUT_S)
        return self

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        deadline = time.monotonic() + TIMEOUT_S
        while self.subacks.get(timeout=max(0.01, deadline - time.monotonic())) != mid:
            pass

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(TIMEOUT_S)

    def until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including the sentinel (topic, payload)."""
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + TIMEOUT_S
        while (topic, payload) not in got:
            left = deadline - time.monotonic()
            assert left > 0, f"sentinel {topic} not received; got {got}"
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            got.append((msg.topic, bytes(msg.payload)))
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def conns() -> Iterator[list[Conn]]:
    made: list[Conn] = []
    yield made
    for conn in made:
        conn.close()


def _tls(tb: TlsBroker, conns: list[Conn], tls: TlsConfig, client_id: str, **kw: Any) -> Conn:
    conn = Conn(client_id)
    conn.client.tls_set_context(tls.context())
    if kw.get("username"):
        conn.client.username_pw_set(kw["username"], "ignored")
    conns.append(conn)
    return conn.open("127.0.0.1", tb.tls_port)


def _hub(tb: TlsBroker, conns: list[Conn]) -> Conn:
    conn = Conn(f"test-hub-{time.monotonic_ns()}")
    conn.client.username_pw_set(DEFAULT_HUB_USERNAME, tb.hub_password)
    conns.append(conn)
    conn.open(tb.broker.hub_host, tb.broker.hub_port)
    assert conn.accepted, "the hub account must get in"
    return conn


def test_a_device_with_its_certificate_publishes_on_its_own_topics(
    tls_broker: TlsBroker, conns: list[Conn]
) -> None:
    hub = _hub(tls_broker, conns)
    hub.subscribe(f"{ROOT}/#")
    device = _tls(tls_broker, conns, tls_broker.credentials("dev-tls-a"), "dev-tls-a")
    assert device.accepted, device.error
    device.subscribe(f"{ROOT}/d/dev-tls-a/cmd")
    device.publish(f"{ROOT}/d/dev-tls-a/tm", b"hello")
    assert (f"{ROOT}/d/dev-tls-a/tm", b"hello") in hub.until(f"{ROOT}/d/dev-tls-a/tm", b"hello")
    hub.publish(f"{ROOT}/d/dev-tls-a/cmd", b"for-a")
    device.until(f"{ROOT}/d/dev-tls-a/cmd", b"for-a")


def test_a_certificate_for_a_cannot_reach_b(tls_broker: TlsBroker, conns: list[Conn]) -> None:
    a_id, b_id = "dev-tls-xa", "dev-tls-xb"
    hub = _hub(tls_broker, conns)
    hub.subscribe(f"{ROOT}/#")
    b = _tls(tls_broker, conns, tls_broker.credentials(b_id), b_id)
    assert b.accepted
    b.subscribe(f"{ROOT}/d/{b_id}/#")
    # A's certificate, claiming B's client id and user name: both become A's CN.
    a = _tls(tls_broker, conns, tls_broker.credentials(a_id), b_id, username=b_id)
    assert a.accepted
    for topic in (f"{ROOT}/d/{b_id}/cmd", f"{ROOT}/#", "#", "$SYS/#"):
        a.subscribe(topic)
    for channel in ("tm", "state", "status", "evt", "req", "dc", "cmd", "desired"):
        a.publish(f"{ROOT}/d/{b_id}/{channel}", b"forged")
    a.publish(f"{ROOT}/d/{a_id}/tm", b"sentinel")
    seen = hub.until(f"{ROOT}/d/{a_id}/tm", b"sentinel")
    assert [t for t, p in seen if p == b"forged"] == [], "a forged message reached the hub"
    hub.publish(f"{ROOT}/d/{b_id}/cmd", b"for-b")
    hub.publish(f"{ROOT}/d/{a_id}/cmd", b"sentinel-a")
    assert b.until(f"{ROOT}/d/{b_id}/cmd", b"for-b")
    got = a.until(f"{ROOT}/d/{a_id}/cmd", b"sentinel-a")
    assert [t for t, _ in got if f"/{b_id}/" in t] == [], "A read B's command"
    # B kept its session: A's connection under B's client id took nothing over.
    assert not b.lost.is_set()


def _expired(tb: TlsBroker, device_id: str) -> TlsConfig:
    past = DeviceCA(tb.ca.directory, clock=lambda: datetime.now(UTC) - 3 * DAY)
    return tb.credentials(device_id, ca=past)


def test_refused_certificates_and_plaintext(
    tls_broker: TlsBroker, conns: list[Conn], tmp_path: Path
) -> None:
    """B12 (a) expired, (b) revoked, (c) another CA, (e) plaintext; and no certificate, and
    the broker's own certificate offered as a client's."""
    tb = tls_broker
    stranger = DeviceCA(tmp_path / "stranger")
    revoked = tb.credentials("dev-tls-revoked")
    assert _tls(tb, conns, revoked, "dev-tls-revoked").accepted  # before revocation
    tb.ca.revoke("dev-tls-revoked")
    tb.reload()
    server = tb.files_for(
        "server", tb.ca.server_cert_file.read_bytes(), tb.ca.server_key_file.read_bytes()
    )
    cases: dict[str, TlsConfig | None] = {
        "expired": _expired(tb, "dev-tls-expired"),
        "revoked (CRL + reload)": revoked,
        "another CA": tb.credentials("dev-tls-stranger", ca=stranger),
        "the broker's server certificate": server,
        "no client certificate": None,
    }
    refused: list[str] = []
    for case, tls in cases.items():
        if tls is None:
            conn = Conn("dev-tls-nocert")
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(cafile=str(tb.ca.cert_file))
            conn.client.tls_set_context(context)
            conns.append(conn)
            conn.open("127.0.0.1", tb.tls_port)
        else:
            conn = _tls(tb, conns, tls, "dev-tls-case")
        if not conn.accepted:
            refused.append(case)
    plain = Conn("dev-tls-plain")
    plain.client.username_pw_set(DEFAULT_HUB_USERNAME, tb.hub_password)
    conns.append(plain)
    if not plain.open("127.0.0.1", tb.tls_port).accepted:
        refused.append("plaintext MQTT (hub password) to the TLS port")
    print(f"TLS negative cases: {len(cases) + 1} tried, {len(refused)} refused: {refused}")
    assert refused == [*cases, "plaintext MQTT (hub password) to the TLS port"]
    # And a good certificate still gets in after all that.
    assert _tls(tb, conns, tb.credentials("dev-tls-good"), "dev-tls-good").accepted


def test_broker_name_is_checked_by_the_agent(tls_broker: TlsBroker) -> None:
    """B12 (d): the agent's TLS context refuses a broker whose certificate does not name the
    host it connects to, and one signed by another CA."""
    tls = tls_broker.credentials("dev-tls-host")
    for hostname in ("127.0.0.1", "localhost"):
        with (
            socket.create_connection(("127.0.0.1", tls_broker.tls_port), TIMEOUT_S) as raw,
            tls.context().wrap_socket(raw, server_hostname=hostname) as ok,
        ):
            assert ok.version() in ("TLSv1.2", "TLSv1.3")
    with (
        socket.create_connection(("127.0.0.1", tls_broker.tls_port), TIMEOUT_S) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="match"),
    ):
        tls.context().wrap_socket(raw, server_hostname="broker.example")


def test_revoked_device_live_connection_survives_a_reload_and_is_kicked(
    tls_broker: TlsBroker, conns: list[Conn]
) -> None:
    """What Mosquitto 2.0 does with a connected client whose certificate is revoked: the
    reload does not drop it; the hub's session takeover does, and it cannot come back."""
    tb = tls_broker
    tls = tb.credentials("dev-tls-live")
    live = _tls(tb, conns, tls, "dev-tls-live")
    assert live.accepted
    tb.ca.revoke("dev-tls-live")
    tb.reload()
    hub = _hub(tb, conns)
    hub.subscribe(f"{ROOT}/d/dev-tls-live/tm")
    live.publish(f"{ROOT}/d/dev-tls-live/tm", b"still-here")
    hub.until(f"{ROOT}/d/dev-tls-live/tm", b"still-here")
    assert not live.lost.is_set(), "mosquitto dropped the client at reload after all"
    take_over_client_id(
        host=tb.broker.hub_host,
        port=tb.broker.hub_port,
        username=DEFAULT_HUB_USERNAME,
        password=tb.hub_password,
        client_id="dev-tls-live",
        timeout_s=TIMEOUT_S,
    )
    assert live.lost.wait(TIMEOUT_S), "the takeover did not drop the revoked device"
    assert not _tls(tb, conns, tls, "dev-tls-live").accepted


def test_agent_gets_a_certificate_and_connects_with_tls_only(tmp_path: Path) -> None:
    """The whole road: enrol, request a certificate with the broker password, run on TLS;
    disable it through the hub's API and watch it fall off and stay off."""
    with live_hub_with(tmp_path, broker={"tls": {"enabled": True}}) as hub:
        tokens = []
        with hub.api as client:
            for _ in range(2):
                answer = client.post("/api/v1/enrollment-tokens", json={"uses": 1})
                tokens.append(answer.json()["token"])
        tls_state, plain_state = StateDir(tmp_path / "agent-tls"), StateDir(tmp_path / "agent-pw")
        identity = enroll(hub_url=hub.url, token=tokens[0], state=tls_state, now=utc_now())
        enroll(hub_url=hub.url, token=tokens[1], state=plain_state, now=utc_now())
        endpoint = request_certificate(state=tls_state)
        assert endpoint.port == hub.ctx.broker.tls.port  # type: ignore[union-attr]
        assert (tls_state.root / "tls" / "device.key").stat().st_mode & 0o077 == 0

        runners = [
            AgentThread(make_agent(fast_settings(state.root))) for state in (tls_state, plain_state)
        ]
        tls_agent, plain_agent = (runner.start() for runner in runners)
        try:
            assert tls_agent.link.tls
            assert not plain_agent.link.tls  # no certificate: its password, as before
            for agent in (tls_agent, plain_agent):
                hub.wait_until(
                    lambda a=agent: hub.device(a.device_id)["reported_state"] is not None,
                    what=f"{agent.device_id} reporting its state",
                )
            # Disabling the device is what revokes its certificate (and drops it).
            with hub.api as client:
                answer = client.post(f"/api/v1/devices/{identity.device_id}/disable")
                assert answer.status_code == 200, answer.text
            assert hub.ctx.device_ca is not None
            assert revoke_device_certificates(hub.ctx, identity.device_id) == []  # done already
            wait_until(lambda: not tls_agent.connected, TIMEOUT_S, "the revoked agent dropped")
            failures = tls_agent.link.connect_failures
            wait_until(
                lambda: tls_agent.link.connect_failures >= failures + 3,
                10.0,
                "three refused reconnects",
            )
            assert not tls_agent.connected
            assert plain_agent.connected
        finally:
            for runner in runners:
                runner.stop()
