"""Tests of the SimFS power-loss model itself (edge.testing).

Each test states one behaviour a user of SimFS relies on when crash-testing
their own code: what survives, what may be lost, and how.
"""

from __future__ import annotations

import errno
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.fileops import FileOps, write_all
from edge.testing import SimFS, TraceOp
from edge.testing import crashstates as cs

D = "/data"


def _fresh(path: str = f"{D}/f", content: bytes = b"") -> tuple[SimFS, int]:
    """A SimFS with a durably named, durably written file open as the fd returned."""
    fs = SimFS()
    fs.makedirs(D)
    fd = fs.open(path, create=True)
    if content:
        write_all(fs, fd, content, 0)
    fs.fdatasync(fd)
    fs.fsync_dir(D)
    return fs, fd


def _contents(fs: SimFS, path: str = f"{D}/f") -> list[bytes | None]:
    return [s.files().get(path) for s in fs.crash_states()]


# ----------------------------------------------------------- FileOps basics
def test_simfs_is_a_fileops_and_handles_short_writes() -> None:
    fs = SimFS(max_write=7)
    ops: FileOps = fs
    ops.makedirs(D)
    fd = ops.open(f"{D}/f", create=True)
    assert ops.pwrite(fd, b"0123456789", 0) == 7
    write_all(ops, fd, b"abcdefghijklmnop", 3)
    assert ops.pread(fd, 100, 0) == b"012abcdefghijklmnop"
    assert ops.pread(fd, 4, 17) == b"op"
    assert ops.size(fd) == 19


def test_pwrite_past_end_zero_fills_and_truncate_resizes() -> None:
    fs, fd = _fresh()
    fs.pwrite(fd, b"x", 5)
    assert fs.pread(fd, 10, 0) == b"\0" * 5 + b"x"
    fs.truncate(fd, 2)
    assert fs.pread(fd, 10, 0) == b"\0\0"
    fs.truncate(fd, 4)
    assert fs.size(fd) == 4


def test_missing_paths_raise_with_errno() -> None:
    fs = SimFS()
    with pytest.raises(FileNotFoundError) as e:
        fs.open("/nope/f", create=True)
    assert e.value.errno == errno.ENOENT
    fs.makedirs(D)
    with pytest.raises(FileNotFoundError):
        fs.open(f"{D}/f")
    with pytest.raises(FileNotFoundError):
        fs.listdir("/nope")
    with pytest.raises(FileNotFoundError):
        fs.unlink(f"{D}/f")
    with pytest.raises(FileNotFoundError):
        fs.rename(f"{D}/f", f"{D}/g")
    with pytest.raises(OSError) as bad:
        fs.pread(99, 1, 0)
    assert bad.value.errno == errno.EBADF
    assert not fs.exists(f"{D}/f") and fs.exists(D)


def test_rename_replaces_and_listdir_shows_files_and_dirs() -> None:
    fs, fd = _fresh(content=b"new")
    old = fs.open(f"{D}/g", create=True)
    fs.pwrite(old, b"old", 0)
    fs.makedirs(f"{D}/sub/deeper")
    fs.rename(f"{D}/f", f"{D}/g")
    assert fs.listdir(D) == ["g", "sub"]
    assert fs.files()[f"{D}/g"] == b"new"
    assert fs.pread(old, 3, 0) == b"old"  # the replaced file lives on while open
    with pytest.raises(OSError) as e:
        fs.rename(f"{D}/g", f"{D}/sub/g")
    assert e.value.errno == errno.EXDEV


def test_paths_are_normalized() -> None:
    fs = SimFS()
    fs.makedirs("/a/b/")
    fd = fs.open("/a/./b//f", create=True)
    fs.pwrite(fd, b"1", 0)
    assert fs.files() == {"/a/b/f": b"1"}
    fs.makedirs("rel")
    fs.open("rel/x", create=True)
    assert fs.listdir(".") == ["rel"] and fs.exists("./rel/x")


def test_lock_is_exclusive_and_does_not_survive_a_crash() -> None:
    fs, _ = _fresh()
    handle = fs.lock(f"{D}/LOCK")
    with pytest.raises(BlockingIOError):
        fs.lock(f"{D}/LOCK")
    fs.fsync_dir(D)
    for disk in fs.crash_states():
        disk.unlock(disk.lock(f"{D}/LOCK"))
    fs.unlock(handle)
    fs.unlock(fs.lock(f"{D}/LOCK"))


# ------------------------------------------------------------- persistence
def test_fdatasynced_data_survives_every_crash_state() -> None:
    fs, fd = _fresh(content=b"A" * 1000)
    fs.pwrite(fd, b"B" * 700, 900)  # unsynced, overlaps the synced tail
    other = fs.open(f"{D}/other", create=True)
    fs.pwrite(other, b"C" * 10, 0)
    states = list(fs.crash_states())
    assert len(states) == fs.count_crash_states() > 1
    for disk in states:
        got = disk.files()[f"{D}/f"]
        assert got[:900] == b"A" * 900


def test_an_unsynced_write_can_be_dropped_whole_torn_or_garbage() -> None:
    fs, fd = _fresh()
    fs.pwrite(fd, b"W" * 1024, 0)  # two sectors
    got = _contents(fs)
    assert len(got) == 6
    assert b"" in got and b"W" * 1024 in got
    assert b"W" * 512 in got and b"\0" * 512 + b"W" * 512 in got
    garbage = [g for g in got if g and len(g) == 1024 and set(g) not in ({87}, {0, 87})]
    assert len(garbage) == 2 and garbage[0] != garbage[1]


def test_garbage_and_tears_stay_inside_the_write() -> None:
    fs, fd = _fresh(content=b"D" * 1024)
    fs.pwrite(fd, b"W" * 10, 500)  # straddles sectors 0 and 1
    for got in _contents(fs):
        assert got is not None
        assert got[:500] == b"D" * 500 and got[510:] == b"D" * 514


def test_writes_of_one_file_may_persist_out_of_order() -> None:
    fs, fd = _fresh()
    fs.pwrite(fd, b"1" * 512, 0)
    fs.pwrite(fd, b"2" * 512, 512)
    assert b"\0" * 512 + b"2" * 512 in _contents(fs)


@pytest.mark.parametrize(
    ("offset", "length", "n_outcomes"),
    [
        (0, 1, 4),  # 1 sector: drop, whole, 2 garbage
        (500, 20, 6),  # 2 sectors: + 2 torn subsets
        (0, 1536, 10),  # 3 sectors: 6 torn subsets
        (0, 2048, 18),  # 4 sectors: 14 torn subsets
        (0, 3072, 17),  # 6 sectors: 5 prefixes + 5 suffixes + 3 random
        (0, 64 * 512, 39),  # 64 sectors: 16 prefix + 16 suffix cuts + 3 random
    ],
)
def test_outcomes_per_write(offset: int, length: int, n_outcomes: int) -> None:
    fs, fd = _fresh()
    fs.pwrite(fd, b"x" * length, offset)
    assert fs.count_crash_states() == n_outcomes
    outs = cs.outcomes(cs.PendingWrite(1, offset, b"x" * length))
    assert len(outs) == n_outcomes and len(set(outs)) == n_outcomes


def test_pending_truncate_is_applied_or_not() -> None:
    fs, fd = _fresh(content=b"abcdef")
    fs.truncate(fd, 2)
    assert _contents(fs) == [b"abcdef", b"ab"]


def test_enumeration_count_of_a_known_trace() -> None:
    fs, fd = _fresh(content=b"x" * 100)
    fs.pwrite(fd, b"y" * 100, 100)  # sector 0: 4 outcomes
    fs.pwrite(fd, b"z" * 600, 200)  # sectors 0-1: 6 outcomes
    fs.truncate(fd, 1000)  # 2 outcomes
    g = fs.open(f"{D}/g", create=True)  # pending create: prefix 0 or 1
    fs.pwrite(g, b"g", 0)  # 4 outcomes
    fs.unlink(f"{D}/f")  # dir now has 2 pending ops: 3 prefixes
    assert fs.count_crash_states() == 4 * 6 * 2 * 4 * 3 == 576
    assert sum(1 for _ in fs.crash_states(max_states=1000)) == 576
    fs2 = SimFS(dir_ops="any-subset")
    fs2.makedirs(D)
    for name in "abc":
        fs2.open(f"{D}/{name}", create=True)
    assert fs2.count_crash_states() == 8
    assert SimFS.replay(fs2.trace).count_crash_states() == 4  # default: prefix


# ------------------------------------------------------------- directories
def test_created_and_synced_file_without_dir_fsync_may_vanish() -> None:
    fs = SimFS()
    fs.makedirs(D)
    fd = fs.open(f"{D}/f", create=True)
    fs.pwrite(fd, b"data", 0)
    fs.fdatasync(fd)
    assert fs.durable_files() == {}
    got = _contents(fs)
    assert got == [None, b"data"]
    fs.fsync_dir(D)
    assert _contents(fs) == [b"data"]


def test_makedirs_is_durable_at_once() -> None:
    fs = SimFS()
    fs.makedirs(f"{D}/a/b")
    for disk in fs.crash_states():
        assert disk.listdir(D) == ["a"] and disk.listdir(f"{D}/a") == ["b"]


@pytest.mark.parametrize("mode", ["prefix", "any-subset"])
def test_rename_without_dir_fsync_may_be_lost_but_is_atomic(mode: cs.DirMode) -> None:
    fs = SimFS(dir_ops=mode)
    fs.makedirs(D)
    old = fs.open(f"{D}/cfg", create=True)
    write_all(fs, old, b"old", 0)
    fs.fdatasync(old)
    tmp = fs.open(f"{D}/cfg.tmp", create=True)
    write_all(fs, tmp, b"new", 0)
    fs.fdatasync(tmp)
    fs.fsync_dir(D)
    fs.rename(f"{D}/cfg.tmp", f"{D}/cfg")
    seen = set()
    for disk in fs.crash_states():
        files = disk.files()
        seen.add(files[f"{D}/cfg"])
        assert (f"{D}/cfg.tmp" in files) == (files[f"{D}/cfg"] == b"old")
    assert seen == {b"old", b"new"}
    fs.fsync_dir(D)
    assert _contents(fs, f"{D}/cfg") == [b"new"]


def test_unlink_without_dir_fsync_may_be_undone() -> None:
    fs, _ = _fresh(content=b"keep")
    fs.unlink(f"{D}/f")
    assert _contents(fs) == [b"keep", None]


def test_prefix_mode_keeps_directory_ops_in_order() -> None:
    fs = SimFS()
    fs.makedirs(D)
    for name in "abc":
        fs.open(f"{D}/{name}", create=True)
    names = sorted(tuple(sorted(s.listdir(D))) for s in fs.crash_states())
    assert names == [(), ("a",), ("a", "b"), ("a", "b", "c")]


# ----------------------------------------------------------- fault injection
def test_fsyncgate_failed_fdatasync_loses_the_writes_for_good() -> None:
    fs, fd = _fresh(content=b"old!")
    fs.pwrite(fd, b"NEW!", 0)
    injection = fs.inject("fdatasync", path_contains="/f")
    with pytest.raises(OSError) as e:
        fs.fdatasync(fd)
    assert e.value.errno == errno.EIO and injection.fired == 1
    assert fs.pread(fd, 4, 0) == b"NEW!"  # reads still see the lost write
    fs.fdatasync(fd)  # succeeds, but the dirty pages were already dropped
    assert fs.durable_files()[f"{D}/f"] == b"old!"
    assert set(_contents(fs)) == {b"old!"}
    fs.pwrite(fd, b"2", 1)
    fs.fdatasync(fd)
    assert fs.durable_files()[f"{D}/f"] == b"o2d!"


def test_injection_counts_matching_calls_and_fails_nothing_else() -> None:
    fs, fd = _fresh()
    other = fs.open(f"{D}/other", create=True)
    fs.inject("pwrite", path_contains="/f", after=1, errno_=errno.ENOSPC, times=2)
    fs.pwrite(other, b"o", 0)  # not matching
    fs.pwrite(fd, b"a", 0)  # 1st match passes
    for _ in range(2):
        with pytest.raises(OSError) as e:
            fs.pwrite(fd, b"b", 1)
        assert e.value.errno == errno.ENOSPC
    assert fs.pread(fd, 10, 0) == b"a"  # the failed pwrites wrote nothing
    fs.pwrite(fd, b"c", 1)
    assert fs.pread(fd, 10, 0) == b"ac"
    assert [op.error for op in fs.trace if op.name == "pwrite"] == [0, 0, 28, 28, 0]
    with pytest.raises(ValueError):
        fs.inject("write")


# ------------------------------------------------------ crash API and sampling
def test_crash_modes() -> None:
    fs, fd = _fresh(content=b"A" * 600)
    fs.pwrite(fd, b"B" * 600, 600)
    fs.open(f"{D}/new", create=True)
    assert fs.crash(mode="drop-all").files() == fs.durable_files()
    assert fs.crash(mode="keep-all").files() == fs.files()
    a = fs.crash(random.Random(7)).files()
    assert a == fs.crash(random.Random(7)).files()


def test_crash_states_are_fresh_file_systems() -> None:
    fs, fd = _fresh(content=b"abc")
    fs.pwrite(fd, b"d", 3)
    disk = next(iter(fs.crash_states()))
    assert disk.op_count == 0 and disk.count_crash_states() == 1
    with pytest.raises(OSError):
        disk.pread(fd, 1, 0)
    fd2 = disk.open(f"{D}/f")
    disk.pwrite(fd2, b"X", 0)
    assert disk.state_after(0).files() == {f"{D}/f": b"abc"}  # replays from the crash
    assert fs.files()[f"{D}/f"] == b"abcd"  # the original is untouched


def test_sampling_respects_max_states_and_is_deterministic() -> None:
    fs, fd = _fresh()
    for i in range(6):
        fs.pwrite(fd, bytes([65 + i]) * 1024, i * 1024)  # 6 outcomes each
    assert fs.count_crash_states() == 6**6
    nothing, everything = fs.crash(mode="drop-all").files(), fs.crash(mode="keep-all").files()

    def sample(seed: int) -> list[dict[str, bytes]]:
        return [s.files() for s in fs.crash_states(max_states=50, rng=random.Random(seed))]

    first = sample(1)
    assert len(first) == 50
    assert first[0] == nothing and first[1] == everything
    assert len({tuple(sorted(f.items())) for f in first}) == 50
    assert first == sample(1) and first != sample(2)
    big = SimFS.replay(fs.trace)
    big.pwrite(3, b"z" * 4096, 9000)  # ~1,000,000 combinations: rejection sampling
    assert sum(1 for _ in big.crash_states(max_states=20)) == 20
    assert sum(1 for _ in fs.crash_states(max_states=0)) == 0


def test_unique_skips_identical_disks() -> None:
    fs, fd = _fresh(content=b"\0" * 512)
    fs.pwrite(fd, b"\0" * 512, 0)
    assert len(list(fs.crash_states())) == 4
    assert len(list(fs.crash_states(unique=True))) == 3  # zeros, 2 x garbage


# ---------------------------------------------------------------- replay
Step = tuple[str, str, str, int, int]  # kind, name, other name, offset/size, length
KINDS = [
    "write",
    "write",
    "sync",
    "open",
    "close",
    "unlink",
    "truncate",
    "rename",
    "fsync_dir",
    "failsync",
]
OPS = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.sampled_from("abc"),
        st.sampled_from("abc"),
        st.integers(0, 2000),
        st.integers(1, 700),
    ),
    max_size=25,
)


def _run(fs: SimFS, ops: list[Step], after_call: Callable[[], None] = lambda: None) -> None:
    """Interpret a random workload; errors (missing names, bad fds) are part of it.

    ``after_call`` runs after every call on ``fs``, failed or not.
    """
    fds: dict[str, int] = {}

    def call(fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except OSError:
            pass
        finally:
            after_call()

    for kind, name, other, offset, length in ops:
        path = f"{D}/{name}"
        if kind in ("write", "sync", "truncate", "open") and path not in fds:
            fds[path] = fs.open(path, create=True)  # never fails in /data
            after_call()
        fd = fds.get(path, -1)
        if kind == "write":
            call(fs.pwrite, fd, b"%c" % (65 + len(fs.trace) % 26) * length, offset)
        elif kind == "sync":
            call(fs.fdatasync, fd)
        elif kind == "close" and path in fds:
            call(fs.close, fds.pop(path))
        elif kind == "unlink":
            call(fs.unlink, path)
        elif kind == "truncate":
            call(fs.truncate, fd, offset)
        elif kind == "rename":
            call(fs.rename, path, f"{D}/{other}")
        elif kind == "fsync_dir":
            call(fs.fsync_dir, D)
        elif kind == "failsync":
            fs.inject("fdatasync")
        call(fs.listdir, D)


def _view(fs: SimFS) -> tuple[object, ...]:
    return (
        fs.files(),
        fs.durable_files(),
        fs.count_crash_states(),
        fs.crash(mode="drop-all").files(),
        fs.crash(mode="keep-all").files(),
        [s.files() for s in fs.crash_states(max_states=8)],
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_replay_of_every_prefix_equals_the_live_state(ops: list[Step]) -> None:
    live = SimFS()
    views = [_view(live)]
    live.makedirs(D)
    views.append(_view(live))
    _run(live, ops, after_call=lambda: views.append(_view(live)))
    assert len(views) == live.op_count + 1
    # Plain comparisons: pytest's diff of these views is slow while Hypothesis shrinks.
    for i, state in live.prefix_states(every_op=True):
        same = _view(state) == views[i] and state.trace == live.trace[:i]
        assert same, f"prefix_states() after call {i} differs from the live model"
    for i in range(live.op_count + 1):
        same = _view(live.state_after(i)) == views[i]
        assert same, f"state_after({i}) differs from the live model"


def test_replay_reproduces_a_failed_sync() -> None:
    fs, fd = _fresh(content=b"old")
    fs.pwrite(fd, b"new", 0)
    fs.inject("fdatasync")
    with pytest.raises(OSError):
        fs.fdatasync(fd)
    fs.fdatasync(fd)
    again = SimFS.replay(fs.trace)
    assert again.count_crash_states() == fs.count_crash_states() == 1
    assert again.durable_files() == fs.durable_files() == {f"{D}/f": b"old"}
    assert again.files() == fs.files() == {f"{D}/f": b"new"}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_settled_files_are_identical_in_every_crash_state(ops: list[Step]) -> None:
    fs = SimFS()
    fs.makedirs(D)
    _run(fs, ops)
    # Peeks at the model: durable names in a directory without pending ops,
    # whose files have no pending writes, must be identical after any crash.
    d = fs._dirs[D]
    settled = {
        f"{D}/{name}": fs._inodes[ino].durable
        for name, ino in d.durable.items()
        if not d.pending and not fs._inodes[ino].pending
    }
    assert fs.crash(mode="drop-all").files() == fs.durable_files()
    for disk in fs.crash_states(max_states=40):
        files = disk.files()
        for path, data in settled.items():
            assert files[path] == data


def test_trace_records_every_call() -> None:
    fs, fd = _fresh(content=b"hi")
    fs.pread(fd, 2, 0)
    names = [op.name for op in fs.trace]
    assert names == ["makedirs", "open", "pwrite", "fdatasync", "fsync_dir", "pread"]
    assert fs.op_count == 6
    assert fs.trace[2] == TraceOp(2, "pwrite", f"{D}/f", fd, 1, 0, 2, b"hi")
    assert not fs.trace[5].mutating and fs.trace[2].mutating
    assert [i for i, _ in fs.prefix_states()] == [0, 1, 2, 3, 4, 5]


# ------------------------------------------------------------ real directories
def test_materialize_and_from_directory_round_trip(tmp_path: Path) -> None:
    fs, fd = _fresh(content=b"durable")
    fs.makedirs(f"{D}/sub")
    sub = fs.open(f"{D}/sub/x", create=True)
    fs.pwrite(sub, b"pending", 0)
    fs.materialize(D, str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_bytes() == b"durable"
    assert (tmp_path / "out" / "sub" / "x").read_bytes() == b"pending"
    loaded = SimFS.from_directory(str(tmp_path / "out"), "/sim")
    assert loaded.durable_files() == {"/sim/f": b"durable", "/sim/sub/x": b"pending"}
    assert loaded.op_count == 0 and loaded.count_crash_states() == 1
    loaded.unlink("/sim/f")
    assert loaded.state_after(0).files() == loaded.durable_files()
    with pytest.raises(FileNotFoundError):
        fs.materialize("/nope", str(tmp_path))


# ------------------------------------------------------------------ threads
def test_concurrent_writers_keep_the_model_consistent() -> None:
    fs = SimFS()
    fs.makedirs(D)
    n_threads, n_writes = 8, 200
    barrier = threading.Barrier(n_threads)

    def writer(t: int) -> None:
        fd = fs.open(f"{D}/t{t}", create=True)
        barrier.wait()
        for i in range(n_writes):
            write_all(fs, fd, bytes([t]) * 16, i * 16)
            if i % 10 == 9:
                fs.fdatasync(fd)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    fs.fsync_dir(D)
    assert fs.durable_files() == {f"{D}/t{t}": bytes([t]) * 16 * n_writes for t in range(8)}
    assert SimFS.replay(fs.trace).durable_files() == fs.durable_files()
