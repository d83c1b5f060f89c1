"""The hub's buffered paho client against a real Mosquitto: every packet whole and in order,
however packets fall across its large reads."""

import random
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hub.messaging.buffered import READ_CHUNK, BufferedClient, check_paho_internals
from tests.conftest import BrokerHandle

TIMEOUT_S = 30.0


def _client(cls: type[mqtt.Client], handle: BrokerHandle, client_id: str) -> mqtt.Client:
    client = cls(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(handle.hub_username, handle.hub_password)
    return client


def test_a_burst_of_mixed_sizes_arrives_whole_and_in_order(mosquitto: BrokerHandle) -> None:
    rng = random.Random(7)
    # Mostly telemetry-sized, with packets larger than one read and some that straddle reads.
    sizes = [rng.choice([1, 60, 519, 4000]) for _ in range(3000)]
    sizes[100] = READ_CHUNK * 2 + 13
    sizes[2000] = READ_CHUNK - 3
    payloads = [rng.randbytes(n) for n in sizes]
    received: list[bytes] = []
    subscribed, done = threading.Event(), threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received.append(bytes(message.payload))
        if len(received) == len(payloads):
            done.set()

    # On the hub's own listener, where client ids are kept as sent.
    port = mosquitto.broker.hub_port
    reader = _client(BufferedClient, mosquitto, "buffered-reader")
    reader.on_message = on_message
    reader.on_subscribe = lambda *args: subscribed.set()
    reader.on_connect = lambda client, *args: client.subscribe("outpost/burst", qos=1)
    reader.connect(mosquitto.host, port)
    reader.loop_start()
    writer = _client(mqtt.Client, mosquitto, "burst-writer")
    writer.connect(mosquitto.host, port)
    writer.loop_start()
    try:
        assert subscribed.wait(TIMEOUT_S)
        for payload in payloads:
            writer.publish("outpost/burst", payload, qos=1)
        assert done.wait(TIMEOUT_S), f"{len(received)} of {len(payloads)} arrived"
        assert received == payloads
    finally:
        for client in (writer, reader):
            client.disconnect()
            client.loop_stop()


def test_bytes_of_a_lost_connection_are_never_read_on_the_next() -> None:
    check_paho_internals()
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="buffered-unit")
    client._read_buffer = memoryview(b"\x30\x05rest-of-an-old-packet")
    client._sock_close()
    assert not client._read_buffer
