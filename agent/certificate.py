"""Ask the hub for a client certificate for the broker's TLS listener.

The device makes its own key (EC P-256, kept in ``tls/device.key``; it never leaves the device)
and sends a CSR, proving who it is with the broker credentials it got at enrolment. The hub
answers with a certificate whose CN is the device id, its CA, and the TLS listener's address.
The answer is checked before it is stored: a certificate for another key or another device, or
one not signed by the CA sent with it, is refused and nothing changes on disk.

A renewal asks again with the same key, so the key and the certificate on disk always match.
"""

import base64
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.errors import EnrollmentError
from agent.hubhttp import post_json
from agent.state import StateDir
from agent.tlsfiles import TlsEndpoint, TlsFiles

CERTIFICATE_PATH = "/api/v1/devices/{device_id}/certificate"


class CertificateError(EnrollmentError):
    """The hub refused the certificate request, could not be reached, or its answer does not
    hold up; the files on disk are unchanged."""


class CertificateResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    device_id: str
    serial: str
    not_after: datetime
    certificate: str
    ca_certificate: str
    tls_host: str
    tls_port: int | None


def _device_key(files: TlsFiles) -> ec.EllipticCurvePrivateKey:
    """The device's key, made and stored (0600) on first use."""
    try:
        key = serialization.load_pem_private_key(files.key_file.read_bytes(), password=None)
    except FileNotFoundError:
        key = ec.generate_private_key(ec.SECP256R1())
        files.save_key(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return key
    except ValueError as exc:
        raise CertificateError(f"{files.key_file} is not a readable private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{files.key_file} is not an EC key")
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _post(url: str, body: dict[str, Any], *, user: str, password: str, timeout_s: float) -> Any:
    basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return post_json(
        url,
        body,
        timeout_s=timeout_s,
        error=CertificateError,
        what="the certificate",
        headers={"authorization": f"Basic {basic}"},
    )


def check_issued(
    answer: CertificateResponse, *, key: ec.EllipticCurvePrivateKey, device_id: str
) -> tuple[x509.Certificate, x509.Certificate]:
    """(certificate, CA) if the answer certifies this key as this device for client auth,
    signed by the CA it came with."""
    try:
        cert = x509.load_pem_x509_certificate(answer.certificate.encode())
        ca = x509.load_pem_x509_certificate(answer.ca_certificate.encode())
    except ValueError as exc:
        raise CertificateError(f"hub sent an unreadable certificate: {exc}") from None
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        raise CertificateError(f"certificate names {names}, not this device {device_id!r}")
    if cert.public_key() != key.public_key():
        raise CertificateError("certificate is for another key than this device's")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError(f"certificate is not signed by the CA sent with it: {exc}") from None
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise CertificateError("certificate is not for TLS client authentication")
    if answer.tls_port is None:
        raise CertificateError("hub did not say the port of its TLS listener")
    return cert, ca


def request_certificate(*, state: StateDir, timeout_s: float = 30.0) -> TlsEndpoint:
    """Get (or renew) this device's certificate and store it in ``state``'s ``tls/`` folder.

    From then on the agent connects with TLS only (``[mqtt] tls = auto``). Returns the TLS
    listener's address.
    """
    identity = state.load_identity()
    files = TlsFiles(state.root)
    key = _device_key(files)
    url = identity.hub_url.rstrip("/") + CERTIFICATE_PATH.format(device_id=identity.device_id)
    raw = _post(
        url,
        {"csr": make_csr(key, identity.device_id).decode("ascii")},
        user=identity.device_id,
        password=identity.broker.password,
        timeout_s=timeout_s,
    )
    try:
        answer = CertificateResponse.model_validate(raw)
    except ValidationError as exc:
        raise CertificateError(f"unexpected certificate response: {exc}") from None
    cert, ca = check_issued(answer, key=key, device_id=identity.device_id)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    # The CA is taken on first use, over the channel enrolment trusted; after that it is
    # pinned, so a renewal cannot slip in another CA for the broker's certificate.
    if files.ca_file.exists() and files.ca_file.read_bytes() != ca_pem:
        raise CertificateError(
            f"the hub's device CA is not the one in {files.ca_file}; remove {files.directory}"
            " to accept a new CA"
        )
    assert answer.tls_port is not None  # checked above
    endpoint = TlsEndpoint(host=answer.tls_host, port=answer.tls_port)
    files.save_certificate(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        ca_pem=ca_pem,
        endpoint=endpoint,
    )
    return endpoint
