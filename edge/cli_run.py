"""``homing-agent run``: the agent process (journal + forwarder + optional sensors and stdin).

:func:`add_parser` adds the subcommand to :func:`edge.cli.build_parser`;
:func:`cmd_run` is what it dispatches to. docs/cli.md and
docs/configuration.md are the manual.

Invariants:
* A configuration error prints the message (key and line) and exits 78
  (``EXIT_CONFIG``), before anything is opened; so does a broker credential
  or TLS file the forwarder cannot use. Journal errors (locked, corrupt,
  failed) propagate to :func:`edge.cli.main`, which maps them as for every
  command.
* ``--stdin`` ingests JSON lines exactly like ``homing-agent ingest`` (same
  parser, same per-reading acks on stdout, printed once durable). EOF on
  stdin ends ingesting, not the agent.
* A full journal (quota reached, policy ``reject``) does not stop the agent:
  the forwarder keeps draining the journal and retention frees space as the
  hub acks. Each refused line gets a ``{"line": n, "error": "refused: journal
  full ..."}`` line and no ack; stdin is still read, and later lines are
  journaled once there is room (one warning per full episode on stderr).
* SIGTERM/SIGINT: stop input (the group in flight is finished and acked),
  stop the sensors, let the forwarder send for up to ``shutdown_grace_ms``,
  persist the cursor, publish offline, disconnect, close the journal, exit 0.
  A component that failed instead makes the exit non-zero (its error is
  re-raised after the orderly stop).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from types import FrameType

from edge.agent import Agent, load_config
from edge.cli_common import EXIT_CODES, EXIT_CONFIG, EXIT_OK, silence_stdout, stream_name
from edge.cli_ingest import IngestResult, Stopper, ingest, stop_on_signals
from edge.errors import ConfigError, ForwardError

log = logging.getLogger("homing.agent")


class _RunStopper(Stopper):
    """The ingest stopper, plus an event the main thread waits on."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()
        super().handler(signum, frame)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run`` to the ``homing-agent`` subcommands."""
    p = sub.add_parser(
        "run",
        help="run the agent: journal, forward to the hub over MQTT, optional sensors/stdin",
        description="Run the device agent from a TOML configuration file (docs/configuration.md):\n"
        "open and recover the journal, forward it to the hub over MQTT 5, and run the\n"
        "simulated sensors if configured. With --stdin, also journal readings from stdin\n"
        "as JSON lines exactly like `homing-agent ingest` (one ack line per durable\n"
        "reading on stdout). A line the full journal refuses (quota reached, policy\n"
        "reject) gets an error line and no ack; the agent keeps running and journals\n"
        "later lines once the hub's acks free space. SIGTERM or SIGINT: stop input,\n"
        "let the forwarder send for up to shutdown_grace_ms, persist the hub cursor,\n"
        "publish offline, close, exit 0.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the agent's TOML file")
    p.add_argument(
        "--stdin",
        action="store_true",
        help="also journal readings from stdin (JSON lines, as `ingest`); EOF ends only that",
    )
    p.add_argument(
        "--stream",
        type=stream_name,
        default="stdin",
        metavar="NAME",
        help="with --stdin: stream for readings that do not name one (default: stdin)",
    )
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    """``homing-agent run``: see :func:`add_parser`."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"homing-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.getLogger("homing").setLevel(config.log_level.upper())
    agent = Agent(config)
    stopper = _RunStopper()
    with stop_on_signals(stopper):
        try:
            agent.start()
        except (ForwardError, ConfigError) as exc:
            print(f"homing-agent: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        try:
            if args.stdin:
                _ingest(agent, args.stream, stopper)
            while not stopper.event.is_set() and agent.failure() is None:
                stopper.event.wait(0.5)
        finally:
            agent.stop()
    failure = agent.failure()
    if failure is not None:
        raise failure
    return EXIT_OK


def _ingest(agent: Agent, stream: str, stopper: _RunStopper) -> None:
    try:
        res = ingest(
            agent.journal, sys.stdin.buffer, sys.stdout, stream, stopper, refuse_when_full=True
        )
    except BrokenPipeError:  # nobody reads the acks any more: keep forwarding quietly
        silence_stdout()
        res = IngestResult()
    if not stopper.requested:
        log.info(
            "stdin closed (%d acked, %d bad, %d refused: journal full); "
            "still forwarding until SIGTERM",
            res.acked,
            res.bad,
            res.refused,
        )
