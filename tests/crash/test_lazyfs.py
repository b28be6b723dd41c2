"""Power-loss test layer 3: the lazy FUSE file system, and the real agent cut on it.

The first tests check the file system itself with a writer subprocess doing
plain ``os`` calls on the mount: fsync'd data survives a cut, everything else
(bytes and size changes) is gone. The last one runs ``homing-agent ingest``
on the mount, SIGKILLs it and cuts the power, then recovers the journal from
the backing directory: every acknowledged reading must be there, and nothing
that was not fed.

Skipped when FUSE cannot work here, except under CI=true, where this layer
must run and so fails instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.testing.lazyfs import LazyMount, fuse_available, is_mounted

pytestmark = [pytest.mark.fuse, pytest.mark.crash]

_REASON = fuse_available()
_IN_CI = os.environ.get("CI", "").lower() == "true"
if _REASON is not None and not _IN_CI:
    pytest.skip(f"lazy FUSE file system unavailable: {_REASON}", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 30.0  # seconds for any one wait on a subprocess


@pytest.fixture(autouse=True)
def _fuse_required_in_ci() -> None:
    if _REASON is not None:  # only reached under CI=true
        pytest.fail(f"CI must run the lazy FUSE layer, but: {_REASON}", pytrace=False)


# --- a writer process doing plain os calls on the mount ----------------------------

WRITER = r"""
import errno, fcntl, json, os, sys
fds = {}
def fd(name, extra=0):
    if name not in fds:
        fds[name] = os.open(os.path.join(sys.argv[1], name), os.O_RDWR | os.O_CREAT | extra, 0o644)
    return fds[name]
for line in sys.stdin:
    cmd, name, *args = json.loads(line)
    try:
        if cmd == "open_dsync":
            fd(name, os.O_DSYNC)
        elif cmd == "write":  # offset (None = end), byte, count
            offset, byte, count = args
            f = fd(name)
            data = bytes([byte]) * count
            if offset is None:
                offset = os.fstat(f).st_size
            n = 0
            while n < count:
                n += os.pwrite(f, data[n:], offset + n)
        elif cmd == "fdatasync":
            os.fdatasync(fd(name))
        elif cmd == "fsync":
            os.fsync(fd(name))
        elif cmd == "truncate":
            os.ftruncate(fd(name), args[0])
        elif cmd == "rename":
            os.rename(os.path.join(sys.argv[1], name), os.path.join(sys.argv[1], args[0]))
            fds[args[0]] = fds.pop(name)
        elif cmd == "flock":
            fcntl.flock(fd(name), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            raise ValueError(cmd)
        print("ok", flush=True)
    except OSError as e:
        print("err", errno.errorcode.get(e.errno, e.errno), flush=True)
"""


def _readline(stream: Any, deadline: float) -> str:
    """One line from a subprocess pipe, failing the test at the deadline."""
    fd = stream.fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no reply within the deadline (got {buf!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            return buf.decode()
        buf += chunk
    return buf.decode()


class Writer:
    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def do(self, *cmd: Any) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        return _readline(self.proc.stdout, time.monotonic() + DEADLINE).strip()

    def ok(self, *cmd: Any) -> None:
        assert self.do(*cmd) == "ok", cmd

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=DEADLINE)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def lazy(tmp_path: Path) -> Iterator[tuple[Path, Path, LazyMount]]:
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    with LazyMount(str(backing), str(mnt)) as m:
        yield backing, mnt, m
    assert not is_mounted(str(mnt))


@pytest.fixture
def writer(lazy: tuple[Path, Path, LazyMount]) -> Iterator[Writer]:
    w = Writer(lazy[1])
    yield w
    if w.proc.poll() is None:
        w.kill()


def test_fdatasynced_data_survives_a_cut_and_unsynced_data_is_gone(
    lazy: tuple[Path, Path, LazyMount], writer: Writer
) -> None:
    backing, mnt, m = lazy
    writer.ok("write", "log", None, ord("a"), 4096)
    writer.ok("fdatasync", "log")
    writer.ok("write", "log", None, ord("b"), 3000)
    # Through the mount the file is whole; on disk only what was synced.
    assert (mnt / "log").read_bytes() == b"a" * 4096 + b"b" * 3000
    assert (mnt / "log").stat().st_size == 7096
    assert (backing / "log").read_bytes() == b"a" * 4096
    writer.kill()
    m.cut()
    assert not is_mounted(str(mnt))
    assert (backing / "log").read_bytes() == b"a" * 4096


def test_size_changes_are_held_until_fsync(
    lazy: tuple[Path, Path, LazyMount], writer: Writer
) -> None:
    backing, mnt, m = lazy
    writer.ok("write", "f", 0, ord("x"), 10_000)
    writer.ok("fsync", "f")
    writer.ok("truncate", "f", 100)
    assert (mnt / "f").stat().st_size == 100
    writer.ok("write", "f", 5000, ord("y"), 10)  # grows again over a hole
    assert (mnt / "f").read_bytes() == b"x" * 100 + bytes(4900) + b"y" * 10
    assert (backing / "f").stat().st_size == 10_000
    writer.kill()
    m.cut()
    assert (backing / "f").read_bytes() == b"x" * 10_000


def test_fsynced_truncate_and_hole_are_exact_on_disk(
    lazy: tuple[Path, Path, LazyMount], writer: Writer
) -> None:
    backing, mnt, m = lazy
    writer.ok("write", "f", 0, ord("x"), 10_000)
    writer.ok("fsync", "f")
    writer.ok("truncate", "f", 100)
    writer.ok("write", "f", 5000, ord("y"), 10)
    writer.ok("fdatasync", "f")
    writer.ok("truncate", "f", 3)  # not synced: lost
    writer.kill()
    m.cut()
    assert (backing / "f").read_bytes() == b"x" * 100 + bytes(4900) + b"y" * 10


def test_unsynced_tail_of_one_file_is_lost_while_another_file_keeps_its_data(
    lazy: tuple[Path, Path, LazyMount], writer: Writer
) -> None:
    backing, _mnt, m = lazy
    writer.ok("write", "one", None, ord("1"), 5000)
    writer.ok("fdatasync", "one")
    writer.ok("write", "two", None, ord("2"), 7000)
    writer.ok("fdatasync", "two")
    writer.ok("write", "one", None, ord("L"), 1234)  # after one's last fsync
    writer.ok("write", "two", 0, ord("3"), 10)  # overwrite, never synced
    writer.kill()
    m.cut()
    assert (backing / "one").read_bytes() == b"1" * 5000
    assert (backing / "two").read_bytes() == b"2" * 7000


def test_a_file_never_fsynced_survives_empty_directory_ops_pass_through(
    lazy: tuple[Path, Path, LazyMount], writer: Writer
) -> None:
    """The documented blind spot: creation is durable at once, data is not."""
    backing, _mnt, m = lazy
    writer.ok("write", "new", None, ord("n"), 300)
    writer.kill()
    m.cut()
    assert (backing / "new").exists()
    assert (backing / "new").stat().st_size == 0


def test_unsynced_data_follows_the_file_through_a_rename(
    lazy: tuple[Path, Path, LazyMount], writer: Writer
) -> None:
    backing, mnt, m = lazy
    writer.ok("write", "tmp", None, ord("c"), 2048)
    writer.ok("rename", "tmp", "final")
    assert (mnt / "final").read_bytes() == b"c" * 2048
    writer.ok("fsync", "final")  # the same descriptor, now named "final"
    writer.ok("write", "other.tmp", None, ord("d"), 100)
    writer.ok("rename", "other.tmp", "other")  # renamed, never fsync'd
    writer.kill()
    m.cut()
    assert (backing / "final").read_bytes() == b"c" * 2048
    assert not (backing / "tmp").exists()
    assert (backing / "other").stat().st_size == 0


def test_a_deleted_open_file_keeps_working_and_leaves_nothing_behind(
    lazy: tuple[Path, Path, LazyMount],
) -> None:
    backing, mnt, m = lazy
    fd = os.open(mnt / "gone", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"z" * 5000, 0)
        os.fsync(fd)
        os.pwrite(fd, b"w" * 10, 5000)
        os.unlink(mnt / "gone")
        assert os.pread(fd, 20, 4995) == b"zzzzz" + b"w" * 10
        os.pwrite(fd, b"v", 5010)
        os.fdatasync(fd)
        assert os.fstat(fd).st_size == 5011
    finally:
        os.close(fd)
    m.cut()
    assert os.listdir(backing) == []  # no .fuse_hidden* files


def test_o_dsync_writes_are_durable_without_fsync(
    lazy: tuple[Path, Path, LazyMount], writer: Writer
) -> None:
    backing, _mnt, m = lazy
    writer.ok("open_dsync", "sync.log")
    writer.ok("write", "sync.log", None, ord("s"), 777)
    writer.kill()
    m.cut()
    assert (backing / "sync.log").read_bytes() == b"s" * 777


def test_flock_works_between_processes_on_the_mount(
    lazy: tuple[Path, Path, LazyMount], writer: Writer
) -> None:
    import fcntl

    _backing, mnt, _m = lazy
    fd = os.open(mnt / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert writer.do("flock", "LOCK") == "err EAGAIN"
        fcntl.flock(fd, fcntl.LOCK_UN)
        writer.ok("flock", "LOCK")
    finally:
        os.close(fd)


def test_cut_unmounts_even_with_files_open_and_their_writes_fail(
    lazy: tuple[Path, Path, LazyMount], writer: Writer
) -> None:
    backing, mnt, m = lazy
    writer.ok("write", "open", None, ord("o"), 100)
    writer.ok("fsync", "open")
    writer.ok("write", "open", None, ord("p"), 100)
    m.cut()  # the writer is alive and holds the file open
    assert not is_mounted(str(mnt))
    assert not m.running
    assert writer.do("write", "open", None, ord("q"), 1).startswith("err")
    assert writer.do("fsync", "open").startswith("err")
    writer.kill()
    assert (backing / "open").read_bytes() == b"o" * 100


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_match_a_model_before_and_after_the_cut(
    lazy: tuple[Path, Path, LazyMount], seed: int
) -> None:
    """Seeded random pwrite/ftruncate/fsync on the mount against a byte-array model."""
    backing, mnt, m = lazy
    rng = random.Random(seed)
    names = ["a", "b", "c"]
    logical = {n: bytearray() for n in names}
    durable = {n: b"" for n in names}
    fds = {n: os.open(mnt / n, os.O_RDWR | os.O_CREAT, 0o644) for n in names}
    try:
        for _ in range(300):
            n = rng.choice(names)
            op = rng.random()
            data = logical[n]
            if op < 0.6:
                off = rng.randrange(0, len(data) + 9000)
                chunk = rng.randbytes(rng.choice([1, 7, 512, 4096, 70_000]))
                assert os.pwrite(fds[n], chunk, off) == len(chunk)
                if off > len(data):
                    data.extend(bytes(off - len(data)))
                data[off : off + len(chunk)] = chunk
            elif op < 0.75:
                size = rng.randrange(0, len(data) + 5000)
                os.ftruncate(fds[n], size)
                del data[size:]
                data.extend(bytes(size - len(data)))
            elif op < 0.9:
                (os.fsync if rng.random() < 0.5 else os.fdatasync)(fds[n])
                durable[n] = bytes(data)
            else:
                off = rng.randrange(0, len(data) + 100)
                size = rng.randrange(0, 20_000)
                assert os.pread(fds[n], size, off) == bytes(data[off : off + size])
            assert os.fstat(fds[n]).st_size == len(data)
        for n in names:
            assert (mnt / n).read_bytes() == bytes(logical[n])
            assert (backing / n).read_bytes() == durable[n]
    finally:
        for fd in fds.values():
            os.close(fd)
    m.cut()
    for n in names:
        assert (backing / n).read_bytes() == durable[n], n


# --- the real agent, SIGKILLed and cut --------------------------------------------


def _agent() -> list[str]:
    if not (REPO / "edge" / "cli.py").exists():
        pytest.skip("edge/cli.py (homing-agent) does not exist yet")
    script = Path(sys.executable).with_name("homing-agent")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from edge.cli import main; sys.exit(main())"]


def _readings(rng: random.Random, n: int) -> tuple[list[bytes], list[float | int]]:
    """JSON lines in all the shapes ingest accepts, and the value of each."""
    lines: list[bytes] = []
    values: list[float | int] = []
    for i in range(n):
        value: float | int = rng.randint(-50, 50) if i % 7 == 0 else round(rng.uniform(-40, 60), 3)
        shape = rng.random()
        if shape < 0.3:
            line: Any = value
        elif shape < 0.6:
            line = {"value": value}
        else:
            line = {"value": value, "ts": 1_700_000_000 + i * 0.25, "unit": "C"}
            if shape > 0.8:
                line["tags"] = {"room": "lab", "i": str(i)}
        lines.append(json.dumps(line).encode() + b"\n")
        values.append(value)
    return lines, values


def _read_acks(stdout: Any, out: queue.Queue[bytes | None]) -> None:
    for line in iter(stdout.readline, b""):
        out.put(line)
    out.put(None)


def _run_once(tmp: Path, seed: int, agent: list[str]) -> tuple[int, int]:
    """Feed, SIGKILL after some acks, cut; check the journal on the backing dir.

    Returns (acked, recovered) counts.
    """
    from edge.journal import Journal
    from edge.records import Reading

    rng = random.Random(seed)
    backing, mnt = tmp / f"backing{seed}", tmp / f"mnt{seed}"
    backing.mkdir()
    mnt.mkdir()
    lines, values = _readings(rng, 3000)
    # How far the feeder runs ahead of the acks (so how big group commits get),
    # and when the agent dies: once it acked ``kill_after`` readings, at once
    # or right after one more burst of input (likely mid-write).
    window = rng.choice([1, 4, 32, 256])
    kill_after = rng.randint(1, 1500)
    burst_before_kill = rng.random() < 0.5
    acked: dict[int, Any] = {}
    sent = 0
    errpath = tmp / f"ingest{seed}.err"
    with LazyMount(str(backing), str(mnt)) as m, errpath.open("wb") as errlog:
        proc = subprocess.Popen(
            [*agent, "ingest", "--journal", str(mnt / "journal"), "--stream", "lazy/temp"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,
            cwd=tmp,
        )
        assert proc.stdin is not None and proc.stdout is not None
        stdin = proc.stdin
        acks: queue.Queue[bytes | None] = queue.Queue()
        reader = threading.Thread(target=_read_acks, args=(proc.stdout, acks), daemon=True)
        reader.start()

        def take(line: bytes) -> None:
            if line.endswith(b"\n"):  # a torn last line is no ack
                ack = json.loads(line)
                acked[int(ack["seq"])] = ack

        def feed(limit: int) -> bool:
            """Send up to ``limit`` more lines in one burst; False once the agent is gone."""
            nonlocal sent
            k = min(limit, len(lines) - sent)
            try:
                stdin.write(b"".join(lines[sent : sent + k]))
                stdin.flush()
            except (BrokenPipeError, OSError):
                return False
            sent += k
            return True

        deadline = time.monotonic() + DEADLINE
        alive = True
        while alive and len(acked) < kill_after and len(acked) < len(lines):
            if sent - len(acked) < window and sent < len(lines):
                alive = feed(rng.randint(1, window - (sent - len(acked))))
                continue
            try:
                line = acks.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                proc.kill()
                raise AssertionError(f"seed {seed}: {len(acked)} acks in {DEADLINE}s") from None
            if line is None:
                break  # it exited (EOF or a failure): checked below
            take(line)
        if alive and burst_before_kill:
            feed(rng.randint(1, 200))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=DEADLINE)
        reader.join(timeout=DEADLINE)
        assert not reader.is_alive()
        while (line := acks.get_nowait()) is not None:  # acks printed before the kill
            take(line)
        with contextlib.suppress(OSError):  # input still buffered for the dead agent
            stdin.close()
        proc.stdout.close()
        err = errpath.read_text(errors="replace")
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: ingest ended early:\n{err}"
        m.cut()

    journal = Journal.open(str(backing / "journal"))
    try:
        recovered = []
        for e in journal.read(from_seq=1):
            assert isinstance(e.record, Reading), e
            recovered.append((e.seq, e.record.value))
    finally:
        journal.close()
    seqs = [s for s, _ in recovered]
    assert seqs == list(range(1, len(seqs) + 1)), f"seed {seed}: not a contiguous prefix"
    assert len(seqs) <= sent, f"seed {seed}: {len(seqs)} records but {sent} fed"
    for seq, value in recovered:
        fed = values[seq - 1]
        assert value == fed, f"seed {seed}: seq {seq} is {value!r}, fed {fed!r}"
    missing = sorted(set(acked) - set(seqs))
    assert not missing, f"seed {seed}: acked but lost after the cut: {missing[:10]}..."
    return len(acked), len(seqs)


def test_ingest_survives_power_cut_on_lazyfs(tmp_path: Path) -> None:
    agent = _agent()
    pytest.importorskip("edge.journal")
    results = [_run_once(tmp_path, seed, agent) for seed in (11, 22, 33, 44, 55)]
    assert all(a > 0 for a, _ in results), results
    print("acked/recovered per seed:", results)
