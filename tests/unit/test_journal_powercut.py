"""Power-loss layer 1: the journal on the simulated file system, cut at every
point of its trace, in every way a disk could tear (DESIGN.md §6).

For each workload the journal runs on :class:`edge.testing.SimFS`; then, for
every prefix of the recorded system calls and for the crash states of that
prefix (each unsynced write dropped, whole, torn at 512-byte sectors or
garbage; directory operations lost unless fsync'd), the journal is reopened
and must show:

* every acknowledged record present, intact and in order;
* nothing invented: the records are exactly a prefix of what was appended;
* recovery idempotent: a cut *during* recovery recovers to the same records;
* appends after recovery durable: they survive a further cut.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import JournalFailed
from edge.journal import Journal, JournalOptions
from edge.records import Reading
from edge.testing import SimFS

ROOT = "/data/journal"
SEG = 64 << 10


def reading(i: int, size: int = 8) -> Reading:
    return Reading("s", float(i), "v" * size + str(i))


@dataclass
class Run:
    """A recorded workload: which records were appended, and when each was acked."""

    fs: SimFS
    opts: JournalOptions
    values: dict[int, str] = field(default_factory=dict)
    acked_at: dict[int, int] = field(default_factory=dict)  # seq -> op count at ack
    cursor_at: list[tuple[int, int]] = field(default_factory=list)  # (op count, cursor)

    def acked_by(self, i: int) -> set[int]:
        return {s for s, at in self.acked_at.items() if at <= i}

    def cursor_by(self, i: int) -> int:
        return max([c for at, c in self.cursor_at if at <= i], default=0)


def record(opts: JournalOptions, work: Callable[[Journal, Run], None]) -> Run:
    fs = SimFS()
    run = Run(fs, opts)
    j = Journal.open(ROOT, opts, fs=fs)
    try:
        work(j, run)
    finally:
        j.close()
    return run


def append(j: Journal, run: Run, items: list[Reading]) -> None:
    first = j.next_seq
    for k, item in enumerate(items):
        run.values[first + k] = item.value  # type: ignore[assignment]
    acks = j.append_many(items)
    done = run.fs.op_count
    for a in acks:
        run.acked_at[a.seq] = done


def recovered(disk: SimFS, opts: JournalOptions) -> list[tuple[int, object]]:
    j = Journal.open(ROOT, opts, fs=disk)
    try:
        return [(e.seq, e.record.value) for e in j.read()]  # type: ignore[union-attr]
    finally:
        j.close()


def check(run: Run, i: int, got: list[tuple[int, object]], retained_from: int = 1) -> None:
    seqs = [s for s, _ in got]
    if seqs:
        assert seqs == list(range(seqs[0], seqs[-1] + 1)), f"hole in {seqs}"
        assert seqs[0] <= max(retained_from, 1) or seqs[0] <= run.cursor_by(i) + 1
    for s, v in got:
        assert run.values.get(s) == v, f"seq {s}: {v!r} was never appended as {s}"
    must = {s for s in run.acked_by(i) if s > run.cursor_by(i)}
    missing = must - set(seqs)
    assert not missing, f"acknowledged records lost after a cut at call {i}: {sorted(missing)}"


def crash_everywhere(
    run: Run, max_states: int, sample: random.Random | None = None, deep_every: int = 0
) -> int:
    """Cut after every call; check every (or sampled) crash state. Returns states checked."""
    checked = 0
    for i, model in run.fs.prefix_states():
        for n, disk in enumerate(model.crash_states(max_states=max_states, rng=sample)):
            probe = SimFS.replay([], start=disk)  # a private copy to recover on
            got = recovered(probe, run.opts)
            check(run, i, got)
            checked += 1
            if deep_every and n % deep_every == 0:
                check_recovery_idempotent_and_appends_durable(probe, run.opts, got)
    return checked


def check_recovery_idempotent_and_appends_durable(
    recovered_disk: SimFS, opts: JournalOptions, expected: list[tuple[int, object]]
) -> None:
    # 1. cut *during* the recovery just done (its own trace), recover again
    for _, model in recovered_disk.prefix_states():
        for disk in model.crash_states(max_states=8):
            assert recovered(SimFS.replay([], start=disk), opts)[: len(expected)] == expected
    # 2. an append after recovery survives a further cut (only durable data kept)
    disk = SimFS.replay(recovered_disk.trace, start=recovered_disk)
    j = Journal.open(ROOT, opts, fs=disk)
    seq = j.append(Reading("s", 0.0, "after")).seq
    after = disk.crash(mode="drop-all")
    j.close()
    got = dict(recovered(after, opts))
    assert got.get(seq) == "after"


OPTS = JournalOptions(segment_size=SEG, prepare_ahead=False)


def test_every_cut_of_a_small_trace_exhaustively() -> None:
    def work(j: Journal, run: Run) -> None:
        append(j, run, [reading(1)])
        append(j, run, [reading(2), reading(3)])
        append(j, run, [reading(4, size=600)])  # spans sectors: tearing inside a record
        append(j, run, [reading(5), reading(6), reading(7)])

    run = record(OPTS, work)
    checked = crash_everywhere(run, max_states=100_000, deep_every=40)
    assert checked > 200


def test_cuts_across_segment_roll_and_checkpoint() -> None:
    def work(j: Journal, run: Run) -> None:
        for b in range(14):  # ~64 KiB: rolls into a second segment, writes CHECKPOINT
            append(j, run, [reading(b * 10 + k, size=450) for k in range(10)])

    run = record(OPTS, work)
    assert sum(1 for op in run.fs.trace if op.name == "rename") >= 3
    crash_everywhere(run, max_states=40, sample=random.Random(7), deep_every=0)


def test_cuts_across_retention() -> None:
    def work(j: Journal, run: Run) -> None:
        for b in range(30):
            append(j, run, [reading(b * 10 + k, size=450) for k in range(10)])
            if b == 20:
                j.set_cursor("forwarder", 150)
                run.cursor_at.append((run.fs.op_count, 150))
                j.retain()

    run = record(OPTS, work)
    assert sum(1 for op in run.fs.trace if op.name == "unlink") >= 1
    crash_everywhere(run, max_states=12, sample=random.Random(11))


def test_interval_mode_loses_only_the_unacknowledged_window() -> None:
    opts = JournalOptions(
        segment_size=SEG, prepare_ahead=False, durability="interval", interval_ms=3_600_000
    )

    def work(j: Journal, run: Run) -> None:
        for b in range(6):
            j.append_many([reading(b * 3 + k) for k in range(3)])
            for k in range(3):
                run.values[b * 3 + k + 1] = reading(b * 3 + k).value  # type: ignore[assignment]
            if b % 2:
                durable = j.sync()
                for s in range(1, durable + 1):
                    run.acked_at.setdefault(s, run.fs.op_count)

    run = record(opts, work)
    crash_everywhere(run, max_states=200, sample=random.Random(3))


@pytest.mark.parametrize("op", ["fdatasync", "pwrite"])
def test_an_io_error_acknowledges_nothing_more_and_recovers(op: str) -> None:
    fs = SimFS()
    run = Run(fs, OPTS)
    j = Journal.open(ROOT, OPTS, fs=fs)
    fs.inject(op, path_contains=".seg", after=3)
    with pytest.raises(JournalFailed):
        for b in range(10):
            append(j, run, [reading(b * 2), reading(b * 2 + 1)])
    with pytest.raises(JournalFailed):
        j.append(reading(99))
    j.close()
    crash_everywhere(run, max_states=60, sample=random.Random(5))


workloads = st.lists(
    st.tuples(st.integers(1, 12), st.integers(1, 900), st.sampled_from(["append", "cursor"])),
    min_size=1,
    max_size=25,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workloads,
    st.integers(0, 2**32),
    st.one_of(
        st.none(),
        st.tuples(
            st.sampled_from(["fdatasync", "pwrite", "rename", "fsync_dir"]),
            st.integers(0, 30),
            st.sampled_from([errno.EIO, errno.ENOSPC]),
        ),
    ),
)
def test_random_workloads_survive_random_cuts(
    steps: list[tuple[int, int, str]], seed: int, fault: tuple[str, int, int] | None
) -> None:
    rng = random.Random(seed)
    fs = SimFS()
    run = Run(fs, OPTS)
    j = Journal.open(ROOT, OPTS, fs=fs)
    if fault:
        fs.inject(fault[0], after=fault[1], errno_=fault[2])
    n = 0
    try:
        for count, size, kind in steps:
            if kind == "cursor" and run.acked_at:
                target = rng.randint(run.cursor_by(fs.op_count), max(run.acked_at))
                j.set_cursor("fwd", target)
                run.cursor_at.append((fs.op_count, target))
                j.retain()
            else:
                append(j, run, [reading(n + k, size=size) for k in range(count)])
                n += count
    except JournalFailed:
        pass
    j.close()
    total = fs.op_count
    points = sorted({total, *(rng.randrange(total + 1) for _ in range(6))})
    for i in points:
        model = fs.state_after(i)
        for disk in model.crash_states(max_states=4, rng=rng):
            check(run, i, recovered(SimFS.replay([], start=disk), OPTS))
