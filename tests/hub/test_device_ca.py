"""The hub's device CA: what a client certificate says (and what it never takes from the CSR),
the CSRs and requesters it refuses, the broker's server certificate, and the CRL.

Certificates are read back with ``cryptography`` and checked field by field; the API cases run
the real app on a SQLite file with devices enrolled through its own enrolment route.
"""

import base64
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlmodel import Session

from agent.certificate import CertificateError, CertificateResponse, check_issued, make_csr
from hub.broker.tls_listener import TlsListener, render_tls_listener, resolve_tls_port
from hub.devices.models import Device
from hub.errors import InvalidInput
from hub.security.ca import SERVER_COMMON_NAME, DeviceCA
from hub.settings import HubSettings
from tests.hub.conftest import RunningHub, hub_app

DEVICE = "dev-000000000001"
OTHER = "dev-000000000002"
DAY = timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _csr(
    key: CertificateIssuerPrivateKeyTypes,
    *,
    cn: str = DEVICE,
    extra: bool = False,
) -> bytes:
    """A CSR for ``key``; ``extra`` asks for everything the hub must not grant: another
    organisation, a SAN, CA rights, server auth."""
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    builder = x509.CertificateSigningRequestBuilder()
    if extra:
        names.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil"))
        builder = (
            builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("hub.example")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.subject_name(x509.Name(names)).sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def ca(tmp_path: Path) -> DeviceCA:
    authority = DeviceCA(tmp_path / "ca")
    authority.ensure()
    return authority


# -- the CA itself ------------------------------------------------------------------------------


def test_ca_is_made_on_first_use_with_a_private_key_file_only_the_hub_reads(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    authority = DeviceCA(directory)
    assert not directory.exists()
    authority.ensure()
    assert stat.S_IMODE(authority.key_file.stat().st_mode) == 0o600
    cert = authority.certificate
    key = serialization.load_pem_private_key(authority.key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == cert.public_key()
    cert.verify_directly_issued_by(cert)  # self-signed
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    # A second hub process on the same directory uses the same CA, it does not make another.
    assert DeviceCA(directory).certificate == cert
    assert authority.crl_file.exists()  # the broker refuses every client without a CRL


def test_a_key_file_that_is_not_the_ca_key_is_refused(ca: DeviceCA) -> None:
    ca.key_file.write_bytes(
        _key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(Exception, match="is not the key of"):
        DeviceCA(ca.directory).ensure()


# -- device certificates ------------------------------------------------------------------------


def test_client_certificate_names_the_device_and_grants_client_auth_only(ca: DeviceCA) -> None:
    key = _key()
    before = datetime.now(UTC)
    cert = ca.issue_client(device_id=DEVICE, csr_pem=_csr(key, extra=True), validity=30 * DAY)
    after = datetime.now(UTC)
    # Nothing from the CSR but its key: CN is the device id and nothing else.
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
    assert cert.public_key() == key.public_key()
    assert cert.issuer == ca.certificate.subject
    cert.verify_directly_issued_by(ca.certificate)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.crl_sign
    assert not usage.value.key_encipherment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    # Valid from a few minutes ago (clock skew) for the configured time, no longer.
    assert before - timedelta(minutes=10) <= cert.not_valid_before_utc <= before
    assert before + 30 * DAY - timedelta(seconds=1) <= cert.not_valid_after_utc
    assert cert.not_valid_after_utc <= after + 30 * DAY
    # Recorded, so that revocation finds it.
    [entry] = ca.certificates(DEVICE)
    assert (entry.serial, entry.revoked_at) == (cert.serial_number, None)


def test_validity_never_passes_the_ca_own(ca: DeviceCA) -> None:
    cert = ca.issue_client(device_id=DEVICE, csr_pem=_csr(_key()), validity=100 * 365 * DAY)
    assert cert.not_valid_after_utc == ca.certificate.not_valid_after_utc


def _flip_signature(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature, at the end of the structure
    body = base64.encodebytes(bytes(der)).decode()
    return (
        f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n".encode()
    )


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: _flip_signature(_csr(_key())), "signature does not verify"),
        (lambda: _csr(rsa.generate_private_key(65537, 2048)), "too weak"),
        (lambda: _csr(ec.generate_private_key(ec.SECP521R1())), "not accepted"),
        (lambda: _csr(ed25519.Ed25519PrivateKey.generate()), "not accepted"),
        (lambda: _csr(_key(), cn=OTHER), "names another device"),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "not a PEM"),
        (lambda: b"x" * 20_000, "larger than"),
    ],
    ids=["bad-signature", "rsa-2048", "p521", "ed25519", "other-cn", "garbage", "oversize"],
)
def test_bad_csrs_are_refused_and_nothing_is_recorded(ca: DeviceCA, make: Any, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        ca.issue_client(device_id=DEVICE, csr_pem=make(), validity=DAY)
    assert ca.certificates() == []


def test_rsa_3072_is_accepted(ca: DeviceCA) -> None:
    key = rsa.generate_private_key(65537, 3072)
    cert = ca.issue_client(device_id=DEVICE, csr_pem=_csr(key), validity=DAY)
    assert cert.public_key() == key.public_key()


def test_an_invalid_device_id_gets_no_certificate(ca: DeviceCA) -> None:
    for bad in ("+", "a/#", "outpost_hub", "Dev-1"):
        with pytest.raises(InvalidInput, match="not a device id"):
            ca.issue_client(device_id=bad, csr_pem=_csr(_key(), cn=bad), validity=DAY)


# -- revocation ---------------------------------------------------------------------------------


def _crl(ca: DeviceCA) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(ca.crl_file.read_bytes())


def test_crl_lists_the_revoked_device_serials_signed_by_the_ca(ca: DeviceCA) -> None:
    first = ca.issue_client(device_id=DEVICE, csr_pem=_csr(_key()), validity=DAY)
    second = ca.issue_client(device_id=DEVICE, csr_pem=_csr(_key()), validity=DAY)
    other = ca.issue_client(device_id=OTHER, csr_pem=_csr(_key(), cn=OTHER), validity=DAY)
    assert list(_crl(ca)) == []

    revoked = ca.revoke(DEVICE)

    assert sorted(revoked) == sorted([first.serial_number, second.serial_number])
    crl = _crl(ca)
    assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.certificate.subject
    assert {r.serial_number for r in crl} == {first.serial_number, second.serial_number}
    assert crl.get_revoked_certificate_by_serial_number(other.serial_number) is None
    assert crl.next_update_utc is not None
    # Valid as long as the CA: a hub that is never restarted keeps accepting its devices.
    assert crl.next_update_utc == ca.certificate.not_valid_after_utc
    # Revoking again finds nothing new; the other device is untouched.
    assert ca.revoke(DEVICE) == []
    assert [c.revoked_at for c in ca.certificates(OTHER)] == [None]


def test_a_crl_signed_by_another_ca_does_not_verify(ca: DeviceCA, tmp_path: Path) -> None:
    ca.issue_client(device_id=DEVICE, csr_pem=_csr(_key()), validity=DAY)
    ca.revoke(DEVICE)
    stranger = DeviceCA(tmp_path / "other")
    assert not _crl(ca).is_signature_valid(stranger.certificate.public_key())  # type: ignore[arg-type]


def test_expired_certificates_leave_the_ledger_and_the_crl(ca: DeviceCA) -> None:
    past = datetime.now(UTC) - 10 * DAY
    old_ca = DeviceCA(ca.directory, clock=lambda: past)
    old = old_ca.issue_client(device_id=DEVICE, csr_pem=_csr(_key()), validity=DAY)
    old_ca.revoke(DEVICE)
    assert old.serial_number in {r.serial_number for r in _crl(ca)}
    ca.issue_client(device_id=OTHER, csr_pem=_csr(_key(), cn=OTHER), validity=DAY)
    ca.write_crl()
    assert [c.device_id for c in ca.certificates()] == [OTHER]
    assert list(_crl(ca)) == []


# -- the broker's certificate and listener ------------------------------------------------------


def test_server_certificate_names_loopback_and_the_public_host(ca: DeviceCA) -> None:
    cert_file, key_file = ca.ensure_server_certificate(
        ["broker.example", "10.1.2.3"], validity=90 * DAY
    )
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    cert.verify_directly_issued_by(ca.certificate)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ip_address("127.0.0.1"),
        ip_address("::1"),
        ip_address("10.1.2.3"),
    }
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "broker.example"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SERVER_COMMON_NAME
    # Kept while it still names every host; made again when a host is added.
    assert ca.ensure_server_certificate(["broker.example"], validity=90 * DAY) == (
        cert_file,
        key_file,
    )
    assert x509.load_pem_x509_certificate(cert_file.read_bytes()) == cert
    ca.ensure_server_certificate(["new.example"], validity=90 * DAY)
    assert x509.load_pem_x509_certificate(cert_file.read_bytes()) != cert


def test_tls_listener_config_trusts_the_device_ca_only(ca: DeviceCA) -> None:
    cert_file, key_file = ca.ensure_server_certificate([], validity=90 * DAY)
    listener = TlsListener(
        port=18883,
        bind="127.0.0.1",
        cafile=ca.cert_file,
        certfile=cert_file,
        keyfile=key_file,
        crlfile=ca.crl_file,
    )
    lines = render_tls_listener(listener).splitlines()
    assert lines[0] == "listener 18883 127.0.0.1"
    for wanted in (
        f"cafile {ca.cert_file}",
        f"certfile {cert_file}",
        f"keyfile {key_file}",
        f"crlfile {ca.crl_file}",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
    ):
        assert wanted in lines
    assert not any(line.startswith("capath") for line in lines)
    # The CA file holds exactly one certificate: the device CA.
    assert ca.cert_file.read_bytes().count(b"BEGIN CERTIFICATE") == 1


def test_tls_port_is_remembered(tmp_path: Path) -> None:
    assert resolve_tls_port(tmp_path, None, 20001) == 20001
    assert resolve_tls_port(tmp_path, None, 20002) == 20001  # devices hold the first one
    assert resolve_tls_port(tmp_path, 20003, 20004) == 20003


# -- the certificate request over the API -------------------------------------------------------


@pytest.fixture
def tls_hub(tmp_path: Path) -> Iterator[RunningHub]:
    settings = HubSettings(
        data_dir=tmp_path / "hub", broker={"tls": {"enabled": True, "port": 18883}}
    )
    with hub_app(settings) as hub:
        yield hub


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _request(hub: RunningHub, device_id: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    # Without the admin token: the device's own credentials are the only ones sent.
    return hub.client.post(
        f"/api/v1/devices/{device_id}/certificate",
        json=body,
        headers={"Authorization": "", **headers},
    )


def test_device_gets_a_certificate_with_its_broker_password(tls_hub: RunningHub) -> None:
    enrolled = tls_hub.enroll()
    device_id, password = enrolled["device_id"], enrolled["broker"]["password"]
    key = _key()
    response = _request(
        tls_hub,
        device_id,
        {"csr": make_csr(key, device_id).decode()},
        _basic(device_id, password),
    )
    assert response.status_code == 201, response.text
    answer = CertificateResponse.model_validate(response.json())
    assert answer.tls_port == 18883
    # The agent's own check of the answer accepts it.
    cert, ca = check_issued(answer, key=key, device_id=device_id)
    assert cert.subject.rfc4514_string() == f"CN={device_id}"
    assert ca == tls_hub.ctx.device_ca.certificate  # type: ignore[union-attr]
    # The password may come in the body instead.
    body = {"csr": make_csr(_key(), device_id).decode(), "password": password}
    assert _request(tls_hub, device_id, body, {}).status_code == 201


def test_wrong_credentials_get_nothing(tls_hub: RunningHub) -> None:
    a = tls_hub.enroll()
    b = tls_hub.enroll()
    csr = make_csr(_key(), a["device_id"]).decode()
    cases = {
        "wrong password": (a["device_id"], _basic(a["device_id"], "not-it")),
        "unknown device": ("dev-999999999999", _basic("dev-999999999999", "whatever")),
        "another device's credentials": (
            a["device_id"],
            _basic(b["device_id"], b["broker"]["password"]),
        ),
        "no credentials": (a["device_id"], {}),
        "bearer, not basic": (a["device_id"], {"Authorization": "Bearer x"}),
        "malformed basic": (a["device_id"], {"Authorization": "Basic !!!"}),
    }
    for case, (device_id, headers) in cases.items():
        response = _request(tls_hub, device_id, {"csr": csr}, headers)
        assert response.status_code == 401, (case, response.text)
    assert tls_hub.ctx.device_ca.certificates() == []  # type: ignore[union-attr]


def test_a_bad_csr_from_a_real_device_is_refused_with_the_reason(tls_hub: RunningHub) -> None:
    enrolled = tls_hub.enroll()
    device_id = enrolled["device_id"]
    csr = _flip_signature(make_csr(_key(), device_id)).decode()
    response = _request(
        tls_hub, device_id, {"csr": csr}, _basic(device_id, enrolled["broker"]["password"])
    )
    assert response.status_code == 422
    assert "signature" in response.json()["detail"]


def test_no_certificates_without_a_tls_listener(running_hub: RunningHub) -> None:
    enrolled = running_hub.enroll()
    device_id = enrolled["device_id"]
    response = _request(
        running_hub,
        device_id,
        {"csr": make_csr(_key(), device_id).decode()},
        _basic(device_id, enrolled["broker"]["password"]),
    )
    assert response.status_code == 409, response.text


def test_agent_refuses_an_answer_for_another_key_or_device(ca: DeviceCA) -> None:
    key = _key()
    cert = ca.issue_client(device_id=DEVICE, csr_pem=_csr(_key()), validity=DAY)

    def answer(c: x509.Certificate, ca_cert: x509.Certificate) -> CertificateResponse:
        return CertificateResponse(
            device_id=DEVICE,
            serial="1",
            not_after=c.not_valid_after_utc,
            certificate=c.public_bytes(serialization.Encoding.PEM).decode(),
            ca_certificate=ca_cert.public_bytes(serialization.Encoding.PEM).decode(),
            tls_host="127.0.0.1",
            tls_port=18883,
        )

    with pytest.raises(CertificateError, match="another key"):
        check_issued(answer(cert, ca.certificate), key=key, device_id=DEVICE)
    own = ca.issue_client(device_id=DEVICE, csr_pem=_csr(key), validity=DAY)
    with pytest.raises(CertificateError, match="not this device"):
        check_issued(answer(own, ca.certificate), key=key, device_id=OTHER)
    with pytest.raises(CertificateError, match="not signed by the CA"):
        check_issued(
            answer(own, x509.load_pem_x509_certificate(_other_ca_pem(ca))),
            key=key,
            device_id=DEVICE,
        )
    check_issued(answer(own, ca.certificate), key=key, device_id=DEVICE)


def _other_ca_pem(ca: DeviceCA) -> bytes:
    other = DeviceCA(ca.directory.parent / "stranger")
    return other.ca_pem()


@pytest.mark.parametrize("status", ["disabled", "pending"])
def test_a_device_without_broker_access_gets_no_certificate(
    tls_hub: RunningHub, status: str
) -> None:
    enrolled = tls_hub.enroll()
    device_id = enrolled["device_id"]
    with Session(tls_hub.ctx.engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        device.status = status
        session.add(device)
        session.commit()
    response = _request(
        tls_hub,
        device_id,
        {"csr": make_csr(_key(), device_id).decode()},
        _basic(device_id, enrolled["broker"]["password"]),
    )
    assert response.status_code == 401, response.text
    assert "disabled or not approved" in response.json()["detail"]
