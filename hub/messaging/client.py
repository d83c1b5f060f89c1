"""The hub's paho-mqtt client: thin on purpose. It subscribes, hands every message to a callback
(the worker's queue) and publishes; all decisions live in ``handlers``.
"""

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.topics import Channel, Topics
from hub.errors import MessagingUnavailable
from hub.messaging.buffered import BufferedClient, check_paho_internals

logger = logging.getLogger(__name__)

SHARE_GROUP = "hub"
SUBSCRIBED_CHANNELS = (
    Channel.STATE,
    Channel.STATUS,
    Channel.EVT,
    Channel.REQ,
    Channel.TM,
    Channel.DC,
)
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
KEEPALIVE_S = 30


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None


def shared_subscriptions(topics: Topics) -> list[str]:
    """Device topics through a shared subscription, so hub replicas split the traffic."""
    return [f"$share/{SHARE_GROUP}/{topics.device_wildcard(c)}" for c in SUBSCRIBED_CHANNELS]


class MqttClient:
    """Implements ``Publisher``; reconnects with backoff and resubscribes on every connect."""

    def __init__(
        self,
        address: BrokerAddress,
        *,
        topics: Topics,
        on_message: Callable[[str, bytes], None],
    ) -> None:
        self._address = address
        self._topics = topics
        self._on_message_cb = on_message
        self.connected = False
        self._subscribed = threading.Event()
        check_paho_internals()
        client = BufferedClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"outpost-hub-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if address.username is not None:
            client.username_pw_set(address.username, address.password)
        client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client

    def start(self) -> None:
        # connect_async: a broker that is not up yet is retried by the loop, not fatal.
        self._client.connect_async(self._address.host, self._address.port, KEEPALIVE_S)
        self._client.loop_start()

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Wait until the broker confirmed the subscriptions of the first connection."""
        return self._subscribed.wait(timeout_s)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            # paho keeps QoS>0 messages and sends them after reconnecting.
            logger.info("broker not connected, message queued", extra={"topic": topic})
        elif info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise MessagingUnavailable(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if reason_code.is_failure:
            logger.warning("broker refused connection", extra={"reason": str(reason_code)})
            return
        self.connected = True
        client.subscribe([(t, 1) for t in shared_subscriptions(self._topics)])
        logger.info("connected to broker", extra={"host": self._address.host})

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        self._subscribed.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self.connected = False
        logger.warning("disconnected from broker", extra={"reason": str(reason_code)})

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._on_message_cb(message.topic, bytes(message.payload))
        except Exception:
            # Never let an exception escape into paho's network thread.
            logger.exception("message callback failed", extra={"topic": message.topic})
