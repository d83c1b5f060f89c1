"""THREATS E2, E1a and B7 as one matrix: every device tries every other device's topics on a real
Mosquitto run with the hub's own configuration, ACL and password files.

Each device subscribes to every other device's channels and to wide filters, publishes to every
other device's channels, leaves a Will on every other device's status, and connects under every
other device's client id. Judged by deliveries, never by PUBACK or SUBACK (mosquitto
acknowledges a denied QoS 1 publish, on purpose): a privileged subscriber (the hub account on
the hub's listener, subscribed to everything it may read) and the devices themselves count what
arrived. Control messages on each device's own topics must arrive, proving the subscribers
listen; cross-device deliveries must be 0.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.topics import DEVICE_TO_HUB, Channel

if TYPE_CHECKING:
    from conftest import BrokerHandle

pytestmark = pytest.mark.integration

ROOT = "outpost"
DEVICES = [f"dev-matrix-{i}" for i in range(4)]
DIGEST = "cd" * 32
TIMEOUT_S = 10.0
UP = sorted(str(c) for c in DEVICE_TO_HUB)  # state, status, evt, tm, dc, req
ALL_CHANNELS = sorted(str(c) for c in Channel)


class Probe:
    """One MQTT connection that records what it receives and whether the broker dropped it."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.username = username
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.log: list[tuple[str, bytes]] = []
        self.dropped = threading.Event()
        self._connack = threading.Event()
        self._acks: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            # Devices connect under their own id, as agents do.
            client_id=client_id or username,
            protocol=paho.MQTTv311,
            # A replaced connection must stay down: reconnecting would replace the new one in
            # turn, for ever (emqx #151).
            reconnect_on_failure=False,
        )
        self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = lambda *a: self._connack.set()
        self.client.on_disconnect = lambda *a: self.dropped.set()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda c, u, mid, rc, p: self._ack(mid)
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        assert self._connack.wait(TIMEOUT_S), f"{username}: no CONNACK"
        assert self.client.is_connected(), f"{username}: refused"

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        got = (msg.topic, bytes(msg.payload))
        self.received.put(got)
        with self._lock:
            self.log.append(got)

    def _ack(self, mid: int) -> None:
        with self._lock:
            self._acks.setdefault(mid, threading.Event()).set()

    def subscribe(self, topic_filter: str) -> None:
        """Subscribe and wait for the SUBACK (granted or not: only deliveries count)."""
        _, mid = self.client.subscribe(topic_filter, qos=1)
        assert mid is not None
        with self._lock:
            event = self._acks.setdefault(mid, threading.Event())
        assert event.wait(TIMEOUT_S), f"no SUBACK for {topic_filter}"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT_S)

    def wait_for(self, topic: str, payload: bytes) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while (topic, payload) not in self.snapshot():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{self.username}: {topic} {payload!r} never arrived"
            with contextlib.suppress(queue.Empty):
                self.received.get(timeout=remaining)

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.log)

    def cut(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a crash does: the Will fires."""
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        # Shut down under paho's loop, which wakes on it and ends (it does not reconnect).
        sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_stop()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _device_of(topic: str) -> str | None:
    parts = topic.split("/")
    return parts[2] if len(parts) == 4 and parts[:2] == [ROOT, "d"] else None


def test_no_device_reaches_another_devices_topics(mosquitto: BrokerHandle) -> None:
    passwords = mosquitto.add_devices(DEVICES)
    broker = mosquitto.broker
    probes: list[Probe] = []

    def open_probe(username: str, password: str, **kw: Any) -> Probe:
        probe = Probe(mosquitto.host, mosquitto.port, username, password, **kw)
        probes.append(probe)
        return probe

    hub = Probe(
        broker.hub_host,
        broker.hub_port,
        mosquitto.hub_username,
        mosquitto.hub_password,
        client_id=f"matrix-hub-{os.urandom(3).hex()}",
    )
    probes.append(hub)
    try:
        hub.subscribe("#")
        hub.subscribe("$SYS/#")
        devices = {d: open_probe(d, passwords[d]) for d in DEVICES}
        attempts: dict[str, int] = {"subscribe": 0, "publish": 0, "will": 0, "client id": 0}

        # -- reads: every other device's channels and every wide filter ----------------------
        for device_id in DEVICES:
            hub.publish(
                f"{ROOT}/d/{device_id}/desired", b"retained-" + device_id.encode(), retain=True
            )
        wide = [
            f"{ROOT}/d/+/cmd",
            f"{ROOT}/d/+/desired",
            f"{ROOT}/d/+/+",
            f"{ROOT}/d/#",
            f"{ROOT}/#",
            "#",
            "+/d/+/cmd",
            "$SYS/#",
            f"$share/g/{ROOT}/d/+/cmd",
            "$CONTROL/#",
        ]
        for me, probe in devices.items():
            for other, channel in itertools.product(DEVICES, ALL_CHANNELS):
                if other != me:
                    probe.subscribe(f"{ROOT}/d/{other}/{channel}")
                    attempts["subscribe"] += 1
            for topic_filter in wide:
                probe.subscribe(topic_filter)
                attempts["subscribe"] += 1
            for channel in ("desired", "cmd", "ack"):  # its own: the control
                probe.subscribe(f"{ROOT}/d/{me}/{channel}")
        # Live traffic on every device's channels, from the hub and from the devices.
        for device_id, probe in devices.items():
            for channel in ("desired", "cmd", "ack"):
                hub.publish(f"{ROOT}/d/{device_id}/{channel}", b"down-" + device_id.encode())
            for channel in UP:
                probe.publish(f"{ROOT}/d/{device_id}/{channel}", b"up-" + device_id.encode())
        for device_id, probe in devices.items():
            hub.publish(f"{ROOT}/d/{device_id}/cmd", b"sentinel")
            probe.wait_for(f"{ROOT}/d/{device_id}/cmd", b"sentinel")

        # -- writes: every other device's channels, packages, the hub's topics ----------------
        for me, probe in devices.items():
            for other, channel in itertools.product(DEVICES, ALL_CHANNELS):
                if other != me:
                    probe.publish(f"{ROOT}/d/{other}/{channel}", b"attack-" + me.encode())
                    attempts["publish"] += 1
            for topic in (
                f"{ROOT}/d/{me}/desired",  # its own, but hub -> device
                f"{ROOT}/d/{me}/cmd",
                f"{ROOT}/d/{me}/ack",
                f"{ROOT}/pkg/{DIGEST}/c/0",
                f"{ROOT}/pkg/{DIGEST}/manifest",
                f"{ROOT}/d/{me}",
                f"{ROOT}/cmd",
            ):
                probe.publish(topic, b"attack-" + me.encode())
                attempts["publish"] += 1
            neighbour = DEVICES[(DEVICES.index(me) + 1) % len(DEVICES)]
            probe.publish(
                f"{ROOT}/d/{neighbour}/status", b"attack-retained-" + me.encode(), retain=True
            )
            attempts["publish"] += 1
            probe.publish(f"{ROOT}/d/{me}/state", b"control-" + me.encode())
        for me in DEVICES:
            hub.wait_for(f"{ROOT}/d/{me}/state", b"control-" + me.encode())

        # -- client ids: connecting under another device's id kicks nobody -------------------
        # The device listener replaces every client id with the user name, so the intruder
        # lands on its own id (replacing its own connection) and the victim stays connected.
        for victim in DEVICES:
            held = open_probe(victim, passwords[victim])
            for intruder in DEVICES:
                if intruder == victim:
                    continue
                attempts["client id"] += 1
                open_probe(intruder, passwords[intruder], client_id=victim)
                # A round trip on the victim's connection: had it been kicked, this would fail.
                payload = f"still-here-{victim}-{intruder}".encode()
                held.publish(f"{ROOT}/d/{victim}/state", payload)
                hub.wait_for(f"{ROOT}/d/{victim}/state", payload)
                assert not held.dropped.is_set(), f"{intruder} kicked {victim}"

        # -- Wills on every other device's status -------------------------------------------
        for me, other in itertools.permutations(DEVICES, 2):
            topic = f"{ROOT}/d/{other}/status"
            probe = open_probe(me, passwords[me], will=(topic, b"will-attack-" + me.encode()))
            attempts["will"] += 1
            probe.cut()
        # Each device once more under its own id: its CONNACK means the broker is done with the
        # cut connection (closed, or taken over), so every Will above had its chance.
        for me in DEVICES:
            open_probe(me, passwords[me])
        # A Will on its own status is delivered: the control that Wills do fire.
        last = DEVICES[-1]
        control = open_probe(last, passwords[last], will=(f"{ROOT}/d/{last}/status", b"will-ok"))
        control.cut()
        hub.wait_for(f"{ROOT}/d/{last}/status", b"will-ok")

        # -- the verdict, by deliveries -------------------------------------------------------
        at_hub = hub.snapshot()
        forged = [m for m in at_hub if m[1].startswith((b"attack", b"will-attack"))]
        cross_reads = {
            me: [
                (topic, payload)
                for topic, payload in devices[me].snapshot()
                if _device_of(topic) != me
            ]
            for me in DEVICES
        }
        own_reads = {
            me: sum(1 for topic, _ in devices[me].snapshot() if _device_of(topic) == me)
            for me in DEVICES
        }
        total = sum(attempts.values())
        delivered = len(forged) + sum(len(v) for v in cross_reads.values())
        print(
            f"\nACL matrix: {len(DEVICES)} devices, {total} attempts "
            f"({', '.join(f'{k} {v}' for k, v in attempts.items())}); "
            f"cross-device deliveries {delivered} (at the hub {len(forged)}, "
            f"at devices {sum(len(v) for v in cross_reads.values())}); "
            f"control deliveries at the hub {sum(1 for m in at_hub if m[1].startswith(b'control'))}"
            f" + 1 Will, at devices {sum(own_reads.values())}"
        )
        assert forged == []
        assert cross_reads == {me: [] for me in DEVICES}
        # Each device did receive its own retained desired state, down traffic and sentinel.
        for me in DEVICES:
            assert own_reads[me] >= 5, (me, devices[me].snapshot())
        # The privileged subscriber heard every device's own up traffic.
        for me in DEVICES:
            for channel in UP:
                assert (f"{ROOT}/d/{me}/{channel}", b"up-" + me.encode()) in at_hub
        assert not any(m[0].startswith("$SYS") for d in DEVICES for m in devices[d].snapshot())
    finally:
        for probe in probes:
            probe.close()
