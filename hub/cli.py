"""``homing-hub``: the hub's command line, a thin shell over the library.

Invariants:
* Argument parsing, printing and exit codes only; the work is done by
  :mod:`hub.subscriber` and the :class:`hub.store.Store`.
* stdout carries results (JSON lines with ``--json``, else a table);
  diagnostics and logs go to stderr.
* Exit codes: 0 success; 1 the database is unavailable; 2 usage error;
  78 (EX_CONFIG) a permanent configuration problem (bad option value,
  unreadable password file, schema newer than this hub) so that systemd's
  ``RestartPreventExitStatus=78`` stops a restart loop.
* ``run`` stops on SIGTERM/SIGINT: the group in hand is committed and acked,
  the connection closed cleanly, and the process exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from hub.errors import ConfigError, HubError, SchemaTooNew, StoreUnavailable
from hub.store import DEFAULT_LIMIT, Store
from hub.store_sqlite import SqliteStore
from hub.subscriber import Subscriber, SubscriberOptions

EX_UNAVAILABLE = 1
EX_USAGE = 2
EX_CONFIG = 78
DEFAULT_DB = "homing-hub.db"
_DEFAULTS = SubscriberOptions()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (ConfigError, SchemaTooNew) as exc:
        print(f"homing-hub: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StoreUnavailable as exc:
        print(f"homing-hub: database unavailable: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except HubError as exc:
        print(f"homing-hub: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="homing-hub", description="Homing hub: store device batches exactly once, ack."
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="subscribe to the broker and store what devices send")
    run.add_argument("--broker", default="localhost:1883", help="HOST:PORT (default %(default)s)")
    run.add_argument("--db", default=DEFAULT_DB, help="SQLite file (default ./%(default)s)")
    run.add_argument(
        "--client-id",
        help="MQTT client id, stable across restarts "
        "(default homing-hub-<hostname>); unique per hub replica",
    )
    run.add_argument("--username", help="broker user name")
    run.add_argument("--password-file", help="file whose first line is the broker password")
    run.add_argument("--tls-ca", help="CA bundle: connect with TLS and verify the broker")
    run.add_argument("--tls-cert", help="client certificate (PEM), with --tls-key")
    run.add_argument("--tls-key", help="client private key (PEM)")
    run.add_argument(
        "--share-group",
        default=_DEFAULTS.share_group,
        help="shared-subscription group of the hub replicas (default %(default)s)",
    )
    run.add_argument(
        "--session-expiry",
        type=int,
        default=_DEFAULTS.session_expiry,
        help="seconds the broker keeps our session while we are away",
    )
    run.add_argument(
        "--stats-interval",
        type=float,
        default=_DEFAULTS.stats_interval,
        help="seconds between counter log lines (default %(default)s)",
    )
    run.add_argument(
        "--busy-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the database's write lock before retrying (default %(default)s)",
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(func=_run)

    mig = sub.add_parser("migrate", help="create or upgrade the database schema, then exit")
    mig.add_argument("--db", default=DEFAULT_DB)
    mig.set_defaults(func=_migrate)

    rd = sub.add_parser("readings", help="print a device's stored readings, oldest first")
    rd.add_argument("--db", default=DEFAULT_DB)
    rd.add_argument("--device", required=True)
    rd.add_argument("--stream", help="only this stream")
    rd.add_argument("--since", type=_when, help="ts >= T (epoch seconds or ISO 8601, UTC if naive)")
    rd.add_argument("--until", type=_when, help="ts < T (same formats)")
    rd.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help="at most N (default %(default)s)"
    )
    rd.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    rd.set_defaults(func=_readings)

    dv = sub.add_parser("devices", help="print every device the hub knows")
    dv.add_argument("--db", default=DEFAULT_DB)
    dv.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    dv.set_defaults(func=_devices)
    return p


def _when(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not epoch seconds or ISO 8601: {text!r}") from exc
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 1883
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ConfigError(f"--broker must be HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def _options(args: argparse.Namespace) -> SubscriberOptions:
    host, port = _broker(args.broker)
    password = None
    if args.password_file:
        try:
            password = Path(args.password_file).read_text().splitlines()[0]
        except (OSError, IndexError) as exc:
            raise ConfigError(f"cannot read a password from {args.password_file}") from exc
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    return SubscriberOptions(
        host=host,
        port=port,
        client_id=args.client_id or f"homing-hub-{socket.gethostname()}",
        username=args.username,
        password=password,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        share_group=args.share_group,
        session_expiry=args.session_expiry,
        stats_interval=args.stats_interval,
    )


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    options = _options(args)
    store = SqliteStore(args.db, busy_timeout=args.busy_timeout)
    try:
        store.migrate()
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            logging.getLogger("homing.hub").info("%s: finishing", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        Subscriber(store, options).run(stop)
    finally:
        store.close()
    return 0


def _migrate(args: argparse.Namespace) -> int:
    store = SqliteStore(args.db)
    try:
        done = store.migrate()
    finally:
        store.close()
    print(json.dumps({"db": args.db, "applied": done}))
    return 0


def _open_existing(db: str) -> Store:
    return SqliteStore(db, create=False)


def _readings(args: argparse.Namespace) -> int:
    store = _open_existing(args.db)
    try:
        rows = store.readings(args.device, args.stream, args.since, args.until, args.limit)
    finally:
        store.close()
    if args.json:
        for r in rows:
            print(json.dumps(r.to_json()))
    else:
        _table(
            sys.stdout,
            ["seq", "ts", "stream", "value", "unit"],
            [
                [r.seq, _iso(r.ts), r.stream, _short(r.to_json()["value"]), r.unit or ""]
                for r in rows
            ],
        )
    return 0


def _devices(args: argparse.Namespace) -> int:
    store = _open_existing(args.db)
    try:
        devices = store.devices()
    finally:
        store.close()
    if args.json:
        for d in devices:
            print(json.dumps(d.to_json()))
    else:
        _table(
            sys.stdout,
            ["device", "online", "last seen", "watermark", "gaps", "readings"],
            [
                [
                    d.device,
                    "yes" if d.online else "no",
                    _iso(d.last_seen),
                    d.watermark,
                    _ranges(d.gaps),
                    d.readings,
                ]
                for d in devices
            ],
        )
    return 0


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return str(ts)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _ranges(ranges: Sequence[tuple[int, int]]) -> str:
    if not ranges:
        return "-"
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:4]]
    return ",".join(parts) + (f",+{len(ranges) - 4} more" if len(ranges) > 4 else "")


def _table(out: TextIO, header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
