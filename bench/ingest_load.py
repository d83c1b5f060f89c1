"""The ingest benchmark's load: telemetry messages in the wire format, the devices that publish
them, and the bare subscriber that is their floor.

- ``telemetry_load``: each device's messages, encoded with ``agent.protocol.messages.encode``
  before the clock starts (encoding is the device's work, not the hub's: done during the timed
  part it would only slow the publishers down).
- ``publish_stream``: N paho clients on this process's loop (``bench.bare``), each publishing its
  device's messages in seq order with QoS 1 and at most ``mqtt_inflight`` unacknowledged by the
  broker. Towards the hub each device also keeps at most ``window`` messages not yet acknowledged
  by the hub (its ``ack`` topic, sent after the commit), and sends the unacknowledged ones again
  after ``resend_s`` without progress, as the agent's outbox does.
- ``FloorSubscriber``: one plain paho client in a process of its own (as the hub is), network
  thread and all, that counts what it receives and nothing else.
"""

import asyncio
import json
import multiprocessing
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol.messages import ModelStats, TelemetryBody, TelemetryRecord, encode
from agent.settings import TelemetrySettings
from agent.state import StateDir
from bench.bare import Account, BareClients
from bench.timing import BenchTimeout

# The agent's: a device sends what the hub has not acknowledged again after this long.
AGENT_RESEND_S = TelemetrySettings().resend_s
INTERVAL_S = 60.0  # each record is one telemetry interval of the device, as the agent's default
_RESEND_CHECK_S = 0.25
_CHILD_JOIN_S = 10.0


@dataclass(frozen=True)
class Load:
    """Every device's messages, in seq order. A message names no device (the topic does), so
    one load serves any fleet of as many devices."""

    payloads: list[list[bytes]]  # per device, in the fleet's order
    first_seq: int  # of each device's first message, the same for every device
    records_per_message: int

    @property
    def messages(self) -> int:
        return sum(len(p) for p in self.payloads)

    @property
    def records(self) -> int:
        return self.messages * self.records_per_message

    @property
    def payload_bytes(self) -> int:
        return sum(len(b) for p in self.payloads for b in p)

    @property
    def last_seq(self) -> int:
        """Each device's last seq once its messages are all stored."""
        per_device = len(self.payloads[0]) if self.payloads else 0
        return self.first_seq + per_device * self.records_per_message - 1


def _record(seq: int, at: datetime) -> TelemetryRecord:
    # What an agent with one model measures over an interval (agent/telemetry.py): ~500 B.
    return TelemetryRecord(
        seq=seq,
        at=at,
        interval_s=INTERVAL_S,
        uptime_s=seq * INTERVAL_S,
        cpu_percent=12.5 + seq % 50,
        memory_bytes=180_000_000 + seq,
        disk_free_bytes=9_000_000_000 - seq,
        reconnects=0,
        outbox_backlog=seq % 7,
        models=[
            ModelStats(
                model="iris",
                version=1,
                inferences=1200 + seq % 100,
                errors=0,
                p50_ms=0.31,
                p95_ms=0.52,
                p99_ms=0.9,
            )
        ],
    )


def telemetry_load(
    devices: int,
    *,
    messages_per_device: int,
    records_per_message: int,
    first_seq: int,
) -> Load:
    """Each device's messages with seqs ``first_seq`` onwards, ``records_per_message`` each.

    ``first_kept`` is ``first_seq`` in every message: the oldest record the device holds that the
    hub has not acknowledged yet is never older than that, so the hub never skips a record that
    was not stored (its ack rule: every seq in ``[max(cursor + 1, first_kept), S]`` stored).
    """
    last = first_seq + messages_per_device * records_per_message
    start = datetime.now(UTC) - timedelta(seconds=INTERVAL_S * last)
    payloads = []
    for _ in range(devices):
        messages = []
        for m in range(messages_per_device):
            seq0 = first_seq + m * records_per_message
            records = [
                _record(s, start + timedelta(seconds=INTERVAL_S * s))
                for s in range(seq0, seq0 + records_per_message)
            ]
            messages.append(encode(TelemetryBody(first_kept=first_seq, records=records)))
        payloads.append(messages)
    return Load(payloads, first_seq, records_per_message)


def device_accounts(state_dirs: Sequence[Path]) -> list[Account]:
    """The broker accounts enrolment gave the devices (client id = user name = device id)."""
    accounts = []
    for state_dir in state_dirs:
        broker = StateDir(state_dir).load_identity().broker
        accounts.append(Account(broker.username, broker.username, broker.password))
    return accounts


@dataclass(frozen=True)
class Published:
    """One pass of the publishers, timed on this machine's monotonic clock."""

    started_at: float  # the first publish
    acked_at: float | None  # the hub acknowledged every device's last seq (None: no acks asked)
    publishes: int  # including those sent again
    resent: int  # messages published again after resend_s without the hub's progress
    cpu_s: float  # this process, from the first publish to the end


class _Devices:
    """Per-device send state; every method runs on the loop's thread."""

    def __init__(
        self,
        load: Load,
        topics: Sequence[str],
        *,
        mqtt_inflight: int,
        window: int | None,
        resend_s: float,
    ) -> None:
        self.load = load
        self.topics = list(topics)
        self.mqtt_inflight = mqtt_inflight
        self.window = window  # None: publish without waiting for the hub
        self.resend_s = resend_s
        n = len(load.payloads)
        self.sent = [0] * n  # messages published (the next index to publish)
        self.unpubacked = [0] * n
        self.acked = [0] * n  # messages the hub acknowledged
        self.progress_at = [0.0] * n  # the last ack that moved, or the first publish
        self.publishes = 0
        self.resent = 0
        self.pubacks = 0
        self.unsent = load.messages  # messages to publish, counting those to send again
        self.devices_done = 0  # every message acknowledged by the hub
        self.acked_at = 0.0
        self.done = asyncio.Event()
        self.clients: BareClients | None = None

    def pump(self, i: int) -> None:
        """Publish device ``i``'s next messages while its bounds allow."""
        clients = self.clients
        assert clients is not None
        payloads = self.load.payloads[i]
        while (
            self.sent[i] < len(payloads)
            and self.unpubacked[i] < self.mqtt_inflight
            and (self.window is None or self.sent[i] - self.acked[i] < self.window)
        ):
            clients.publish(i, self.topics[i], payloads[self.sent[i]], qos=1)
            self.sent[i] += 1
            self.unpubacked[i] += 1
            self.publishes += 1
            self.unsent -= 1

    def on_puback(self, i: int) -> None:
        self.unpubacked[i] -= 1
        self.pubacks += 1
        if self.window is None and self.unsent == 0 and self.pubacks == self.publishes:
            self.done.set()
        self.pump(i)

    def on_ack(self, i: int, payload: bytes | bytearray) -> None:
        # json, not the agent's pydantic decoder: the bench process shares two cores with the
        # hub, and the wire format of an ack is pinned by the protocol's golden files.
        body = json.loads(payload)["body"]
        if body.get("kind") != "ack" or body.get("stream") != "tm":
            return
        total = len(self.load.payloads[i])
        rpm = self.load.records_per_message
        acked = min(total, max(0, (int(body["seq"]) - self.load.first_seq + 1) // rpm))
        if acked <= self.acked[i]:
            return
        self.acked[i] = acked
        self.progress_at[i] = time.monotonic()
        if acked == total:
            self.devices_done += 1
            if self.devices_done == len(self.acked):
                self.acked_at = self.progress_at[i]
                self.done.set()
        self.pump(i)

    def resend_stalled(self) -> None:
        """Go back to the first unacknowledged message of a device the hub has not moved for
        ``resend_s`` (the hub dropped one at its full queue, say): what the agent does."""
        now = time.monotonic()
        for i, sent in enumerate(self.sent):
            if self.acked[i] < sent and now - self.progress_at[i] > self.resend_s:
                self.resent += sent - self.acked[i]
                self.unsent += sent - self.acked[i]
                self.sent[i] = self.acked[i]
                self.progress_at[i] = now
                self.pump(i)


async def publish_stream(
    *,
    host: str,
    port: int,
    accounts: Sequence[Account],
    topics: Sequence[str],
    load: Load,
    mqtt_inflight: int,
    connect_timeout_s: float,
    timeout_s: float,
    ack_topics: Sequence[str] | None = None,
    window: int | None = None,
    resend_s: float = AGENT_RESEND_S,
    on_connected: Callable[[], None] | None = None,
) -> Published:
    """Connect one client per device, publish ``load`` and wait until it is all acknowledged:
    by the hub on ``ack_topics`` when given (at most ``window`` messages per device waiting for
    it), else by the broker."""
    devices = _Devices(load, topics, mqtt_inflight=mqtt_inflight, window=window, resend_s=resend_s)
    clients = BareClients(
        host=host,
        port=port,
        accounts=accounts,
        on_message=(lambda i, _topic, payload: devices.on_ack(i, payload)),
        on_puback=devices.on_puback,
    )
    devices.clients = clients
    resender: asyncio.Task[None] | None = None
    try:
        await clients.connect_all(timeout_s=connect_timeout_s)
        if ack_topics is not None:
            ack_list = list(ack_topics)
            await clients.subscribe_all(lambda i: ack_list[i], qos=1, timeout_s=connect_timeout_s)
        if on_connected is not None:
            on_connected()
        cpu_before = time.process_time()
        started_at = time.monotonic()
        devices.progress_at = [started_at] * len(accounts)
        for i in range(len(accounts)):
            devices.pump(i)
        if ack_topics is not None:
            resender = asyncio.create_task(_resend_loop(devices), name="ingest-resend")
        what = "the hub's ack of every device's last seq" if ack_topics else "every PUBACK"
        try:
            async with asyncio.timeout(timeout_s):
                await devices.done.wait()
        except TimeoutError:
            raise BenchTimeout(
                f"{what} within {timeout_s:g} s: {devices.pubacks}/{load.messages} published, "
                f"{sum(devices.acked)} acknowledged by the hub"
            ) from None
        return Published(
            started_at=started_at,
            acked_at=devices.acked_at if ack_topics is not None else None,
            publishes=devices.publishes,
            resent=devices.resent,
            cpu_s=time.process_time() - cpu_before,
        )
    finally:
        if resender is not None:
            resender.cancel()
        clients.abort_all()


async def _resend_loop(devices: _Devices) -> None:
    # A timer, as the agent's own resend check is; cancelled when the pass ends.
    while True:
        await asyncio.sleep(_RESEND_CHECK_S)
        devices.resend_stalled()


# -- the floor: a bare subscriber in a process of its own --------------------------------------


@dataclass(frozen=True)
class FloorConfig:
    host: str
    port: int
    account: Account
    topic: str  # a filter, e.g. ``outpost/f/+/tm``
    expected: int  # messages to receive
    timeout_s: float


@dataclass(frozen=True)
class FloorReceived:
    received: int
    payload_bytes: int
    first_at: float  # monotonic (the same clock in every process on Linux)
    last_at: float
    cpu_s: float  # the subscriber process's CPU from ready to done


class _Counter:
    """paho's callbacks on its network thread; the main thread waits on ``done``."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.payload_bytes = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.subscribed = threading.Event()
        self.done = threading.Event()

    def on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any
    ) -> None:
        self.subscribed.set()

    def on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # What the hub's client does with a message before its queue: copy the payload.
        payload = bytes(msg.payload)
        now = time.monotonic()
        if self.received == 0:
            self.first_at = now
        self.received += 1
        self.payload_bytes += len(payload)
        if self.received >= self.expected:
            self.last_at = now
            self.done.set()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _floor_main(conn: Connection, cfg: FloorConfig) -> None:
    """The subscriber process: connect, subscribe, say ready, count until done or the deadline."""
    counter = _Counter(cfg.expected)
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id="bench-floor-subscriber",
        protocol=paho.MQTTv311,
        clean_session=True,
    )
    client.username_pw_set(cfg.account.username, cfg.account.password)
    client.on_subscribe = counter.on_subscribe
    client.on_message = counter.on_message

    def on_connect(
        client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if not reason.is_failure:
            client.subscribe(cfg.topic, qos=1)

    client.on_connect = on_connect
    try:
        # The same network side as the hub's client: paho's own thread.
        client.connect(cfg.host, cfg.port, keepalive=30)
        client.loop_start()
        if not counter.subscribed.wait(cfg.timeout_s):
            conn.send(("failed", f"not subscribed within {cfg.timeout_s:g} s"))
            return
        cpu_before = _cpu_s()
        conn.send(("ready", None))
        counter.done.wait(cfg.timeout_s)
        conn.send(
            (
                "done",
                FloorReceived(
                    received=counter.received,
                    payload_bytes=counter.payload_bytes,
                    first_at=counter.first_at,
                    last_at=counter.last_at,
                    cpu_s=_cpu_s() - cpu_before,
                ),
            )
        )
    except Exception as exc:  # reported to the parent, which raises it there
        conn.send(("failed", repr(exc)))
    finally:
        client.disconnect()
        client.loop_stop()
        conn.close()


class FloorSubscriber:
    """The floor's subscriber process: ``start`` waits until it is subscribed, ``result`` until
    it has every message (or its deadline passed)."""

    def __init__(self, cfg: FloorConfig) -> None:
        self._cfg = cfg
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=False)
        self._proc: BaseProcess = ctx.Process(
            target=_floor_main, args=(child, cfg), name="bench-floor-subscriber"
        )
        self._child = child

    def _receive(self, timeout_s: float, what: str) -> Any:
        if not self._conn.poll(timeout_s):
            raise BenchTimeout(f"floor subscriber: {what} not within {timeout_s:g} s")
        try:
            kind, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"floor subscriber died (exit code {self._proc.exitcode})") from None
        if kind == "failed":
            raise RuntimeError(f"floor subscriber failed: {value}")
        return value

    def start(self) -> None:
        self._proc.start()
        self._child.close()
        # Spawning a Python process and importing paho takes a moment on a busy machine.
        self._receive(self._cfg.timeout_s, "subscribed")

    async def result(self) -> FloorReceived:
        """Wait (off the loop) for the subscriber's count; raises if it missed messages."""
        value: FloorReceived = await asyncio.to_thread(
            self._receive, self._cfg.timeout_s + _CHILD_JOIN_S, "every message received"
        )
        if value.received < self._cfg.expected:
            raise BenchTimeout(
                f"floor subscriber received {value.received} of {self._cfg.expected} messages "
                f"within {self._cfg.timeout_s:g} s"
            )
        return value

    def stop(self) -> None:
        self._conn.close()
        self._proc.join(_CHILD_JOIN_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(_CHILD_JOIN_S)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
