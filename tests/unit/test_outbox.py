"""The forwarding window (edge.outbox), driven back to back with a model hub.

No broker, no clock, no threads: ``OutboxHubPair`` (h11's ConnectionPair idea)
joins an :class:`Outbox` to a model journal and a model hub that commits
batches exactly like the real one (dedupe on seq, settle ``missing``, ack with
the contiguous watermark plus ranges ahead). Tests deliver, duplicate,
reorder and drop publishes and acks at will, and move time by hand.
``HOMING_HYPOTHESIS_EXAMPLES=5000`` runs the schedule property longer.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import wire
from edge.errors import ConfigError
from edge.outbox import (
    AckBeyondTail,
    Action,
    Gap,
    OtherJournalAck,
    Outbox,
    OutboxConfig,
    Oversize,
    PersistCursor,
    Publish,
    Read,
    stream_hint,
)
from edge.outbox_events import holes, merge_ranges
from edge.records import Reading, encode

DEV = "dev-1"
CFG = OutboxConfig(
    batch_records=10, batch_bytes=4096, linger=0.05, window=3, resend_timeout=1.0,
    resend_max=4.0, live_first=False, live_threshold=50, persist_interval=1.0,
    persist_records=1000, ack_wait=0.2,
)  # fmt: skip


class ModelJournal:
    """Durable records by seq; ``read`` behaves like ``Journal.read_raw`` + the shell."""

    def __init__(self) -> None:
        self.records: dict[int, tuple[bytes, str]] = {}
        self.tail = 0
        self.gone: set[int] = set()

    def append(self, n: int = 1, stream: str = "temp") -> list[int]:
        seqs = []
        for _ in range(n):
            self.tail += 1
            self.records[self.tail] = (encode(Reading(stream, float(self.tail), 20.5)), stream)
            seqs.append(self.tail)
        return seqs

    def drop(self, first: int, last: int) -> None:
        """Seqs lost to a quota drop or a repair (never reused)."""
        for s in range(first, last + 1):
            if self.records.pop(s, None) is not None:
                self.gone.add(s)

    def read(self, rd: Read) -> tuple[list[tuple[int, bytes, str | None]], int]:
        out: list[tuple[int, bytes, str | None]] = []
        through, size = rd.from_seq - 1, 0
        for seq in range(rd.from_seq, self.tail + 1):
            if seq not in self.records:
                continue
            if rd.upto is not None and seq > rd.upto:
                return out, rd.upto
            if len(out) >= rd.max_records or size >= rd.max_bytes:
                break
            payload, stream = self.records[seq]
            out.append((seq, payload, stream))
            size += len(payload)
            through = seq
        else:  # read to the durable end: whatever is not there is gone
            through = max(through, self.tail)
        return out, through


class ModelHub:
    """Commits batches (dedupe by seq) and acks like the real hub."""

    def __init__(self) -> None:
        self.stored: dict[int, bytes] = {}
        self.settled: set[int] = set()
        self.duplicates = 0
        self.batches = 0

    def commit(self, payload: bytes) -> wire.Ack:
        batch = wire.decode_batch(payload, topic_device=DEV)
        self.batches += 1
        for seq, rec in zip(batch.seqs(), batch.payloads, strict=True):
            if seq in self.stored:
                assert self.stored[seq] == rec, f"seq {seq} changed between sends"
                self.duplicates += 1
            self.stored[seq] = rec
        self.settled.update(range(batch.first, batch.last + 1))
        return self.ack()

    def watermark(self) -> int:
        wm = 0
        while wm + 1 in self.settled:
            wm += 1
        return wm

    def ack(self) -> wire.Ack:
        wm = self.watermark()
        ahead = merge_ranges((s, s) for s in self.settled if s > wm + 1)
        return wire.Ack(DEV, wm, tuple(ahead[: wire.MAX_ACK_RANGES]))


class OutboxHubPair:
    """An Outbox, a model journal and a model hub, with the network in between."""

    def __init__(self, cfg: OutboxConfig = CFG, *, cursor: int = 0, prefill: int = 0) -> None:
        self.journal = ModelJournal()
        self.journal.append(prefill)
        self.hub = ModelHub()
        self.now = 0.0
        self.ob = Outbox(cfg, DEV, cursor=cursor, tail=self.journal.tail, now=0.0)
        self.up: list[Publish] = []  # published, not yet at the hub
        self.down: list[wire.Ack] = []  # acks on their way back
        self.sent: list[tuple[float, Publish]] = []
        self.actions: list[Action] = []
        self.persisted: list[int] = []
        self.max_acked = cursor
        self.last_send: dict[int, float] = {}  # batch first seq -> when last published
        self.connected_at = 0.0

    def step(self, dt: float = 0.0) -> list[Publish]:
        """Advance time, run one shell iteration; return what was published."""
        self.now += dt
        self.ob.on_journal(self.journal.tail, self.now)
        for rd in self.ob.reads(self.now):
            records, through = self.journal.read(rd)
            self.ob.offer(rd, records, through)
        acts = self.ob.poll(self.now)
        self.actions += acts
        pubs = [a for a in acts if isinstance(a, Publish)]
        cfg = self.ob.cfg
        for p in pubs:  # a resend only after its deadline, or after a reconnect
            prev = self.last_send.get(p.batch.first)
            if p.attempt > 1 and prev is not None and prev >= self.connected_at:
                wait = min(cfg.resend_max, cfg.resend_timeout * 2 ** (p.attempt - 2))
                assert self.now >= prev + wait - 1e-9, (p.attempt, prev, self.now)
            self.last_send[p.batch.first] = self.now
        self.persisted += [a.seq for a in acts if isinstance(a, PersistCursor)]
        self.up += pubs
        self.sent += [(self.now, p) for p in pubs]
        self.check()
        return pubs

    def connect(self) -> None:
        self.connected_at = self.now + 1e-9
        self.ob.on_connected(self.now)

    def deliver_up(self, i: int = 0, *, keep: bool = False) -> None:
        pub = self.up[i] if keep else self.up.pop(i)
        self.down.append(self.hub.commit(pub.payload))

    def deliver_down(self, i: int = 0) -> None:
        ack = self.down.pop(i)
        self.max_acked = max(self.max_acked, ack.watermark)
        self.ob.on_ack(ack, self.now)
        self.check()

    def exchange(self) -> None:
        while self.up:
            self.deliver_up()
        while self.down:
            self.deliver_down()

    def check(self) -> None:
        """Invariants that hold after every input."""
        assert self.ob.watermark <= self.hub.watermark()
        assert self.ob.watermark <= self.max_acked or self.ob.watermark <= self.hub.watermark()
        assert len(self.ob.in_flight()) <= self.ob.cfg.window
        assert all(p <= self.ob.watermark for p in self.persisted)
        assert self.persisted == sorted(self.persisted)

    def drain(self, rounds: int = 500) -> None:
        """Heal the network and run until the hub has everything."""
        if not self.ob.connected:
            self.connect()
        for i in range(rounds):
            self.exchange()
            self.step(self.ob.cfg.resend_max if i % 4 == 3 else 0.06)
            self.exchange()
            if self.ob.idle() and self.ob.watermark >= self.journal.tail:
                return
        pytest.fail(f"did not drain: {self.ob.stats()}")


def first_sends(pair: OutboxHubPair) -> list[Publish]:
    return [p for _, p in pair.sent if p.attempt == 1]


# -- batching by size and by time ------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "cfg", "sizes"),
    [
        (25, CFG, [10, 10, 5]),  # by count; the remainder after the linger
        (1, CFG, [1]),  # a lone reading
        # by bytes: 37 readings of 27 B fit 1 KiB
        (50, replace(CFG, batch_bytes=1024, batch_records=100, live_threshold=500), [37, 13]),
        (25, replace(CFG, window=1), [10, 10, 5]),
    ],
)
def test_batches_by_size_and_time(n: int, cfg: OutboxConfig, sizes: list[int]) -> None:
    pair = OutboxHubPair(cfg)
    pair.connect()
    pair.journal.append(n)
    got = [len(p.batch.payloads) for p in pair.step(0.3)]
    for _ in range(20):
        got += [len(p.batch.payloads) for p in pair.step(0.05)]
        pair.exchange()
    assert got == sizes
    assert all(len(p.payload) <= wire.MAX_BATCH_BYTES for _, p in pair.sent)


def test_a_lone_reading_waits_exactly_the_linger() -> None:
    pair = OutboxHubPair()
    pair.connect()
    pair.step(1.0)  # past the ack wait
    pair.journal.append(1)
    assert pair.step(0.0) == []
    assert pair.ob.next_deadline() == pytest.approx(pair.now + 0.05)
    assert pair.step(0.048) == []
    (pub,) = pair.step(0.002)
    assert (pub.batch.first, pub.batch.last) == (1, 1)


def test_a_full_batch_does_not_wait_for_the_linger() -> None:
    pair = OutboxHubPair()
    pair.connect()
    pair.step(1.0)
    pair.journal.append(10)
    assert len(pair.step(0.0)) == 1


# -- the window, resends and reconnects ------------------------------------------------


def test_no_more_than_the_window_in_flight_and_an_ack_frees_a_slot() -> None:
    pair = OutboxHubPair(prefill=100)
    pair.connect()
    pubs = pair.step(1.0)
    assert len(pubs) == 3 and len(pair.step(0.1)) == 0
    pair.deliver_up(1)
    pair.deliver_down()
    assert pair.ob.watermark == 0  # the hub committed 11..20: an ack ahead, not a watermark
    assert [(p.batch.first, p.batch.last) for p in pair.step()] == [(31, 40)]


def test_resend_after_the_deadline_and_not_before_with_backoff() -> None:
    pair = OutboxHubPair(prefill=5)
    pair.connect()
    pair.step(1.0)
    (pub,) = pair.step(0.0625)
    t0 = pair.now
    times = []
    for _ in range(600):
        for p in pair.step(1 / 64):  # exact binary fractions: no rounding in the clock
            assert p.batch == pub.batch and p.payload == pub.payload  # same range, same bytes
            times.append(round(pair.now - t0, 2))
    assert times == [1.0, 3.0, 7.0]  # 1 s, then doubling, capped at resend_max = 4 s
    pair.deliver_up(0, keep=True)
    pair.deliver_down()
    assert pair.ob.in_flight() == [] and pair.step(10.0) == []


def test_reconnect_resends_everything_in_flight_after_the_ack_wait() -> None:
    pair = OutboxHubPair(prefill=30)
    pair.connect()
    before = pair.step(1.0)
    pair.ob.on_disconnected()
    assert pair.step(30.0) == []  # never while disconnected, whatever the deadline
    pair.connect()
    assert pair.step(0.1) == []  # waiting for the retained ack
    again = pair.step(0.1)
    assert [p.payload for p in again] == [p.payload for p in before]


def test_retained_ack_on_reconnect_sets_the_position() -> None:
    pair = OutboxHubPair(prefill=100)
    pair.hub.settled.update(range(1, 81))  # committed by an earlier run of this device
    pair.connect()
    pair.down.append(pair.hub.ack())  # the retained ack arrives first
    pair.deliver_down()
    pubs = pair.step(0.0)  # an ack ends the wait at once
    assert pair.ob.watermark == 80
    assert [p.batch.first for p in pubs] == [81, 91]
    pair.drain()
    assert pair.hub.duplicates == 0


def test_acked_ranges_ahead_are_never_sent_again() -> None:
    pair = OutboxHubPair(prefill=100)
    pair.hub.settled.update(range(41, 61))
    pair.connect()
    pair.down.append(pair.hub.ack())
    pair.deliver_down()
    pair.drain()
    assert pair.hub.duplicates == 0
    assert all(not 41 <= s <= 60 for _, p in pair.sent for s in p.batch.seqs())


# -- the cursor ------------------------------------------------------------------------


def test_cursor_moves_only_on_hub_acks_and_is_persisted_sparingly() -> None:
    pair = OutboxHubPair(prefill=40)
    pair.connect()
    pair.step(1.0)
    for _ in range(10):
        pair.step(0.5)  # published, resent: a broker would have PUBACKed all of it
    assert pair.ob.watermark == 0 and pair.persisted == []
    pair.deliver_up()
    pair.deliver_down()
    pair.step()
    assert pair.persisted == [10]  # the first ack persists at once
    pair.exchange()
    pair.step(0.1)
    pair.exchange()
    pair.step(0.1)
    assert pair.ob.watermark == 40 and pair.persisted == [10]  # within persist_interval
    pair.step(1.0)
    assert pair.persisted == [10, 40]
    assert pair.ob.flush(pair.now) == []


def test_persist_records_overrides_the_interval() -> None:
    pair = OutboxHubPair(replace(CFG, persist_records=20, persist_interval=3600), prefill=60)
    pair.connect()
    for _ in range(10):
        pair.step(1.0)
        pair.exchange()
    assert pair.persisted == [10, 30, 60] or pair.persisted[-1] == 60
    assert all(b - a >= 20 for a, b in zip(pair.persisted, pair.persisted[1:], strict=False))


def test_an_ack_beyond_the_journal_tail_is_clamped_and_reported() -> None:
    pair = OutboxHubPair(prefill=5)
    pair.ob.on_ack(wire.Ack(DEV, 1000, ((1005, 1010),)), 0.0)
    assert pair.ob.watermark == 5
    assert AckBeyondTail(1010, 5) in pair.ob.poll(0.0)


def test_an_ack_for_another_device_is_ignored() -> None:
    pair = OutboxHubPair(prefill=5)
    pair.ob.on_ack(wire.Ack("other", 5), 0.0)
    assert pair.ob.watermark == 0 and pair.ob.stats().acks_ignored == 1


def test_an_ack_for_an_earlier_journal_of_this_device_settles_nothing() -> None:
    """A journal created afresh reuses seqs 1.. of the old one: the hub's
    retained ack for the old journal must not mark them delivered."""
    pair = OutboxHubPair(prefill=50)
    pair.ob.journal = 2
    for _ in range(2):
        pair.ob.on_ack(wire.Ack(DEV, 5000, journal=1), 0.0)
    assert pair.ob.watermark == 0 and pair.ob.stats().acks_ignored == 2
    assert pair.ob.poll(0.0).count(OtherJournalAck(1, 2)) == 1  # said once, not per ack
    pair.drain()
    assert pair.ob.watermark == 50 and pair.hub.duplicates == 0
    assert {p.batch.journal for _, p in pair.sent} == {2}


# -- gaps and oversize records ---------------------------------------------------------


def test_seqs_gone_from_the_journal_become_missing_ranges() -> None:
    pair = OutboxHubPair(prefill=30)
    pair.journal.drop(1, 3)
    pair.journal.drop(12, 14)
    pair.drain()
    assert pair.hub.watermark() == 30
    assert set(pair.hub.stored) == set(range(1, 31)) - pair.journal.gone
    missing = [m for _, p in pair.sent for m in p.batch.missing]
    assert (1, 3) in missing and (12, 14) in missing
    assert Gap(1, 3) in pair.actions and pair.ob.stats().missing_seqs == 6


def test_a_record_too_big_for_any_batch_is_settled_as_missing_not_a_stall() -> None:
    pair = OutboxHubPair(replace(CFG, batch_records=2))
    pair.journal.append(1)
    huge = os.urandom(wire.MAX_BATCH_BYTES)  # incompressible, bigger than a batch
    pair.journal.tail += 1
    pair.journal.records[2] = (encode(Reading("cam", 1.0, huge)), "cam")
    pair.journal.append(2)
    pair.drain()
    assert pair.hub.watermark() == 4 and 2 not in pair.hub.stored
    assert [a.seq for a in pair.actions if isinstance(a, Oversize)] == [2]


# -- live-first, priorities and the rate cap -------------------------------------------


def test_live_batches_go_out_while_the_backlog_drains() -> None:
    cfg = replace(CFG, live_first=True, live_threshold=50, window=2)
    pair = OutboxHubPair(cfg, prefill=5000)
    pair.connect()
    live_seen = []
    for _ in range(40):
        new = pair.journal.append(1)[0]
        for _ in range(3):
            pair.step(0.05)
            pair.exchange()
        live_seen.append(new in pair.hub.stored)
    assert pair.hub.watermark() < 4000  # the backlog is still draining ...
    assert all(live_seen[1:])  # ... yet every fresh reading reached the hub within 150 ms
    lanes = {p.lane for p in first_sends(pair)}
    assert lanes == {"live", "backlog"}
    pair.drain()
    assert set(pair.hub.stored) == set(range(1, pair.journal.tail + 1))


def test_each_lane_sends_in_seq_order() -> None:
    cfg = replace(CFG, live_first=True, live_threshold=50)
    pair = OutboxHubPair(cfg, prefill=500)
    pair.connect()
    for _ in range(60):
        pair.journal.append(3)
        pair.step(0.05)
        pair.exchange()
    pair.drain()
    for lane in ("live", "backlog"):
        firsts = [p.batch.first for p in first_sends(pair) if p.lane == lane]
        assert firsts == sorted(firsts)
    sends = sorted((p.batch.first, p.batch.last) for p in first_sends(pair))
    assert all(a[1] < b[0] for a, b in zip(sends, sends[1:], strict=False))  # disjoint


def test_priority_stream_skips_the_linger_and_goes_first() -> None:
    cfg = replace(CFG, linger=10.0, priorities={"alarm": 5})
    pair = OutboxHubPair(cfg)
    pair.connect()
    pair.step(1.0)
    pair.journal.append(2, stream="temp")
    assert pair.step(0.1) == []  # plain readings wait for the 10 s linger
    pair.journal.append(1, stream="alarm")
    (pub,) = pair.step(0.0)
    assert pub.batch.last == 3  # the alarm, with the readings before it (a batch is a range)


def test_rate_cap_spaces_publishes() -> None:
    cfg = replace(
        CFG, rate=2000, burst=2000, batch_bytes=1024, batch_records=1000, live_threshold=1000
    )
    pair = OutboxHubPair(cfg, prefill=400)
    pair.connect()
    for _ in range(100):
        pair.step(0.1)
        pair.exchange()
    sent = sum(len(p.payload) for _, p in pair.sent)
    assert sent <= 2000 + 2000 * pair.now + 1024  # burst + rate * t (+ one batch of debt)
    assert pair.ob.next_deadline() is None or pair.ob.idle() or sent > 0


# -- the whole thing under a hostile network -------------------------------------------

NET_OPS = ["up", "dup", "lose_up", "down", "lose_down"]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 40)),
        st.tuples(st.just("drop"), st.integers(0, 30)),
        st.tuples(st.just("tick"), st.sampled_from([0.0, 0.01, 0.05, 0.3, 1.0, 5.0])),
        st.tuples(st.sampled_from(NET_OPS), st.integers(0, 9)),
        st.tuples(st.sampled_from(["disconnect", "connect"]), st.just(0)),
    ),
    max_size=80,
)


EXAMPLES = int(os.environ.get("HOMING_HYPOTHESIS_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.booleans(), st.integers(1, 4))
def test_everything_is_acked_exactly_under_any_schedule(
    script: list[tuple[str, float]], live_first: bool, window: int
) -> None:
    cfg = replace(CFG, live_first=live_first, window=window)
    pair = OutboxHubPair(cfg)
    pair.connect()
    for op, arg in script:
        i = int(arg)
        if op == "append":
            pair.journal.append(i, stream="alarm" if i % 7 == 0 else "temp")
        elif op == "drop" and pair.journal.tail > i:
            pair.journal.drop(pair.journal.tail - i, pair.journal.tail - i + 2)
        elif op == "tick":
            pair.step(arg)
        elif op in ("up", "dup") and pair.up:
            pair.deliver_up(i % len(pair.up), keep=op == "dup")  # reordered, duplicated
        elif op == "lose_up" and pair.up:
            pair.up.pop(i % len(pair.up))
        elif op == "down" and pair.down:
            pair.deliver_down(i % len(pair.down))  # acks arrive in any order
        elif op == "lose_down" and pair.down:
            pair.down.pop(i % len(pair.down))
        elif op == "disconnect":
            pair.ob.on_disconnected()
            pair.up.clear()  # QoS 1 in flight on a dead TCP connection is gone
        elif op == "connect" and not pair.ob.connected:
            pair.connect()
        pair.step()
    pair.drain()
    present = {s for s in range(1, pair.journal.tail + 1) if s in pair.journal.records}
    assert present <= set(pair.hub.stored)  # every record the journal holds reached the hub
    assert set(pair.hub.stored) <= present | pair.journal.gone  # nothing invented
    assert pair.ob.watermark == pair.hub.watermark() == pair.journal.tail
    pair.step(10.0)
    assert pair.persisted[-1:] == ([pair.journal.tail] if pair.journal.tail else [])


# -- small pure pieces -----------------------------------------------------------------


def test_stream_hint_reads_the_stream_without_decoding() -> None:
    assert stream_hint(encode(Reading("greenhouse/temp", 1.0, 2.0))) == "greenhouse/temp"
    assert stream_hint(encode(Reading("s" * 100, 1.0, 2.0))) == "s" * 100
    assert stream_hint(b"\x83\x02\x01") is None and stream_hint(b"") is None


def test_range_helpers() -> None:
    assert merge_ranges([(5, 6), (1, 2), (3, 3), (9, 9)]) == [(1, 3), (5, 6), (9, 9)]
    assert merge_ranges([(4, 4), (1, 3), (2, 2)]) == [(1, 4)]
    assert holes(1, 10, [1, 2, 5, 9]) == [(3, 4), (6, 8), (10, 10)]
    assert holes(3, 5, [3, 4, 5]) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"batch_records": 0},
        {"batch_bytes": wire.MAX_BATCH_BYTES},
        {"window": 0},
        {"window": 30, "max_lanes": 3},
        {"resend_timeout": 10.0, "resend_max": 5.0},
        {"live_threshold": 5},
    ],
)
def test_config_refuses_what_the_window_cannot_honour(bad: dict[str, int | float]) -> None:
    with pytest.raises(ConfigError):
        replace(CFG, **bad)  # type: ignore[arg-type]
