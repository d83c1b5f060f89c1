"""The certificate request and its answer, as the HTTP API carries them."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from hub.security.ca import MAX_CSR_BYTES


class CertificateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # PEM; the hub takes only its public key (and checks its self-signature).
    csr: str = Field(max_length=MAX_CSR_BYTES)
    # The device's broker password, when not sent as HTTP Basic credentials.
    password: str | None = Field(default=None, max_length=1024)


class CertificateIssued(BaseModel):
    device_id: str
    serial: str  # hex
    not_after: datetime
    certificate: str  # PEM, CN = device_id
    ca_certificate: str  # PEM: the CA that signs the broker's certificate too
    tls_host: str
    # None when the hub does not know the TLS port (no listener started, none configured).
    tls_port: int | None
