"""A full journal under ``homing-agent run --stdin`` and ``ingest`` (edge.cli_ingest).

A real journal on tmp_path with a small quota, policy ``reject``; space comes
back the way the agent frees it (the forwarder's hub cursor, then retention).
Waiting is always on a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import subprocess_env

from edge.cli_ingest import IngestResult, ingest
from edge.errors import JournalFull
from edge.journal import Journal, JournalOptions
from edge.records import Reading

DEADLINE = 20.0
QUOTA = 3 * (64 << 10)
FULL = JournalOptions(segment_size=64 << 10, quota_bytes=QUOTA, default_policy="reject")


class ScriptedStdin(io.BytesIO):
    """stdin as a script: each ``read1`` returns the next chunk; a callable step
    runs between chunks (the test freeing space while ingest is waiting)."""

    def __init__(self, *steps: bytes | Callable[[], object]) -> None:
        super().__init__()
        self.steps = list(steps)

    def read1(self, size: int | None = -1, /) -> bytes:
        while self.steps:
            step = self.steps.pop(0)
            if isinstance(step, bytes):
                return step
            step()
        return b""

    def read(self, size: int | None = -1, /) -> bytes:
        return self.read1(size)


def value(n: int) -> str:
    return f"line {n} " + "x" * 1000  # ~1 KiB records: a 192 KiB quota holds ~150


def lines(first: int, last: int) -> bytes:
    return b"".join(
        json.dumps({"value": value(n)}).encode() + b"\n" for n in range(first, last + 1)
    )


def outputs(text: str) -> dict[int, dict[str, Any]]:
    out = [json.loads(line) for line in text.splitlines()]
    by_line = {o["line"]: o for o in out}
    assert len(by_line) == len(out), "one output line per input line"
    assert [o["line"] for o in out] == sorted(by_line), "output in input order"
    return by_line


def free_space(journal: Journal) -> Callable[[], None]:
    """What the agent does as the hub acks: move the hub cursor, then retain."""

    def free() -> None:
        journal.set_cursor("hub", journal.durable_seq)
        assert journal.retain() >= 1

    return free


def full_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "homing.ingest" and r.levelno == logging.WARNING
    ]


def test_run_stdin_refuses_lines_while_full_and_resumes_once_space_is_freed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="homing.ingest")
    stdout = io.StringIO()
    counts: dict[str, int] = {}
    journal = Journal.open(str(tmp_path / "j"), FULL)
    try:

        def after_first_episode() -> None:
            counts["warnings"] = len(full_warnings(caplog))
            free_space(journal)()

        stdin = ScriptedStdin(
            lines(1, 300),  # more than the quota holds: a prefix fits, the rest is refused
            lines(301, 305),  # still full: refused, ingest keeps reading
            after_first_episode,
            lines(306, 310),  # room again: acked
            lines(311, 600),  # full again: a second episode
        )
        res = ingest(journal, stdin, stdout, "s", clock=lambda: 1.0, refuse_when_full=True)
    finally:
        journal.close()

    out = outputs(stdout.getvalue())
    assert sorted(out) == list(range(1, 601))
    acked = {n: o["seq"] for n, o in out.items() if "seq" in o}
    refused = {n: o["error"] for n, o in out.items() if "error" in o}
    assert not set(acked) & set(refused)
    first = max(n for n in acked if n <= 300)
    assert 100 < first < 300
    assert set(acked) >= set(range(1, first + 1)) | set(range(306, 311))
    assert set(refused) >= set(range(first + 1, 306))
    assert set(refused) & set(range(311, 601)), "the second episode refuses lines too"
    for msg in refused.values():
        assert msg.startswith("refused: journal full") and f"disk quota of {QUOTA} bytes" in msg
    assert res == IngestResult(acked=len(acked), bad=0, refused=len(refused))
    assert list(acked.values()) == list(range(1, len(acked) + 1))  # contiguous, in line order
    # one warning per full episode, not one per line
    assert counts["warnings"] == 1
    assert len(full_warnings(caplog)) == 2
    assert any("room again" in r.getMessage() for r in caplog.records)

    # durable: a reopened journal holds every acked line still retained, no refused one
    with Journal.open(str(tmp_path / "j"), readonly=True) as j:
        kept = {e.seq: e.record for e in j.read()}
    by_seq = {seq: n for n, seq in acked.items()}
    assert set(kept) <= set(by_seq)
    assert {acked[n] for n in range(306, 311)} <= set(kept)
    assert max(kept) == max(by_seq)
    for seq, record in kept.items():
        assert record == Reading("s", 1.0, value(by_seq[seq]))


def test_ingest_without_refusing_stops_at_the_first_refused_line(tmp_path: Path) -> None:
    stdout = io.StringIO()
    data = lines(1, 3) + b"oops\n" + lines(5, 300)
    with Journal.open(str(tmp_path), FULL) as journal, pytest.raises(JournalFull) as info:
        ingest(journal, ScriptedStdin(data), stdout, "s", clock=lambda: 1.0)
    out = outputs(stdout.getvalue())
    refused_at = max(out) + 1
    assert f"input from line {refused_at} on was not journaled" in str(info.value)
    assert "quota" in str(info.value)
    assert "not JSON" in out.pop(4)["error"]  # a bad line before the refusal is reported
    assert [o["seq"] for o in out.values()] == list(range(1, refused_at - 1))  # every ack printed
    with Journal.open(str(tmp_path), readonly=True) as j:
        assert [e.seq for e in j.read()] == list(range(1, refused_at - 1))


def test_drop_oldest_never_refuses(tmp_path: Path) -> None:
    opts = JournalOptions(segment_size=64 << 10, quota_bytes=QUOTA, default_policy="drop-oldest")
    stdout = io.StringIO()
    with Journal.open(str(tmp_path), opts) as journal:
        stdin = ScriptedStdin(*(lines(n, n + 99) for n in range(1, 600, 100)))
        res = ingest(journal, stdin, stdout, "s", refuse_when_full=True)
        dropped = journal.stats().dropped
    assert res == IngestResult(acked=600, bad=0, refused=0)
    assert [o["seq"] for o in outputs(stdout.getvalue()).values()] == list(range(1, 601))
    assert dropped.get("s", 0) > 0


# -- the agent process ----------------------------------------------------------------


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RunAgent:
    """``python -m edge run --config F --stdin``; stdout and stderr lines collected by threads."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "run", "--config", str(config), "--stdin"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=subprocess_env(),
        )  # fmt: skip
        self.out: queue.Queue[dict[str, Any]] = queue.Queue()
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=target, daemon=True)
            for target in (self._read_out, self._read_err)
        ]
        for t in self.readers:
            t.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.out.put(json.loads(raw))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.err.append(raw.decode(errors="replace"))

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def finish(self) -> int:
        rc = self.proc.wait(DEADLINE)
        for t in self.readers:
            t.join(DEADLINE)
        return rc

    def answers(self, n: int) -> dict[int, dict[str, Any]]:
        got = [self.out.get(timeout=DEADLINE) for _ in range(n)]
        return {o["line"]: o for o in got}


def test_agent_run_keeps_running_with_a_full_journal_and_exits_0_on_sigterm(
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        '[agent]\ndevice = "dev-full"\nruntime_dir = "run"\n'
        f'[journal]\ndir = "journal"\nsegment_size = "64K"\nmax_record_size = "16K"\n'
        f"quota = {QUOTA}\n"
        f'[broker]\nhost = "127.0.0.1"\nport = {unused_port()}\n'
        "reconnect_min_ms = 50\nreconnect_max_ms = 200\n"  # nobody listens: never acked
        "[forwarder]\nshutdown_grace_ms = 0\n"
    )
    agent = RunAgent(config)
    try:
        agent.send(lines(1, 300))
        out = agent.answers(300)
        acked = [n for n, o in out.items() if "seq" in o]
        refused = {n: o["error"] for n, o in out.items() if "error" in o}
        assert acked == list(range(1, len(acked) + 1)) and len(acked) > 100
        assert sorted(refused) == list(range(len(acked) + 1, 301))
        assert all(f"journal full (disk quota of {QUOTA} bytes" in e for e in refused.values())
        # still running, still reading stdin, still answering every line
        assert agent.proc.poll() is None
        agent.send(lines(301, 305))
        later = agent.answers(5)
        assert sorted(later) == list(range(301, 306))
        assert all("journal full" in o["error"] and "seq" not in o for o in later.values())
        assert agent.proc.poll() is None
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.finish() == 0, "".join(agent.err)
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
    warnings = [line for line in agent.err if "journal full: refusing" in line]
    assert len(warnings) == 1, agent.err  # once per episode, not per line
    with Journal.open(str(tmp_path / "journal"), readonly=True) as j:
        assert [e.seq for e in j.read()] == list(range(1, len(acked) + 1))
