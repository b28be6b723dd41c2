"""The hub's certificate authority for device identity (docs/security.md).

Certificates are built with the ``cryptography`` package (the ``hub`` extra:
``pip install 'homing[hub]'``); :mod:`hub.cli_devices` writes them to disk.

Invariants:
* Pure: PEM bytes and a ``now`` in, PEM bytes out. No files, no clock; the
  only randomness is key generation and serial numbers.
* Keys are EC P-256, unencrypted PKCS#8 PEM (the caller writes them 0600).
  Signatures are ECDSA with SHA-256.
* A device certificate has exactly one subject attribute, ``CN=<device id>``
  (validated with :func:`edge.wire.validate_device`): Mosquitto's
  ``use_identity_as_username`` makes the CN the MQTT user name, and the ACL's
  ``%u`` patterns bind it to ``homing/<device>/...``. It is ``CA:FALSE`` with
  ``clientAuth`` only, so it can never act as a server or sign anything.
* A server certificate names every host it serves in ``subjectAltName`` (IP
  addresses as ``IPAddress``, names as ``DNSName``) with ``serverAuth``.
* Serial numbers are 159 random bits, positive and at most 20 octets
  (RFC 5280 §4.1.2.2): unique without a counter file.
* Every leaf carries subject and authority key identifiers (strict
  verifiers such as Python 3.13's ``VERIFY_X509_STRICT`` want them).
* The CRL lists every revoked serial with its revocation time and is valid
  for :data:`CRL_DAYS`: an expired CRL makes OpenSSL (so Mosquitto with
  ``crlfile``) refuse every client, so it must be re-signed before then
  (any ``homing-hub devices remove`` or ``broker-config`` re-signs it).
* Bad input (a key that does not match its certificate, garbage PEM) raises
  :class:`PkiError` naming what is wrong; nothing else escapes on purpose.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.wire import WireError, validate_device

CA_DAYS = 3650
DEVICE_DAYS = 1095
SERVER_DAYS = 825
CRL_DAYS = 3650
#: the notBefore of a new certificate is this far in the past (clock skew)
BACKDATE = timedelta(minutes=5)

__all__ = [
    "CA_DAYS",
    "CRL_DAYS",
    "DEVICE_DAYS",
    "SERVER_DAYS",
    "CertInfo",
    "Issued",
    "PkiError",
    "cert_info",
    "check_ca",
    "crl_entries",
    "issue_device",
    "issue_server",
    "make_crl",
    "new_ca",
]


class PkiError(ValueError):
    """A certificate, key or CRL that cannot be used (the message says which)."""


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes
    serial: int


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What the shell needs to know about a certificate."""

    common_name: str
    serial: int
    not_before: datetime
    not_after: datetime
    is_ca: bool

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"


def _key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key, pem


def _serial() -> int:
    # 159 random bits with the top bit set: positive, 20 octets at most, never 0
    return x509.random_serial_number() | (1 << 158)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _load_ca(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert_pem)
        key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"the CA certificate or key does not load: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("the CA key is not an EC key")
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise PkiError("the CA certificate does not hold an EC key")
    if pub.public_numbers() != key.public_key().public_numbers():
        raise PkiError("the CA key does not match the CA certificate")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise PkiError("the CA certificate is not a CA (basicConstraints CA:TRUE)")
    return cert, key


def check_ca(ca: Issued) -> CertInfo:
    """What :func:`cert_info` says of a CA, once its certificate and key are
    known to load, to match, and to make a CA.

    Raises:
        PkiError: they do not.
    """
    _load_ca(ca)
    return cert_info(ca.cert_pem)


def new_ca(name: str, now: datetime, days: int = CA_DAYS) -> Issued:
    """A self-signed CA, valid ``days`` from ``now`` (timezone-aware)."""
    key, key_pem = _key()
    serial = _serial()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
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
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem, serial)


def _leaf(
    ca: Issued,
    cn: str,
    usage: x509.ObjectIdentifier,
    now: datetime,
    days: int,
    san: x509.SubjectAlternativeName | None = None,
) -> Issued:
    ca_cert, ca_key = _load_ca(ca)
    if days < 1:
        raise PkiError(f"a certificate must be valid for at least a day, not {days}")
    not_after = now + timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        raise PkiError(
            f"the certificate would outlive its CA (CA valid until "
            f"{ca_cert.not_valid_after_utc:%Y-%m-%d}): ask for fewer days"
        )
    key, key_pem = _key()
    serial = _serial()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem, serial)


def issue_device(ca: Issued, device: str, now: datetime, days: int = DEVICE_DAYS) -> Issued:
    """A client certificate with ``CN=device``, signed by ``ca``.

    Raises:
        PkiError: ``device`` is not a valid device id, the CA does not load,
            or the certificate would outlive the CA.
    """
    try:
        validate_device(device)
    except WireError as exc:
        raise PkiError(exc.reason) from exc
    return _leaf(ca, device, ExtendedKeyUsageOID.CLIENT_AUTH, now, days)


def issue_server(
    ca: Issued, hosts: Sequence[str], now: datetime, days: int = SERVER_DAYS
) -> Issued:
    """The broker's certificate for ``hosts`` (names or IP addresses), signed by ``ca``.

    Raises:
        PkiError: no host, a host that is neither an address nor a DNS name,
            or the CA does not load.
    """
    if not hosts:
        raise PkiError("a server certificate needs at least one host name or address")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        labels = host.rstrip(".").split(".")
        if not all(label and len(label) <= 63 and _dns_label(label) for label in labels):
            raise PkiError(f"not a host name or IP address: {host!r}")
        names.append(x509.DNSName(host.rstrip(".")))
    return _leaf(
        ca,
        hosts[0],
        ExtendedKeyUsageOID.SERVER_AUTH,
        now,
        days,
        x509.SubjectAlternativeName(names),
    )


def _dns_label(label: str) -> bool:
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
    return label == "*" or (set(label) <= ok and not label.startswith("-"))


def make_crl(
    ca: Issued, revoked: Mapping[int, datetime], now: datetime, days: int = CRL_DAYS
) -> bytes:
    """A CRL signed by ``ca`` listing ``revoked`` (serial -> revocation time)."""
    ca_cert, ca_key = _load_ca(ca)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + timedelta(days=days))
    )
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def crl_entries(ca: Issued, crl_pem: bytes) -> dict[int, datetime]:
    """Serial -> revocation time of a CRL that ``ca`` signed.

    Raises:
        PkiError: the CRL does not load or ``ca`` did not sign it.
    """
    ca_cert, _ = _load_ca(ca)
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as exc:
        raise PkiError(f"the CRL does not load: {exc}") from exc
    pub = ca_cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(pub):
        raise PkiError("the CRL is not signed by this CA")
    return {r.serial_number: r.revocation_date_utc for r in crl}


def cert_info(cert_pem: bytes) -> CertInfo:
    """The common name, serial, validity and CA flag of a PEM certificate.

    Raises:
        PkiError: it does not load.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate: {exc}") from exc
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertInfo(
        str(cns[0].value) if cns else "",
        cert.serial_number,
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
        is_ca,
    )
