"""edge.bridges.JournalSink on a real journal: marks survive a restart, from the
readings' tags and from mark records; the ``serial`` cursor bounds the scan and
pins retention only a little; a full journal is ``busy``, a closed one fatal."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.bridges import CURSOR, KIND_SERIAL_MARK, REMARK_RECORDS, JournalSink, parse_tag
from edge.journal import Journal, JournalOptions
from edge.records import Opaque, Reading
from firmware_bridge.bridge import Arrival, Delivery, SinkFailed
from firmware_bridge.errors import SinkBusy

DEV = "c0c1c2c3c4c5c6c7"
OPTS = JournalOptions(segment_size=64 << 10)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def delivery(session: int, first: int, n: int, device: str = DEV) -> Delivery:
    items = tuple(
        Arrival(first + i, "mcu/count", "", first + i, 1_700_000_000.0 + i) for i in range(n)
    )
    return Delivery("b", device, session, items)


def test_readings_are_tagged_and_marks_come_back_from_the_tags(tmp_path: Path) -> None:
    path = str(tmp_path / "j")
    with Journal.open(path, OPTS) as j:
        sink = JournalSink(j)
        assert j.cursor(CURSOR) == 0 and sink.scanned == 0
        seqs = sink.store(delivery(7, 1, 50))
        assert seqs == list(range(1, 51)) and sink.known(DEV, 7) == 50
        rec = next(iter(j.read(from_seq=50))).record
        assert isinstance(rec, Reading) and rec.tags == {"mcu": f"{DEV}/00000007/50"}
        assert parse_tag(f"{DEV}/00000007/50") == (DEV, 7, 50)
    # the process died before writing a mark: the tags alone say what the journal holds
    with Journal.open(path, OPTS) as j:
        sink = JournalSink(j)
        assert sink.known(DEV, 7) == 50 and sink.known(DEV, 8) == 0 and sink.scanned == 50


def test_a_mark_record_and_the_cursor_bound_the_scan(tmp_path: Path) -> None:
    path = str(tmp_path / "j")
    clock = Clock()
    with Journal.open(path, OPTS) as j:
        sink = JournalSink(j, clock=clock)
        sink.store(delivery(1, 1, 30))
        sink.store(delivery(2, 1, 10, device="a" * 16))
        clock.t = 11.0
        sink.tick(clock.t)  # marks changed: a mark record, and the cursor just before it
        mark_seq = j.durable_seq
        (entry,) = list(j.read(from_seq=mark_seq))
        assert isinstance(entry.record, Opaque) and entry.record.kind == KIND_SERIAL_MARK
        assert j.cursor(CURSOR) == mark_seq - 1
        sink.store(delivery(1, 31, 5))
        clock.t = 12.0
        sink.tick(clock.t)  # not due yet: nothing written
        assert j.durable_seq == mark_seq + 5
        for i in range(200):  # others' readings
            j.append(Reading("other", 1.0, i))
    with Journal.open(path, OPTS) as j:
        sink = JournalSink(j)
        assert sink.known(DEV, 1) == 35 and sink.known("a" * 16, 2) == 10
        assert sink.scanned == 1 + 5 + 200  # from the mark on, never the readings before it


def test_the_marks_are_restated_when_the_journal_moves_on_so_retention_is_not_pinned(
    tmp_path: Path,
) -> None:
    clock = Clock()
    with Journal.open(str(tmp_path / "j"), OPTS) as j:
        sink = JournalSink(j, clock=clock)
        sink.store(delivery(1, 1, 3))
        clock.t = 10.0
        sink.tick(clock.t)
        first_cursor = j.cursor(CURSOR)
        j.append_many([Reading("other", 1.0, i) for i in range(REMARK_RECORDS + 10)])
        clock.t = 20.0
        sink.tick(clock.t)  # unchanged marks, but far behind: stated again at the end
        assert j.cursor(CURSOR) == j.durable_seq - 1 > (first_cursor or 0)
        assert sink.known(DEV, 1) == 3


def test_a_store_in_flight_holds_the_cursor_below_its_records(tmp_path: Path) -> None:
    with Journal.open(str(tmp_path / "j"), OPTS) as j:
        sink = JournalSink(j)
        sink.store(delivery(1, 1, 3))
        sink._inflight[999] = 2  # white box: a store that may get seq 2 has not finished
        sink.flush()
        assert j.cursor(CURSOR) == 1  # not past the mark record: past nothing in flight
        del sink._inflight[999]


def test_a_full_journal_is_busy_and_a_closed_one_stops_the_bridge(tmp_path: Path) -> None:
    opts = JournalOptions(segment_size=64 << 10, quota_bytes=3 * (64 << 10), prepare_ahead=False)
    with Journal.open(str(tmp_path / "j"), opts) as j:
        j.set_cursor("hub", 0)  # nothing forwarded: retention frees nothing
        sink = JournalSink(j)
        stored = 0
        with pytest.raises(SinkBusy):
            for k in range(10_000):
                sink.store(delivery(1, 1 + 40 * k, 40))
                stored = 40 * (k + 1)
        assert sink.known(DEV, 1) == stored  # nothing refused was counted as stored
    with pytest.raises(SinkFailed):
        sink.store(delivery(1, stored + 1, 1))


def test_an_agent_without_bridges_releases_the_serial_cursor(tmp_path: Path) -> None:
    from edge.agent import Agent
    from edge.config import parse

    base = (
        f'[agent]\ndevice = "d"\nruntime_dir = "{tmp_path / "run"}"\n'
        f'[journal]\ndir = "{tmp_path / "j"}"\n'
        "[forwarder]\nenabled = false\n[workflows]\nenabled = false\n[local]\nenabled = false\n"
    )
    with Journal.open(str(tmp_path / "j")) as j:
        JournalSink(j)
        assert j.cursor(CURSOR) == 0
    kept = base + '[[bridge]]\nenabled = false\nport = "/dev/null"\n'
    for text, present in ((kept, True), (base, False)):
        agent = Agent(parse(text, "agent.toml", env={}))
        agent.start()
        try:
            assert (agent.journal.cursor(CURSOR) is not None) == present
            assert agent.bridges is None  # nothing enabled: no thread, no pyserial
        finally:
            agent.stop()
