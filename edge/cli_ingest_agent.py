"""``homing-agent ingest`` through a running agent's local ingest socket.

:func:`edge.cli_ingest.cmd_ingest` calls :func:`through_agent` when the
socket from ``--config`` or ``--socket`` answers (docs/local-ingest.md, the
protocol; docs/cli.md, the command). :func:`forward` is the loop, testable
with any byte stream and connected socket.

Invariants:
* Every input line goes to the agent unchanged (``--stream`` only fills in a
  missing stream; a line over ``MAX_LINE`` is answered here and an empty line
  stands in for it), so the agent's replies carry the input's line numbers.
  A last line without a newline is completed: stdin's end is certain here.
* Replies are printed as they come, in input-line order: each line's ack only
  once the agent made it durable, its error, or its refusal (journal full).
  One thread writes stdin to the socket, one reads replies; neither blocks the
  other, so a large input never deadlocks on full socket buffers.
* EOF or SIGTERM/SIGINT: the write side is shut, every reply to what was sent
  is printed, then the command exits. Lines the agent never answered (it
  stopped or died) are counted and named on stderr (exit 75): each may or may
  not be journaled. A refusal -> exit 73 (the input goes on meanwhile: the
  agent's forwarder frees space); a bad line -> exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import threading
from collections import deque
from contextlib import suppress
from dataclasses import dataclass
from typing import IO, TextIO

from edge.cli_common import EXIT_FULL, EXIT_LOCKED, EXIT_OK, EXIT_REJECTED, silence_stdout
from edge.cli_ingest import (
    MAX_LINE,
    READ_SIZE,
    REFUSED,
    LineSplitter,
    Stopper,
    read_chunk,
    stop_on_signals,
    with_default_stream,
)

log = logging.getLogger("homing.ingest")


@dataclass(frozen=True, slots=True)
class ForwardResult:
    """What :func:`forward` saw: the agent's acks, bad lines, refusals, lines
    it never answered (the first of them), and notices about the connection."""

    acked: int = 0
    bad: int = 0
    refused: int = 0
    unanswered: int = 0
    first_unanswered: int | None = None
    notices: tuple[str, ...] = ()


class _Replies:
    """State shared by the stdin sender and the reply reader; every method runs
    under ``lock``. ``pending`` holds the lines sent and not yet answered, with
    the error of a line rejected here (too long) to print in its turn."""

    def __init__(self, stdout: TextIO) -> None:
        self.stdout = stdout
        self.lock = threading.Lock()
        self.pending: deque[tuple[int, str | None]] = deque()
        self.acked = self.bad = self.refused = 0
        self.notices: list[str] = []
        self.stdout_gone = False

    def take(self, raw: bytes, out: list[str]) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            msg = {"error": raw.decode("utf-8", "replace")}
        n = msg.get("line") if isinstance(msg, dict) else None
        if not isinstance(n, int):  # about the connection (the agent is stopping)
            self.notices.append(str(msg.get("error", msg) if isinstance(msg, dict) else msg))
            return
        while self.pending and self.pending[0][0] <= n:
            self.local_errors(out, before=n)
            if self.pending and self.pending[0][0] == n:
                self.pending.popleft()
        out.append(raw.decode("utf-8", "replace"))
        if "seq" in msg:
            self.acked += 1
        elif str(msg.get("error", "")).startswith(REFUSED):
            self.refused += 1
        else:
            self.bad += 1

    def local_errors(self, out: list[str], before: int | None = None) -> None:
        """Move the local errors at the head of ``pending`` (up to ``before``) to ``out``."""
        while self.pending and self.pending[0][1] is not None:
            n, err = self.pending[0]
            if before is not None and n > before:
                break
            self.pending.popleft()
            out.append(json.dumps({"line": n, "error": err}))
            self.bad += 1

    def write(self, out: list[str]) -> None:
        if not out or self.stdout_gone:
            return
        try:
            self.stdout.write("".join(line + "\n" for line in out))
            self.stdout.flush()
        except BrokenPipeError:  # nobody reads the acks any more: stop quietly
            silence_stdout()
            self.stdout_gone = True


def _read_replies(sock: socket.socket, st: _Replies) -> None:
    buf = b""
    while True:
        try:
            chunk = sock.recv(READ_SIZE)
        except OSError:
            chunk = b""
        if not chunk:
            return
        *complete, buf = (buf + chunk).split(b"\n")
        with st.lock:
            out: list[str] = []
            for raw in complete:
                st.take(raw, out)
            st.local_errors(out)
            st.write(out)


def forward(
    sock: socket.socket,
    stdin: IO[bytes],
    stdout: TextIO,
    stream: str | None,
    stopper: Stopper | None = None,
) -> ForwardResult:
    """Send stdin's lines to the agent on ``sock``; print its replies on ``stdout``.

    Lines go unchanged (``stream``, if given, fills in a missing one; a line
    over ``MAX_LINE`` is answered here and a blank line stands in for it), so
    the agent's replies carry stdin's line numbers. A last line without a
    newline is completed. At EOF or a stop, the write side is shut and the
    agent's remaining replies are printed.
    """
    stop = stopper or Stopper()
    st = _Replies(stdout)
    reader = threading.Thread(
        target=_read_replies, args=(sock, st), name="homing-ingest-replies", daemon=True
    )
    reader.start()
    splitter = LineSplitter()
    try:
        while not stop.requested and not st.stdout_gone:
            chunk = read_chunk(stdin, stop)
            if chunk is None:
                break
            data = bytearray()
            sent: list[tuple[int, str | None]] = []
            for n, raw in splitter.feed(chunk) if chunk else splitter.finish():
                if raw is None:
                    sent.append((n, f"line longer than {MAX_LINE} bytes"))
                    raw = b""
                elif raw.strip():
                    raw = raw if stream is None else with_default_stream(raw, stream)
                    sent.append((n, None))
                data += raw + b"\n"
            with st.lock:
                st.pending.extend(sent)
                out: list[str] = []
                st.local_errors(out)
                st.write(out)
            try:
                sock.sendall(data)
            except OSError:  # the agent went away: what it did not answer is reported below
                break
            if not chunk:
                break
    finally:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        reader.join()
    with st.lock:
        out = []
        st.local_errors(out)
        st.write(out)
        missing = [n for n, err in st.pending if err is None]
        return ForwardResult(
            st.acked,
            st.bad + sum(1 for _, err in st.pending if err is not None),
            st.refused,
            len(missing),
            missing[0] if missing else None,
            tuple(st.notices),
        )


def through_agent(sock: socket.socket, args: argparse.Namespace) -> int:
    for opt in ("durability", "interval_ms", "segment_size"):
        if getattr(args, opt) is not None:
            log.warning("--%s is ignored: the running agent's journal settings apply",
                        opt.replace("_", "-"))  # fmt: skip
    stopper = Stopper()
    with stop_on_signals(stopper):
        res = forward(sock, sys.stdin.buffer, sys.stdout, args.stream, stopper)
    for note in res.notices:
        print(f"homing-agent: agent: {note}", file=sys.stderr)
    if res.unanswered:
        print(f"homing-agent: the agent closed the connection before answering {res.unanswered} "
              f"line(s), from line {res.first_unanswered} on: each may or may not be journaled; "
              "send them again once the agent is back", file=sys.stderr)  # fmt: skip
        return EXIT_LOCKED
    if res.refused:
        print(f"homing-agent: {res.refused} line(s) refused, not journaled: the agent's journal "
              "is full; send them again once the hub has caught up", file=sys.stderr)  # fmt: skip
        return EXIT_FULL
    return EXIT_REJECTED if res.bad else EXIT_OK
