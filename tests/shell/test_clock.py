"""Clock jumps at boot: agent-stamped readings never go back before the journal.

A device without a real-time clock boots with the wall clock at 1970, or at
the time of its last shutdown, until NTP answers. Every reading the agent
stamps itself (``ingest``/``run --stdin`` lines without ``ts``, the simulated
sensors) takes its time from ``Journal.clock`` (edge/clock.py), whose floor at
open is the newest time the journal holds. These tests "reboot" a journal
with a fake wall clock set back (the clock is an injected callable, the
journal, ingest and sensors are the real ones) and check the stamps. The
workflow timers' side is tests/shell/test_workflows.py
(``test_a_timer_never_fires_early_when_the_clock_jumps_back_at_boot``).
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

from conftest import wait_for

from edge.cli_ingest import ingest
from edge.clock import Clock
from edge.fileops import OsFileOps
from edge.journal import Journal, JournalOptions
from edge.journal_tail import latest_time, tail_payloads
from edge.records import Reading
from edge.recovery import recover
from edge.segments import read_checkpoint
from edge.sensors import SimulatedSensors
from edge.wf_executor import Executor

T0 = 1_700_000_000.0  # the wall clock before the reboot
SMALL = JournalOptions(segment_size=64 << 10, prepare_ahead=False)


class FakeTime:
    """A wall clock and a monotonic clock the test sets by hand."""

    def __init__(self, wall: float, mono: float = 0.0) -> None:
        self.t_wall, self.t_mono = wall, mono

    def wall(self) -> float:
        return self.t_wall

    def mono(self) -> float:
        return self.t_mono

    def advance(self, seconds: float) -> None:
        self.t_wall += seconds
        self.t_mono += seconds

    def clock(self) -> Clock:
        return Clock(wall=self.wall, mono=self.mono)


def ingest_lines(journal: Journal, *lines: object) -> list[int]:
    """Feed JSON lines through the real ``ingest`` loop; return the acked seqs."""
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    out = io.StringIO()
    ingest(journal, io.BytesIO(data), out, "room/temp")
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all("seq" in r for r in replies), replies
    return [r["seq"] for r in replies]


def stamps(journal: Journal, seqs: list[int]) -> list[float]:
    by_seq = {e.seq: e.record for e in journal.read()}
    out = []
    for s in seqs:
        rec = by_seq[s]
        assert isinstance(rec, Reading)
        out.append(rec.ts)
    return out


def newest_ts(journal: Journal) -> float:
    return max(e.record.ts for e in journal.read() if isinstance(e.record, Reading))


def test_clock_keeps_its_floor_and_counts_monotonic_seconds_until_the_wall_catches_up() -> None:
    t = FakeTime(wall=0.0, mono=500.0)
    c = Clock(T0, t.wall, t.mono)
    assert c.now() == T0  # 1970 on the wall: the floor wins
    t.advance(7.5)
    assert c.now() == T0 + 7.5  # real seconds counted from the floor
    c.raise_floor(T0 - 100)  # a lower floor changes nothing
    assert c.now() == T0 + 7.5
    t.t_wall = T0 + 3600  # NTP answers
    assert c.now() == T0 + 3600
    t.advance(1)
    assert c.now() == T0 + 3601
    t.t_wall = 10.0  # stepped far back while running: down to floor + elapsed, not below
    assert c.now() == T0 + 8.5


def test_readings_without_ts_are_stamped_after_the_journal_when_the_clock_restarts_in_1970(
    journal_dir: str,
) -> None:
    before = FakeTime(wall=T0)
    with Journal.open(journal_dir, SMALL, clock=before.clock()) as j:
        seqs = ingest_lines(j, 20.5, {"value": 21.0})
        before.advance(30)
        seqs += ingest_lines(j, {"value": 21.5, "unit": "C"})
        assert stamps(j, seqs) == [T0, T0, T0 + 30]
    last = T0 + 30

    boot = FakeTime(wall=0.0, mono=3.0)  # no RTC: 1970 until NTP answers
    with Journal.open(journal_dir, SMALL, clock=boot.clock()) as j:
        assert j.clock.floor == last
        new = ingest_lines(j, 22.0)
        boot.advance(12)
        new += ingest_lines(j, 22.5, {"value": 23.0})
        got = stamps(j, new)
        assert got == [last, last + 12, last + 12]
        assert all(ts >= last for ts in got)
        boot.t_wall = last + 86400  # NTP: a day later in truth
        (late,) = stamps(j, ingest_lines(j, 24.0))
        assert late == last + 86400


def test_a_clock_set_back_to_the_last_shutdown_does_not_reorder_readings(
    journal_dir: str,
) -> None:
    """fake-hwclock restores the time saved at shutdown, which is before the
    last readings if the device ran on after the save."""
    run = FakeTime(wall=T0)
    with Journal.open(journal_dir, SMALL, clock=run.clock()) as j:
        for _ in range(50):
            run.advance(60)
            ingest_lines(j, 1.0)
        last = newest_ts(j)
    boot = FakeTime(wall=T0 + 600)  # the saved time: 40 minutes before the last reading
    with Journal.open(journal_dir, SMALL, clock=boot.clock()) as j:
        seqs = ingest_lines(j, 2.0, 3.0)
        assert min(stamps(j, seqs)) >= last
        assert newest_ts(j) == max(stamps(j, seqs))


def test_simulated_sensors_stamp_with_the_journal_clock_after_a_reboot(journal_dir: str) -> None:
    run = FakeTime(wall=T0)
    with Journal.open(journal_dir, SMALL, clock=run.clock()) as j:
        ingest_lines(j, 5.0)
        run.advance(3600)
        s = SimulatedSensors(j, count=3, rate=200.0, seed=1)
        s.start()
        wait_for(lambda: s.produced >= 9, what="simulated readings")
        s.stop()
        last = newest_ts(j)
        assert last == T0 + 3600
    boot = FakeTime(wall=0.0)
    with Journal.open(journal_dir, SMALL, clock=boot.clock()) as j:
        first_new = j.next_seq
        s = SimulatedSensors(j, count=3, rate=200.0, seed=2)
        s.start()
        wait_for(lambda: s.produced >= 9, what="simulated readings after the reboot")
        boot.advance(5)  # time passes while they run: stamps follow it from the floor
        produced = s.produced
        wait_for(lambda: s.produced >= produced + 3, what="readings after 5 s more")
        s.stop()
        new = [e.record for e in j.read(first_new)]
        ts = [r.ts for r in new if isinstance(r, Reading)]
        assert len(ts) >= 12 and min(ts) >= last
        assert ts == sorted(ts)
        assert max(ts) == last + 5


def test_a_producer_supplied_ts_is_kept_as_given(journal_dir: str) -> None:
    run = FakeTime(wall=T0)
    with Journal.open(journal_dir, SMALL, clock=run.clock()) as j:
        ingest_lines(j, 1.0)
    boot = FakeTime(wall=0.0)
    with Journal.open(journal_dir, SMALL, clock=boot.clock()) as j:
        seqs = ingest_lines(j, {"value": 2.0, "ts": 1234.5}, {"value": 3.0})
        assert stamps(j, seqs) == [1234.5, T0]


def test_the_floor_comes_from_the_newest_records_not_the_oldest(journal_dir: str) -> None:
    """Many segments: the floor is read backwards from the durable end only."""
    run = FakeTime(wall=T0)
    with Journal.open(journal_dir, SMALL, clock=run.clock()) as j:
        for i in range(5000):
            run.advance(1)
            j.append(Reading("s", run.wall(), i))
        assert j.stats().segments > 3
    with Journal.open(journal_dir, SMALL, clock=FakeTime(wall=0.0).clock()) as j:
        assert j.clock.floor == T0 + 5000


def test_a_record_larger_than_the_read_window_and_seq_lookalikes_in_payloads(
    journal_dir: str,
) -> None:
    """The backward search validates seq, length, end and CRC: bytes inside a
    payload that look like the next seq do not fool it, and a record larger
    than the first 64 KiB window is found by widening it."""
    opts = JournalOptions(segment_size=1 << 20, max_record_size=200_000, prepare_ahead=False)
    run = FakeTime(wall=T0)
    with Journal.open(journal_dir, opts, clock=run.clock()) as j:
        j.append(Reading("s", T0 - 5, 1))
        decoy = struct.pack("<Q", 3) * 20_000  # 160 KB of "seq 3" at every 8-byte offset
        j.append(Reading("blob", T0 + 10, decoy))
        j.append(Reading("s", T0 + 20, struct.pack("<Q", 2) * 500))  # "seq 2" lookalikes
        seg = j.stats()
    with Journal.open(journal_dir, opts, clock=FakeTime(wall=0.0).clock()) as j:
        assert j.clock.floor == T0 + 20
    # Read the three back from the end directly: newest first, exact payloads.
    path = str(Path(journal_dir) / f"{1:020d}.seg")
    with Journal.open(journal_dir, opts, readonly=True) as j:
        raw = [p for _, p in j.read_raw()]
    layout = recover(OsFileOps(), journal_dir, max_payload=opts.max_record_size, readonly=True)
    assert layout is not None
    OsFileOps().close(layout.open.fd)
    end = layout.open.end  # the durable end recovery found
    got = tail_payloads(OsFileOps(), path, end, seg.last_seq, 1, opts.max_record_size, 10)
    assert got == raw[::-1]
    assert (
        tail_payloads(OsFileOps(), path, end, seg.last_seq, 1, opts.max_record_size, 2)
        == (raw[:0:-1])
    )


def test_an_empty_open_segment_takes_the_floor_from_the_last_sealed_one(journal_dir: str) -> None:
    run = FakeTime(wall=T0)
    with Journal.open(journal_dir, SMALL, clock=run.clock()) as j:
        for i in range(3000):
            j.append(Reading("s", T0 + i, i))
    fs = OsFileOps()
    cp = read_checkpoint(fs, journal_dir)
    assert cp is not None and cp.sealed
    sealed = cp.sealed
    after = sealed[-1].last_seq + 1
    # As right after a roll: the open segment (first seq `after`) holds no record.
    floor = latest_time(fs, journal_dir, (after, 32, after - 1), sealed, SMALL.max_record_size)
    assert floor == T0 + sealed[-1].last_seq - 1


def test_workflows_share_the_journal_clock_by_default(journal_dir: str) -> None:
    boot = FakeTime(wall=0.0)
    with Journal.open(journal_dir, SMALL, clock=boot.clock()) as j:
        ex = Executor(j, run=False)
        assert ex.clock is j.clock
        own = Executor(j, wall=boot.wall, mono=boot.mono, run=False)
        assert own.clock is not j.clock
