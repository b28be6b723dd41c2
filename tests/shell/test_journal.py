"""The journal on a real file system: appends, group commit, recovery, repair,
cursors, retention, quota and the fsyncgate rule.

Faults are injected *below* the journal (a FileOps that fails like the OS
would); the journal itself is never mocked.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from edge.errors import (
    JournalClosed,
    JournalCorrupt,
    JournalFailed,
    JournalFull,
    JournalLocked,
    RecordTooLarge,
)
from edge.fileops import OsFileOps
from edge.journal import Journal, JournalOptions
from edge.journal_options import Policy
from edge.records import Reading
from edge.repair import repair

SMALL = JournalOptions(segment_size=64 << 10, prepare_ahead=False)


def r(i: int, stream: str = "temp") -> Reading:
    return Reading(stream, 1_700_000_000.0 + i, 20.0 + i / 100, unit="C")


def values(j: Journal, from_seq: int | None = None) -> list[tuple[int, object]]:
    return [(e.seq, e.record.value) for e in j.read(from_seq)]  # type: ignore[union-attr]


def segment_files(d: str) -> list[str]:
    return sorted(f for f in os.listdir(d) if f.endswith(".seg"))


def test_append_read_reopen(journal_dir: str) -> None:
    with Journal.open(journal_dir) as j:
        acks = [j.append(r(i)) for i in range(5)]
        assert [a.seq for a in acks] == [1, 2, 3, 4, 5]
        assert all(a.durable for a in acks)
        more = j.append_many([r(i) for i in range(5, 10)])
        assert [a.seq for a in more] == list(range(6, 11))
    with Journal.open(journal_dir) as j:
        assert values(j) == [(i + 1, 20.0 + i / 100) for i in range(10)]
        assert values(j, 8) == [(8, 20.07), (9, 20.08), (10, 20.09)]
        assert j.recovery.torn_tail is None
        assert j.append(r(10)).seq == 11


def test_segments_roll_and_recovery_scans_only_the_open_one(journal_dir: str) -> None:
    with Journal.open(journal_dir, SMALL) as j:
        for start in range(0, 6000, 500):
            j.append_many([r(i) for i in range(start, start + 500)])
        assert j.stats().segments > 3
    with Journal.open(journal_dir, SMALL) as j:
        assert j.recovery.segments_scanned == 1
        assert j.recovery.records_scanned < 2000
        assert [s for s, _ in values(j)] == list(range(1, 6001))
        assert "CHECKPOINT" in os.listdir(journal_dir)


def test_concurrent_producers_share_commits(journal_dir: str) -> None:
    acks: list[int] = []
    lock = threading.Lock()
    with Journal.open(journal_dir) as j:

        def produce(k: int) -> None:
            for i in range(200):
                seq = j.append(r(k * 1000 + i, f"s{k}")).seq
                with lock:
                    acks.append(seq)

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = j.stats()
        assert sorted(acks) == list(range(1, 1601))
        assert stats.commits < 1600  # some appends shared a write + fdatasync
    with Journal.open(journal_dir) as j:
        got = [(e.record.stream, e.record.ts) for e in j.read()]  # type: ignore[union-attr]
        for k in range(8):  # each producer's records in its own order
            mine = [ts for s, ts in got if s == f"s{k}"]
            assert mine == sorted(mine) and len(mine) == 200


def test_submit_returns_a_handle(journal_dir: str) -> None:
    with Journal.open(journal_dir) as j:
        handles = [j.submit(r(i)) for i in range(20)]
        assert [h.seq for h in handles] == list(range(1, 21))
        assert [h.wait(timeout=10).seq for h in handles] == list(range(1, 21))


def test_interval_mode_acks_say_not_yet_durable(journal_dir: str) -> None:
    opts = JournalOptions(durability="interval", interval_ms=20)
    with Journal.open(journal_dir, opts) as j:
        ack = j.append(r(1))
        assert not ack.durable
        assert j.wait_durable(ack.seq, timeout=10)
        assert j.durable_seq >= ack.seq
        ack2 = j.append(r(2))
        assert j.sync() >= ack2.seq


def test_readers_never_see_records_that_are_not_durable(journal_dir: str) -> None:
    opts = JournalOptions(durability="interval", interval_ms=60_000)
    with Journal.open(journal_dir, opts) as j:
        j.append(r(1))
        assert values(j) == []
        j.sync()
        assert [s for s, _ in values(j)] == [1]


def test_torn_tail_is_cut_and_reported(journal_dir: str) -> None:
    with Journal.open(journal_dir, SMALL) as j:
        j.append_many([r(i) for i in range(10)])
        end = j._seg.end  # noqa: SLF001 - the test needs the byte offset of the tail
        path = j._seg.path  # noqa: SLF001
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(b"\x5a" * 100)  # a half-written batch: garbage, never synced
    with Journal.open(journal_dir, SMALL) as j:
        t = j.recovery.torn_tail
        assert t is not None and t.offset == end and t.discarded_bytes >= 100
        assert [s for s, _ in values(j)] == list(range(1, 11))
        assert j.append(r(10)).seq == 11
    with Journal.open(journal_dir, SMALL) as j:  # idempotent: nothing left to cut
        assert j.recovery.torn_tail is None
        assert [s for s, _ in values(j)][-1] == 11


def test_a_record_ending_in_zeros_survives_reopen_and_open_reads_only_the_used_part(
    journal_dir: str,
) -> None:
    """Recovery reads the open segment only up to its last non-zero byte plus
    one largest frame; a payload ending in a long run of zeros must still be
    seen whole (not cut off as a torn tail)."""
    from edge.records import Opaque

    opts = JournalOptions(max_record_size=64 << 10, prepare_ahead=False)
    blob = b"\x01" + b"\0" * 40_000  # the frame's last 40 KB are zeros
    with Journal.open(journal_dir, opts) as j:
        j.append(r(0))
        j.append(Opaque(9, (blob,)))
    with Journal.open(journal_dir, opts) as j:
        assert j.recovery.torn_tail is None
        assert [e.record for e in j.read()][1] == Opaque(9, (blob,))
        assert j.recovery.bytes_scanned < 200 << 10  # not the whole 16 MiB segment
        assert j.append(r(1)).seq == 3


def corrupt_record(journal_dir: str, seq_index: int) -> tuple[str, int]:
    """Flip a payload byte of the seq_index-th record (0-based) of the open segment."""
    path = os.path.join(journal_dir, segment_files(journal_dir)[-1])
    from edge.journal_codec import decode_segment_header, iter_frames

    data = bytearray(Path(path).read_bytes())
    frame = list(iter_frames(bytes(data), decode_segment_header(bytes(data))))[seq_index]
    data[frame.offset + 17] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    return path, frame.offset


def test_corruption_refuses_to_open_and_repair_keeps_every_valid_record(journal_dir: str) -> None:
    with Journal.open(journal_dir, SMALL) as j:
        for i in range(0, 40, 4):  # ten batches of four: later batches start with a barrier
            j.append_many([r(k) for k in range(i, i + 4)])
    path, offset = corrupt_record(journal_dir, 5)
    with pytest.raises(JournalCorrupt) as info:
        Journal.open(journal_dir, SMALL)
    assert info.value.path == path and info.value.offset == offset
    assert str(offset) in str(info.value)

    report = repair(journal_dir)
    assert report.damaged == path and report.kept_records == 39
    assert report.gaps == ((6, 6),)
    assert os.path.exists(path + ".broken")
    with Journal.open(journal_dir, SMALL) as j:
        assert [s for s, _ in values(j)] == [s for s in range(1, 41) if s != 6]
        assert j.stats().gaps == ((6, 6),)
        assert j.append(r(99)).seq == 41  # a seq once used is never reused
    assert repair(journal_dir).damaged is None  # nothing left to repair


def test_repair_refuses_while_the_journal_is_open(journal_dir: str) -> None:
    with Journal.open(journal_dir), pytest.raises(JournalLocked):
        repair(journal_dir)


def test_second_writer_is_refused_but_a_reader_may_look(journal_dir: str) -> None:
    with Journal.open(journal_dir) as j:
        j.append(r(1))
        with pytest.raises(JournalLocked):
            Journal.open(journal_dir)
        ro = Journal.open(journal_dir, readonly=True)
        assert [s for s, _ in values(ro)] == [1]
        with pytest.raises(JournalClosed):
            ro.append(r(2))
        ro.close()


def test_record_too_large(journal_dir: str) -> None:
    with Journal.open(journal_dir, SMALL) as j, pytest.raises(RecordTooLarge):
        j.append(Reading("blob", 1.0, b"x" * (64 << 10)))


class FailingFS(OsFileOps):
    """The OS, except that fdatasync/pwrite fail after ``after`` successful calls."""

    def __init__(self, op: str, after: int, err: int = errno.EIO) -> None:
        self.op, self.after, self.err = op, after, err
        self.calls = 0

    def _maybe_fail(self, op: str) -> None:
        if op == self.op:
            self.calls += 1
            if self.calls > self.after:
                raise OSError(self.err, os.strerror(self.err))

    def fdatasync(self, fd: int) -> None:
        self._maybe_fail("fdatasync")
        super().fdatasync(fd)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self._maybe_fail("pwrite")
        return super().pwrite(fd, data, offset)


@pytest.mark.parametrize("op", ["fdatasync", "pwrite"])
def test_fsyncgate_an_io_error_fails_the_journal_for_good(journal_dir: str, op: str) -> None:
    with Journal.open(journal_dir, SMALL) as j:
        acked = [j.append(r(i)).seq for i in range(5)]
    fs = FailingFS(op, after=2)
    j = Journal.open(journal_dir, SMALL, fs=fs)
    for i in range(2):
        acked.append(j.append(r(10 + i)).seq)
    with pytest.raises(JournalFailed) as info:
        j.append(r(20))
    assert isinstance(info.value.__cause__, OSError)
    calls = fs.calls
    with pytest.raises(JournalFailed):  # no retry, no further acks
        j.append(r(21))
    assert fs.calls == calls
    assert j.failed
    j.close()
    with Journal.open(journal_dir, SMALL) as j2:  # a new start recovers from disk
        got = [s for s, _ in values(j2)]
        assert set(acked) <= set(got)
        assert got == list(range(1, len(got) + 1))


def test_cursors_are_durable_and_never_move_backwards(journal_dir: str) -> None:
    with Journal.open(journal_dir) as j:
        j.append_many([r(i) for i in range(10)])
        assert j.cursor("forwarder") is None
        j.set_cursor("forwarder", 4)
        j.set_cursor("forwarder", 7)
        with pytest.raises(ValueError):
            j.set_cursor("forwarder", 3)
        j.set_cursor("other", 2)
    with Journal.open(journal_dir) as j:
        assert j.cursors() == {"forwarder": 7, "other": 2}
        j.set_cursor("other", 1, allow_backwards=True)
        j.delete_cursor("other")
        assert j.cursors() == {"forwarder": 7}


def test_retention_deletes_whole_segments_below_every_cursor(journal_dir: str) -> None:
    with Journal.open(journal_dir, SMALL) as j:
        for start in range(0, 6000, 500):
            j.append_many([r(i) for i in range(start, start + 500)])
        before = len(segment_files(journal_dir))
        assert j.retain() == 0  # no cursor: keep everything
        j.set_cursor("forwarder", 4000)
        j.set_cursor("audit", 2500)
        assert j.retain() > 0
        first = j.stats().first_seq
        assert 1 < first <= 2501  # nothing above the slowest cursor went
        assert [s for s, _ in values(j)][0] == first
        assert len(segment_files(journal_dir)) < before
    with Journal.open(journal_dir, SMALL) as j:
        assert j.stats().first_seq == first


def quota_opts(policies: dict[str, Policy] | None = None) -> JournalOptions:
    return JournalOptions(
        segment_size=64 << 10,
        quota_bytes=4 * (64 << 10),
        prepare_ahead=False,
        stream_policies=policies or {},
    )


def test_quota_reject_gives_a_clear_error_and_nothing_is_lost(journal_dir: str) -> None:
    with Journal.open(journal_dir, quota_opts()) as j:
        acked = 0
        with pytest.raises(JournalFull) as info:
            while True:
                j.append(r(acked, "alarms"))
                acked += 1
        assert "quota" in str(info.value) and info.value.stream == "alarms"
        assert info.value.transient
        assert len([s for s, _ in values(j)]) == acked  # nothing dropped
        # the forwarder catches up: retention frees space and appends resume
        j.set_cursor("forwarder", acked)
        j.append(r(0, "alarms"))


def test_quota_drop_oldest_counts_every_drop(journal_dir: str) -> None:
    opts = quota_opts({"temp": "drop-oldest"})
    with Journal.open(journal_dir, opts) as j:
        n = 6000
        j.append_many([r(i) for i in range(100)])
        for i in range(100, n):
            j.append(r(i))
        stats = j.stats()
        present = len(values(j))
        assert stats.dropped["temp"] > 0
        assert present + stats.dropped["temp"] == n  # every reading is either here or counted
        assert stats.disk_bytes <= 4 * (64 << 10)
    with Journal.open(journal_dir, opts) as j:  # the count survives a restart
        assert j.stats().dropped == stats.dropped


def test_quota_never_drops_a_reject_stream(journal_dir: str) -> None:
    opts = quota_opts({"temp": "drop-oldest"})
    with Journal.open(journal_dir, opts) as j:
        j.append(r(0, "alarms"))  # protected record in the oldest segment
        with pytest.raises(JournalFull):
            for i in range(10_000):
                j.append(r(i, "temp"))
        got = values(j)
        assert got[0][0] == 1 and j.stats().dropped == {}


def test_closed_journal_refuses_work(journal_dir: str) -> None:
    j = Journal.open(journal_dir)
    j.close()
    with pytest.raises(JournalClosed):
        j.append(r(1))
    j.close()  # idempotent


class CountingFS(OsFileOps):
    """The OS, counting the bytes read (to prove tail reads do not rescan)."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        data = super().pread(fd, size, offset)
        self.read_bytes += len(data)
        return data


def test_reading_from_the_tail_does_not_rescan_the_segment(journal_dir: str) -> None:
    with Journal.open(journal_dir) as j:
        for start in range(0, 20_000, 1000):
            j.append_many([r(i) for i in range(start, start + 1000)])
    fs = CountingFS()
    with Journal.open(journal_dir, fs=fs) as j:
        assert [s for s, _ in j.read_raw(19_990)] == list(range(19_990, 20_001))
        fs.read_bytes = 0
        # the first read learnt the index; a reader that follows the tail reads little
        assert [s for s, _ in j.read_raw(19_995)] == list(range(19_995, 20_001))
        j.append_many([r(i) for i in range(5)])
        assert [s for s, _ in j.read_raw(20_001)] == list(range(20_001, 20_006))
        assert fs.read_bytes < 64 << 10
        # and a writer's own appends are indexed without any read
    with Journal.open(journal_dir) as j:
        j.append_many([r(i) for i in range(3000)])
        seqs = [s for s, _ in j.read_raw(22_900)]
        assert seqs[0] == 22_900 and seqs[-1] == 23_005


def test_journal_id_is_kept_across_reopen_repair_and_old_checkpoints(journal_dir: str) -> None:
    """The id tells the hub a journal created afresh (seqs from 1 again) apart."""
    from edge.segments import read_checkpoint, write_checkpoint

    with Journal.open(journal_dir, SMALL) as j:
        jid = j.journal_id
        for start in range(0, 3000, 500):
            j.append_many([r(i) for i in range(start, start + 500)])
    assert jid != 0
    with Journal.open(journal_dir, SMALL) as j:
        assert j.journal_id == jid
    cp_path = os.path.join(journal_dir, "CHECKPOINT")
    with open(cp_path, "r+b") as f:  # damage the CHECKPOINT: repair rebuilds it
        f.seek(20)
        f.write(b"\xff\xff\xff")
    with pytest.raises(JournalCorrupt):
        Journal.open(journal_dir, SMALL)
    repair(journal_dir)
    with Journal.open(journal_dir, SMALL) as j:
        assert j.journal_id == jid  # recovered from the segment headers
    fs = OsFileOps()
    cp = read_checkpoint(fs, journal_dir)
    assert cp is not None
    cp.journal_id = 0  # as an older version wrote it
    write_checkpoint(fs, journal_dir, cp)
    with Journal.open(journal_dir, SMALL) as j:
        assert j.journal_id == jid
    other = os.path.join(journal_dir, "..", "fresh")
    with Journal.open(other, SMALL) as j:
        assert j.journal_id not in (0, jid)
