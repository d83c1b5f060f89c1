"""The embedded Mosquitto's TLS listener for devices with a client certificate.

Its ``cafile`` holds the hub's device CA and nothing else: with ``use_identity_as_username``
every CA in that file can mint broker identities (mosquitto.conf(5), THREATS.md B12). The
certificate's CN (the device id) becomes the user name, so the ACL's ``%u`` patterns pin a
certificate to its own device's topics exactly as a password does on the plain listener.
"""

from dataclasses import dataclass
from pathlib import Path

from hub.atomic import write_atomic

TLS_PORT_FILE = "tls-port"


@dataclass(frozen=True)
class TlsListener:
    """Where the listener binds and the files it reads (all written by the hub's CA)."""

    port: int
    bind: str
    cafile: Path
    certfile: Path
    keyfile: Path
    crlfile: Path


def render_tls_listener(listener: TlsListener) -> str:
    """The lines appended to mosquitto.conf for ``listener``."""
    for path in (listener.cafile, listener.certfile, listener.keyfile, listener.crlfile):
        if any(c in str(path) for c in "\n\r"):
            raise ValueError(f"path not usable in mosquitto.conf: {path!r}")
    if any(c.isspace() for c in listener.bind):
        raise ValueError(f"bind address not usable in mosquitto.conf: {listener.bind!r}")
    return "\n".join(
        [
            f"listener {listener.port} {listener.bind}",
            f"cafile {listener.cafile}",
            f"certfile {listener.certfile}",
            f"keyfile {listener.keyfile}",
            # Mosquitto reads the CRL at start and on SIGHUP; it must always exist and be
            # current, or OpenSSL refuses every client certificate.
            f"crlfile {listener.crlfile}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",  # the minimum; TLS 1.3 is negotiated when both sides can
            "",
        ]
    )


def resolve_tls_port(data_dir: Path, fixed: int | None, pick: int) -> int:
    """The TLS port: ``fixed`` if configured, else the one remembered in ``data_dir``, else
    ``pick`` (a free port), remembered from then on: devices hold it with their certificate."""
    if fixed is not None:
        return fixed
    path = data_dir / TLS_PORT_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        write_atomic(path, f"{pick}\n".encode(), mode=0o600)
        return pick
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{path} holds {text!r}, not a port number")
    return int(text)
