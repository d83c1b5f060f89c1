"""Where a device keeps its TLS credentials: the ``tls/`` folder of its state directory.

tls/device.key      its private key (EC P-256), made on the device, mode 0600; never sent
tls/device.crt      its client certificate from the hub's device CA (CN = the device id)
tls/ca.crt          the hub's device CA: the only CA the broker's certificate is checked against
tls/endpoint.json   host and port of the broker's TLS listener

A device with ``device.crt`` connects with TLS only: it never falls back to its password on
the plain listener, nor to an unverified connection (THREATS.md B12).
"""

import ssl
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.atomic import write_atomic
from agent.errors import AgentError

SECRET_MODE = 0o600


class TlsMode(StrEnum):
    """``[mqtt] tls``: when the agent connects with its certificate."""

    AUTO = "auto"  # with TLS when tls/device.crt is there, else with the password
    ON = "on"  # with TLS only; no certificate is an error, never a fallback
    OFF = "off"  # with the password, even when a certificate is there


class TlsEndpoint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)


@dataclass(frozen=True)
class TlsConfig:
    """What the MQTT link needs for mutual TLS."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def context(self) -> ssl.SSLContext:
        """A client context: TLS 1.2 at least, the broker's certificate checked against the
        hub's CA only (not the system store) and its name against the host connected to."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # A subject CN is not a host name: only the certificate's SANs count.
        context.hostname_checks_common_name = False
        context.load_verify_locations(cafile=str(self.ca_file))
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


class TlsFilesError(AgentError):
    """The TLS files are missing or unusable: request a certificate again."""


class TlsFiles:
    """The ``tls/`` folder of one state directory."""

    def __init__(self, state_root: Path) -> None:
        self.directory = state_root / "tls"

    @property
    def key_file(self) -> Path:
        return self.directory / "device.key"

    @property
    def cert_file(self) -> Path:
        return self.directory / "device.crt"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def endpoint_file(self) -> Path:
        return self.directory / "endpoint.json"

    def has_certificate(self) -> bool:
        return self.cert_file.exists()

    def save_key(self, key_pem: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.key_file, key_pem, mode=SECRET_MODE)

    def save_certificate(self, *, cert_pem: bytes, ca_pem: bytes, endpoint: TlsEndpoint) -> None:
        """Store what the hub issued; the certificate last, as it is what switches TLS on."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.ca_file, ca_pem)
        write_atomic(self.endpoint_file, endpoint.model_dump_json().encode())
        write_atomic(self.cert_file, cert_pem)

    def endpoint(self) -> TlsEndpoint:
        try:
            return TlsEndpoint.model_validate_json(self.endpoint_file.read_bytes())
        except FileNotFoundError:
            raise TlsFilesError(f"{self.endpoint_file} is missing") from None
        except ValidationError as exc:
            raise TlsFilesError(f"corrupt {self.endpoint_file.name}: {exc}") from None

    def config(self) -> TlsConfig:
        for path in (self.key_file, self.cert_file, self.ca_file):
            if not path.is_file():
                raise TlsFilesError(f"{path} is missing: request a certificate again")
        return TlsConfig(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)


def broker_tls(
    files: TlsFiles, *, mode: TlsMode, host: str | None, port: int | None
) -> tuple[str, int, TlsConfig] | None:
    """(host, port, TLS files) when the device connects with TLS, else None (its password on
    the plain listener). ``host``/``port`` override the endpoint the hub gave (NAT)."""
    if mode is TlsMode.OFF or (mode is TlsMode.AUTO and not files.has_certificate()):
        return None
    if not files.has_certificate():
        raise TlsFilesError(f"[mqtt] tls = on, but {files.cert_file} is missing")
    endpoint = files.endpoint()
    return host or endpoint.host, port or endpoint.port, files.config()
