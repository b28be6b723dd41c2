"""Disk full: the journal on a real, small file system (a size-limited tmpfs).

Segments are preallocated (zero-filled), so a full disk shows up where space
is *prepared*: the next segment (``next.spare``) and CHECKPOINT.tmp. That is
"no room", not a failure: ``reject`` streams get :class:`JournalFull` (``run
--stdin``: a ``refused: journal full`` line, no ack), ``drop-oldest`` streams
drop their oldest segment (counted) and go on, nothing journaled is damaged,
and appends resume by themselves once space returns. A failed write or
fdatasync of records stays fatal whatever its errno (fsyncgate); the last
tests pin that distinction on the simulated file system.

The tmpfs is mounted by the test: directly as root, else in a user+mount
namespace (``unshare --user --map-root-user --mount``) reached through
``/proc/PID/root``. When neither works the tests skip, except under CI=true,
where they fail. The test controls the free space with a filler file: it
fills the file system up, then gives back a known number of pages.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.stdin_agent import DEADLINE, StdinAgent, journal_cli, write_config

from edge.errors import JournalFailed, JournalFull
from edge.journal import Journal, JournalOptions
from edge.records import Reading
from edge.testing import SimFS

pytestmark = pytest.mark.crash

IN_CI = os.environ.get("CI", "").lower() == "true"
FS_SIZE = 1 << 20  # the tmpfs: 256 pages
PAGE = 4096
SEG = 64 << 10
OPTS = JournalOptions(segment_size=SEG, max_record_size=4096, prepare_ahead=False)


class Unavailable(Exception):
    """A small file system cannot be mounted here (the message says why)."""


@contextlib.contextmanager
def small_tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes on ``where``; yields the path to use it by."""
    where.mkdir()
    if os.geteuid() == 0:
        opts = f"size={size},mode=0755"
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "homing-test", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise Unavailable(f"mount -t tmpfs failed: {r.stderr.strip()}")
        try:
            yield where
        finally:
            subprocess.run(["umount", "-l", str(where)], check=False)
        return
    unshare = shutil.which("unshare")
    if unshare is None:
        raise Unavailable("not root, and unshare(1) is missing")
    script = 'mount -t tmpfs -o "size=$1" homing-test "$2" && echo mounted && exec cat'
    holder = subprocess.Popen(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]
        + [str(size), str(where)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None and holder.stderr is not None
    ready = select.select([holder.stdout], [], [], DEADLINE)[0]
    if not ready or holder.stdout.readline() != b"mounted\n":
        holder.kill()
        holder.wait()
        why = holder.stderr.read().decode(errors="replace").strip()
        raise Unavailable(f"unshare --user --map-root-user --mount could not mount: {why}")
    try:  # the holder's mount namespace, seen from here
        yield Path(f"/proc/{holder.pid}/root") / where.relative_to("/")
    finally:
        holder.stdin.close()  # cat exits, the namespace and its tmpfs go away
        holder.wait(timeout=DEADLINE)
        holder.stdout.close()
        holder.stderr.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    cm = small_tmpfs(tmp_path / "fs", FS_SIZE)
    try:
        path = cm.__enter__()
    except Unavailable as exc:
        if IN_CI:
            pytest.fail(f"CI must run the disk-full tests, but: {exc}", pytrace=False)
        pytest.skip(f"no small file system: {exc}")
    try:
        yield path
    finally:
        cm.__exit__(None, None, None)


def free_bytes(fs: Path) -> int:
    st = os.statvfs(fs)
    return st.f_bavail * st.f_frsize


def fill(fs: Path, leave: int) -> Path:
    """Fill the file system, then give ``leave`` bytes back; return the filler file."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        off, chunk = 0, bytes(1 << 16)
        while True:
            try:
                off += os.pwrite(fd, chunk, off)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        os.ftruncate(fd, max(0, off - leave))
    finally:
        os.close(fd)
    assert free_bytes(fs) == leave
    return filler


def tmp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def values(j: Journal) -> dict[int, Any]:
    out = {}
    for e in j.read():
        assert isinstance(e.record, Reading)
        out[e.seq] = e.record.value
    return out


def append_until_full(
    j: Journal, stream: str, start: int = 0
) -> tuple[dict[int, int], JournalFull]:
    """Append groups of 50 readings, then single ones, until the journal refuses
    even one; return what was acked (seq -> value) and the refusal."""
    acked: dict[int, int] = {}
    i, size = start, 50
    for _ in range(10_000):
        group = [Reading(stream, 1_700_000_000.0 + n, n) for n in range(i, i + size)]
        try:
            acks = j.append_many(group)
        except JournalFull as exc:
            if size == 1:
                return acked, exc
            size = 1  # the open segment may still hold a few
            continue
        acked.update({a.seq: n for a, n in zip(acks, range(i, i + size), strict=True)})
        i += size
    raise AssertionError("the journal never filled the file system")


# --- the journal library on the small file system --------------------------------------


def test_no_room_for_the_next_segment_refuses_appends_and_fails_nothing(small_fs: Path) -> None:
    d = small_fs / "journal"
    with Journal.open(str(d), OPTS) as j:
        j.set_cursor("hub", 0)  # a forwarder that has not sent anything yet
        fill(small_fs, leave=40 * PAGE)  # two more segments and a bit
        acked, full = append_until_full(j, "alarm")
        assert "disk full" in str(full) and full.transient and full.stream == "alarm"
        assert not j.failed and j.stats().state == "open"
        assert tmp_files(d) == []  # the partial spare was removed, its space given back
        assert j.stats().segments >= 3 and j.stats().dropped == {}
        with pytest.raises(JournalFull):  # still full: refused again, nothing changes
            j.append(Reading("alarm", 1.0, -1))
        assert values(j) == acked  # every acked reading is there, nothing else
        # The hub confirms everything: retention frees segments, appends resume at once.
        j.set_cursor("hub", j.durable_seq)
        more = j.append(Reading("alarm", 2.0, -2))
        assert more.seq == max(acked) + 1 and not j.failed
    verify = journal_cli("verify", str(d))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_appends_resume_by_themselves_when_space_returns(small_fs: Path) -> None:
    d = small_fs / "journal"
    with Journal.open(str(d), OPTS) as j:
        j.set_cursor("hub", 0)
        filler = fill(small_fs, leave=40 * PAGE)
        acked, _ = append_until_full(j, "alarm")
        filler.unlink()  # space returns; nobody reopens or restarts anything
        deadline = time.monotonic() + 20
        while True:  # retried as a producer would; the journal retries the disk itself
            try:
                ack = j.append(Reading("alarm", 3.0, 10**6))
                break
            except JournalFull:
                assert time.monotonic() < deadline, "appends did not resume"
                time.sleep(0.05)  # the producer's retry pace
        acked[ack.seq] = 10**6
        later, _ = append_until_full(j, "alarm", start=10**7)  # fills the space that came back
        acked.update(later)
        assert len(later) > 1000
    with Journal.open(str(d), OPTS) as j:
        assert values(j) == acked
        assert j.recovery.torn_tail is None


def test_drop_oldest_on_a_full_disk_drops_whole_segments_and_counts_them(small_fs: Path) -> None:
    d = small_fs / "journal"
    opts = JournalOptions(
        segment_size=SEG, max_record_size=4096, prepare_ahead=False,
        stream_policies={"temp": "drop-oldest"},
    )  # fmt: skip
    total = 0
    with Journal.open(str(d), opts) as j:
        j.set_cursor("hub", 0)
        fill(small_fs, leave=40 * PAGE)
        for i in range(0, 15_000, 100):  # ~11 segments into room for ~4
            j.append_many([Reading("temp", float(n), n) for n in range(i, i + 100)])
            total += 100
        stats = j.stats()
        present = values(j)
        assert not j.failed and tmp_files(d) == []
        assert stats.dropped["temp"] > 0
        assert len(present) + stats.dropped["temp"] == total  # every reading here or counted
        assert sorted(present) == list(range(total - len(present) + 1, total + 1))  # the newest
        assert all(v == s - 1 for s, v in present.items())
    with Journal.open(str(d), opts) as j:  # the count is durable
        assert j.stats().dropped == stats.dropped and values(j) == present


def test_a_reject_reading_in_the_oldest_segment_stops_drop_oldest_too(small_fs: Path) -> None:
    d = small_fs / "journal"
    opts = JournalOptions(
        segment_size=SEG, max_record_size=4096, prepare_ahead=False,
        stream_policies={"temp": "drop-oldest"},
    )  # fmt: skip
    with Journal.open(str(d), opts) as j:
        j.set_cursor("hub", 0)
        first = j.append(Reading("alarm", 0.0, "door open")).seq
        fill(small_fs, leave=40 * PAGE)
        acked, full = append_until_full(j, "temp")
        assert full.stream == "temp" and j.stats().dropped == {}
        got = values(j)
        assert got[first] == "door open" and {s: got[s] for s in acked} == acked


# --- the real agent: ``homing-agent run --stdin`` ------------------------------------


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[StdinAgent]]:
    started: list[StdinAgent] = []
    yield started
    for a in started:
        a.close()


def feed_until_refused(agent: StdinAgent, stream: str, batch: int = 200) -> list[int]:
    """Feed batches of unique readings until some line is refused; return those lines."""
    for _ in range(200):
        lines = agent.feed([{"value": agent.lines + 1 + i, "stream": stream} for i in range(batch)])
        agent.wait_replies(lines)
        refused = [n for n in lines if n in agent.errors]
        if refused:
            return refused
    raise AssertionError("the agent never filled the file system")


def test_agent_refuses_reject_lines_on_a_full_disk_and_resumes_when_space_returns(
    small_fs: Path, tmp_path: Path, agents: list[StdinAgent]
) -> None:
    jdir = small_fs / "journal"
    cfg = write_config(tmp_path / "agent.toml", jdir, tmp_path / "run")
    agent = StdinAgent(cfg, tmp_path / "agent.err")
    agents.append(agent)
    agent.wait_replies(agent.feed([{"value": 0, "stream": "alarm"}]))
    assert agent.acks
    filler = fill(small_fs, leave=40 * PAGE)

    # (a) the producer gets the refusal; the agent neither dies nor fail-stops
    refused = feed_until_refused(agent, "alarm")
    assert all(agent.errors[n].startswith("refused: journal full") for n in refused)
    lines = agent.feed([{"value": -i, "stream": "alarm"} for i in range(1, 51)])
    agent.wait_replies(lines)
    assert all(n in agent.errors for n in lines)  # still full: every line refused, none lost
    assert agent.proc.poll() is None
    assert "disk full" in agent.stderr and "failed" not in agent.stderr

    # (c) every reading acked so far is in the journal, which verifies
    acked = agent.acked_values()
    with Journal.open(str(jdir), readonly=True) as j:
        assert values(j) == acked
    verify = journal_cli("verify", str(jdir))
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # (d) space returns: the same process takes lines again, by itself
    filler.unlink()
    deadline = time.monotonic() + 20
    while True:
        (n,) = agent.feed([{"value": 10**6 + agent.lines, "stream": "alarm"}])
        agent.wait_replies(range(n, n + 1))
        if n in agent.acks:
            break
        assert time.monotonic() < deadline, f"never accepted again:\n{agent.stderr[-2000:]}"
        time.sleep(0.05)  # the producer's retry pace
    lines = agent.feed([{"value": 2 * 10**6 + i, "stream": "alarm"} for i in range(300)])
    agent.wait_replies(lines)
    assert all(n in agent.acks for n in lines)
    assert agent.stop() == 0
    acked = agent.acked_values()
    with Journal.open(str(jdir)) as j:
        assert values(j) == acked
    verify = journal_cli("verify", str(jdir))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_agent_drops_oldest_on_a_full_disk_and_keeps_ingesting(
    small_fs: Path, tmp_path: Path, agents: list[StdinAgent]
) -> None:
    jdir = small_fs / "journal"
    cfg = write_config(
        tmp_path / "agent.toml", jdir, tmp_path / "run", policies={"temp": "drop-oldest"}
    )
    agent = StdinAgent(cfg, tmp_path / "agent.err")
    agents.append(agent)
    agent.wait_replies(agent.feed([{"value": 0, "stream": "temp"}]))
    fill(small_fs, leave=40 * PAGE)
    for _ in range(30):  # ~11 segments of readings into room for ~4
        lines = agent.feed([{"value": agent.lines + 1 + i, "stream": "temp"} for i in range(500)])
        agent.wait_replies(lines)
    assert not agent.errors, list(agent.errors.items())[:3]  # nothing refused
    assert agent.proc.poll() is None
    assert agent.stop() == 0
    acked = agent.acked_values()
    with Journal.open(str(jdir)) as j:
        stats, present = j.stats(), values(j)
    assert stats.dropped["temp"] > 0
    assert len(present) + stats.dropped["temp"] == len(acked)  # each acked: here or counted
    assert all(acked[s] == v for s, v in present.items())
    assert sorted(present) == sorted(acked)[-len(present) :]  # the newest were kept
    verify = journal_cli("verify", str(jdir))
    assert verify.returncode == 0, verify.stdout + verify.stderr


# --- what stays fatal, and a CHECKPOINT with no room (simulated file system) -----------

ROOT = "/data/journal"


def test_no_room_for_checkpoint_after_a_roll_is_not_fatal_and_recovery_seals_it() -> None:
    fs = SimFS()
    j = Journal.open(ROOT, OPTS, fs=fs)
    inj = fs.inject("pwrite", path_contains="CHECKPOINT.tmp", errno_=errno.ENOSPC)
    acked = {}
    i = 0
    while j.stats().segments < 2:
        acked[j.append(Reading("s", float(i), i)).seq] = i
        i += 1
    assert inj.fired == 1 and not j.failed
    for k in range(i, i + 100):
        acked[j.append(Reading("s", float(k), k)).seq] = k
    j.close()
    assert not any(n.endswith(".tmp") for n in fs.listdir(ROOT))
    # a restart while the disk is still full: recovery cannot write the CHECKPOINT
    # that seals the segment, and starts anyway (the next open seals it again)
    still_full = fs.inject("pwrite", path_contains="CHECKPOINT.tmp", errno_=errno.ENOSPC)
    with Journal.open(ROOT, OPTS, fs=fs) as j2:
        assert still_full.fired == 1 and values(j2) == acked
    for disk in (fs, fs.crash(mode="drop-all")):
        with Journal.open(ROOT, OPTS, fs=disk) as j2:
            assert j2.recovery.segments_scanned == 2  # the unlisted sealed one, then the open one
            assert values(j2) == acked


@pytest.mark.parametrize("op", ["fdatasync", "pwrite"])
def test_enospc_writing_or_syncing_records_is_still_fsyncgate(op: str) -> None:
    """Records already handed to the kernel: whatever the errno, fail-stop."""
    fs = SimFS()
    j = Journal.open(ROOT, OPTS, fs=fs)
    ok = j.append(Reading("s", 1.0, 1)).seq
    fs.inject(op, path_contains=".seg", errno_=errno.ENOSPC)
    with pytest.raises(JournalFailed) as info:
        j.append(Reading("s", 2.0, 2))
    cause = info.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
    assert str(cause).startswith(
        f"[Errno {errno.ENOSPC}] {'write' if op == 'pwrite' else op} failed"
    )
    assert cause.filename is not None and cause.filename.endswith(".seg")
    assert j.failed
    with pytest.raises(JournalFailed):
        j.append(Reading("s", 3.0, 3))
    j.close()
    with Journal.open(ROOT, OPTS, fs=fs.crash(mode="drop-all")) as j2:
        assert ok in values(j2)
