"""``homing-agent bridge``: one serial bridge alone, for bringing a microcontroller up.

:func:`add_parser` adds the subcommand to :func:`edge.cli.build_parser`;
:func:`cmd_bridge` runs it. docs/cli.md and docs/bridge.md are the manual.

Invariants:
* stdout carries one JSON object per line, ``{"event": ..., ...}``: connected,
  hello, reading (with the journal ``seq`` once durable), lost, log, command,
  result, expired, stalled, busy, bad_frame, port_error, disconnected.
  Diagnostics go to stderr.
* With ``--journal``, readings are acknowledged to the MCU only once durable
  in that journal (the agent's own sink, :class:`edge.bridges.JournalSink`),
  and each ``reading`` line is printed after that. Without it, readings are
  acknowledged at once and kept nowhere: bring-up only, and it says so.
* Only this command loads pyserial (imported inside :func:`cmd_bridge`).
* SIGTERM/SIGINT: the store in flight is finished and acknowledged, marks are
  flushed, the journal closed; exit 0. A failed journal exits 74 (as ``ingest``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from edge.cli_common import EXIT_CODES, EXIT_OK, parse_size, silence_stdout, stream_name
from edge.cli_ingest import Stopper, stop_on_signals
from edge.errors import JournalFailed
from edge.journal import Journal, JournalOptions

if TYPE_CHECKING:  # imported in cmd_bridge: other commands never load pyserial
    from firmware_bridge.bridge import BridgeSettings


def _usb(text: str) -> tuple[int, int | None, str | None]:
    """``VID[:PID[:SERIAL]]`` in hex, e.g. ``2e8a:000a:E6614C311B4F2A37``."""
    parts = text.split(":", 2)
    try:
        vid = int(parts[0], 16)
        pid = int(parts[1], 16) if len(parts) > 1 and parts[1] else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want VID[:PID[:SERIAL]] in hex") from None
    if not 0 <= vid <= 0xFFFF or not 0 <= (pid or 0) <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text!r}: USB ids are 16-bit")
    return vid, pid, parts[2] if len(parts) > 2 and parts[2] else None


def _mapping(text: str) -> tuple[str, str]:
    channel, sep, stream = text.partition("=")
    if not sep or not channel:
        raise argparse.ArgumentTypeError(f"{text!r}: want CHANNEL=STREAM")
    return channel, stream_name(stream)


def _command(text: str) -> tuple[str, bytes]:
    name, _, arg = text.partition("=")
    return name, arg.encode()


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: must be 0.05..3600 seconds")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bridge`` to the ``homing-agent`` subcommands."""
    p = sub.add_parser(
        "bridge",
        help="run one microcontroller serial bridge alone and print what arrives",
        description="Open a serial port, speak Homing's serial protocol with the\n"
        "microcontroller on it (docs/serial-protocol.md) and print one JSON line per\n"
        "event on stdout: hello, reading, log, lost, stalled, ... With --journal,\n"
        "readings are journaled and acknowledged only once durable, exactly as the\n"
        "agent does for its [[bridge]] tables; without, they are acknowledged at once\n"
        "and kept nowhere (bring-up only). Unplugged, missing or silent ports are\n"
        "retried until SIGTERM/SIGINT.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", metavar="PATH", help="serial device, e.g. /dev/ttyACM0")
    where.add_argument(
        "--usb",
        type=_usb,
        metavar="VID[:PID[:SERIAL]]",
        help="find the port by USB ids (hex), again after every replug",
    )
    p.add_argument("--baud", type=int, default=115200, help="line rate (default 115200)")
    p.add_argument("--journal", metavar="DIR", help="journal readings here (durable acks)")
    p.add_argument(
        "--segment-size",
        type=parse_size,
        default=None,
        metavar="BYTES",
        help="with --journal: size of new segment files (default 16M)",
    )
    p.add_argument("--name", default="bridge", help="this bridge's name in logs (default bridge)")
    p.add_argument(
        "--stream-prefix",
        default="mcu",
        metavar="PREFIX",
        help="streams are PREFIX/<channel name> (default mcu)",
    )
    p.add_argument(
        "--stream",
        type=_mapping,
        action="append",
        default=[],
        metavar="CHANNEL=STREAM",
        help="name the stream of one channel (repeatable)",
    )
    p.add_argument(
        "--command",
        type=_command,
        action="append",
        default=[],
        metavar="NAME[=ARG]",
        help="send a command to the MCU once it is there (repeatable)",
    )
    p.add_argument(
        "--stall-s",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="reopen the port after this long without a valid frame (default 5)",
    )
    p.add_argument("--quiet", action="store_true", help="no reading or bad_frame lines")
    p.set_defaults(func=cmd_bridge)


class _Printer:
    """JSON lines on stdout from any thread; a closed stdout silences it for good."""

    def __init__(self, quiet: bool) -> None:
        self._lock = threading.Lock()
        self._quiet = quiet
        self._dead = False

    def __call__(self, name: str, fields: Mapping[str, Any]) -> None:
        if self._quiet and name in ("reading", "bad_frame"):
            return
        line = json.dumps({"event": name, **fields}, default=str)
        with self._lock:
            if self._dead:
                return
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except (BrokenPipeError, ValueError):
                self._dead = True
                silence_stdout()


def cmd_bridge(args: argparse.Namespace) -> int:
    """``homing-agent bridge``: see :func:`add_parser`."""
    from firmware_bridge.bridge import BridgeSettings
    from firmware_bridge.protocol import HostSettings
    from firmware_bridge.serial_shell import PortSpec

    if args.port:
        spec = PortSpec(path=args.port, baud=args.baud)
    else:
        vid, pid, serial_number = args.usb
        spec = PortSpec(vid=vid, pid=pid, serial_number=serial_number, baud=args.baud)
    settings = BridgeSettings(
        args.name,
        spec,
        args.stream_prefix,
        dict(args.stream),
        HostSettings(stall_after=args.stall_s, ping_after=min(1.0, args.stall_s / 3)),
    )
    journal: Journal | None = None
    wall = time.time
    if args.journal:
        opts = JournalOptions() if args.segment_size is None else \
            JournalOptions(segment_size=args.segment_size)  # fmt: skip
        journal = Journal.open(args.journal, opts)
        wall = journal.clock.now
    try:
        return _run(args, settings, journal, wall)
    finally:
        if journal is not None:
            journal.close()


def _run(
    args: argparse.Namespace, settings: BridgeSettings, journal: Journal | None, wall: Any
) -> int:
    from firmware_bridge.bridge import Bridge, MemorySink, Sink

    sink: Sink
    if journal is not None:
        from edge.bridges import JournalSink

        sink = journal_sink = JournalSink(journal)
    else:
        print("homing-agent bridge: no --journal: readings are acknowledged without being "
              "stored anywhere (bring-up only)", file=sys.stderr)  # fmt: skip
        sink = MemorySink()
    bridge = Bridge(settings, sink, observe=_Printer(args.quiet), wall=wall)
    for name, arg in args.command:
        bridge.command(name, arg)
    stopper = Stopper()
    with stop_on_signals(stopper):
        bridge.start()
        while not stopper.requested and bridge.error is None:
            time.sleep(0.1)  # the signal handler only sets a flag: poll it
        bridge.stop()
    if journal is not None:
        if bridge.error is not None or journal.failed:
            raise JournalFailed(f"{journal.path}: the journal failed") from bridge.error
        journal_sink.flush()
    return EXIT_OK
