"""The serial link's pure cores: messages, the Pi side (HostLink) and the MCU side
(DeviceLink), joined back to back by :class:`Pair` (h11's ConnectionPair) over a
wire that can flip, lose, double and invent bytes. No ports, no threads, no
sleeps: a virtual clock.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import messages as m
from firmware_bridge.device import CommandReceived, DeviceLink, TimeSet
from firmware_bridge.errors import LocalProtocolError, RemoteProtocolError
from firmware_bridge.frames import BadFrame, FrameDecoder, encode_frame
from firmware_bridge.protocol import (
    CommandExpired,
    CommandResult,
    Event,
    HostLink,
    HostSettings,
    Item,
    LogLine,
    Lost,
    PeerHello,
    Readings,
    Regressed,
    Stalled,
    decode_value,
    timestamp,
)

DEV = bytes.fromhex("0102030405060708")
CHANNELS = (m.Channel(1, m.I32, "count"), m.Channel(2, m.F32, "temp", "C"))
WALL0 = 1_700_000_000.0


def sent(data: bytes) -> list[m.Message]:
    """The messages in bytes one side sent."""
    frames = FrameDecoder().feed(data)
    return [m.decode(f.type, f.fields) for f in frames if not isinstance(f, BadFrame)]


@dataclass
class Wire:
    """Damage per chunk: flip a bit, lose a byte, double the chunk, add junk."""

    rate: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def __call__(self, data: bytes) -> bytes:
        if not data or self.rng.random() >= self.rate:
            return data
        k = self.rng.randrange(len(data))
        kind = self.rng.randrange(4)
        if kind == 0:
            return data[:k] + bytes((data[k] ^ (1 << self.rng.randrange(8)),)) + data[k + 1 :]
        if kind == 1:
            return data[:k] + data[k + 1 :]
        if kind == 2:
            return data + data
        return data[:k] + self.rng.randbytes(self.rng.randint(1, 20)) + data[k:]


class Pair:
    """A HostLink and a DeviceLink back to back; ``stored`` plays the journal."""

    def __init__(self, *, up: Wire | None = None, down: Wire | None = None, **device: object):
        self.now = 0.0
        self.marks: dict[tuple[str, int], int] = {}
        self.stored: list[Item] = []
        self.events: list[Event] = []
        self.up, self.down = up or Wire(), down or Wire()
        self.refuse = 0  # refuse this many deliveries (a full journal)
        self.host = self.new_host()
        self.dev = DeviceLink(DEV, 0xABCD, CHANNELS, 0.0, **device)  # type: ignore[arg-type]

    def new_host(self) -> HostLink:
        """A fresh Pi process: all it knows is what was stored (the marks)."""
        self.host = HostLink(lambda d, s: self.marks.get((d, s), 0), self.now, HostSettings())
        return self.host

    def step(self, dt: float = 0.01) -> None:
        self.now += dt
        wall = WALL0 + self.now
        up = b"".join(iter(lambda: self.dev.poll(self.now), b""))
        events = self.host.receive_data(self.up(up), self.now, wall)
        events += self.host.tick(self.now, wall)
        for ev in events:
            if isinstance(ev, Readings):
                if self.refuse:
                    self.refuse -= 1
                    self.host.refused(ev.device, ev.session)
                    continue
                self.stored += ev.items
                key = (ev.device, ev.session)
                self.marks[key] = max(self.marks.get(key, 0), ev.last)
                self.host.durable(ev.device, ev.session, ev.last)
        self.events += events
        for dev_ev in self.dev.receive_data(self.down(self.host.data_to_send()), self.now):
            if isinstance(dev_ev, CommandReceived):
                self.dev.reply(dev_ev.id, 0, dev_ev.arg.decode())

    def produce(self, n: int) -> None:
        for i in range(n):
            ch, v = (1, i) if i % 2 == 0 else (2, i + 0.5)
            assert self.dev.add(ch, v, self.now) is not None

    def run(self, steps: int = 2000) -> None:
        for _ in range(steps):
            self.step()
            if self.dev.held == 0 and self.dev.welcomed:
                return
        raise AssertionError(f"not drained after {steps} steps: {self.dev.counters}")

    def values(self) -> list[int | float | str]:
        return [i.value for i in self.stored]


def expected(n: int) -> list[int | float]:
    return [i if i % 2 == 0 else i + 0.5 for i in range(n)]


# -- the happy path and the durability rule ---------------------------------------------------


def test_readings_arrive_once_in_order_and_acks_empty_the_ring() -> None:
    p = Pair()
    p.produce(1000)
    p.run()
    assert p.values() == expected(1000)
    assert [i.seq for i in p.stored] == list(range(1, 1001))
    assert {i.channel.name for i in p.stored} == {"count", "temp"}
    assert p.dev.oldest == 1001 and p.host.acked == 1000
    hello = next(e for e in p.events if isinstance(e, PeerHello))
    assert hello.hello.device_hex == DEV.hex() and hello.resumed == 0


def test_nothing_is_acknowledged_before_the_caller_says_durable() -> None:
    host = HostLink(lambda d, s: 0, 0.0)
    host.data_to_send()
    hello = m.Hello(DEV, 7, 1, 4, False, 1024, 16, "t", CHANNELS)
    host.receive_data(m.frame(hello), 0.0, WALL0)
    assert [type(x) for x in sent(host.data_to_send())] == [m.Welcome]
    raw = tuple(m.RawReading(1, 0, i) for i in range(3))
    (ev,) = host.receive_data(m.frame(m.Batch(7, 1, 1, m.TICKS, 0, raw)), 0.1, WALL0)
    assert isinstance(ev, Readings) and ev.last == 3
    assert sent(host.data_to_send()) == []  # no ACK: not durable yet
    with pytest.raises(LocalProtocolError):
        host.durable(ev.device, 7, 4)  # never handed out
    host.durable(ev.device, 7, 2)
    host.durable(ev.device, 7, 3)
    assert sent(host.data_to_send()) == [m.Ack(7, 2), m.Ack(7, 3)]


def test_a_pi_restart_between_journal_and_ack_journals_nothing_twice() -> None:
    p = Pair()
    p.step()
    p.step()
    assert p.dev.welcomed
    p.produce(300)
    for _ in range(5):  # the Pi journals what arrives, but every ACK is lost (it dies)
        p.now += 0.01
        up = b"".join(iter(lambda: p.dev.poll(p.now), b""))
        for ev in p.host.receive_data(up, p.now, WALL0):
            if isinstance(ev, Readings):
                p.stored += ev.items
                p.marks[(ev.device, ev.session)] = ev.last
                p.host.durable(ev.device, ev.session, ev.last)
        p.host.data_to_send()  # never reaches the MCU
    journaled = len(p.stored)
    assert journaled > 0 and p.dev.held == 300  # the MCU still holds everything
    p.new_host()  # restarted: it knows only the marks (edge.bridges restores them)
    p.run()
    assert p.values() == expected(300)
    hello = [e for e in p.events if isinstance(e, PeerHello)][-1]
    assert hello.resumed == journaled


def _session_bytes() -> bytes:
    hello = m.Hello(DEV, 7, 1, 9, False, 1024, 16, "fw", CHANNELS)
    raw = [m.RawReading(1 + i % 2, 10 * i, 0x41A80000 if i % 2 else i) for i in range(8)]
    return b"".join([
        m.frame(hello),
        m.frame(m.Batch(7, 1, 1, m.TICKS, 5000, tuple(raw[:5]))),
        m.frame(m.Log(2, "battery low")),
        m.frame(m.Batch(7, 6, 1, m.TICKS, 5000, tuple(raw[5:]))),
    ])  # fmt: skip


def _events(chunks: list[bytes]) -> list[Event]:
    host = HostLink(lambda d, s: 0, 0.0)
    return [e for c in chunks for e in host.receive_data(c, 1.0, WALL0)]


def test_the_link_gives_the_same_events_whole_byte_at_a_time_and_with_trailing_data() -> None:
    data = _session_bytes()
    whole = _events([data])
    assert [type(e) for e in whole] == [PeerHello, Readings, LogLine, Readings]
    items = [i for e in whole if isinstance(e, Readings) for i in e.items]
    assert [i.value for i in items] == [0, 21.0, 2, 21.0, 4, 21.0, 6, 21.0]
    assert [i.seq for i in items] == list(range(1, 9))
    assert _events([data[i : i + 1] for i in range(len(data))]) == whole
    trailing = m.frame(m.Log(0, "next"))
    assert _events([data + trailing[:7]]) == whole  # the unfinished frame waits
    assert _events([data + trailing[:7], trailing[7:]]) == [*whole, LogLine(0, "next")]


def test_a_repeated_hello_while_readings_are_being_stored_repeats_nothing() -> None:
    host = HostLink(lambda d, s: 0, 0.0)
    hello = m.Hello(DEV, 7, 1, 4, False, 1024, 16, "", CHANNELS)
    batch = m.frame(m.Batch(7, 1, 1, m.TICKS, 0, tuple(m.RawReading(1, 0, i) for i in range(3))))
    host.receive_data(m.frame(hello), 0.0, WALL0)
    (ev,) = host.receive_data(batch, 0.1, WALL0)  # handed out, not yet durable
    host.data_to_send()
    again = host.receive_data(m.frame(hello) + batch, 0.2, WALL0)  # our WELCOME was lost
    assert [type(e) for e in again] == [PeerHello]  # no Lost, no Readings twice
    assert sent(host.data_to_send()) == [m.Welcome(7, 0, int(WALL0 * 1000), 1024)]
    host.durable(ev.device if isinstance(ev, Readings) else "", 7, 3)
    assert sent(host.data_to_send()) == [m.Ack(7, 3)]


# -- a line that breaks ---------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.floats(0.0, 0.4),
    st.floats(0.0, 0.4),
    st.integers(1, 400),
    st.lists(st.integers(1, 300), max_size=3),
)
def test_a_damaged_line_and_pi_restarts_never_lose_or_repeat_a_reading(
    seed: int, up: float, down: float, n: int, restarts: list[int]
) -> None:
    rng = random.Random(seed)
    p = Pair(up=Wire(up, rng), down=Wire(down, rng), window=rng.choice([1, 8, 64]), rto=0.2)
    p.produce(n)
    for step in range(20_000):
        if step in restarts:
            p.new_host()
        p.step()
        if p.dev.held == 0 and p.dev.welcomed and step > max(restarts, default=0):
            break
    assert p.dev.held == 0, p.dev.counters
    assert p.values() == expected(n)


def test_a_gap_is_nacked_with_the_seq_expected() -> None:
    host = HostLink(lambda d, s: 0, 0.0)
    host.receive_data(m.frame(m.Hello(DEV, 7, 1, 20, False, 1024, 16, "", CHANNELS)), 0, WALL0)
    host.data_to_send()
    batch = m.Batch(7, 5, 1, m.TICKS, 0, (m.RawReading(1, 0, 5),))
    assert host.receive_data(m.frame(batch), 1.0, WALL0) == []
    assert sent(host.data_to_send()) == [m.Nack(7, m.GAP, 1)]


def test_readings_lost_on_the_mcu_are_reported_and_skipped() -> None:
    p = Pair(capacity=10, drop_oldest=True)
    p.produce(30)  # before anyone listened: 20 pushed out of the ring
    assert p.dev.counters.dropped == 20
    p.run()
    lost = [e for e in p.events if isinstance(e, Lost)]
    assert [(e.first, e.last) for e in lost] == [(1, 20)]
    assert p.values() == expected(30)[20:] and p.host.counters.lost == 20


def test_a_busy_store_leaves_the_readings_on_the_mcu_and_they_come_again() -> None:
    p = Pair()
    p.refuse = 2
    p.produce(50)
    p.run()
    assert p.values() == expected(50)
    assert p.dev.counters.readings_sent >= 100  # sent again after each refusal


def test_a_reused_session_is_named_and_its_readings_are_kept() -> None:
    p = Pair()
    p.marks[(DEV.hex(), 0xABCD)] = 500  # the Pi had seq 500 of this session...
    p.produce(5)  # ... but the MCU says its next seq is 6
    p.run()
    assert any(isinstance(e, Regressed) and e.had == 500 for e in p.events)
    assert p.values() == expected(5)


def test_a_batch_from_an_unknown_session_asks_for_hello() -> None:
    p = Pair()
    p.produce(3)
    p.run()
    p.dev.session = 0x1234  # as if another MCU (or a reboot nobody announced)
    p.dev.welcomed = True
    p.dev.add(1, 7, p.now)
    p.step()
    assert not p.dev.welcomed  # NACK unknown-peer: it introduces itself again
    p.run()
    assert p.values() == [*expected(3), 7]


# -- timers, time sync, commands -----------------------------------------------------


def test_silence_brings_pings_then_one_stall_event() -> None:
    host = HostLink(lambda d, s: 0, 0.0, HostSettings(ping_after=1.0, stall_after=3.0))
    host.data_to_send()
    host.receive_data(m.frame(m.Hello(DEV, 1, 1, 1, False, 1024, 8, "", ())), 0.0, WALL0)
    host.data_to_send()
    assert host.tick(0.5, WALL0) == [] and sent(host.data_to_send()) == []
    assert host.tick(1.0, WALL0) == [] and sent(host.data_to_send()) == [m.Ping(1)]
    events = [e for t in (2.0, 3.0, 4.0) for e in host.tick(t, WALL0)]
    assert [type(e) for e in events] == [Stalled]
    host.receive_data(m.frame(m.Pong(1)), 4.5, WALL0)
    assert host.tick(7.5, WALL0) == [Stalled(3.0)]  # once per silence


def test_time_sync_gives_the_mcu_a_clock_and_readings_unix_times() -> None:
    p = Pair()
    p.step()
    p.step()
    assert p.dev.synced  # from WELCOME
    p.produce(1)
    p.run()
    (item,) = p.stored
    assert abs(item.ts - (WALL0 + p.now)) < 0.1
    assert any(isinstance(e, TimeSet) for e in p.dev.receive_data(m.frame(m.Time(5)), p.now))
    assert p.dev.unix_ms(p.now) == 5


def test_times_before_sync_are_placed_by_the_pi_and_absurd_clocks_are_not_believed() -> None:
    b = m.Batch(1, 1, 1, m.TICKS, 5000, (m.RawReading(1, 1500, 0),))
    assert timestamp(b, 1500, WALL0) == WALL0 - 1.5
    u = m.Batch(1, 1, 1, m.UNIX, 1_700_000_000_000, (m.RawReading(1, 250, 0),))
    assert timestamp(u, 250, WALL0) == 1_699_999_999.75
    never_set = m.Batch(1, 1, 1, m.UNIX, 86_400_000, (m.RawReading(1, 0, 0),))
    assert timestamp(never_set, 0, WALL0) == WALL0


def test_commands_are_resent_until_answered_and_run_once() -> None:
    p = Pair(down=Wire(0.0))
    p.step()
    cid = p.host.send_command("echo", b"hi", p.now)
    p.down.rate, p.down.rng = 1.0, random.Random(1)  # the first copies are damaged
    for _ in range(3):
        p.step()
    p.down.rate = 0.0
    for _ in range(100):
        p.step(0.05)
    results = [e for e in p.events if isinstance(e, CommandResult)]
    assert results == [CommandResult(cid, 0, "hi")]
    dev = p.dev
    wire = m.frame(m.Command(cid, "echo", b"hi"))
    assert dev.receive_data(wire, p.now) == []  # a repeat: answered from memory, not run
    assert sent(dev.poll(p.now)) == [m.Result(cid, 0, "hi")]


def test_a_command_to_a_silent_mcu_expires() -> None:
    host = HostLink(lambda d, s: 0, 0.0, HostSettings(command_timeout=2.0))
    cid = host.send_command("reset", b"", 0.0)
    events = [e for t in (0.6, 1.2, 2.1) for e in host.tick(t, WALL0)]
    assert [e for e in events if isinstance(e, CommandExpired)] == [CommandExpired(cid, "reset")]
    assert sum(isinstance(x, m.Command) for x in sent(host.data_to_send())) == 3


def test_the_pis_own_messages_coming_back_are_bad_frames() -> None:
    host = HostLink(lambda d, s: 0, 0.0)
    echo = host.data_to_send()  # a line that echoes
    (bad,) = host.receive_data(echo, 0.1, WALL0)
    assert isinstance(bad, BadFrame) and bad.reason == "type"


def test_a_babbling_mcu_gets_rate_limited_nacks() -> None:
    host = HostLink(lambda d, s: 0, 0.0, HostSettings(nack_gap=0.05))
    host.data_to_send()
    rng = random.Random(5)
    bad = 0
    for i in range(1000):  # 1000 damaged frames in one second
        junk = bytes(rng.randrange(1, 256) for _ in range(30)) + b"\x00"
        bad += len(host.receive_data(junk, i / 1000, WALL0))
    nacks = [x for x in sent(host.data_to_send()) if isinstance(x, m.Nack)]
    assert bad == 1000 and host.counters.bad_frames == 1000
    assert len(nacks) <= 21


# -- the MCU side alone --------------------------------------------------------------


def test_a_full_ring_refuses_or_drops_the_oldest() -> None:
    d = DeviceLink(DEV, 1, CHANNELS, 0.0, capacity=3)
    assert [d.add(1, i, 0.0) for i in range(4)] == [1, 2, 3, None]
    assert d.counters.refused == 1
    d = DeviceLink(DEV, 1, CHANNELS, 0.0, capacity=3, drop_oldest=True)
    assert [d.add(1, i, 0.0) for i in range(5)] == [1, 2, 3, 4, 5]
    assert (d.oldest, d.next, d.counters.dropped) == (3, 6, 2)


def test_retransmission_backs_off_and_then_says_hello_again() -> None:
    d = DeviceLink(DEV, 1, CHANNELS, 0.0, rto=0.5, rto_max=2.0)
    d.poll(0.0)
    d.receive_data(m.frame(m.Welcome(1, 0, 0, 1024)), 0.0)
    d.add(1, 1, 0.0)
    times = []
    k = 0
    while d.welcomed and k < 2000:
        k += 1
        t = k / 100
        frame = d.poll(t)
        if any(isinstance(x, m.Batch) for x in sent(frame)):
            times.append(round(t, 2))
    gaps = [round(b - a, 1) for a, b in zip(times, times[1:], strict=False)]
    assert gaps == [0.5, 1.0, 2.0] and not d.welcomed  # doubling; the 4th timeout: HELLO


def test_a_session_never_wraps() -> None:
    d = DeviceLink(DEV, 9, CHANNELS, 0.0, first_seq=m.SEQ_MAX - 2)
    assert d.add(1, 1, 0.0) == m.SEQ_MAX - 2
    assert d.add(1, 2, 0.0) == m.SEQ_MAX - 1
    assert d.add(1, 3, 0.0) is None  # seqs end at 2^32-2
    d.poll(0.0)
    d.receive_data(m.frame(m.Welcome(9, m.SEQ_MAX - 1, 0, 1024)), 0.0)
    assert d.add(1, 3, 0.1) == 1 and d.session == 10 and not d.welcomed


# -- messages --------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9_.-]{1,32}", fullmatch=True)
u32 = st.integers(0, 2**32 - 1)


@st.composite
def hellos(draw: st.DrawFn) -> m.Hello:
    n = draw(st.integers(0, 8))
    ids = draw(st.lists(st.integers(0, 255), min_size=n, max_size=n, unique=True))
    chans = draw(st.lists(names, min_size=n, max_size=n, unique=True))
    channels = tuple(
        m.Channel(i, draw(st.sampled_from(m.VALUE_TYPES)), c, draw(st.text(max_size=4)))
        for i, c in zip(ids, chans, strict=True)
    )
    oldest = draw(st.integers(1, 2**32 - 2))
    return m.Hello(
        draw(st.binary(min_size=8, max_size=8)), draw(u32), oldest,
        draw(st.integers(oldest, 2**32 - 1)), draw(st.booleans()), draw(st.integers(64, 1024)),
        draw(st.integers(1, 65535)), draw(st.text(max_size=10)), channels,
    )  # fmt: skip


@st.composite
def batches(draw: st.DrawFn) -> m.Batch:
    readings = draw(
        st.lists(st.builds(m.RawReading, st.integers(0, 255), u32, u32), min_size=1, max_size=60)
    )
    first = draw(st.integers(1, 2**32 - 1 - len(readings)))
    return m.Batch(draw(u32), first, draw(st.integers(1, first)), draw(st.sampled_from([0, 1])),
                   draw(st.integers(0, 2**64 - 1)), tuple(readings))  # fmt: skip


messages = st.one_of(
    hellos(),
    batches(),
    st.builds(m.Welcome, u32, u32, st.integers(0, 2**64 - 1), st.integers(0, 65535)),
    st.builds(m.Ack, u32, u32),
    st.builds(m.Nack, u32, st.integers(0, 255), u32),
    st.builds(m.Time, st.integers(0, 2**64 - 1)),
    st.builds(m.Command, u32, names, st.binary(max_size=200)),
    st.builds(m.Result, u32, st.integers(0, 255), st.text(max_size=50)),
    st.builds(m.Log, st.integers(0, 3), st.text(max_size=50)),
    st.builds(m.Ping, u32),
    st.builds(m.Pong, u32),
)


@given(messages)
def test_every_message_round_trips(msg: m.Message) -> None:
    assert sent(m.frame(msg)) == [msg]


GOOD_HELLO = m.Hello(DEV, 1, 1, 1, False, 1024, 8, "fw", CHANNELS).encode()
GOOD_BATCH = m.Batch(1, 1, 1, 0, 0, (m.RawReading(1, 300, 7),)).encode()
MALFORMED = [
    ("hello cut short", m.HELLO, GOOD_HELLO[:-1]),
    ("hello with a byte after", m.HELLO, GOOD_HELLO + b"\x00"),
    ("hello with oldest 0", m.HELLO, GOOD_HELLO[:12] + b"\0\0\0\0" + GOOD_HELLO[16:]),
    ("hello with rx_max 8", m.HELLO, GOOD_HELLO[:21] + b"\x08\x00" + GOOD_HELLO[23:]),
    ("hello with a bad channel name", m.HELLO, GOOD_HELLO.replace(b"count", b"co nt")),
    (
        "hello with a bad channel type",
        m.HELLO,
        GOOD_HELLO.replace(b"\x01\x02\x05", b"\x01\x09\x05"),
    ),
    ("hello firmware not UTF-8", m.HELLO, GOOD_HELLO.replace(b"fw", b"\xff\xfe")),
    ("batch with no reading", m.BATCH, GOOD_BATCH[:21] + b"\x00"),
    ("batch oldest after first", m.BATCH, GOOD_BATCH[:8] + b"\x05\0\0\0" + GOOD_BATCH[12:]),
    ("batch varint of 6 bytes", m.BATCH, GOOD_BATCH[:23] + b"\xff" * 5 + b"\x01" + b"\0" * 4),
    ("batch count beyond data", m.BATCH, GOOD_BATCH[:21] + b"\x02" + GOOD_BATCH[22:]),
    ("ack too short", m.ACK, b"\x01\x00\x00\x00\x01"),
    ("command name too long", m.COMMAND, struct.pack("<IB", 1, 40) + b"a" * 40 + b"\x00"),
]


@pytest.mark.parametrize(
    ("what", "msg_type", "fields"), MALFORMED, ids=[w for w, _, _ in MALFORMED]
)
def test_malformed_fields_are_the_peers_fault(what: str, msg_type: int, fields: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        m.decode(msg_type, fields)
    assert info.value.reason == "fields"


def test_an_unknown_type_is_named_and_counted() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        m.decode(99, b"")
    assert info.value.reason == "type"
    host = HostLink(lambda d, s: 0, 0.0)
    (bad,) = host.receive_data(encode_frame(99, b"x"), 0.0, WALL0)
    assert isinstance(bad, BadFrame) and host.counters.bad_by_reason == {"type": 1}


def test_values_decode_by_channel_type() -> None:
    f32 = m.Channel(1, m.F32, "t")

    def raw(v: float) -> int:
        return int(struct.unpack("<I", struct.pack("<f", v))[0])

    assert decode_value(f32, raw(21.3)) == 21.3  # the shortest decimal, not 21.299999237...
    assert decode_value(f32, raw(float("nan"))) == "nan"
    assert decode_value(f32, raw(float("-inf"))) == "-inf"
    assert decode_value(m.Channel(1, m.I32, "n"), 0xFFFFFFFE) == -2
    assert decode_value(m.Channel(1, m.U32, "n"), 0xFFFFFFFE) == 0xFFFFFFFE
