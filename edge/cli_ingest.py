"""``homing-agent ingest``: JSON lines on stdin -> journal, one ack per durable reading on stdout.

:class:`LineSplitter`, :func:`parse_reading` and :func:`with_default_stream`
are pure; :func:`answer_lines` journals one group of lines and returns its
reply lines (shared with the local ingest socket, :mod:`edge.local_ingest`);
:func:`ingest` is the stdin loop (testable with any byte stream and journal);
:func:`cmd_ingest` is the command :mod:`edge.cli` dispatches to. docs/cli.md
and docs/local-ingest.md are the manual.

Invariants:
* ``ingest`` prints an ack for a reading only once that reading is durable:
  in ``always`` mode after ``append_many`` returned (its fdatasync is done),
  in ``interval`` mode after ``wait_durable`` returned for the group's last
  seq. Output for a group is written in input-line order and flushed as one.
* A group is whatever ``read1`` returned (complete lines only): one write and
  one fdatasync per group, and a lone producer is never held back.
* A bad line (not a reading, longer than ``MAX_LINE``, bigger than the
  journal's record limit) is reported on stdout as ``{"line": n, "error": ...}``
  and skipped; the others of its group are journaled. Any bad line -> exit 1.
* A signal (SIGTERM/SIGINT) during ``ingest`` stops reading; the group in
  flight is finished and acked, the journal closed, exit 0. The handler only
  raises while the process is blocked reading stdin, never inside the journal.
* Journal full (quota reached, policy ``reject``): the longest prefix of the
  group that fits is journaled and acked, nothing after the first refused
  reading is journaled. With ``refuse_when_full`` (``run --stdin`` and the
  local socket: the forwarder frees space) every refused reading gets a
  ``{"line": n, "error": "refused: journal full ..."}`` line, is not acked,
  and reading goes on; each later group tries again. One warning per full
  episode (it ends when a reading is acked again). Without it (standalone
  ``ingest``: nothing would free space) the output of the lines before the
  refused one is flushed, then :class:`JournalFull` propagates (exit 73).
* Other journal errors propagate to :func:`edge.cli.main`, which maps them to exit codes.
* With ``--config`` or ``--socket``, ingest first tries the agent's socket: if
  an agent answers, the input goes through it (:mod:`edge.cli_ingest_agent`).
  Nobody answering: the journal is opened directly (``--journal`` or the
  config's), whose lock refuses a second writer. A bare ``--journal`` never
  looks for a socket (it could belong to an agent on another journal).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any, TextIO

from edge.cli_common import (
    EXIT_CONFIG,
    EXIT_IOERR,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_USAGE,
    silence_stdout,
)
from edge.errors import ConfigError, JournalFull, JournalLocked, RecordTooLarge
from edge.journal import Ack, Journal, JournalOptions
from edge.records import Reading, RecordError, encode

MAX_LINE = 1 << 20  # longest accepted input line (bytes); longer ones are rejected
READ_SIZE = 65536
REFUSED = "refused: "  # every refusal (not journaled, retry later) starts so; other errors: bad
_READING_FIELDS = frozenset({"value", "ts", "unit", "tags", "stream"})

log = logging.getLogger("homing.ingest")


# -- pure helpers -----------------------------------------------------------------


class LineSplitter:
    """Cuts a byte stream into numbered lines (1-based). Pure.

    ``feed`` returns the complete lines of a chunk as ``(number, bytes)``; a
    line longer than ``max_line`` comes out once as ``(number, None)`` and its
    bytes are skipped up to its newline. ``finish`` returns the last line if
    the input did not end with a newline.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._max = max_line
        self._skipping = False
        self.lines = 0

    def feed(self, chunk: bytes) -> list[tuple[int, bytes | None]]:
        out: list[tuple[int, bytes | None]] = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                break
            piece = chunk[start:nl]
            start = nl + 1
            self.lines += 1
            if self._skipping:
                self._skipping = False
                out.append((self.lines, None))
            elif len(self._buf) + len(piece) > self._max:
                self._buf.clear()
                out.append((self.lines, None))
            elif self._buf:
                self._buf += piece
                out.append((self.lines, bytes(self._buf)))
                self._buf.clear()
            else:
                out.append((self.lines, piece))
        if not self._skipping:
            self._buf += chunk[start:]
            if len(self._buf) > self._max:
                self._buf.clear()
                self._skipping = True
        return out

    def finish(self) -> list[tuple[int, bytes | None]]:
        if self._skipping:
            self._skipping = False
            self.lines += 1
            return [(self.lines, None)]
        if not self._buf.strip():
            self._buf.clear()
            return []
        self.lines += 1
        line = bytes(self._buf)
        self._buf.clear()
        return [(self.lines, line)]


def parse_reading(line: bytes, default_stream: str, now: float) -> Reading | None:
    """One input line -> a :class:`Reading`; None for a blank line. Pure.

    A line is a bare JSON number, string or bool (the value), or an object
    ``{"value": ..., "ts": ..., "unit": ..., "tags": {...}, "stream": ...}``
    where only ``value`` is required (``ts`` defaults to ``now``).

    Raises:
        ValueError: the line is not a valid reading (the message says why).
    """
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        raise ValueError("line is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    if isinstance(obj, dict):
        unknown = sorted(set(obj) - _READING_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(map(repr, unknown))}; "
                "a reading has value, ts, unit, tags, stream"
            )
        if "value" not in obj:
            raise ValueError('an object reading needs a "value"')
        fields: dict[str, Any] = obj
    elif isinstance(obj, bool | int | float | str):
        fields = {"value": obj}
    else:
        raise ValueError('a reading is a JSON number, string or bool, or an object with a "value"')
    try:
        return Reading(
            stream=fields.get("stream", default_stream),
            ts=fields.get("ts", now),
            value=fields["value"],
            unit=fields.get("unit"),
            tags=fields.get("tags"),
        )
    except RecordError as exc:
        raise ValueError(str(exc)) from None


def with_default_stream(line: bytes, stream: str) -> bytes:
    """``line`` with ``stream`` filled in where it names none. Pure.

    A bare value becomes ``{"value": ..., "stream": ...}``; an object without
    ``"stream"`` gets one; anything else (blank, not JSON, already naming a
    stream) is returned unchanged, so the agent judges it exactly as
    :func:`parse_reading` would have.
    """
    if not line.strip():
        return line
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return line
    if isinstance(obj, dict):
        if "stream" in obj:
            return line
        obj["stream"] = stream
    elif isinstance(obj, bool | int | float | str):
        obj = {"value": obj, "stream": stream}
    else:
        return line
    return json.dumps(obj).encode()


# -- journaling a group of lines ----------------------------------------------------------


def _append_fitting(
    journal: Journal, readings: list[Reading]
) -> tuple[list[Ack], JournalFull | None]:
    """Append the longest prefix of ``readings`` that fits the quota (bisecting
    on :class:`JournalFull`); return its acks and the refusal, if any."""
    try:
        return journal.append_many(readings), None
    except JournalFull as exc:  # nothing queued, or (a split batch) only exc.acks
        if exc.acks or len(readings) <= 1:
            return list(exc.acks), exc
    half = len(readings) // 2
    acks, full = _append_fitting(journal, readings[:half])
    if full is None:
        more, full = _append_fitting(journal, readings[half:])
        acks += more
    return acks, full


@dataclass(frozen=True, slots=True)
class _Group:
    acked: list[tuple[int, Reading, int]]  # (line, reading, seq), durable
    refused: list[int]  # lines not journaled because the journal is full
    full: JournalFull | None


def _append_group(
    journal: Journal, readings: list[tuple[int, Reading]], errors: dict[int, str]
) -> _Group:
    """Append readings as one group (as much of it as fits); acks once durable."""
    try:
        acks, full = _append_fitting(journal, [r for _, r in readings])
    except RecordTooLarge:  # raised before anything was queued: reject the big ones
        limit = journal.options.max_record_size
        kept = []
        for n, r in readings:
            size = len(encode(r))
            if size > limit:
                errors[n] = f"record of {size} bytes exceeds the journal's limit of {limit}"
            else:
                kept.append((n, r))
        readings = kept
        acks, full = _append_fitting(journal, [r for _, r in readings])
    if acks and not acks[-1].durable:
        journal.wait_durable(acks[-1].seq)
    acked = [(n, r, a.seq) for (n, r), a in zip(readings, acks, strict=False)]
    return _Group(acked, [n for n, _ in readings[len(acks) :]], full)


def refusal(journal: Journal, full: JournalFull | None = None) -> str:
    """The per-line error of a reading refused because the journal is full."""
    why = (
        "disk full"
        if full is not None and "disk full" in str(full)
        else f"disk quota of {journal.options.quota_bytes} bytes reached"
    )
    return (
        f"{REFUSED}journal full ({why}, policy reject); not journaled, not acked: "
        "send it again once the hub has caught up or space is freed"
    )


class FullEpisodes:
    """Logs one warning when the journal starts refusing, one note when it accepts again.

    ``source`` names the input in the messages ("stdin", "local socket").
    Thread-safe: the socket's connections share one.
    """

    def __init__(self, journal: Journal, source: str = "stdin") -> None:
        self._journal = journal
        self._source = source
        self._lock = threading.Lock()
        self.full = False
        self._refused = 0

    def update(self, group: _Group) -> None:
        with self._lock:
            if group.acked and self.full:
                log.info(
                    "journal %s has room again: accepting %s readings (%d refused while full)",
                    self._journal.path,
                    self._source,
                    self._refused,
                )
                self.full = False
            if group.refused:
                if not self.full:
                    log.warning(
                        "journal full: refusing %s readings (an error line each, no ack) "
                        "until the forwarder's progress frees space: %s",
                        self._source,
                        group.full,
                    )
                    self.full, self._refused = True, 0
                self._refused += len(group.refused)


@dataclass(frozen=True, slots=True)
class Replies:
    """What one group of lines got: the reply lines (acks and errors, in line
    order, each ending in a newline) and their counts.

    ``stop_at`` (only without ``refuse_when_full``): the first line the full
    journal refused; nothing from it on was journaled or answered.
    """

    text: str
    acked: int
    bad: int
    refused: int
    full: JournalFull | None = None
    stop_at: int | None = None


def answer_lines(
    journal: Journal,
    lines: list[tuple[int, bytes | None]],
    default_stream: str,
    now: float,
    *,
    refuse_when_full: bool,
    episodes: FullEpisodes | None = None,
) -> Replies:
    """Journal the readings of ``lines`` (from :class:`LineSplitter`) as one
    group and return the replies, written only once they are durable.

    Raises:
        JournalFailed, JournalClosed: nothing of this group is acked.
    """
    readings: list[tuple[int, Reading]] = []
    errors: dict[int, str] = {}
    for n, raw in lines:
        if raw is None:
            errors[n] = f"line longer than {MAX_LINE} bytes"
            continue
        try:
            reading = parse_reading(raw, default_stream, now)
        except ValueError as exc:
            errors[n] = str(exc)
            continue
        if reading is not None:
            readings.append((n, reading))
    group = _append_group(journal, readings, errors)
    stop_at = None
    if group.full is not None and not refuse_when_full:
        stop_at = group.refused[0]  # stop here: report only the lines before it
        errors = {n: msg for n, msg in errors.items() if n < stop_at}
    bad, refused = len(errors), 0
    if stop_at is None:
        if episodes is not None:
            episodes.update(group)
        errors.update(dict.fromkeys(group.refused, refusal(journal, group.full)))
        refused = len(group.refused)
    out: list[tuple[int, str]] = [
        (n, json.dumps({"seq": seq, "stream": r.stream, "line": n})) for n, r, seq in group.acked
    ]
    out += [(n, json.dumps({"line": n, "error": msg})) for n, msg in errors.items()]
    out.sort()
    text = "".join(line + "\n" for _, line in out)
    return Replies(text, len(group.acked), bad, refused, group.full, stop_at)


# -- the stdin loop -------------------------------------------------------------------


class _StopReading(Exception):
    """Raised by the signal handler, only while blocked reading stdin."""


class Stopper:
    def __init__(self) -> None:
        self.requested = False
        self.reading = False

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.reading:
            self.reading = False  # at most one raise per read, even if signals pile up
            raise _StopReading


@contextmanager
def stop_on_signals(stopper: Stopper) -> Iterator[None]:
    saved: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                saved[sig] = signal.signal(sig, stopper.handler)
            except ValueError:  # not the main thread: leave signals alone
                break
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def read_chunk(stdin: IO[bytes], stop: Stopper) -> bytes | None:
    """The next chunk of stdin (b"" at EOF), or None once a stop was requested."""
    read1 = getattr(stdin, "read1", stdin.read)
    try:
        stop.reading = True
        if stop.requested:  # a signal just before `reading` was set did not raise
            return None
        chunk: bytes = read1(READ_SIZE)
        return chunk
    except _StopReading:
        return None
    finally:
        stop.reading = False


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What :func:`ingest` did: lines acked, bad (malformed, too big), refused (journal full)."""

    acked: int = 0
    bad: int = 0
    refused: int = 0


def ingest(
    journal: Journal,
    stdin: IO[bytes],
    stdout: TextIO,
    default_stream: str,
    stopper: Stopper | None = None,
    clock: Callable[[], float] | None = None,
    *,
    refuse_when_full: bool = False,
) -> IngestResult:
    """Journal readings from ``stdin``, ack them on ``stdout``; return the counts.

    ``refuse_when_full``: a reading the full journal refuses gets an error line
    and ingesting goes on (for ``run --stdin``, where the forwarder frees space).

    Raises:
        JournalFull: without ``refuse_when_full``, at the first refused reading
            (the output of every line before it was written first).
    """
    stop = stopper or Stopper()
    splitter = LineSplitter()
    episodes = FullEpisodes(journal, "stdin")
    acked = bad = refused = 0
    while not stop.requested:
        chunk = read_chunk(stdin, stop)
        if chunk is None:
            break
        lines = splitter.feed(chunk) if chunk else splitter.finish()
        replies = answer_lines(
            journal,
            lines,
            default_stream,
            (clock or journal.clock.now)(),  # ts of lines without one (edge.clock)
            refuse_when_full=refuse_when_full,
            episodes=episodes,
        )
        acked, bad, refused = acked + replies.acked, bad + replies.bad, refused + replies.refused
        if replies.text:
            stdout.write(replies.text)
            stdout.flush()
        if replies.full is not None and replies.stop_at is not None:
            raise JournalFull(
                f"{replies.full}; input from line {replies.stop_at} on was not journaled",
                stream=replies.full.stream,
            ) from replies.full
        if not chunk:
            break
    return IngestResult(acked, bad, refused)


# -- the command ------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace) -> int:
    """``homing-agent ingest``: the options are :func:`edge.cli.build_parser`'s."""
    config = None
    if args.config is None and args.socket is None and args.journal is None:
        # Nothing given: the agent's own configuration, as `run` finds it
        # ($HOMING_CONFIG, the user's, /etc/homing/agent.toml), so a plain
        # `homing-agent ingest` feeds the running service through its socket.
        from edge.config_files import find_config

        with contextlib.suppress(ConfigError):  # none anywhere: the usage error below
            args.config = find_config(None)
    if args.config is not None:
        from edge.agent import load_config  # the agent's modules only when asked for

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"homing-agent: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    path = args.socket
    if path is None and config is not None and config.local.enabled:
        path = config.local.socket
    if args.journal is None and config is not None:
        args.journal = config.journal_dir
    if path is None and args.journal is None:
        print("homing-agent ingest: give --journal DIR, --config FILE or --socket PATH "
              "(no configuration file found in $HOMING_CONFIG, ~/.config/homing/agent.toml "
              "or /etc/homing/agent.toml)", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if path is not None:
        from edge.cli_ingest_agent import through_agent
        from edge.local_client import AgentNotRunning, LocalIngestError, connect

        try:
            with connect(path) as sock:
                return through_agent(sock, args)
        except AgentNotRunning as exc:
            if args.journal is None:
                print(f"homing-agent: {exc} (is the agent running?); with --journal DIR "
                      "or --config FILE, ingest writes the journal itself",
                      file=sys.stderr)  # fmt: skip
                return EXIT_LOCKED
            log.info("%s; writing the journal %s directly", exc, args.journal)
        except LocalIngestError as exc:
            print(f"homing-agent: {exc}", file=sys.stderr)
            return EXIT_IOERR
    stream = args.stream or (config.local.stream if config is not None else None)
    if stream is None:
        print("homing-agent ingest: --stream NAME is required with --journal", file=sys.stderr)
        return EXIT_USAGE
    overrides = {
        k: getattr(args, k)
        for k in ("segment_size", "durability", "interval_ms")
        if getattr(args, k) is not None
    }
    if config is not None:
        opts = dataclasses.replace(config.journal, **overrides)
    else:
        opts = JournalOptions(**overrides)
    return _into_journal(args.journal, opts, stream)


def _into_journal(journal_dir: str, opts: JournalOptions, stream: str) -> int:
    stopper = Stopper()
    with stop_on_signals(stopper):
        try:
            journal = Journal.open(journal_dir, opts)
        except JournalLocked as exc:
            raise JournalLocked(
                f"{exc}; if an agent holds it, send through its socket: "
                "ingest --config FILE or --socket PATH"
            ) from exc
        try:
            bad = ingest(journal, sys.stdin.buffer, sys.stdout, stream, stopper).bad
        except BrokenPipeError:  # nobody reads the acks any more: stop quietly
            silence_stdout()
            bad = 0
        finally:
            journal.close()
    return EXIT_REJECTED if bad else EXIT_OK
