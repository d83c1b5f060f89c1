"""Bare paho clients driven from one asyncio loop: the floor the agent's MQTT link is held to.

The same integration the agent uses (``agent/mqtt.py``): no network thread, the socket handed
to the loop through paho's ``on_socket_*`` callbacks, ``loop_read``/``loop_write`` as the
loop's reader and writer, ``loop_misc`` once a second for keep-alive. Nothing else: no message
encoding, no state on disk, one shared callback object and one keep-alive sweep for all clients
instead of tasks per client. That is what plain paho costs (FLOORS.md: ~4.5 KB a connection,
~12k connects/s).
"""

import asyncio
import random
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from bench.timing import BenchTimeout

MessageSink = Callable[[int, str, bytes | bytearray], None]  # (client index, topic, payload)
PubackSink = Callable[[int], None]  # (client index): the broker acknowledged a QoS 1 publish
_MISC_PERIOD_S = 1.0
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass(frozen=True)
class Account:
    client_id: str
    username: str
    password: str


class BareClients:
    """N paho clients on the running loop. Build it inside that loop."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        accounts: Sequence[Account],
        keepalive_s: int = 30,
        on_message: MessageSink | None = None,
        on_puback: PubackSink | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._host = host
        self._port = port
        self._keepalive_s = keepalive_s
        self._sink = on_message
        self._puback_sink = on_puback
        self.connected_at: list[float | None] = [None] * len(accounts)
        self.refused = 0
        self.subscribed = 0
        self.heartbeats_sent = 0
        self._changed = asyncio.Event()
        self._slots: asyncio.Semaphore | None = None
        self._beats: list[asyncio.TimerHandle] = []
        self._misc: asyncio.Task[None] | None = None
        self.clients = [self._make(i, a) for i, a in enumerate(accounts)]

    def _make(self, index: int, account: Account) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=account.client_id,
            userdata=index,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        client.username_pw_set(account.username, account.password)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        if self._sink is not None:
            client.on_message = self._on_message
        if self._puback_sink is not None:
            client.on_publish = self._on_publish
        return client

    # -- paho's callbacks, shared by every client (the index comes in as userdata) -----------

    def _on_socket_open(self, client: paho.Client, index: int, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop.add_reader(sock, client.loop_read)

    def _on_socket_close(self, client: paho.Client, index: int, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _on_register_write(self, client: paho.Client, index: int, sock: Any) -> None:
        self._loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: paho.Client, index: int, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _on_connect(
        self, client: paho.Client, index: int, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self.refused += 1
        else:
            self.connected_at[index] = time.monotonic()
        if self._slots is not None:
            self._slots.release()
        self._changed.set()

    def _on_subscribe(
        self, client: paho.Client, index: int, mid: int, reasons: Any, props: Any
    ) -> None:
        self.subscribed += 1
        self._changed.set()

    def _on_message(self, client: paho.Client, index: int, msg: paho.MQTTMessage) -> None:
        assert self._sink is not None
        self._sink(index, msg.topic, msg.payload)

    def _on_publish(
        self, client: paho.Client, index: int, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        assert self._puback_sink is not None
        self._puback_sink(index)

    # -- driving them ----------------------------------------------------------------------

    @property
    def connected(self) -> int:
        return sum(1 for t in self.connected_at if t is not None)

    async def _wait_changed(self, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchTimeout(what)
        self._changed.clear()
        try:
            async with asyncio.timeout(remaining):
                await self._changed.wait()
        except TimeoutError:
            raise BenchTimeout(what) from None

    async def connect_all(self, *, in_flight: int = 100, timeout_s: float) -> None:
        """Connect every client, keeping at most ``in_flight`` CONNECTs unanswered.

        Mosquitto's listen backlog is 100: more at once and SYNs are dropped, and each dropped
        one stalls a blocking connect for a second (FLOORS.md).
        """
        deadline = time.monotonic() + timeout_s
        what = f"{len(self.clients)} bare clients connected within {timeout_s:g} s"
        self._slots = asyncio.Semaphore(in_flight)
        self._misc = self._loop.create_task(self._keepalive(), name="bare-keepalive")
        for client in self.clients:
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self._slots.acquire()
            except TimeoutError:
                raise BenchTimeout(what) from None
            try:
                client.connect(self._host, self._port, self._keepalive_s)
            except OSError:
                self.refused += 1
                self._slots.release()
        while self.connected + self.refused < len(self.clients):
            await self._wait_changed(deadline, what)
        self._slots = None
        if self.refused:
            raise BenchTimeout(f"{self.refused} bare clients were refused by the broker")

    async def _keepalive(self) -> None:
        # A timer, not a wait for a condition: paho checks its keep-alive once a second.
        while True:
            await asyncio.sleep(_MISC_PERIOD_S)
            for client in self.clients:
                client.loop_misc()

    async def subscribe_all(
        self, topic: str | Callable[[int], str], *, qos: int = 1, timeout_s: float
    ) -> None:
        """Subscribe every client to ``topic`` (or to ``topic(index)``, each its own) and wait
        for every SUBACK."""
        deadline = time.monotonic() + timeout_s
        self.subscribed = 0
        for index, client in enumerate(self.clients):
            client.subscribe(topic if isinstance(topic, str) else topic(index), qos)
        while self.subscribed < len(self.clients):
            await self._wait_changed(deadline, f"SUBACKs within {timeout_s:g} s")

    def publish(
        self, index: int, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        self.clients[index].publish(topic, payload, qos=qos, retain=retain)

    def start_heartbeats(
        self,
        *,
        topic_of: Callable[[int], str],
        payload: bytes,
        period_s: float,
        rng: random.Random,
    ) -> None:
        """Every client publishes ``payload`` (QoS 1, retained, as the agent's heartbeat) every
        ``period_s``, the first one at a random offset so they do not all beat together."""
        topics = [topic_of(i) for i in range(len(self.clients))]

        def beat(index: int) -> None:
            self.clients[index].publish(topics[index], payload, qos=1, retain=True)
            self.heartbeats_sent += 1
            self._beats[index] = self._loop.call_later(period_s, beat, index)

        self._beats = [
            self._loop.call_later(rng.uniform(0, period_s), beat, i)
            for i in range(len(self.clients))
        ]

    def stop_heartbeats(self) -> None:
        for handle in self._beats:
            handle.cancel()
        self._beats = []

    def abort_all(self) -> None:
        """Drop every connection with a reset (SO_LINGER 0), so no port is left in TIME_WAIT."""
        self.stop_heartbeats()
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        for client in self.clients:
            sock = client.socket()
            if isinstance(sock, socket.socket):
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                sock.close()
