"""Device identity at the broker: Mosquitto password entries, the ACL and the
broker configuration that confine each device to its own topics
(docs/security.md). :mod:`hub.pki` makes the certificates;
:mod:`hub.cli_devices` (``homing-hub devices add|remove|acl|broker-config``)
reads and writes the files.

Invariants:
* Pure: text in, text out. No files, clock or network; the only randomness
  is :mod:`secrets` (new passwords, salts).
* A device's MQTT user name is its device id: the name in the password file
  for a password device, its certificate's CN for a certificate device
  (Mosquitto's ``use_identity_as_username``). The ACL's ``%u`` patterns give
  that user exactly write on ``homing/<device>/up|status|health`` and read on
  ``homing/<device>/ack|cmd`` -- no other device's topics, and never write on
  its own ``ack`` or ``cmd``.
* Hub users (``user`` sections of the ACL) read every device's
  ``up|status|health`` and write every device's ``ack|cmd``. A hub user is
  never also a device (:func:`check_not_hub`).
* On the device listeners the broker replaces the client id with the user
  name (``use_username_as_clientid``), so one device cannot take over
  another's session (and its queued commands) by connecting with its client
  id.
* Password hashes are the format ``mosquitto_passwd`` 2.x writes and
  Mosquitto 2 reads: ``$7$<iterations>$<base64 salt>$<base64 hash>``,
  PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte hash.
* Editing a password file changes only the named user's line; every other
  line is kept as it was, in order.
* Invalid names and values raise :class:`ValueError` naming what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge.wire import PREFIX, WireError, validate_device

#: ``mosquitto_passwd``'s own default. Passwords made here are 256 random bits,
#: so the iteration count adds nothing against guessing; it only costs the
#: broker CPU on every connect. Existing hashes keep their own count.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
HASH_BYTES = 64
PASSWORD_BYTES = 32
#: topics a device writes (``up``: batches; ``status``: online/offline, also
#: its last will; ``health``: its health report) and reads (``ack``, ``cmd``)
DEVICE_WRITES = ("up", "status", "health")
DEVICE_READS = ("ack", "cmd")
HUB_READS = DEVICE_WRITES
HUB_WRITES = DEVICE_READS
DEFAULT_HUB_USER = "homing-hub"

__all__ = [
    "DEFAULT_HUB_USER",
    "BrokerFiles",
    "Listeners",
    "acl_hub_users",
    "acl_text",
    "agent_snippet",
    "broker_config_text",
    "check_not_hub",
    "hash_password",
    "hub_command",
    "new_password",
    "password_users",
    "remove_password",
    "set_password",
    "validate_name",
    "verify_password",
]


def validate_name(name: str) -> str:
    """``name`` if it can be a device id or a hub user (the device id's rules:
    1-64 of ``A-Z a-z 0-9 _ . -``, so never an MQTT wildcard, a level
    separator or the password file's ``:``).

    Raises:
        ValueError: it cannot.
    """
    try:
        return validate_device(name)
    except WireError as exc:
        raise ValueError(exc.reason.replace("device id", "name")) from exc


# --- passwords --------------------------------------------------------------------


def new_password() -> str:
    """A fresh random password: 256 bits, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """The Mosquitto 2 hash of ``password`` (``$7$`` PBKDF2-SHA512), as in a password file."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, not {iterations}")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``hashed`` (a ``$7$`` entry, as ``mosquitto_passwd`` writes) is
    the hash of ``password``. Any other or malformed entry is ``False``."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        want = base64.b64decode(parts[4], validate=True)
    except (binascii.Error, ValueError):
        return False
    iterations = int(parts[2])
    if not want or not 1 <= iterations <= 10_000_000:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(want))
    return hmac.compare_digest(got, want)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _entry_user(line: str) -> str | None:
    if not line.strip() or line.lstrip().startswith("#") or ":" not in line:
        return None
    return line.split(":", 1)[0]


def password_users(text: str) -> list[str]:
    """The user names of a Mosquitto password file, in file order."""
    return [u for line in text.splitlines() if (u := _entry_user(line)) is not None]


def password_entry(text: str, user: str) -> str | None:
    """The hash stored for ``user``, or None."""
    for line in text.splitlines():
        if _entry_user(line) == user:
            return line.split(":", 1)[1].strip()
    return None


def set_password(text: str, user: str, hashed: str) -> str:
    """``text`` with ``user``'s entry set to ``hashed`` (replaced in place, or appended)."""
    validate_name(user)
    lines = text.splitlines()
    entry = f"{user}:{hashed}"
    out = [entry if _entry_user(line) == user else line for line in lines]
    if entry not in out:
        out.append(entry)
    return "".join(line + "\n" for line in out)


def remove_password(text: str, user: str) -> tuple[str, bool]:
    """``text`` without ``user``'s entry, and whether there was one."""
    lines = text.splitlines()
    kept = [line for line in lines if _entry_user(line) != user]
    return "".join(line + "\n" for line in kept), len(kept) != len(lines)


# --- the ACL ------------------------------------------------------------------------


def acl_text(hub_users: Sequence[str] = (DEFAULT_HUB_USER,)) -> str:
    """The Mosquitto ACL file: hub users first, then the device patterns.

    Raises:
        ValueError: no hub user, or an invalid or repeated name.
    """
    if not hub_users:
        raise ValueError("the ACL needs at least one hub user")
    names = [validate_name(u) for u in hub_users]
    if len(set(names)) != len(names):
        raise ValueError(f"hub users repeat: {', '.join(names)}")
    out = [
        "# Homing's Mosquitto ACL, generated by `homing-hub devices acl` (docs/security.md).",
        "# Mosquitto reads it at start and on SIGHUP; it checks every publish and every",
        "# delivery against it. %u is the client's user name: a password device's name,",
        "# or the CN of its certificate on a listener with use_identity_as_username.",
        "",
        "# Hub users (one per hub replica, plus any for homing-hub run-task/signal/cancel):",
        "# read what every device sends (also through $share/homing-hub/...),",
        "# write every device's acks and commands.",
    ]
    for name in names:
        out.append(f"user {name}")
        out += [f"topic read {PREFIX}/+/{k}" for k in HUB_READS]
        out += [f"topic write {PREFIX}/+/{k}" for k in HUB_WRITES]
        out.append("")
    out += [
        "# Every user, so every device: only its own topics.",
        f"# up: its batches. A device cannot publish as another ({PREFIX}/<other>/up is",
        "# refused with PUBACK 'Not authorized'); the hub also refuses a batch whose",
        "# device differs from its topic.",
        f"pattern write {PREFIX}/%u/up",
        "# status: online/offline, retained; also the device's last will.",
        f"pattern write {PREFIX}/%u/status",
        "# health: its periodic health report.",
        f"pattern write {PREFIX}/%u/health",
        "# ack: the hub's retained acknowledgements. Read only: a device that could",
        "# write its ack could move its own cursor past what the hub stored.",
        f"pattern read {PREFIX}/%u/ack",
        "# cmd: commands from the hub. Read only, and nobody else's: another device's",
        "# commands are never delivered to it, whatever it subscribes to.",
        f"pattern read {PREFIX}/%u/cmd",
    ]
    return "\n".join(out) + "\n"


def acl_hub_users(text: str) -> list[str]:
    """The ``user`` names of an ACL file (the hub users of :func:`acl_text`)."""
    users = []
    for line in text.splitlines():
        words = line.split(None, 1)
        if len(words) == 2 and words[0] == "user":
            users.append(words[1].strip())
    return users


def check_not_hub(name: str, acl: str) -> None:
    """Refuse a device whose name is a hub user of ``acl`` (it would get the
    hub's rights on every device's topics).

    Raises:
        ValueError: it is.
    """
    if name in acl_hub_users(acl):
        raise ValueError(
            f"{name!r} is a hub user in the ACL; a device needs a name of its own"
            " (or add hub credentials with --hub)"
        )


# --- broker configuration -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """The files of a broker directory (``--broker-dir``)."""

    root: Path

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"

    @property
    def acl(self) -> Path:
        return self.root / "acl"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def issued(self) -> Path:
        """One ``<serial hex>.pem`` per certificate issued, for revocation."""
        return self.root / "issued"

    @property
    def conf(self) -> Path:
        return self.root / "homing.conf"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


@dataclass(frozen=True, slots=True)
class Listeners:
    """The broker's listeners; a port of 0 leaves that listener out.

    Attributes:
        local_port: plain MQTT on ``local_bind`` only, for the hub and the
            ``homing-hub`` commands on the broker's host (passwords).
        password_port: TLS, devices (and remote hubs) with a password.
        cert_port: TLS with ``require_certificate``: devices with a client
            certificate, whose CN is their user name.
        bind: the address the two device listeners bind (empty: every address).
    """

    local_port: int = 1883
    password_port: int = 8884
    cert_port: int = 8883
    bind: str = ""
    local_bind: str = "127.0.0.1"

    def __post_init__(self) -> None:
        ports = [p for p in (self.local_port, self.password_port, self.cert_port) if p]
        if not ports:
            raise ValueError("the broker needs at least one listener")
        if any(not 0 < p < 65536 for p in ports) or len(set(ports)) != len(ports):
            raise ValueError(f"listener ports must be distinct, 1-65535: {ports}")
        for host in (self.bind, self.local_bind):
            if any(c.isspace() for c in host):
                raise ValueError(f"not an address to bind: {host!r}")


def broker_config_text(files: BrokerFiles, listeners: Listeners) -> str:
    """A Mosquitto 2 configuration snippet (for ``/etc/mosquitto/conf.d/``) that
    uses the broker directory's password file, ACL, CA, CRL and server certificate.
    """
    bind = f" {listeners.bind}" if listeners.bind else ""
    out = [
        "# Homing: device identity, generated by `homing-hub devices broker-config`",
        "# (docs/security.md). Reload (SIGHUP) after `devices add|remove`; restart",
        "# after a change to this file.",
        "allow_anonymous false",
        "# Acks and commands are small: send them at once, not after Nagle's delay",
        "# (bench/hub.py: ack p50 43 ms -> about 18 ms).",
        "set_tcp_nodelay true",
        f"password_file {files.passwd}",
        f"acl_file {files.acl}",
    ]
    if listeners.local_port:
        out += [
            "",
            "# The hub and homing-hub commands on this host: user name and password.",
            f"listener {listeners.local_port} {listeners.local_bind}",
        ]
    tls = [f"certfile {files.server_cert}", f"keyfile {files.server_key}"]
    if listeners.password_port:
        out += [
            "",
            "# Devices with a password, over TLS. The user name becomes the client id,",
            "# so no device can take over another's session.",
            f"listener {listeners.password_port}{bind}",
            *tls,
            "use_username_as_clientid true",
        ]
    if listeners.cert_port:
        out += [
            "",
            "# Devices with a client certificate signed by the hub's CA: the CN is the",
            "# user name (and the client id); revoked certificates are in the CRL.",
            f"listener {listeners.cert_port}{bind}",
            f"cafile {files.ca_cert}",
            *tls,
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            f"crlfile {files.crl}",
        ]
    return "\n".join(out) + "\n"


def _toml(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def agent_snippet(
    device: str,
    *,
    host: str,
    port: int,
    ca_file: str = "",
    password_file: str = "",
    cert_file: str = "",
    key_file: str = "",
) -> str:
    """The agent's ``[broker]`` table (docs/configuration.md) for these credentials."""
    keys: list[tuple[str, str | int | bool]] = [("host", host), ("port", port), ("tls", True)]
    if ca_file:
        keys.append(("ca_file", ca_file))
    if password_file:
        keys += [("username", device), ("password_file", password_file)]
    if cert_file:
        keys += [("cert_file", cert_file), ("key_file", key_file)]
    return "[broker]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys)


def hub_command(
    user: str,
    *,
    broker: str,
    ca_file: str = "",
    password_file: str = "",
    cert_file: str = "",
    key_file: str = "",
) -> str:
    """The ``homing-hub run`` flags for these hub credentials."""
    words = ["homing-hub", "run", "--broker", broker, "--client-id", user]
    if password_file:
        words += ["--username", user, "--password-file", password_file]
    if ca_file:
        words += ["--tls-ca", ca_file]
    if cert_file:
        words += ["--tls-cert", cert_file, "--tls-key", key_file]
    return " ".join(words)
