"""A scripted hub on a real broker, for agent tests that must not depend on the hub's code.

It answers desired-state and chunk requests from a RepositorySimulator's documents, records
every event and state a device sends, and acknowledges events like the real hub. Telemetry and
data-collection records are stored once per ``(device, seq)`` and acknowledged by the rule the
agent relies on: everything below a batch's ``first_kept`` counts as done, then the ack moves up
through the seqs stored without a gap.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.messages import (
    AckBody,
    ChunkRequestBody,
    CollectedRecord,
    CommandResultBody,
    DataBody,
    DesiredRequestBody,
    Envelope,
    EventBody,
    StateBody,
    StatusBody,
    TelemetryBody,
    TelemetryRecord,
    decode,
    encode,
)
from agent.protocol.topics import Channel, Topics
from tests.support.repository import BuiltPackage


@dataclass
class FakeHub:
    host: str
    port: int
    username: str
    password: str
    topics: Topics = field(default_factory=Topics)
    desired: dict[str, bytes] = field(default_factory=dict)  # device id -> desired message
    packages: dict[str, bytes] = field(default_factory=dict)  # digest -> archive bytes
    chunk_filter: Callable[[str, int, bytes], bytes | None] = lambda d, i, b: b
    events: list[tuple[str, EventBody]] = field(default_factory=list)
    states: list[tuple[str, StateBody]] = field(default_factory=list)
    statuses: list[tuple[str, StatusBody]] = field(default_factory=list)
    command_results: list[tuple[str, CommandResultBody]] = field(default_factory=list)
    chunk_requests: int = 0
    chunk_bytes: int = 4096
    changed: threading.Condition = field(default_factory=threading.Condition)
    # Telemetry and collected records as stored: (device id, seq) -> record, in arrival order.
    telemetry: dict[tuple[str, int], TelemetryRecord] = field(default_factory=dict)
    collected: dict[tuple[str, int], CollectedRecord] = field(default_factory=dict)
    # Every tm/dc message: (device id, stream, first_kept, seqs, payload bytes).
    batches: list[tuple[str, str, int, list[int], int]] = field(default_factory=list)
    duplicates: int = 0  # records received again after they were stored
    acked: dict[tuple[str, str], int] = field(default_factory=dict)  # (device, stream) -> seq
    # False: store tm/dc records but never acknowledge them (a hub that stops confirming).
    ack_records: bool = True

    def __post_init__(self) -> None:
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fake-hub")
        self._client.username_pw_set(self.username, self.password)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._connected = threading.Event()

    def start(self) -> None:
        self._client.connect(self.host, self.port)
        self._client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("fake hub could not connect")

    def stop(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def _on_connect(self, client: paho.Client, *args: object) -> None:
        for channel in (
            Channel.REQ,
            Channel.EVT,
            Channel.STATE,
            Channel.STATUS,
            Channel.TM,
            Channel.DC,
        ):
            client.subscribe(self.topics.device_wildcard(channel), qos=1)
        self._connected.set()

    def offer(self, *packages: "BuiltPackage") -> None:
        """Serve these packages' chunks when a device asks for them."""
        for package in packages:
            self.packages[package.ref.digest] = package.data

    def publish_desired(self, device_id: str, message: bytes) -> None:
        self.desired[device_id] = message
        self._client.publish(
            self.topics.device(device_id, Channel.DESIRED), message, qos=1, retain=True
        )

    def send_command(self, device_id: str, message: bytes) -> None:
        self._client.publish(self.topics.device(device_id, Channel.CMD), message, qos=1)

    def command_result(self, command_id: str, timeout_s: float = 20.0) -> CommandResultBody:
        """The (latest) answer to a command, waiting for it with a deadline."""

        def answers() -> list[CommandResultBody]:
            return [r for _, r in self.command_results if r.command_id == command_id]

        self.wait_for(lambda: bool(answers()), timeout_s=timeout_s)
        return answers()[-1]

    def publish_raw(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        where = self.topics.parse_device(msg.topic)
        envelope: Envelope = decode(bytes(msg.payload))
        body = envelope.body
        device = where.device_id
        if isinstance(body, DesiredRequestBody) and device in self.desired:
            self.publish_desired(device, self.desired[device])
        elif isinstance(body, ChunkRequestBody):
            self.chunk_requests += 1
            data = self.packages.get(body.digest)
            if data is not None:
                for index in body.chunks:
                    chunk = data[index * self.chunk_bytes : (index + 1) * self.chunk_bytes]
                    filtered = self.chunk_filter(body.digest, index, chunk)
                    if filtered is not None:
                        client.publish(self.topics.chunk(body.digest, index), filtered, qos=1)
        elif isinstance(body, EventBody):
            with self.changed:
                self.events.append((device, body))
                self.changed.notify_all()
            ack = encode(AckBody(stream="evt", seq=body.seq))
            client.publish(self.topics.device(device, Channel.ACK), ack, qos=1)
        elif isinstance(body, StateBody):
            with self.changed:
                self.states.append((device, body))
                self.changed.notify_all()
        elif isinstance(body, StatusBody):
            with self.changed:
                self.statuses.append((device, body))
                self.changed.notify_all()
        elif isinstance(body, CommandResultBody):
            with self.changed:
                self.command_results.append((device, body))
                self.changed.notify_all()
        elif isinstance(body, TelemetryBody):
            self._store_records(client, device, "tm", body, len(msg.payload))
        elif isinstance(body, DataBody):
            self._store_records(client, device, "dc", body, len(msg.payload))

    def _store_records(
        self,
        client: paho.Client,
        device: str,
        stream: str,
        body: TelemetryBody | DataBody,
        size: int,
    ) -> None:
        store: dict[tuple[str, int], Any] = self.telemetry if stream == "tm" else self.collected
        with self.changed:
            self.batches.append(
                (device, stream, body.first_kept, [r.seq for r in body.records], size)
            )
            for record in body.records:
                if (device, record.seq) in store:
                    self.duplicates += 1
                else:
                    store[(device, record.seq)] = record
            # Below first_kept the device holds nothing more: acknowledge past that gap.
            acked = max(self.acked.get((device, stream), 0), body.first_kept - 1)
            while (device, acked + 1) in store:
                acked += 1
            self.acked[(device, stream)] = acked
            self.changed.notify_all()
        if self.ack_records:
            self.ack(device, stream)

    def ack(self, device: str, stream: str) -> None:
        """Acknowledge what is stored of ``stream`` (as the hub does after its commit)."""
        seq = self.acked.get((device, stream), 0)
        body = AckBody(stream="tm" if stream == "tm" else "dc", seq=seq)
        self._client.publish(self.topics.device(device, Channel.ACK), encode(body), qos=1)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
        with self.changed:
            if not self.changed.wait_for(predicate, timeout_s):
                raise AssertionError("condition not met before the deadline")
