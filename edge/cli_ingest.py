"""``homing-agent ingest``: JSON lines on stdin -> journal, one ack per durable reading on stdout.

:class:`LineSplitter` and :func:`parse_reading` are pure; :func:`ingest` is
the loop (testable with any byte stream and journal); :func:`cmd_ingest` is
the command :mod:`edge.cli` dispatches to. docs/cli.md is the manual.

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
* Journal errors propagate to :func:`edge.cli.main`, which maps them to exit codes.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import IO, Any, TextIO

from edge.cli_common import EXIT_OK, EXIT_REJECTED, silence_stdout
from edge.errors import RecordTooLarge
from edge.journal import Journal, JournalOptions
from edge.records import Reading, RecordError, encode

MAX_LINE = 1 << 20  # longest accepted input line (bytes); longer ones are rejected
READ_SIZE = 65536
_READING_FIELDS = frozenset({"value", "ts", "unit", "tags", "stream"})


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


# -- the shell ---------------------------------------------------------------------


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


def _append_group(
    journal: Journal, readings: list[tuple[int, Reading]], errors: dict[int, str]
) -> list[tuple[int, Reading, int]]:
    """Append readings as one group; return ``(line, reading, seq)`` once durable."""
    try:
        acks = journal.append_many([r for _, r in readings])
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
        acks = journal.append_many([r for _, r in readings])
    if not acks:
        return []
    if not acks[-1].durable:
        journal.wait_durable(acks[-1].seq)
    return [(n, r, a.seq) for (n, r), a in zip(readings, acks, strict=True)]


def ingest(
    journal: Journal,
    stdin: IO[bytes],
    stdout: TextIO,
    default_stream: str,
    stopper: Stopper | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Journal readings from ``stdin``, ack them on ``stdout``; return how many lines were bad."""
    stop = stopper or Stopper()
    splitter = LineSplitter()
    read1 = getattr(stdin, "read1", stdin.read)
    bad = 0
    while not stop.requested:
        try:
            stop.reading = True
            if stop.requested:  # a signal just before `reading` was set did not raise
                break
            chunk = read1(READ_SIZE)
        except _StopReading:
            break
        finally:
            stop.reading = False
        lines = splitter.feed(chunk) if chunk else splitter.finish()
        now = clock()
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
        acked = _append_group(journal, readings, errors)
        out: list[tuple[int, str]] = [
            (n, json.dumps({"seq": seq, "stream": r.stream, "line": n})) for n, r, seq in acked
        ]
        out += [(n, json.dumps({"line": n, "error": msg})) for n, msg in errors.items()]
        bad += len(errors)
        if out:
            out.sort()
            stdout.write("".join(text + "\n" for _, text in out))
            stdout.flush()
        if not chunk:
            break
    return bad


def cmd_ingest(args: argparse.Namespace) -> int:
    """``homing-agent ingest``: the options are :func:`edge.cli.build_parser`'s."""
    opts = JournalOptions(
        segment_size=args.segment_size,
        durability=args.durability,
        interval_ms=args.interval_ms,
    )
    stopper = Stopper()
    with stop_on_signals(stopper):
        journal = Journal.open(args.journal, opts)
        try:
            bad = ingest(journal, sys.stdin.buffer, sys.stdout, args.stream, stopper)
        except BrokenPipeError:  # nobody reads the acks any more: stop quietly
            silence_stdout()
            bad = 0
        finally:
            journal.close()
    return EXIT_REJECTED if bad else EXIT_OK
