"""The files and port of the broker's TLS listener, made ready before Mosquitto starts."""

from datetime import timedelta
from ipaddress import ip_address

from hub.broker.supervisor import free_loopback_port
from hub.broker.tls_listener import TlsListener, resolve_tls_port
from hub.security.ca import DeviceCA
from hub.settings import HubSettings


def _certifiable(host: str) -> bool:
    """A name a client can connect to (0.0.0.0 and :: are bind-all, not addresses)."""
    try:
        return not ip_address(host).is_unspecified
    except ValueError:
        return bool(host)


def prepare_tls_listener(settings: HubSettings, ca: DeviceCA, *, bind: str) -> TlsListener:
    """Create the CA if needed, sign a fresh CRL (its nextUpdate restarts now), make the
    broker's certificate for loopback, ``bind`` and the public host, and settle the port."""
    ca.ensure()
    ca.write_crl()
    hosts = [h for h in (bind, settings.broker.public_host) if h and _certifiable(h)]
    certfile, keyfile = ca.ensure_server_certificate(
        hosts, validity=timedelta(days=settings.broker.tls.server_cert_days)
    )
    settings.broker_dir.mkdir(parents=True, exist_ok=True)
    port = resolve_tls_port(settings.broker_dir, settings.broker.tls.port, free_loopback_port(bind))
    return TlsListener(
        port=port,
        bind=bind,
        cafile=ca.cert_file,
        certfile=certfile,
        keyfile=keyfile,
        crlfile=ca.crl_file,
    )
