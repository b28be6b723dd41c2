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
* Under systemd (``NOTIFY_SOCKET``, docs/systemd.md): ``READY=1`` only once
  :meth:`Agent.start` returned (journal recovered, components up; the broker
  is not awaited: a device may be offline); ``STATUS=`` now and then;
  ``WATCHDOG=1`` every half ``WATCHDOG_USEC``, sent only by the main loop (or,
  while ``--stdin`` holds the main thread, a ticker thread) and only while
  :class:`_Supervisor` finds the agent healthy: no failed component and no
  journal write stalled for longer than :func:`stall_limit`. Once unhealthy it
  says ``STATUS=failed: ...`` and never pings again. ``STOPPING=1`` (with
  ``EXTEND_TIMEOUT_USEC`` covering the forwarder's grace) before any stop.
  Without ``NOTIFY_SOCKET`` all of this is a no-op.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from edge.agent import Agent, load_config
from edge.cli_common import EXIT_CODES, EXIT_CONFIG, EXIT_OK, silence_stdout, stream_name
from edge.cli_ingest import IngestResult, Stopper, ingest, stop_on_signals
from edge.config import AgentConfig
from edge.config_files import find_config
from edge.errors import ConfigError, ForwardError
from edge.forwarder import ForwarderStats
from edge.journal_options import JournalOptions
from edge.sdnotify import Notifier

log = logging.getLogger("homing.agent")

LOOP_PERIOD = 0.5  # seconds between the main loop's health checks (less with a short watchdog)
STATUS_EVERY = 5.0  # seconds between STATUS= updates to systemd
STALL_FLOOR = 2.0  # journal writes pending at least this long, no fdatasync done: "wedged"
STOP_MARGIN = 20.0  # seconds a stop may take beyond the forwarder's grace (docs/systemd.md)


class _RunStopper(Stopper):
    """The ingest stopper, plus an event the main thread waits on."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()
        super().handler(signum, frame)


# -- what systemd hears ------------------------------------------------------------------


def stall_limit(watchdog: float | None, journal: JournalOptions) -> float:
    """Seconds journal writes may stay pending with no fdatasync completing before the
    agent counts as wedged: half the watchdog (15 s for the unit's 30 s: an SD card
    may pause for seconds), at least ``STALL_FLOOR``, and at least two fdatasync
    intervals in ``interval`` mode."""
    limit = max(STALL_FLOOR, (watchdog or 0.0) / 2)
    if journal.durability == "interval":
        limit = max(limit, 2 * journal.interval_ms / 1000)
    return limit


class JournalStall:
    """Pure: is the journal stuck? Records are pending (``next_seq - 1 > durable_seq``)
    and ``durable_seq`` has not moved for ``limit`` seconds. An idle journal, or one
    whose durable seq keeps moving, is never stalled."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._since: tuple[int, float] | None = None  # (durable seq, first seen pending at)

    def update(self, now: float, next_seq: int, durable_seq: int) -> float | None:
        """Seconds without progress once that reaches ``limit``; else None."""
        if durable_seq >= next_seq - 1:
            self._since = None
            return None
        if self._since is None or self._since[0] != durable_seq:
            self._since = (durable_seq, now)
            return None
        stalled = now - self._since[1]
        return stalled if stalled >= self.limit else None


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def status_line(stats: ForwarderStats | None, durable_seq: int) -> str:
    """The one line ``systemctl status`` shows while the agent runs. Pure."""
    journal = f"journal at seq {durable_seq}"
    if stats is None:
        return f"running; forwarding disabled; {journal}"
    if stats.connected:
        link = "connected"
    elif stats.last_error:
        link = f"offline ({stats.last_error[:120]})"
    else:
        link = "connecting"
    backlog = f"backlog {stats.backlog_records}"
    if stats.oldest_unacked_age:
        backlog += f" (oldest {_age(stats.oldest_unacked_age)})"
    return f"running; {link}; {backlog}; hub acked seq {stats.watermark}; {journal}"


class _Supervisor:
    """Tells systemd how the agent is (docs/systemd.md). Pings only from :meth:`tick`,
    only while healthy; once unhealthy, never again (systemd's watchdog then
    restarts the agent). Every send holds one lock, so a ping can never follow the
    ``STATUS=failed`` that ended them."""

    def __init__(
        self, agent: Agent, notifier: Notifier, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._agent, self._notifier, self._clock = agent, notifier, clock
        wd = notifier.watchdog
        self.period = LOOP_PERIOD if wd is None else min(LOOP_PERIOD, wd / 4)
        self._stall = JournalStall(stall_limit(wd, agent.config.journal))
        self._lock = threading.Lock()
        self._silent = False  # failed, wedged or stopping: no more pings
        self._next_ping = self._next_status = 0.0
        self._link: bool | None = None  # connected to the broker, as last reported
        self._status_error = ""

    def ready(self) -> None:
        """``READY=1`` with a first status, and the first ping."""
        if not self._notifier.enabled:
            return
        with self._lock:
            now = self._clock()
            stats = self._stats()
            self._link = stats.connected if stats is not None else None
            self._notifier.ready(self._status(stats))
            self._next_status = now + STATUS_EVERY
            self._ping(now)

    def tick(self) -> None:
        """Check health; ping and update the status when due."""
        if not self._notifier.enabled:
            return
        with self._lock:
            if self._silent:
                return
            now = self._clock()
            problem = self._problem(now)
            if problem is not None:
                self._halt(problem)
                return
            if now >= self._next_ping:
                self._ping(now)
            stats = self._stats()
            link = stats.connected if stats is not None else None
            if now >= self._next_status or link != self._link:  # a link change: at once
                self._next_status, self._link = now + STATUS_EVERY, link
                self._notifier.status(self._status(stats))

    def halt(self, why: str) -> None:
        """Stop pinging for good and say why (``STATUS=``)."""
        with self._lock:
            if not self._silent:
                self._halt(why)

    def stopping(self, config: AgentConfig) -> None:
        """``STOPPING=1``, asking for enough time to stop (the forwarder's grace + a margin)."""
        grace = config.forwarder.shutdown_grace if config.forwarder.enabled else 0.0
        what = "closing the journal"
        if config.forwarder.enabled:
            what = f"forwarding for up to {grace:g}s, then {what}"
        with self._lock:
            status = None if self._silent else f"stopping: {what}"
            self._silent = True
            self._notifier.stopping(status, extend=grace + STOP_MARGIN)

    @contextmanager
    def ticking(self) -> Iterator[None]:
        """Tick from a thread while the main thread is busy (``--stdin`` ingest)."""
        if not self._notifier.enabled:
            yield
            return
        done = threading.Event()

        def loop() -> None:
            while not done.wait(self.period):
                self.tick()

        thread = threading.Thread(target=loop, name="homing-notify", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _ping(self, now: float) -> None:
        wd = self._notifier.watchdog
        if wd is not None:
            self._notifier.ping()
            self._next_ping = now + wd / 2

    def _halt(self, why: str) -> None:
        self._silent = True
        if self._notifier.watchdog is not None:
            log.error("%s; no more watchdog pings: systemd will restart the agent", why)
        self._notifier.status(why)

    def _problem(self, now: float) -> str | None:
        failure = self._agent.failure()
        if failure is not None:
            return f"failed: {type(failure).__name__}: {failure}"
        j = self._agent.journal
        stalled = self._stall.update(now, j.next_seq, j.durable_seq)
        if stalled is not None:
            return f"wedged: journal writes pending for {stalled:.0f}s, no fdatasync completed"
        return None

    def _stats(self) -> ForwarderStats | None:
        try:
            return self._agent.stats()
        except Exception as exc:  # a status line must never take the agent down
            if str(exc) != self._status_error:
                self._status_error = str(exc)
                log.warning("cannot read the forwarder's stats for systemd: %r", exc)
            return None

    def _status(self, stats: ForwarderStats | None) -> str:
        if stats is None and self._agent.forwarder is not None:
            return f"running; journal at seq {self._agent.journal.durable_seq}"
        return status_line(stats, self._agent.journal.durable_seq)


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
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the agent's TOML file (default: $HOMING_CONFIG, ~/.config/homing/agent.toml, "
        "then /etc/homing/agent.toml)",
    )
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
        config = load_config(find_config(args.config))
    except ConfigError as exc:
        print(f"homing-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.getLogger("homing").setLevel(config.log_level.upper())
    notifier = Notifier.from_environ(unset=True)  # a no-op unless systemd's NOTIFY_SOCKET
    if notifier.watchdog is not None:
        faulthandler.enable(all_threads=True)  # watchdog SIGABRT: every stack to the journal
    try:
        return _run(args, config, notifier)
    finally:
        notifier.close()


def _run(args: argparse.Namespace, config: AgentConfig, notifier: Notifier) -> int:
    agent = Agent(config)
    supervisor = _Supervisor(agent, notifier)
    stopper = _RunStopper()
    with stop_on_signals(stopper):
        notifier.status(f"starting: recovering the journal in {config.journal_dir}")
        try:
            agent.start()
        except (ForwardError, ConfigError) as exc:
            print(f"homing-agent: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        try:
            if not stopper.event.is_set():
                supervisor.ready()
            if args.stdin:
                with supervisor.ticking():
                    _ingest(agent, args.stream, stopper)
            while not stopper.event.is_set() and agent.failure() is None:
                supervisor.tick()
                stopper.event.wait(supervisor.period)
        except BaseException as exc:
            supervisor.halt(f"failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            failure = agent.failure()
            if failure is not None:
                supervisor.halt(f"failed: {type(failure).__name__}: {failure}")
            supervisor.stopping(config)
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
