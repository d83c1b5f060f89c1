"""Online/offline from missed heartbeats: a device whose connection stays up while the device
goes silent (a hung agent behind a live socket: the broker sees no drop, so no will) is marked
offline by the hub, and back online by its next heartbeat."""

import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.core import utc_now
from agent.enroll import enroll
from agent.protocol.messages import StatusBody, encode
from agent.protocol.topics import Channel, Topics
from agent.state import StateDir
from tests.support.live_hub import live_hub_with

pytestmark = pytest.mark.e2e

OFFLINE_AFTER_S = 5.0


def test_a_silent_device_with_a_live_connection_is_marked_offline_then_online_again(
    tmp_path: Path,
) -> None:
    with live_hub_with(tmp_path, devices={"offline_after_s": OFFLINE_AFTER_S}) as hub:
        with hub.api as client:
            token = client.post("/api/v1/enrollment-tokens", json={"uses": 1}).json()["token"]
        state = StateDir(tmp_path / "hung")
        enroll(hub_url=hub.url, token=token, state=state, now=utc_now(), name="hung")
        identity = state.load_identity()
        topic = Topics(identity.topic_root).device(identity.device_id, Channel.STATUS)

        # The device's own connection, kept alive by paho's pings: the broker never fires a will.
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=identity.device_id)
        client.username_pw_set(identity.broker.username, identity.broker.password)
        client.connect(identity.broker.host, identity.broker.port, keepalive=5)
        client.loop_start()
        try:
            client.publish(topic, encode(StatusBody(online=True, uptime_s=1.0)), qos=1, retain=True)
            hub.wait_until(lambda: hub.device(identity.device_id)["online"], 20, "online")
            silent_from = time.monotonic()

            hub.wait_until(lambda: not hub.device(identity.device_id)["online"], 30, "offline")
            silent_for = time.monotonic() - silent_from
            # Not before the bound; at most a quarter of it late (the check's period), plus the
            # heartbeat flush and the API poll.
            assert silent_for + 0.5 >= OFFLINE_AFTER_S
            assert silent_for <= OFFLINE_AFTER_S * 1.25 + 3.0
            assert client.is_connected(), "the connection itself stayed up all along"

            client.publish(topic, encode(StatusBody(online=True, uptime_s=9.0)), qos=1, retain=True)
            hub.wait_until(lambda: hub.device(identity.device_id)["online"], 20, "online again")
        finally:
            client.loop_stop()
            client.disconnect()
