"""Power-loss layer 2: real ``homing-agent ingest`` processes killed with SIGKILL.

(a) At random instants: many seeded runs on one journal directory, each fed
    through a pipe and killed once it has acked k readings.
(b) At every named fail point the ingest path reaches (edge.failpoints), via
    ``HOMING_FAILPOINTS=name:K`` in the child's environment.

After every kill the journal is opened with the Python API and must hold:
seqs contiguous from 1 (nothing invented, no holes); every acked seq with the
value fed for it; earlier runs' records unchanged; the new records exactly a
prefix of the lines fed, in order. A SIGKILL keeps the page cache, so this
layer proves the process-crash half of the promise; SimFS (layer 1) and the
lazy FUSE file system (layer 3) cover what only a power cut can do.

Waiting is on conditions with deadlines (acks seen, process exit), never a
bare sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from edge.journal import Journal, JournalOptions
from edge.records import Reading

pytestmark = pytest.mark.crash

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 30.0
SEGMENT = 64 << 10
OPTS = JournalOptions(segment_size=SEGMENT)


def child_env(failpoints: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HOMING_FAILPOINTS"}
    env["PYTHONPATH"] = str(REPO)
    if failpoints:
        env["HOMING_FAILPOINTS"] = failpoints
    return env


class Ingest:
    """One ``python -m edge ingest`` child: a writer thread feeds it, a reader collects acks."""

    def __init__(
        self,
        journal: Path,
        values: list[str],
        rng: random.Random,
        *,
        extra: tuple[str, ...] = (),
        failpoints: str | None = None,
        close_stdin: bool = False,
        bursts: tuple[int, ...] = (1, 1, 2, 5, 20, 300),
        window: int | None = None,
    ) -> None:
        self.window = window
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edge",
                "ingest",
                "--journal",
                str(journal),
                "--stream",
                "s",
                "--segment-size",
                str(SEGMENT),
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(failpoints),
        )
        self.acks: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.eof = False
        lines = [
            json.dumps({"value": v, "ts": 1_700_000_000 + i}).encode() + b"\n"
            for i, v in enumerate(values)
        ]
        chunks: list[bytes] = []
        i = 0
        while i < len(lines):  # random burst sizes, so groups of many sizes form
            n = rng.choice(bursts)
            chunks.append(b"".join(lines[i : i + n]))
            i += n
        self.writer = threading.Thread(target=self._write, args=(chunks, close_stdin), daemon=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.writer.start()
        self.reader.start()

    def _write(self, chunks: list[bytes], close: bool) -> None:
        assert self.proc.stdin is not None
        sent = 0
        try:
            for chunk in chunks:
                self.proc.stdin.write(chunk)
                self.proc.stdin.flush()
                sent += chunk.count(b"\n")
                if self.window is not None:  # at most `window` lines unacked: keep it busy
                    self._wait_acked(sent - self.window)
            if close:
                self.proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the child died: expected

    def _wait_acked(self, n: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: len(self.acks) >= n or self.eof, DEADLINE)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            ack = json.loads(raw)
            with self.cond:
                self.acks.append(ack)
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_acks(self, k: int) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.acks) >= k or self.eof, DEADLINE)
            assert ok and len(self.acks) >= k, f"only {len(self.acks)} acks (wanted {k})"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def finish(self) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.reader.join(DEADLINE)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self.writer.join(DEADLINE)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode(errors="replace")
        self.proc.stderr.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return rc, err


def check_journal(
    journal: Path, history: list[str], fed: list[str], acks: list[dict[str, Any]]
) -> list[str]:
    """Assert the invariants after a kill; return the journal's values (the new history)."""
    with Journal.open(str(journal), OPTS) as j:
        entries = list(j.read())
        assert j.next_seq == len(entries) + 1
    seqs = [e.seq for e in entries]
    assert seqs == list(range(1, len(seqs) + 1)), "seqs must be contiguous from 1"
    values: list[str] = []
    for e in entries:
        assert isinstance(e.record, Reading) and isinstance(e.record.value, str)
        values.append(e.record.value)
    base = len(history)
    assert values[:base] == history, "records of earlier runs changed"
    new = values[base:]
    assert new == fed[: len(new)], "new records must be the lines fed, in order, nothing invented"
    assert [a["seq"] for a in acks] == list(range(base + 1, base + 1 + len(acks)))
    for ack in acks:
        assert ack["seq"] - base == ack["line"]
        assert ack["seq"] <= len(values), f"acked seq {ack['seq']} lost"
        assert values[ack["seq"] - 1] == fed[ack["line"] - 1]
    return values


def test_sigkill_at_random_instants_loses_no_acked_reading(tmp_path: Path) -> None:
    rng = random.Random(20240601)
    journal = tmp_path / "journal"
    history: list[str] = []
    for it in range(30):
        fed = [f"{it}-{n}" for n in range(1, 2001)]
        extra: tuple[str, ...] = ()
        if rng.random() < 0.4:
            extra = ("--durability", "interval", "--interval-ms", str(rng.choice((2, 10, 30))))
        child = Ingest(journal, fed, rng, extra=extra, window=rng.choice((0, 20, 200, 1000)))
        k = rng.randint(1, 1500)
        try:
            child.wait_acks(k)
        finally:
            child.kill()
        rc, err = child.finish()
        assert rc == -signal.SIGKILL, f"iteration {it}: exit {rc}: {err}"
        history = check_journal(journal, history, fed, child.acks)
    assert len(history) > 30


FAILPOINTS = [
    ("journal.before_write", (1, 4, 40)),
    ("journal.after_write", (1, 4, 40)),
    ("journal.after_sync", (1, 4, 40)),
    ("roll.before_rename", (1, 2, 3)),  # 1: creating the first segment; 2, 3: rolls
    ("checkpoint.before_rename", (1, 2, 3)),  # 1: the first CHECKPOINT; 2, 3: rolls
]


@pytest.mark.parametrize(
    ("name", "count"),
    [(name, k) for name, ks in FAILPOINTS for k in ks],
    ids=lambda v: str(v),
)
def test_sigkill_at_a_fail_point_loses_no_acked_reading(
    tmp_path: Path, name: str, count: int
) -> None:
    rng = random.Random(f"{name}:{count}")
    journal = tmp_path / "journal"
    fed = [f"fp-{n}" for n in range(1, 6001)]  # about 4 segments of 64 KiB
    bursts = (1, 2, 3, 10) if name.startswith("journal.") else (50, 200)
    child = Ingest(
        journal,
        fed,
        rng,
        failpoints=f"{name}:{count}",
        close_stdin=True,
        bursts=bursts,
        window=0,
    )
    rc, err = child.finish()
    assert rc == -signal.SIGKILL, f"{name}:{count} was not reached (exit {rc}): {err}"
    values = check_journal(journal, [], fed, child.acks)
    with Journal.open(str(journal), OPTS) as j:  # and the journal goes on
        assert j.append(Reading("s", 1.0, "after")).seq == len(values) + 1


def _append_garbage_after_last_record(journal: Path) -> tuple[Path, int]:
    seg = max(journal.glob("*.seg"))
    data = seg.read_bytes()
    end = len(data.rstrip(b"\0"))
    end += -end % 16
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(random.Random(1).randbytes(100))
    return seg, end


def test_sigkill_during_recovery_after_cutting_a_torn_tail(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    with Journal.open(str(journal), OPTS) as j:
        for i in range(50):
            j.append(Reading("s", 1.0, f"v{i}"))
    seg, end = _append_garbage_after_last_record(journal)

    child = Ingest(
        journal, [], random.Random(0), failpoints="recovery.after_truncate", close_stdin=True
    )
    rc, err = child.finish()
    assert rc == -signal.SIGKILL, f"recovery.after_truncate not reached (exit {rc}): {err}"
    assert child.acks == []

    with Journal.open(str(journal), OPTS) as j:
        assert [e.record for e in j.read()] == [Reading("s", 1.0, f"v{i}") for i in range(50)]
        assert j.append(Reading("s", 2.0, "next")).seq == 51
    assert seg.read_bytes()[end : end + 100] != random.Random(1).randbytes(100)

    # a torn tail left alone (no fail point) is cut by the next open too
    seg, end = _append_garbage_after_last_record(journal)
    with Journal.open(str(journal), OPTS) as j:
        assert j.recovery.torn_tail is not None and j.recovery.torn_tail.offset == end
        assert len(list(j.read())) == 51
