"""Dropping one client's live connection, whatever listener it came in on.

Mosquitto 2.0 without a plugin has no "disconnect this client" command, but it keeps one
session per client id across all its listeners: a new connection under an id that is in use
closes the old one. The hub's own listener leaves client ids as sent, so the hub connects there
under the device's id, and leaves at once with a clean session. A device logged in by password
is already dropped by the reload that removed its password line; this reaches one logged in by
certificate too, which no password file governs (its topics are denied by the ACL already).
"""

import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


class KickError(RuntimeError):
    """The broker did not accept the connection that takes the client id over."""


def take_over_client_id(
    *, host: str, port: int, username: str, password: str, client_id: str, timeout_s: float = 5.0
) -> None:
    """Connect as ``client_id`` (closing whoever holds it) and disconnect cleanly."""
    answered = threading.Event()
    outcome: list[Any] = []

    def on_connect(client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        outcome.append(rc)
        answered.set()

    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv311,
        clean_session=True,
        reconnect_on_failure=False,
    )
    client.username_pw_set(username, password)
    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
        client.loop_start()
        if not answered.wait(timeout_s):
            raise KickError(f"no CONNACK from {host}:{port} within {timeout_s}s")
        if outcome[0].is_failure:
            raise KickError(f"broker refused the hub account: {outcome[0]}")
    except OSError as exc:
        raise KickError(f"cannot reach {host}:{port}: {exc}") from exc
    finally:
        client.disconnect()
        client.loop_stop()
