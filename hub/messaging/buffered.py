"""A paho client that reads its socket in large chunks.

paho reads each packet with two or three ``recv`` calls (the command byte, the length bytes
one by one, the rest). At thousands of small telemetry messages a second that is several
system calls per message, and each releases the GIL to the hub's storing thread, which then
holds it until the switch interval: the network thread ends up waiting more than working.
Here one ``recv`` of up to ``READ_CHUNK`` bytes feeds many packets, and every packet already
read is handled before paho waits on the socket again (data in this buffer does not make the
socket readable).

It overrides three of paho's internal methods (``_sock_recv``, ``_sock_close``,
``loop_read``); ``check_paho_internals`` fails loudly if a paho upgrade renames them.
"""

from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

READ_CHUNK = 256 * 1024


def check_paho_internals() -> None:
    for name in ("_sock_recv", "_sock_close", "loop_read"):
        if not callable(getattr(mqtt.Client, name, None)):
            raise RuntimeError(f"this paho-mqtt has no Client.{name}: hub/messaging/buffered.py")


class BufferedClient(mqtt.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_buffer = memoryview(b"")

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self._read_buffer:
            data = super()._sock_recv(READ_CHUNK)  # BlockingIOError when there is nothing
            if not data:
                return data  # the connection is closed: paho handles it
            self._read_buffer = memoryview(data)
        chunk = self._read_buffer[:bufsize]
        self._read_buffer = self._read_buffer[bufsize:]
        return chunk.tobytes()

    def _sock_close(self) -> None:
        # Bytes of a lost connection must never be read as the start of the next one.
        self._read_buffer = memoryview(b"")
        super()._sock_close()

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == mqtt.MQTT_ERR_SUCCESS and self._read_buffer and self._sock is not None:
            rc = super().loop_read(max_packets)
        return rc
