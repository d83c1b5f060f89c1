"""One MQTT connection driven by the asyncio loop that owns it.

paho-mqtt is used without its network thread: its socket is registered with the event loop
(``on_socket_open`` / ``on_socket_register_write``) and ``loop_misc`` runs once a second for
keep-alive. That costs a few KB per connection instead of a thread, which is what lets the
simulator hold thousands of agents in one process (FLOORS.md).

Reconnects use exponential backoff with full jitter, also after the broker drops an established
connection, so a broker restart does not bring the whole fleet back in the same second and a
client-id takeover loop does not spin.

With ``tls`` the link speaks mutual TLS (agent/tlsfiles.py): the broker's certificate is checked
against the hub's CA and the host name, the device's certificate is its identity, and a failed
handshake is a failed connect attempt like any other: retried with backoff, never downgraded.
"""

import asyncio
import logging
import random
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.aio import wait_within
from agent.tlsfiles import TlsConfig

logger = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: a delay drawn from [0, min(cap, base * 2^n)]."""

    base_s: float = 0.5
    cap_s: float = 60.0
    jitter: bool = True

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** min(attempt, 30)))
        return rng.uniform(0.0, ceiling) if self.jitter else ceiling


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str
    password: str


class MqttLink:
    """A reconnecting MQTT 3.1.1 client. ``run`` keeps it connected until cancelled."""

    # A connection that stays up this long counts as healthy and resets the backoff.
    STABLE_AFTER_S = 10.0

    def __init__(
        self,
        *,
        client_id: str,
        broker: BrokerAddress,
        on_message: MessageHandler,
        on_connected: Callable[[], None],
        will: Will | None = None,
        keepalive_s: int = 30,
        backoff: Backoff | None = None,
        connect_timeout_s: float = 10.0,
        rng: random.Random | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self._broker = broker
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self._keepalive_s = keepalive_s
        self._backoff = backoff or Backoff()
        self._connect_timeout_s = connect_timeout_s
        self._rng = rng or random.Random()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        self.tls = tls is not None
        if tls is not None:
            # The certificate is the credential (the broker takes its CN as the user name):
            # the password is not sent where it is not needed.
            self._client.tls_set_context(tls.context())
        else:
            self._client.username_pw_set(broker.username, broker.password)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        # Set once: paho refuses to change it after a lost connection (its state is then
        # "connection lost", not "closed"), which would stop every reconnect.
        self._client.connect_timeout = connect_timeout_s
        self._client.max_inflight_messages_set(100)
        self._client.max_queued_messages_set(10_000)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_socket_open = self._socket_open
        self._client.on_socket_close = self._socket_close
        self._client.on_socket_register_write = self._register_write
        self._client.on_socket_unregister_write = self._unregister_write
        self._loop: asyncio.AbstractEventLoop | None = None
        self._misc_task: asyncio.Task[None] | None = None
        self._connack: asyncio.Future[bool] | None = None
        self._lost: asyncio.Event | None = None
        self.connected = False
        self._cut = False  # drop() cut the socket; the loss has not been noticed yet
        self.connects = 0
        self.connected_at: float | None = None  # time.monotonic() of the latest CONNACK
        self.first_connected_at: float | None = None
        self.connect_failures = 0
        self.disconnects = 0

    # -- the event-loop integration -------------------------------------------------------

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.add_reader(sock, self._readable, client)
        self._misc_task = self._loop.create_task(self._misc(), name=f"mqtt-misc-{id(self)}")

    def _socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        if self._misc_task is not None:
            self._misc_task.cancel()
            self._misc_task = None

    @staticmethod
    def _readable(client: paho.Client) -> None:
        client.loop_read()
        # TLS decrypts whole records: packets left in its buffer do not make the socket
        # readable again, so they are read now or they would wait for the next packet.
        sock = client.socket()
        while isinstance(sock, ssl.SSLSocket) and sock.pending() > 0:
            if client.loop_read() != paho.MQTT_ERR_SUCCESS:
                return
            sock = client.socket()

    def _register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, client.loop_write)

    def _unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    async def _misc(self) -> None:
        # A timer, not a wait for a condition: paho checks keep-alive once a second.
        while self._client.loop_misc() == paho.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(1.0)

    # -- paho callbacks (run inside the event loop, from loop_read / loop_misc) -------------

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        ok = not reason.is_failure
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(ok)
        if not ok:
            logger.warning("broker refused connection: %s", reason)
            return
        self.connected = True
        self._cut = False
        self.connects += 1
        self.connected_at = time.monotonic()
        if self.first_connected_at is None:
            self.first_connected_at = self.connected_at
        try:
            self._on_connected_cb()
        except Exception:
            logger.exception("on_connected handler failed")

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        was_connected = self.connected
        self.connected = False
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(False)
        if was_connected:
            self.disconnects += 1
            logger.info("disconnected from broker: %s", reason)
        if self._lost is not None:
            self._lost.set()

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.receive(msg.topic, bytes(msg.payload))

    def receive(self, topic: str, payload: bytes) -> None:
        """Hand one message to the agent; the simulator's links override it to shape traffic."""
        try:
            self._on_message_cb(topic, payload)
        except Exception:
            # One bad message must not take the connection (or the agent) down.
            logger.exception("message handler failed", extra={"topic": topic})

    # -- the public side ---------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Queue a message; False when not connected (the caller keeps it for later)."""
        if not self.connected:
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == paho.MQTT_ERR_SUCCESS

    def subscribe(self, topics: list[tuple[str, int]]) -> None:
        if self.connected and topics:
            self._client.subscribe(topics)

    def unsubscribe(self, topic: str) -> None:
        if self.connected:
            self._client.unsubscribe(topic)

    def drop(self) -> bool:
        """Cut the connection as a network failure would: no DISCONNECT, so the will fires.

        The link then reconnects with its backoff, as after any other loss. False when there
        was no live connection to cut (not connected, or already cut and not yet noticed).
        """
        sock = self._client.socket()
        if not self.connected or self._cut or not isinstance(sock, socket.socket):
            return False
        self._cut = True
        # SO_LINGER 0 makes close send a reset, as a pulled cable looks to the broker.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
        return True

    async def wait_for_network(self) -> None:
        """Called before every connect attempt; a real network is always there.

        The simulator overrides it to keep a device offline for a window.
        """

    async def run(self) -> None:
        """Connect, and reconnect after every loss, until cancelled."""
        self._loop = asyncio.get_running_loop()
        attempt = 0
        try:
            while True:
                await self.wait_for_network()
                started = time.monotonic()
                if await self._connect_once():
                    assert self._lost is not None
                    await self._lost.wait()
                    if time.monotonic() - started >= self.STABLE_AFTER_S:
                        attempt = 0
                else:
                    self.connect_failures += 1
                await asyncio.sleep(self._backoff.delay(attempt, self._rng))
                attempt += 1
        finally:
            await self._shutdown()

    async def _connect_once(self) -> bool:
        assert self._loop is not None
        self._lost = asyncio.Event()
        self._connack = self._loop.create_future()
        try:
            # The TCP connect itself is blocking in paho; on loopback and LANs it takes
            # microseconds, and the timeout (set once in __init__) bounds it elsewhere.
            self._client.connect(self._broker.host, self._broker.port, self._keepalive_s)
        except (OSError, ValueError) as exc:
            logger.info("cannot reach broker %s:%s: %s", self._broker.host, self._broker.port, exc)
            return False
        try:
            ok = await wait_within(self._connack, self._connect_timeout_s)
        except TimeoutError:
            ok = False
        if not ok:
            self._client.disconnect()
            self._force_close()
        return ok

    def _force_close(self) -> None:
        sock = self._client.socket()
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if self._misc_task is not None:
            self._misc_task.cancel()
            self._misc_task = None

    async def _shutdown(self) -> None:
        if self.connected:
            self._client.disconnect()
            # Give the DISCONNECT a moment to be written so the broker does not fire the will.
            for _ in range(20):
                if self._client.socket() is None:
                    break
                self._client.loop_write()
                await asyncio.sleep(0.005)
        self.connected = False
        self._force_close()
