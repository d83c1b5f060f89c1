"""The hub's device CA: client certificates for devices, the broker's server certificate, and
the revocation list the broker's TLS listener checks, kept as files in data_dir/ca.

    ca/ca.key       the CA's EC P-256 private key, mode 0600
    ca/ca.crt       the self-signed CA certificate (the only CA in the broker's cafile)
    ca/broker.key   the broker's server key, mode 0600
    ca/broker.crt   the broker's server certificate (SANs: loopback and the public host)
    ca/issued.json  every device certificate issued and not yet expired: serial, device,
                    expiry, revocation time
    ca/crl.pem      the CA-signed revocation list of the revoked serials in issued.json

A device keeps its own private key: it sends a CSR, and the hub copies nothing from it but the
public key. The subject (CN = the device id), validity and extensions are the hub's.
"""

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.protocol.topics import is_valid_device_id
from hub.atomic import write_atomic
from hub.database import utcnow
from hub.errors import CorruptStorage, InvalidInput
from hub.secretfiles import write_secret

logger = logging.getLogger(__name__)

# Client and server certificates alike: signatures (the TLS handshake) and nothing else.
_SIGNING_ONLY = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
SERVER_KEY_FILE = "broker.key"
SERVER_CERT_FILE = "broker.crt"
LEDGER_FILE = "issued.json"
CRL_FILE = "crl.pem"

CA_VALIDITY = timedelta(days=3650)
# A CSR is a few hundred bytes; anything much larger is not one.
MAX_CSR_BYTES = 16 * 1024
# Curves and RSA sizes a device key may use; everything else is refused as weak or unsupported
# by the TLS stacks on both ends (Mender accepts the same: ECDSA P-256 and RSA >= 3072).
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
MIN_RSA_BITS = 3072
# Certificates start a little in the past so a device whose clock lags can use them at once.
BACKDATE = timedelta(minutes=5)
# The server certificate is made again when it has less than this left.
SERVER_RENEW_BEFORE = timedelta(days=30)
# Not a valid device id (it has a space), so the broker's own name can never be a device's
# broker user name; its EKU (serverAuth only) keeps it from being accepted as a client anyway.
SERVER_COMMON_NAME = "Outpost broker"
LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class IssuedCertificate:
    """One device certificate in the ledger."""

    serial: int
    device_id: str
    not_after: datetime
    revoked_at: datetime | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "serial": format(self.serial, "x"),
            "device_id": self.device_id,
            "not_after": self.not_after.isoformat(),
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> "IssuedCertificate":
        revoked = raw.get("revoked_at")
        return cls(
            serial=int(str(raw["serial"]), 16),
            device_id=str(raw["device_id"]),
            not_after=datetime.fromisoformat(str(raw["not_after"])),
            revoked_at=None if revoked is None else datetime.fromisoformat(str(revoked)),
        )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_public_key(key: object) -> None:
    """Refuse a key the hub will not certify: weak, or one the TLS stacks do not take."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise InvalidInput(f"CSR key on curve {key.curve.name} is not accepted (P-256, P-384)")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidInput(
                f"CSR RSA key of {key.key_size} bits is too weak (>= {MIN_RSA_BITS})"
            )
        return
    raise InvalidInput(f"CSR key type {type(key).__name__} is not accepted (EC P-256/P-384, RSA)")


def parse_csr(csr_pem: bytes, *, device_id: str) -> x509.CertificateSigningRequest:
    """The CSR if it is well formed, self-signed by its key, with a key the hub accepts, and
    names no other device; ``InvalidInput`` saying why otherwise."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise InvalidInput(f"CSR larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidInput(f"not a PEM certificate signing request: {exc}") from None
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"CSR public key unreadable: {exc}") from None
    _check_public_key(public_key)
    # The signature proves the requester holds the private key of the key to be certified.
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, InvalidSignature):
        valid = False
    if not valid:
        raise InvalidInput("CSR signature does not verify with its own key")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if any(name.value != device_id for name in names):
        # Never copied into the certificate; refused so that a mix-up of devices is visible.
        raise InvalidInput(f"CSR names another device than {device_id!r}")
    return csr


class DeviceCA:
    """The CA files in one directory; ``ensure`` creates them on first use.

    One instance per hub process: its lock serialises writes of the ledger and the CRL.
    """

    def __init__(self, directory: Path, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.directory = directory
        self._clock = clock
        self._lock = threading.RLock()
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._cert: x509.Certificate | None = None

    # -- paths -------------------------------------------------------------------------------

    @property
    def cert_file(self) -> Path:
        return self.directory / CA_CERT_FILE

    @property
    def key_file(self) -> Path:
        return self.directory / CA_KEY_FILE

    @property
    def server_cert_file(self) -> Path:
        return self.directory / SERVER_CERT_FILE

    @property
    def server_key_file(self) -> Path:
        return self.directory / SERVER_KEY_FILE

    @property
    def crl_file(self) -> Path:
        return self.directory / CRL_FILE

    @property
    def ledger_file(self) -> Path:
        return self.directory / LEDGER_FILE

    # -- the CA itself -----------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the CA key and certificate and an empty CRL if they are not there yet."""
        with self._lock:
            if self._cert is not None:
                return
            if not self.cert_file.exists():
                self._create()
            self._load()
            if not self.crl_file.exists():
                self._write_crl(self._read_ledger())

    def _create(self) -> None:
        now = self._clock()
        key = ec.generate_private_key(ec.SECP256R1())
        # A random suffix tells two hubs' CAs apart in logs and in a device's files.
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Outpost"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"Outpost device CA {x509.random_serial_number():x}"[:64]
                ),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            # Path length 0: the CA signs end-entity certificates only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        # Key first: a certificate without its key would be a CA nobody can use.
        write_secret(self.key_file, _key_pem(key))
        write_atomic(self.cert_file, _pem(cert))
        logger.info("device CA created", extra={"directory": str(self.directory)})

    def _load(self) -> None:
        try:
            key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
        except FileNotFoundError as exc:
            raise CorruptStorage(f"device CA incomplete: {exc.filename} is missing") from None
        except ValueError as exc:
            raise CorruptStorage(f"device CA files unreadable: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise CorruptStorage(f"{self.key_file} is not the key of {self.cert_file}")
        self._key, self._cert = key, cert

    def _ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        self.ensure()
        assert self._key is not None
        assert self._cert is not None
        return self._key, self._cert

    @property
    def certificate(self) -> x509.Certificate:
        return self._ca()[1]

    def ca_pem(self) -> bytes:
        return _pem(self.certificate)

    def _builder(
        self, subject: x509.Name, public_key: CertificatePublicKeyTypes, validity: timedelta
    ) -> x509.CertificateBuilder:
        ca_key, ca_cert = self._ca()
        now = self._clock()
        # Never past the CA's own end: a chain is only as valid as its shortest link.
        not_after = min(now + validity, ca_cert.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )

    # -- device certificates -----------------------------------------------------------------

    def issue_client(
        self, *, device_id: str, csr_pem: bytes, validity: timedelta
    ) -> x509.Certificate:
        """A client certificate for ``device_id`` over the CSR's key; recorded in the ledger.

        The caller has authenticated the device; this checks the CSR and the id's form.
        """
        if not is_valid_device_id(device_id):
            raise InvalidInput(f"{device_id!r} is not a device id")
        csr = parse_csr(csr_pem, device_id=device_id)
        public_key = csr.public_key()
        ca_key, _ = self._ca()
        cert = (
            self._builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]),
                public_key,
                validity,
            )
            .add_extension(
                _SIGNING_ONLY,
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .sign(ca_key, hashes.SHA256())
        )
        with self._lock:
            ledger = self._read_ledger()
            ledger.append(
                IssuedCertificate(
                    serial=cert.serial_number,
                    device_id=device_id,
                    not_after=cert.not_valid_after_utc,
                )
            )
            self._write_ledger(ledger)
        logger.info(
            "device certificate issued",
            extra={"device_id": device_id, "serial": format(cert.serial_number, "x")},
        )
        return cert

    def certificates(self, device_id: str | None = None) -> list[IssuedCertificate]:
        """The ledger's certificates (of one device when given), oldest first."""
        with self._lock:
            ledger = self._read_ledger()
        return [c for c in ledger if device_id is None or c.device_id == device_id]

    def revoke(self, device_id: str) -> list[int]:
        """Revoke every certificate of ``device_id`` and rewrite the CRL; the serials newly
        revoked. The broker applies the new CRL after a reload."""
        now = self._clock()
        with self._lock:
            ledger = self._read_ledger()
            revoked: list[int] = []
            updated: list[IssuedCertificate] = []
            for entry in ledger:
                if entry.device_id == device_id and entry.revoked_at is None:
                    entry = IssuedCertificate(entry.serial, entry.device_id, entry.not_after, now)
                    revoked.append(entry.serial)
                updated.append(entry)
            self._write_ledger(updated)
            self._write_crl(updated)
        if revoked:
            logger.info(
                "device certificates revoked",
                extra={"device_id": device_id, "serials": [format(s, "x") for s in revoked]},
            )
        return revoked

    def write_crl(self) -> Path:
        """Sign the CRL again (fresh nextUpdate) and write it; its path."""
        with self._lock:
            self._write_crl(self._read_ledger())
        return self.crl_file

    def _write_crl(self, ledger: Sequence[IssuedCertificate]) -> None:
        ca_key, ca_cert = self._ca()
        now = self._clock()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - BACKDATE)
            # OpenSSL refuses every client once nextUpdate has passed. nextUpdate guards
            # relying parties against a stale CRL handed to them; this one never leaves the
            # hub's data dir (who can replace it can replace the CA), so it runs to the CA's
            # end and a hub never restarted does not lock its fleet out.
            .next_update(max(ca_cert.not_valid_after_utc, now + BACKDATE))
            # Increasing with time, so any two CRLs of this CA are ordered without a counter file.
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        for entry in ledger:
            if entry.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(entry.serial)
                    .revocation_date(entry.revoked_at)
                    .build()
                )
        crl = builder.sign(ca_key, hashes.SHA256())
        write_atomic(self.crl_file, crl.public_bytes(serialization.Encoding.PEM))

    def _read_ledger(self) -> list[IssuedCertificate]:
        try:
            raw = json.loads(self.ledger_file.read_bytes())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise CorruptStorage(f"{self.ledger_file} is not JSON: {exc}") from None
        try:
            return [IssuedCertificate.from_json(item) for item in raw["certificates"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStorage(f"{self.ledger_file} is malformed: {exc!r}") from None

    def _write_ledger(self, ledger: Sequence[IssuedCertificate]) -> None:
        # An expired certificate is refused by its date alone: it leaves the ledger (and the
        # CRL), which stay as large as the live certificates.
        now = self._clock()
        live = [entry.to_json() for entry in ledger if entry.not_after > now]
        text = json.dumps({"certificates": live}, indent=1).encode()
        write_atomic(self.ledger_file, text, mode=0o600)

    # -- the broker's certificate ------------------------------------------------------------

    def ensure_server_certificate(
        self, hosts: Sequence[str], *, validity: timedelta
    ) -> tuple[Path, Path]:
        """The broker's (cert, key) files for loopback and ``hosts``: kept while they name
        every host and have a month left, made anew otherwise."""
        names = list(dict.fromkeys([*LOOPBACK_NAMES, *(h for h in hosts if h)]))
        with self._lock:
            _, ca_cert = self._ca()
            if self._server_current(names, ca_cert):
                return self.server_cert_file, self.server_key_file
            key = ec.generate_private_key(ec.SECP256R1())
            sans: list[x509.GeneralName] = []
            for name in names:
                try:
                    sans.append(x509.IPAddress(ip_address(name)))
                except ValueError:
                    sans.append(x509.DNSName(name))
            ca_key, _ = self._ca()
            cert = (
                self._builder(
                    x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_COMMON_NAME)]),
                    key.public_key(),
                    validity,
                )
                .add_extension(
                    _SIGNING_ONLY,
                    critical=True,
                )
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
                .add_extension(x509.SubjectAlternativeName(sans), False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
                .sign(ca_key, hashes.SHA256())
            )
            write_atomic(self.server_key_file, _key_pem(key), mode=0o600)
            write_atomic(self.server_cert_file, _pem(cert))
        logger.info("broker server certificate issued", extra={"names": names})
        return self.server_cert_file, self.server_key_file

    def _server_current(self, names: Sequence[str], ca_cert: x509.Certificate) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(self.server_cert_file.read_bytes())
            key = serialization.load_pem_private_key(
                self.server_key_file.read_bytes(), password=None
            )
        except (FileNotFoundError, ValueError):
            return False
        if key.public_key() != cert.public_key() or cert.issuer != ca_cert.subject:
            return False
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            return False  # the CA was replaced: its devices would not trust this one
        if cert.not_valid_after_utc - self._clock() < SERVER_RENEW_BEFORE:
            return False
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        have = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(
            san.get_values_for_type(x509.DNSName)
        )
        wanted = set()
        for name in names:
            try:
                wanted.add(str(ip_address(name)))
            except ValueError:
                wanted.add(name)
        return wanted <= have
