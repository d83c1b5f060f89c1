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

from hub.broker.supervisor import BrokerError
from hub.context import HubContext

logger = logging.getLogger(__name__)


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
    try:
        # hub.broker.kick: a connection under the device's id on the hub's own listener.
        broker.disconnect_client(device_id)
    except BrokerError as exc:
        logger.warning(
            "could not drop the revoked device's connection: %s",
            exc,
            extra={"device_id": device_id},
        )
    return serials
