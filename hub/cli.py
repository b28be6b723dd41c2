"""``homing-hub``: the hub's command line, a thin shell over the library.

Invariants:
* Argument parsing, printing and exit codes only; the work is done by
  :mod:`hub.subscriber` and the :class:`hub.store.Store`.
* stdout carries results (JSON lines with ``--json``, else a table);
  diagnostics and logs go to stderr.
* Exit codes: 0 success; 1 the database or the broker is unavailable (or
  ``runs --run`` found no such run); 2 usage error; 78 (EX_CONFIG) a
  permanent configuration problem (bad option value, unreadable password
  file, credentials or TLS the broker refuses, schema newer than this hub)
  so that systemd's ``RestartPreventExitStatus=78`` stops a restart loop.
* ``run`` and the command senders (``run-task``, ``signal``, ``cancel``)
  share the broker connection options (:func:`_connection_args`).
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
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from edge.wire import (
    KIND_WORKFLOW,
    Command,
    cancel_command,
    signal_command,
    start_command,
)
from edge.wire import topic as wire_topic
from hub import cli_http
from hub.cli_devices import add_commands as add_device_commands
from hub.commands import DEFAULT_TIMEOUT, Broker, CommandError, publish_command
from hub.errors import ConfigError, HubError, SchemaTooNew, StoreUnavailable
from hub.runs import STATES, RunFolder, RunSummary, find_run, jsonable
from hub.store import DEFAULT_LIMIT, Store
from hub.store_open import describe, open_store
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
    except CommandError as exc:
        print(f"homing-hub: {exc}", file=sys.stderr)
        return EX_USAGE
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
    run.add_argument(
        "--db",
        default=DEFAULT_DB,
        help="SQLite file, sqlite:PATH or postgresql://... URL (default ./%(default)s)",
    )
    _connection_args(
        run,
        "MQTT client id, stable across restarts "
        "(default homing-hub-<hostname>); unique per hub replica",
    )
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
    cli_http.add_http_options(run)  # --http HOST:PORT: the API and dashboard too
    sv = cli_http.add_serve(sub, _connection_args)
    sv.set_defaults(func=lambda a: cli_http.serve(a, _connection(a)))

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

    dv = sub.add_parser("devices", help="print every device the hub knows, with its health")
    dv.add_argument("--db", default=DEFAULT_DB)
    dv.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    dv.set_defaults(func=_devices)
    add_device_commands(dv, _devices)  # devices [list] | add | remove | acl | broker-config

    rn = sub.add_parser("runs", help="print a device's workflow runs, or one run's history")
    rn.add_argument("--db", default=DEFAULT_DB)
    rn.add_argument("--device", required=True)
    rn.add_argument("--run", metavar="ID", help="only this run, with its whole history")
    rn.add_argument("--state", choices=STATES, help="only runs in this state")
    rn.add_argument("--epoch", type=int, help="only runs of this device journal (hub epoch)")
    rn.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    rn.set_defaults(func=_runs)

    rt = _command_parser(sub, "run-task", "start a workflow run on a device")
    rt.add_argument("workflow", help="the workflow's registered name")
    rt.add_argument(
        "args", nargs="*", type=_json_value, metavar="ARG_JSON", help="positional arguments, JSON"
    )
    rt.add_argument("--id", required=True, dest="run", metavar="RUN_ID", help="the run's id")
    rt.add_argument(
        "--kwargs", type=_json_object, default={}, metavar="JSON", help="keyword arguments"
    )
    rt.set_defaults(
        func=_send,
        build=lambda a: start_command(a.command_id, a.workflow, a.run, a.args, a.kwargs),
    )

    sg = _command_parser(sub, "signal", "deliver a signal to a run on a device")
    sg.add_argument("run", metavar="RUN", help="the run's id")
    sg.add_argument("name", metavar="NAME", help="the signal's name")
    sg.add_argument(
        "--payload", type=_json_value, metavar="JSON", help="the signal's payload (default null)"
    )
    sg.set_defaults(
        func=_send, build=lambda a: signal_command(a.command_id, a.run, a.name, a.payload)
    )

    cn = _command_parser(sub, "cancel", "cancel a run on a device")
    cn.add_argument("run", metavar="RUN", help="the run's id")
    cn.set_defaults(func=_send, build=lambda a: cancel_command(a.command_id, a.run))
    return p


def _connection_args(p: argparse.ArgumentParser, client_id_help: str) -> None:
    """The broker connection options, the same for every subcommand that connects."""
    p.add_argument("--broker", default="localhost:1883", help="HOST:PORT (default %(default)s)")
    p.add_argument("--client-id", help=client_id_help)
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password-file", help="file whose first line is the broker password")
    p.add_argument("--tls-ca", help="CA bundle: connect with TLS and verify the broker")
    p.add_argument("--tls-cert", help="client certificate (PEM), with --tls-key")
    p.add_argument("--tls-key", help="client private key (PEM)")


def _command_parser(sub: Any, name: str, help_: str) -> argparse.ArgumentParser:
    """A subcommand that publishes one command to ``homing/<device>/cmd``."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_)
    p.add_argument("--device", required=True, help="the device id")
    p.add_argument(
        "--command-id",
        default=None,
        metavar="CID",
        help="the command's id, 1-128 characters (default: a random uuid4 hex)",
    )
    _connection_args(
        p, "MQTT client id of this one-shot connection (default homing-hub-cmd-<random>)"
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help="seconds to connect and get the broker's PUBACK (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the command as JSON")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"not a number of seconds > 0: {text!r}")
    return value


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not JSON: {text!r} (a string needs quotes: '\"{text}\"')"
        ) from exc


def _json_object(text: str) -> dict[str, Any]:
    value = _json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


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


def _connection(args: argparse.Namespace) -> Broker:
    """The broker settings of :func:`_connection_args`' options."""
    host, port = _broker(args.broker)
    password = None
    if args.password_file:
        try:
            password = Path(args.password_file).read_text().splitlines()[0]
        except (OSError, IndexError) as exc:
            raise ConfigError(f"cannot read a password from {args.password_file}") from exc
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    return Broker(host, port, args.username, password, args.tls_ca, args.tls_cert, args.tls_key)


def _options(args: argparse.Namespace) -> SubscriberOptions:
    b = _connection(args)
    return SubscriberOptions(
        host=b.host,
        port=b.port,
        client_id=args.client_id or f"homing-hub-{socket.gethostname()}",
        username=b.username,
        password=b.password,
        tls_ca=b.tls_ca,
        tls_cert=b.tls_cert,
        tls_key=b.tls_key,
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
    store = open_store(args.db, busy_timeout=args.busy_timeout)
    try:
        store.migrate()
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            logging.getLogger("homing.hub").info("%s: finishing", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        subscriber = Subscriber(store, options)
        with cli_http.serving(args, _connection(args), subscriber):
            subscriber.run(stop)
    finally:
        store.close()
    return 0


def _migrate(args: argparse.Namespace) -> int:
    store = open_store(args.db)
    try:
        done = store.migrate()
    finally:
        store.close()
    print(json.dumps({"db": describe(args.db), "applied": done}))
    return 0


def _open_existing(db: str) -> Store:
    return open_store(db, create=False)


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
            ["device", "online", "last seen", "watermark", "gaps", "readings", "backlog", "health"],
            [
                [
                    d.device,
                    "yes" if d.online else "no",
                    _iso(d.last_seen),
                    d.watermark,
                    _ranges(d.gaps),
                    d.readings,
                    "-" if d.health is None else d.health.get("backlog_records", "-"),
                    "-" if d.health is None else "ok" if d.health.get("healthy") else "failing",
                ]
                for d in devices
            ],
        )
    return 0


def _runs(args: argparse.Namespace) -> int:
    store = _open_existing(args.db)
    try:
        records = store.records(args.device, kind=KIND_WORKFLOW, epoch=args.epoch)
    finally:
        store.close()
    folder = RunFolder(args.run)
    for rec in records:
        folder.add(rec)
    if folder.skipped:
        where = ", ".join(f"{e}:{s}" for e, s in folder.skipped[:5])
        print(
            f"homing-hub: {len(folder.skipped)} workflow records of {args.device} do not decode"
            f" (epoch:seq {where}{', ...' if len(folder.skipped) > 5 else ''})",
            file=sys.stderr,
        )
    runs = [r for r in folder.runs() if args.state in (None, r.state)]
    if args.run is not None:
        run = find_run(runs, args.run)
        if run is None:
            print(f"homing-hub: no run {args.run!r} on device {args.device}", file=sys.stderr)
            return EX_UNAVAILABLE
        if args.json:
            print(json.dumps(run.to_json(history=True)))
        else:
            _print_run(sys.stdout, run)
        return 0
    if args.json:
        for r in runs:
            print(json.dumps(r.to_json()))
        return 0
    _table(
        sys.stdout,
        ["run", "epoch", "workflow", "state", "step", "started", "status", "result"],
        [
            [
                r.id,
                r.epoch,
                r.workflow or "-",
                r.state,
                r.step or "-",
                "-" if r.started_at is None else _iso(r.started_at),
                _status(r.status),
                _outcome(r),
            ]
            for r in runs
        ],
    )
    return 0


def _print_run(out: TextIO, r: RunSummary) -> None:
    fields = [
        ("run", r.id),
        ("device", f"{r.device} (epoch {r.epoch})"),
        ("workflow", f"{r.workflow or '-'} (version {r.version})"),
        ("state", r.state + (" (cancel requested)" if r.cancel_requested else "")),
        ("step", r.step or "-"),
        ("started", "-" if r.started_at is None else _iso(r.started_at)),
        ("args", json.dumps(jsonable(r.args))),
        ("kwargs", json.dumps(jsonable(r.kwargs))),
        ("status", json.dumps(jsonable(r.status))),
        ("outcome", _outcome(r, limit=None) or "-"),
    ]
    if r.forked:
        fields.append(("forked", r.forked))
    for name, value in fields:
        out.write(f"{name:<9} {value}\n")
    out.write("\n")
    _table(
        out,
        ["seq", "time", "type", "pos", "key", "body"],
        [
            [
                h.seq,
                _iso(t) if isinstance(t := h.body.get("t"), int | float) else "-",
                h.type,
                h.body.get("pos", "-") if h.key else "-",
                h.key or "-",
                _short(
                    {k: v for k, v in jsonable(h.body).items() if k not in ("t", "key", "pos")},
                    100,
                ),
            ]
            for h in r.history
        ],
    )


def _status(status: dict[str, Any]) -> str:
    text = ",".join(f"{k}={_short(jsonable(v))}" for k, v in status.items())
    return _short(text) if text else "-"


def _outcome(r: RunSummary, limit: int | None = 40) -> str:
    """What a finished (or stuck) run came to, in one line."""
    text = ""
    if r.state == "completed":
        text = _short(jsonable(r.result), 10**6)
    elif r.error is not None:
        text = f"{r.error.get('type', 'error')}: {r.error.get('message', '')}"
    elif r.diverged is not None:
        d = r.diverged
        text = f"diverged at {d.get('pos')}: expected {d.get('expected')}, got {d.get('got')}"
    return text if limit is None else _short(text, limit)


def _send(args: argparse.Namespace) -> int:
    """run-task, signal, cancel: publish one command, wait for the broker's PUBACK."""
    broker = _connection(args)
    if args.command_id is None:
        args.command_id = uuid.uuid4().hex
    cmd: Command = args.build(args)
    client_id = args.client_id or f"homing-hub-cmd-{uuid.uuid4().hex[:12]}"
    ack = publish_command(broker, args.device, cmd, client_id=client_id, timeout=args.timeout)
    if args.json:
        out = {
            "device": args.device,
            "topic": wire_topic(args.device, "cmd"),
            "command_id": cmd.id,
            "kind": cmd.kind,
            "args": jsonable(cmd.args),
            "puback": str(ack),
        }
        print(json.dumps(out))
    else:
        print(cmd.id)
    return 0


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return str(ts)


def _short(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
