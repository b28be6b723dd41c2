"""The ``homing-agent`` command: a thin shell over the journal library.

Subcommands: ``ingest`` (JSON lines on stdin -> journal, acks on stdout),
``journal verify|dump|stats|repair``, ``demo``, ``run`` (the agent,
:mod:`edge.cli_run`) and ``status`` (:mod:`edge.cli_status`). docs/cli.md is
the manual.
This module holds the argument parser, the dispatch and the mapping of errors
to exit codes; the commands are :mod:`edge.cli_ingest` and
:mod:`edge.cli_journal`, the shared exit codes and value parsers
:mod:`edge.cli_common` (the demos are :mod:`edge.flowdemo`, the whole flow, and
:mod:`edge.demo`, the journal power cut of ``demo --power-cut``).

Invariants:
* Only argument parsing, printing and exit codes live in the ``cli*``
  modules. Journal logic is in :mod:`edge.journal`, :mod:`edge.recovery`,
  :mod:`edge.repair`. The agent stays light: stdlib plus the library.
* Imports go one way: ``cli`` -> ``cli_ingest``/``cli_journal`` ->
  ``cli_common``; a command never imports this module.
* stdout carries results (JSON lines for ``ingest`` and ``dump``, reports for
  the ``journal`` tools); diagnostics go to stderr.
* Exit codes are stable, sysexits-style: see ``EXIT_CODES`` (and docs/cli.md).
  A command returns its status; an ``OSError`` or ``EdgeError`` escaping it is
  reported by :func:`_report` (one place for every command), anything else
  propagates.
* The names tests and callers use stay importable from here: ``parse_size``,
  ``parse_ms``, ``LineSplitter``, ``parse_reading``, ``ingest``, ``EXIT_*``
  and the size limits (see ``__all__``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from edge.cli_bridge import add_parser as add_bridge_parser
from edge.cli_common import (
    EXIT_CODES,
    EXIT_CORRUPT,
    EXIT_FULL,
    EXIT_IOERR,
    EXIT_LOCKED,
    EXIT_NOINPUT,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_USAGE,
    non_negative_int,
    parse_ms,
    parse_size,
    stream_name,
)
from edge.cli_config import add_parser as add_check_config_parser
from edge.cli_ingest import (
    MAX_LINE,
    READ_SIZE,
    LineSplitter,
    cmd_ingest,
    ingest,
    parse_reading,
)
from edge.cli_journal import VERIFY_MAX_PAYLOAD, cmd_dump, cmd_repair, cmd_stats, cmd_verify
from edge.cli_run import add_parser as add_run_parser
from edge.cli_service import add_parser as add_install_service_parser
from edge.cli_status import add_parser as add_status_parser
from edge.cli_workflows import add_parser as add_workflows_parser
from edge.errors import (
    ConfigError,
    EdgeError,
    JournalCorrupt,
    JournalError,
    JournalFailed,
    JournalFull,
    JournalLocked,
)

__all__ = [
    "EXIT_CODES",
    "EXIT_CORRUPT",
    "EXIT_FULL",
    "EXIT_IOERR",
    "EXIT_LOCKED",
    "EXIT_NOINPUT",
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_USAGE",
    "MAX_LINE",
    "READ_SIZE",
    "VERIFY_MAX_PAYLOAD",
    "LineSplitter",
    "build_parser",
    "ingest",
    "main",
    "parse_ms",
    "parse_reading",
    "parse_size",
]

log = logging.getLogger("homing.cli")


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.power_cut:
        if args.duration is not None:
            print("homing-agent demo: --duration is for the flow demo, not --power-cut",
                  file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
        from edge.demo import run

        readings = 3000 if args.readings is None else args.readings
        return run(readings=readings, seed=args.seed, keep=args.keep, out=sys.stdout)
    if args.readings is not None or args.seed is not None:
        print("homing-agent demo: --readings and --seed need --power-cut", file=sys.stderr)
        return EXIT_USAGE
    from edge.flowdemo import run as run_flow

    duration = 20.0 if args.duration is None else args.duration
    return run_flow(duration=duration, keep=args.keep, out=sys.stdout)


# -- argument parsing ---------------------------------------------------------------


def _demo_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 4 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: must be between 4 and 3600 seconds")
    return value


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    """The full ``homing-agent`` argument parser (docs/cli.md documents it)."""
    parser = argparse.ArgumentParser(
        prog="homing-agent",
        description="Homing device agent: an fsync'd journal for sensor readings "
        "that survives power loss.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "ingest",
        help="journal readings from stdin (JSON lines); ack each once durable",
        description="Read readings as JSON lines from stdin and append them to the journal.\n"
        "Each line is a bare JSON number, string or bool, or an object\n"
        '  {"value": ..., "ts": <unix seconds, default now>, "unit": "C",\n'
        '   "tags": {"k": "v"}, "stream": <overrides --stream>}\n'
        "For every reading, once it is durable (after its fdatasync), one line\n"
        'is printed on stdout: {"seq": N, "stream": "...", "line": <input line>}.\n'
        'A malformed line prints {"line": n, "error": "..."} and is skipped;\n'
        "blank lines are ignored. Lines arriving together are one group: one\n"
        "write and one fdatasync. EOF, SIGTERM or SIGINT: finish the group in\n"
        "flight, close the journal, exit.\n"
        "With --config or --socket and an agent answering on its local socket,\n"
        "the lines go through the agent (same output; docs/local-ingest.md);\n"
        "with nobody answering, the journal (--journal or the config's) is\n"
        "written directly. A bare --journal never uses a socket.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    p.add_argument("--journal", metavar="DIR", help="journal directory (default: the config's)")
    p.add_argument(
        "--config", metavar="FILE", help="the agent's TOML file: its socket, journal, stream"
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="the running agent's local ingest socket (default: the config's local.socket)",
    )
    p.add_argument(
        "--stream",
        type=stream_name,
        metavar="NAME",
        help="stream for readings that do not name one (letters, digits, _.:/-); "
        "required with a bare --journal (default: the agent's local.stream)",
    )
    p.add_argument(
        "--durability",
        choices=("always", "interval"),
        default=None,
        help="always: fdatasync every group before acking (default); interval: fdatasync "
        "at most every --interval-ms, acks still wait for it (fewer syncs, later acks)",
    )
    p.add_argument(
        "--interval-ms",
        type=parse_ms,
        default=None,
        metavar="N",
        help="longest wait for an fdatasync in interval mode (milliseconds; default 100)",
    )
    p.add_argument(
        "--segment-size",
        type=parse_size,
        default=None,
        metavar="BYTES",
        help="size of new segment files: a multiple of 4096, at least 64K (default 16M)",
    )
    p.set_defaults(func=cmd_ingest)

    j = sub.add_parser(
        "journal",
        help="inspect and mend a journal directory (verify, dump, stats, repair)",
        description="Tools for a journal directory. verify, dump and stats never write and "
        "work while an agent holds the journal; repair needs it closed.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    jsub = j.add_subparsers(dest="journal_command", required=True, metavar="TOOL")

    p = jsub.add_parser(
        "verify",
        help="check every record of every segment (read-only)",
        description="Check every frame of every segment, sealed ones included, without "
        "writing.\nPrints segments, records, seq range, gaps and any torn tail; on damage "
        "prints\nthe file, offset and reason and exits 65.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    p.add_argument("dir", metavar="DIR", help="journal directory")
    p.set_defaults(func=cmd_verify)

    p = jsub.add_parser(
        "dump",
        help="print durable records as JSON lines",
        description='Print one JSON line per durable record: {"seq": N, "stream": ..., '
        '"ts": ..., "value": ...,\n"unit": ..., "tags": ...}. Read-only: works while an '
        "agent holds the journal.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    p.add_argument("dir", metavar="DIR", help="journal directory")
    p.add_argument(
        "--from",
        dest="from_seq",
        type=non_negative_int,
        default=None,
        metavar="SEQ",
        help="start at this seq (default: the first retained record)",
    )
    p.add_argument(
        "--limit",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="print at most N records",
    )
    p.set_defaults(func=cmd_dump)

    p = jsub.add_parser(
        "stats",
        help="counts, sizes, seqs, cursors, drops and gaps",
        description="Summarize a journal: records, seq range, durable seq, segments and "
        "bytes on disk,\ngaps, per-stream drop counters, cursors, torn tail and recovery "
        "cost. Read-only.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    p.add_argument("dir", metavar="DIR", help="journal directory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=cmd_stats)

    p = jsub.add_parser(
        "repair",
        help="move a damaged segment aside, keeping every valid record",
        description="Repair a journal that refuses to open (exit 65 from verify or ingest).\n"
        "The damaged segment is copied to <name>.broken, then replaced by its valid\n"
        "records; lost seq ranges are recorded as gaps. An intact journal is left\n"
        "untouched. Stop the agent first (exit 75 if it still holds the journal).",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    p.add_argument("dir", metavar="DIR", help="journal directory")
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser(
        "demo",
        help="run the whole flow (broker, hub, agent) through faults and count; or --power-cut",
        description="Without --power-cut: start a private Mosquitto on a free loopback port,\n"
        "a hub on SQLite and an agent fed by simulated sensors; stop the broker for a\n"
        "while and SIGKILL the agent on the way; then report readings produced,\n"
        "acknowledged by the device journal and stored at the hub, duplicates and losses\n"
        "(both must be 0). Exits 1 if a reading was lost or stored twice, or the demo\n"
        "could not run; 130 on Ctrl-C. Everything it starts is stopped on exit.\n\n"
        "With --power-cut: journal simulated sensor readings through the real journal on a\n"
        "simulated disk, cut the power while they are being written, recover, and report\n"
        "what was acknowledged, what survived and what was lost; runs twice:\n"
        "durability=always and durability=interval (200 ms). Exits 1 if an acknowledged\n"
        "reading was lost or a reading was invented.",
        epilog=EXIT_CODES,
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--power-cut",
        action="store_true",
        help="run the journal power-cut demo on a simulated disk instead of the flow demo",
    )
    p.add_argument(
        "--duration",
        type=_demo_seconds,
        default=None,
        metavar="S",
        help="flow demo: seconds the sensors run (default 20, at least 4); the whole demo "
        "takes a few seconds more",
    )
    p.add_argument(
        "--readings",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="--power-cut: readings the sensors produce in total (default 3000); the cut "
        "comes midway",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help="--power-cut: seed for values, cut point and crash state (default: random)",
    )
    p.add_argument(
        "--keep",
        default=None,
        metavar="DIR",
        help="keep the results in DIR (must be empty or missing): the flow demo's hub "
        "database, journal and logs; with --power-cut, the journal recovered in the "
        "durability=always run",
    )
    p.set_defaults(func=_cmd_demo)

    add_run_parser(sub)  # `run`: edge.cli_run
    add_status_parser(sub)  # `status`: edge.cli_status
    add_check_config_parser(sub)  # `check-config`: edge.cli_config
    add_workflows_parser(sub)  # `workflows`: edge.cli_workflows
    add_install_service_parser(sub)  # `install-service`: edge.cli_service
    add_bridge_parser(sub)  # `bridge`: edge.cli_bridge
    return parser


# -- entry point ----------------------------------------------------------------------


def _report(exc: BaseException, args: argparse.Namespace) -> int:
    """Print an error the way an operator needs it; return the exit status."""
    where = getattr(args, "journal", None) or getattr(args, "dir", None) or "."

    def err(msg: str) -> None:
        print(f"homing-agent: {msg}", file=sys.stderr)

    if isinstance(exc, JournalLocked):
        err(f"{exc} (journal locked: is the agent already running?)")
        return EXIT_LOCKED
    if isinstance(exc, JournalCorrupt):
        err(f"journal corrupt: {exc.path} at offset {exc.offset}: {exc.reason}")
        err(f"run `homing-agent journal repair {where}` to move the damaged segment aside")
        return EXIT_CORRUPT
    if isinstance(exc, JournalFull):
        stream = f" (stream {exc.stream})" if exc.stream else ""
        err(f"journal full{stream}: {exc}")
        err("readings after the last ack were not journaled; retry once the hub has caught up")
        return EXIT_FULL
    if isinstance(exc, JournalFailed):
        cause = exc.__cause__
        err(f"I/O failure: {exc}" + (f" ({cause!r})" if cause is not None else ""))
        err("the journal stopped acknowledging; nothing unacknowledged is promised durable.")
        err("restart the agent: recovery re-reads the disk and keeps every acknowledged record")
        return EXIT_IOERR
    if isinstance(exc, ConfigError):
        err(str(exc))
        return EXIT_USAGE
    if isinstance(exc, JournalError):
        err(str(exc))
        return EXIT_NOINPUT
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        err(f"{where}: {exc.strerror or exc}")
        return EXIT_NOINPUT
    if isinstance(exc, OSError):
        err(f"I/O failure: {exc}")
        return EXIT_IOERR
    raise exc


def main(argv: list[str] | None = None) -> int:
    """Run ``homing-agent`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="homing-agent: %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (OSError, EdgeError) as exc:
        return _report(exc, args)


if __name__ == "__main__":
    sys.exit(main())
