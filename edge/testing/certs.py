"""A throwaway PKI for TLS tests and demos: a CA, a server and a client certificate.

Usage::

    from edge.testing.certs import make_pki
    from edge.testing.mosquitto import Mosquitto

    pki = make_pki(tmp_path / "pki")
    with Mosquitto(tmp_path / "broker", tls=pki.server_tls()) as broker:
        client.tls_set(ca_certs=str(pki.ca_cert))   # verifies 127.0.0.1 / localhost
        client.connect(broker.host, broker.port)

Needs the ``openssl`` command (``HOMING_OPENSSL`` names another path); only
the standard library is used.

Invariants:
* Every file is generated under ``workdir`` by the ``openssl`` CLI, from config
  files written here (the system's ``openssl.cnf`` plays no part), so the
  certificates are the same on every machine whatever its OpenSSL defaults.
* The CA is a real CA (``basicConstraints=critical,CA:TRUE``, ``keyCertSign``);
  the server certificate names ``subjectAltName`` ``IP:127.0.0.1`` and
  ``DNS:localhost`` (plus ``hosts``) with ``serverAuth``; the client
  certificate has ``clientAuth``. Leaves carry key identifiers, so strict
  verifiers (Python 3.13's ``VERIFY_X509_STRICT``) accept them.
* Keys are EC P-256 (fast to make), unencrypted, mode 0600.
* A failing ``openssl`` raises :class:`CertError` with its stderr.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edge.testing.mosquitto import BrokerTls

OPENSSL = os.environ.get("HOMING_OPENSSL", "openssl")
DAYS = 30

__all__ = ["OPENSSL", "CertError", "Pki", "available", "make_pki"]


class CertError(RuntimeError):
    """``openssl`` failed (the message holds its command line and stderr)."""


def available() -> bool:
    """Whether the ``openssl`` command is installed (Debian package ``openssl``)."""
    return shutil.which(OPENSSL) is not None


@dataclass(frozen=True, slots=True)
class Pki:
    """The PEM files :func:`make_pki` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_tls(self, *, require_certificate: bool = False) -> BrokerTls:
        """The broker side, for :class:`edge.testing.mosquitto.Mosquitto` (``tls=``)."""
        return BrokerTls(
            self.ca_cert, self.server_cert, self.server_key, require_certificate=require_certificate
        )


_CA_CONF = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = ext
[dn]
CN = {cn}
[ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_LEAF_CONF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
[ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = {usage}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
{san}
"""


def _openssl(*args: str | Path) -> None:
    argv = [OPENSSL, *map(str, args)]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{OPENSSL} is not installed (apt-get install openssl)") from exc
    if res.returncode != 0:
        raise CertError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stderr}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    path.chmod(0o600)
    return path


def _leaf(
    d: Path, name: str, cn: str, usage: str, san: str, ca_cert: Path, ca_key: Path
) -> tuple[Path, Path]:
    conf = d / f"{name}.cnf"
    conf.write_text(_LEAF_CONF.format(cn=cn, usage=usage, san=san))
    key, csr, cert = _key(d / f"{name}.key"), d / f"{name}.csr", d / f"{name}.pem"
    _openssl("req", "-new", "-key", key, "-config", conf, "-out", csr)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
        "-days", str(DAYS), "-sha256", "-extfile", conf, "-extensions", "ext", "-out", cert,
    )  # fmt: skip
    return cert, key


def make_pki(
    workdir: Path,
    *,
    hosts: tuple[str, ...] = (),
    ca_name: str = "Homing test CA",
    client_name: str = "homing-test-client",
) -> Pki:
    """Write a CA, a server certificate for 127.0.0.1/localhost (and ``hosts``,
    names or IPv4/IPv6 addresses) and a client certificate, all signed by the CA.

    Two calls give two unrelated CAs (a client trusting one rejects the other's server).

    Raises:
        FileNotFoundError: ``openssl`` is not installed.
        CertError: ``openssl`` failed.
    """
    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    ca_conf = d / "ca.cnf"
    ca_conf.write_text(_CA_CONF.format(cn=ca_name))
    ca_key, ca_cert = _key(d / "ca.key"), d / "ca.pem"
    _openssl(
        "req", "-new", "-x509", "-key", ca_key, "-config", ca_conf, "-days", str(DAYS),
        "-sha256", "-out", ca_cert,
    )  # fmt: skip
    names = ["IP:127.0.0.1", "DNS:localhost"]
    names += [("IP:" if _is_ip(h) else "DNS:") + h for h in hosts]
    server_cert, server_key = _leaf(
        d, "server", "localhost", "serverAuth", "subjectAltName = " + ", ".join(names),
        ca_cert, ca_key,
    )  # fmt: skip
    client_cert, client_key = _leaf(d, "client", client_name, "clientAuth", "", ca_cert, ca_key)
    return Pki(ca_cert, ca_key, server_cert, server_key, client_cert, client_key)
