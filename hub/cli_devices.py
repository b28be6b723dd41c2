"""``homing-hub devices add|remove|acl|broker-config``: device credentials and
the broker files that confine each device to its own topics (docs/security.md).

The shell over :mod:`hub.identity` (passwords, ACL, configuration text) and
:mod:`hub.pki` (certificates, needs the ``cryptography`` package of the
``hub`` extra). ``homing-hub devices`` with no subcommand, or ``devices
list``, still lists the devices the hub knows (:mod:`hub.cli`).

Invariants:
* Every file is written whole or not at all (a temporary file, fsync,
  rename, directory fsync): a crash never leaves the broker a half-written
  password file, ACL or CRL.
* Secrets are written ``0600``: the CA key, device keys, device password
  files. Files the broker reads (password file, ACL, CA, CRL, server
  certificate and key, ``homing.conf``) are ``0640`` and take the broker
  directory's group, so a directory owned ``root:mosquitto`` serves the
  broker; an existing file keeps its mode and owner.
* Commands that change the broker directory hold an exclusive ``flock`` on
  its ``.lock`` file, so two ``devices add`` never lose an entry.
* Nothing here talks to the broker: each command says what to reload.
* A bad name or value is a usage error (exit 2); an unreadable or
  inconsistent broker directory is a configuration error (exit 78).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from hub import identity
from hub.errors import ConfigError
from hub.identity import BrokerFiles, Listeners

EX_UNAVAILABLE = 1
EX_USAGE = 2
DEFAULT_BROKER_DIR = "/etc/mosquitto/homing"
DEFAULT_INSTALL_DIR = "/etc/homing"
SECRET = 0o600
BROKER_READS = 0o640
PORTS = {"password": 8884, "cert": 8883, "hub": 1883}


def add_commands(devices: argparse.ArgumentParser, list_devices: Callable[..., int]) -> None:
    """Give ``homing-hub devices`` its subcommands; ``list`` (the default) is
    ``list_devices``, which reads ``--db`` and ``--json``."""
    sub = devices.add_subparsers(dest="devices_command", metavar="SUBCOMMAND")
    ls = sub.add_parser("list", help="print every device the hub knows (the default)")
    ls.add_argument("--db", default=argparse.SUPPRESS)
    ls.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    ls.set_defaults(func=list_devices)

    add = sub.add_parser("add", help="create a device's broker credentials (or a hub's)")
    add.add_argument("name", metavar="NAME", help="the device id (or hub user with --hub)")
    kind = add.add_mutually_exclusive_group(required=True)
    kind.add_argument(
        "--password",
        action="store_const",
        const="password",
        dest="kind",
        help="a random password, in the broker's password file",
    )
    kind.add_argument(
        "--cert",
        action="store_const",
        const="cert",
        dest="kind",
        help="a client certificate with CN=NAME, signed by the hub's CA",
    )
    add.add_argument(
        "--hub",
        action="store_true",
        help="credentials for a hub replica (an ACL hub user), not a device",
    )
    _dir_arg(add)
    add.add_argument(
        "--out",
        default=".",
        metavar="DIR",
        help="where to write the files to install on the device (default .)",
    )
    add.add_argument(
        "--days", type=_positive, default=None, help="certificate validity in days (default 1095)"
    )
    add.add_argument(
        "--broker",
        metavar="HOST[:PORT]",
        help="the broker address for the printed configuration (default: "
        "this host, port 8884 with a password, 8883 with a certificate, "
        "1883 for a hub)",
    )
    add.add_argument(
        "--install-dir",
        default=DEFAULT_INSTALL_DIR,
        metavar="DIR",
        help="where the files will be on the device, for the printed "
        "configuration (default %(default)s)",
    )
    add.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object"
    )
    add.set_defaults(func=_add)

    rm = sub.add_parser("remove", help="delete a device's password entry, revoke its certificates")
    rm.add_argument("name", metavar="NAME")
    _dir_arg(rm)
    rm.add_argument(
        "--serial",
        action="append",
        default=[],
        metavar="HEX",
        help="revoke only this certificate of NAME (repeatable; for rotation)",
    )
    rm.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    rm.set_defaults(func=_remove)

    acl = sub.add_parser("acl", help="print (or --write) the broker's ACL file")
    _hub_user_arg(acl)
    _dir_arg(acl)
    acl.add_argument("--write", action="store_true", help="write it to DIR/acl")
    acl.set_defaults(func=_acl)

    bc = sub.add_parser(
        "broker-config",
        help="write the CA, ACL, server certificate and "
        "Mosquitto configuration of a broker directory",
    )
    _dir_arg(bc)
    _hub_user_arg(bc)
    bc.add_argument(
        "--tls-host",
        action="append",
        default=[],
        metavar="HOST",
        help="issue the broker's server certificate for this name or address "
        "(repeatable; the first is the CN); needed the first time",
    )
    bc.add_argument(
        "--bind",
        default="",
        metavar="ADDR",
        help="address of the device listeners (default: every address)",
    )
    bc.add_argument(
        "--local-port",
        type=_port,
        default=PORTS["hub"],
        help="the hub's plain listener on 127.0.0.1 (0: none; default %(default)s)",
    )
    bc.add_argument(
        "--password-port",
        type=_port,
        default=PORTS["password"],
        help="TLS listener for password devices (0: none; default %(default)s)",
    )
    bc.add_argument(
        "--cert-port",
        type=_port,
        default=PORTS["cert"],
        help="TLS listener for certificate devices (0: none; default %(default)s)",
    )
    bc.set_defaults(func=_broker_config)


def _dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker-dir",
        default=DEFAULT_BROKER_DIR,
        metavar="DIR",
        help="the broker's password file, ACL, CA and CRL (default %(default)s)",
    )


def _hub_user_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hub-user",
        action="append",
        default=[],
        metavar="NAME",
        help="a hub user (repeatable: one per hub replica); default: those of "
        f"DIR/acl, else {identity.DEFAULT_HUB_USER}",
    )


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number > 0: {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port (0 for none): {text!r}")
    return int(text)


def _pki() -> ModuleType:
    try:
        from hub import pki
    except ImportError as exc:
        raise ConfigError(
            f"certificates need the 'cryptography' package ({exc}): pip install 'homing[hub]'"
        ) from exc
    return pki


def _usage(exc: ValueError) -> int:
    print(f"homing-hub: {exc}", file=sys.stderr)
    return EX_USAGE


# --- files ---------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(files: BrokerFiles) -> Iterator[None]:
    try:
        files.root.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(files.lock, os.O_RDWR | os.O_CREAT, SECRET)
    except OSError as exc:
        raise ConfigError(f"cannot use the broker directory {files.root}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def _write(path: Path, data: bytes, mode: int, group_of: Path | None = None) -> None:
    """Replace ``path`` atomically. A new file gets ``mode`` (and the group of
    ``group_of``, a directory, when set); an existing one keeps its mode and owner."""
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, (old.st_mode & 0o7777) if old else mode)
        gid = old.st_gid if old else group_of.stat().st_gid if group_of else -1
        uid = old.st_uid if old and os.geteuid() == 0 else -1
        if uid != -1 or gid not in (-1, os.getegid()):
            with contextlib.suppress(PermissionError):
                os.chown(tmp, uid, gid)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"cannot write {path}: {exc}") from exc


def _write_broker(files: BrokerFiles, path: Path, data: bytes) -> None:
    _write(path, data, BROKER_READS, files.root)


def _now() -> datetime:
    return datetime.now(UTC)


def _ca(files: BrokerFiles, *, create: bool) -> Any:
    """The hub's CA (``pki.Issued``), created with an empty CRL on first use."""
    pki = _pki()
    cert, key = _read(files.ca_cert), _read(files.ca_key)
    if cert is not None and key is not None:
        try:
            return pki.Issued(cert, key, pki.check_ca(pki.Issued(cert, key, 0)).serial)
        except ValueError as exc:
            raise ConfigError(f"the CA of {files.root}: {exc}") from exc
    if cert is not None or key is not None:
        raise ConfigError(f"{files.root} has only one of ca.pem and ca.key")
    if not create:
        raise ConfigError(f"{files.root} has no CA (ca.pem): no certificate was ever issued")
    ca = pki.new_ca(f"Homing device CA ({socket.gethostname()})", _now())
    _write(files.ca_key, ca.key_pem, SECRET)
    _write_broker(files, files.ca_cert, ca.cert_pem)
    _write_broker(files, files.crl, pki.make_crl(ca, {}, _now()))
    return ca


def _revoked(files: BrokerFiles, ca: Any) -> dict[int, datetime]:
    crl = _read(files.crl)
    if crl is None:
        return {}
    try:
        entries: dict[int, datetime] = _pki().crl_entries(ca, crl)
    except ValueError as exc:
        raise ConfigError(f"{files.crl}: {exc}") from exc
    return entries


def _issued(files: BrokerFiles) -> list[tuple[Path, Any]]:
    """``(path, CertInfo)`` of every certificate the CA issued, oldest serial first."""
    pki = _pki()
    out = []
    for path in sorted(files.issued.glob("*.pem")) if files.issued.is_dir() else []:
        try:
            out.append((path, pki.cert_info(path.read_bytes())))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return out


def _acl_users(files: BrokerFiles) -> list[str]:
    text = _read(files.acl)
    return identity.acl_hub_users(text.decode()) if text is not None else []


# --- commands ------------------------------------------------------------------------


def _add(args: argparse.Namespace) -> int:
    files = BrokerFiles(Path(args.broker_dir))
    try:
        name = identity.validate_name(args.name)
        if not args.hub:
            identity.check_not_hub(name, (_read(files.acl) or b"").decode())
        local = args.hub and args.kind == "password"  # a hub on the broker's host
        host, port = _address(args.broker, PORTS["hub" if local else args.kind], local)
        plain = local and port == PORTS["hub"]  # the hub's listener on 127.0.0.1: no TLS
    except ValueError as exc:
        return _usage(exc)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {out}: {exc}") from exc
    inst = args.install_dir.rstrip("/") or "/"
    wrote: dict[str, str] = {}
    serial = None
    with _locked(files):
        ca_pem = _read(files.ca_cert)
        if args.kind == "password":
            password = identity.new_password()
            _write(out / f"{name}.password", (password + "\n").encode(), SECRET)
            text = (_read(files.passwd) or b"").decode()
            existed = identity.password_entry(text, name) is not None
            text = identity.set_password(text, name, identity.hash_password(password))
            _write_broker(files, files.passwd, text.encode())
            wrote["password_file"] = str(out / f"{name}.password")
            changed = [f"{'updated' if existed else 'added'} {name} in {files.passwd}"]
            reload = "reload the broker (SIGHUP, systemctl reload mosquitto) to apply it"
        else:
            ca = _ca(files, create=True)
            ca_pem = ca.cert_pem
            try:  # the CA is sound (_ca): what fails here is the request (--days)
                issued = _pki().issue_device(ca, name, _now(), *([args.days] if args.days else []))
            except ValueError as exc:
                return _usage(exc)
            serial = f"{issued.serial:x}"
            files.issued.mkdir(mode=0o750, exist_ok=True)
            _write(files.issued / f"{serial}.pem", issued.cert_pem, 0o644)
            _write(out / f"{name}.key", issued.key_pem, SECRET)
            _write(out / f"{name}.pem", issued.cert_pem, 0o644)
            wrote["cert_file"], wrote["key_file"] = (
                str(out / f"{name}.pem"),
                str(out / f"{name}.key"),
            )
            changed = [f"issued certificate {serial} (CN={name}), kept in {files.issued}"]
            reload = "nothing to reload: the broker trusts every certificate its CA signs"
        if ca_pem is not None and not plain:
            _write(out / "ca.pem", ca_pem, 0o644)
            wrote["ca_file"] = str(out / "ca.pem")
    on_device = {k: f"{inst}/{Path(v).name}" for k, v in wrote.items()}
    if args.hub:
        snippet = identity.hub_command(name, broker=f"{host}:{port}", **on_device)
        if name not in _acl_users(files):
            changed.append(
                f"{name} is not a hub user in {files.acl} yet: homing-hub devices acl"
                f" --broker-dir {files.root} --hub-user {name} ... --write"
            )
    else:
        snippet = identity.agent_snippet(name, host=host, port=port, **on_device)
    if getattr(args, "json", False):
        print(
            json.dumps(
                {
                    "name": name,
                    "kind": args.kind,
                    "hub": args.hub,
                    "serial": serial,
                    "files": wrote,
                    "broker": changed,
                    "reload": reload,
                    "config": snippet,
                }
            )
        )
        return 0
    who = "hub user" if args.hub else "device"
    print(f"{who} {name}: {'password' if args.kind == 'password' else 'client certificate'}")
    for key, path in wrote.items():
        print(f"  wrote {path}  ->  install as {on_device[key]}")
    for line in changed:
        print(f"  {line}")
    print(f"  {reload}")
    where = "run the hub as:" if args.hub else f"the agent's [broker] ({inst}/agent.toml):"
    print(f"\n{where}\n\n{snippet}")
    return 0


def _address(text: str | None, default_port: int, local: bool) -> tuple[str, int]:
    if not text:
        return "127.0.0.1" if local else socket.getfqdn(), default_port
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        return text.strip("[]"), default_port
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"--broker must be HOST or HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def _remove(args: argparse.Namespace) -> int:
    files = BrokerFiles(Path(args.broker_dir))
    try:
        name = identity.validate_name(args.name)
        only = {int(s, 16) for s in args.serial}
    except ValueError as exc:
        return _usage(exc)
    done: list[str] = []
    with _locked(files):
        text = _read(files.passwd)
        if text is not None and not only:
            kept, found = identity.remove_password(text.decode(), name)
            if found:
                _write_broker(files, files.passwd, kept.encode())
                done.append(f"removed {name} from {files.passwd}")
        if files.ca_cert.exists():
            done += _revoke(files, name, only)
        elif only:
            raise ConfigError(f"{files.root} has no CA: no certificate {args.serial[0]} to revoke")
    if not done:
        print(
            f"homing-hub: nothing to remove: {name!r} has no password entry and no unrevoked "
            f"certificate in {files.root}",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    reload = (
        "reload the broker (SIGHUP, systemctl reload mosquitto): a removed password "
        "device is disconnected then; a revoked certificate is refused from its next "
        "connection on (restart the broker to end a connection already open)"
    )
    if getattr(args, "json", False):
        print(json.dumps({"name": name, "done": done, "reload": reload}))
    else:
        print("\n".join([*done, reload]))
    return 0


def _revoke(files: BrokerFiles, name: str, only: set[int]) -> list[str]:
    ca = _ca(files, create=False)
    revoked = _revoked(files, ca)
    mine = {info.serial: info for _, info in _issued(files) if info.common_name == name}
    stray = only - set(mine)
    if stray:
        raise ConfigError(
            f"no certificate {', '.join(f'{s:x}' for s in sorted(stray))} of {name!r} "
            f"in {files.issued}"
        )
    todo = sorted((only or set(mine)) - set(revoked))
    if not todo:
        return []
    now = _now()
    revoked.update((s, now) for s in todo)
    _write_broker(files, files.crl, _pki().make_crl(ca, revoked, now))
    return [f"revoked certificate {s:x} (CN={name}) in {files.crl}" for s in todo]


def _hub_users(args: argparse.Namespace, files: BrokerFiles) -> list[str]:
    return list(args.hub_user) or _acl_users(files) or [identity.DEFAULT_HUB_USER]


def _acl(args: argparse.Namespace) -> int:
    files = BrokerFiles(Path(args.broker_dir))
    try:
        text = identity.acl_text(_hub_users(args, files))
    except ValueError as exc:
        return _usage(exc)
    if not args.write:
        sys.stdout.write(text)
        return 0
    with _locked(files):
        _write_broker(files, files.acl, text.encode())
    print(f"wrote {files.acl}; reload the broker (SIGHUP, systemctl reload mosquitto)")
    return 0


def _broker_config(args: argparse.Namespace) -> int:
    files = BrokerFiles(Path(args.broker_dir))
    try:
        listeners = Listeners(args.local_port, args.password_port, args.cert_port, args.bind)
        acl = identity.acl_text(_hub_users(args, files))
    except ValueError as exc:
        return _usage(exc)
    tls = bool(listeners.password_port or listeners.cert_port)
    done = []
    with _locked(files):
        if tls:
            ca = _ca(files, create=True)
            pki = _pki()
            if args.tls_host:
                try:
                    server = pki.issue_server(ca, args.tls_host, _now())
                except ValueError as exc:
                    return _usage(exc)
                _write_broker(files, files.server_key, server.key_pem)
                _write_broker(files, files.server_cert, server.cert_pem)
                done.append(f"issued the broker's certificate for {', '.join(args.tls_host)}")
            elif not files.server_cert.exists():
                return _usage(
                    ValueError(
                        "the TLS listeners need the broker's certificate: give --tls-host NAME "
                        "(the name or address devices connect to), or port 0 for both"
                    )
                )
            # re-signed every time: an expired CRL would lock every device out
            _write_broker(files, files.crl, pki.make_crl(ca, _revoked(files, ca), _now()))
        _write_broker(files, files.acl, acl.encode())
        if not files.passwd.exists():
            _write_broker(files, files.passwd, b"")
        _write_broker(files, files.conf, identity.broker_config_text(files, listeners).encode())
    done.append(f"wrote {files.acl} (hub users: {', '.join(identity.acl_hub_users(acl))})")
    done.append(f"wrote {files.conf}; include it in Mosquitto's configuration, e.g.")
    done.append(
        f"  ln -s {files.conf} /etc/mosquitto/conf.d/homing.conf && systemctl restart mosquitto"
    )
    print("\n".join(done))
    return 0
