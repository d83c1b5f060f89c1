"""Revoking a device's certificates: the CRL, the broker's reload, and a kick of the live
connection.

Mosquitto 2.0 reads its ``crlfile`` again on SIGHUP, so new TLS handshakes with a revoked
certificate fail after the reload; a client already connected stays connected (the reload
does not re-check certificates; measured in tests/e2e/test_tls_broker.py). The hub therefore
takes the device's session over: it connects with the device's client id, which makes
Mosquitto drop the device's connection, and leaves. The device's reconnects are then refused
by the CRL.
"""

import logging
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from hub.context import HubContext
from hub.secretfiles import read_or_create_token

logger = logging.getLogger(__name__)

KICK_TIMEOUT_S = 5.0


def take_over_session(
    *, host: str, port: int, username: str, password: str, client_id: str, timeout_s: float
) -> bool:
    """Connect as ``client_id`` and leave at once: the broker drops whoever held that id.

    True once the broker accepted the takeover connection.
    """
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311, clean_session=True
    )
    client.username_pw_set(username, password)
    accepted = threading.Event()
    result: list[bool] = []

    def on_connect(c: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        result.append(not reason.is_failure)
        accepted.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
    except OSError as exc:
        logger.warning("cannot reach the broker to kick a client: %s", exc)
        return False
    client.loop_start()
    try:
        accepted.wait(timeout_s)
        return bool(result and result[0])
    finally:
        client.disconnect()
        client.loop_stop()


def revoke_device_certificates(ctx: HubContext, device_id: str) -> list[int]:
    """Revoke every certificate of ``device_id``: CRL rewritten, broker reloaded, and the
    device's live connection dropped. The serials newly revoked.

    The disable flow calls this after the device lost its broker password, so the password
    listener will not take it back either. Safe to call for a device without certificates.
    """
    ca = ctx.device_ca
    if ca is None:
        return []
    serials = ca.revoke(device_id)
    if not serials:
        return []
    # The reload makes mosquitto read the new CRL before it handles another connection.
    ctx.on_credentials_changed()
    broker = ctx.broker
    if broker is None or broker.tls is None:
        logger.warning(
            "certificates revoked, but no embedded TLS listener to reload: give the external"
            " broker the new CRL",
            extra={"device_id": device_id, "crl": str(ca.crl_file)},
        )
        return serials
    password = read_or_create_token(ctx.settings.hub_broker_password_path, nbytes=24)
    # From the hub's own listener, where client ids are left as sent (on the device and TLS
    # listeners every client id is forced to the user name, so no one else can take it).
    kicked = take_over_session(
        host=broker.hub_host,
        port=broker.hub_port,
        username=broker.hub_username,
        password=password,
        client_id=device_id,
        timeout_s=KICK_TIMEOUT_S,
    )
    if not kicked:
        logger.warning(
            "could not drop the revoked device's connection", extra={"device_id": device_id}
        )
    return serials
