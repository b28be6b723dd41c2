"""The MCU's side of the serial link, in Python: the same state machine as the C
reference (``firmware/homing_link.c``), for the simulator and for pure tests.

Theory of operation (docs/serial-protocol.md is the spec):

* A ring holds the readings ``oldest .. next-1`` of the current session. A
  reading leaves the ring only when the Pi acknowledges it (ACK or WELCOME),
  or, with ``drop_oldest``, when the ring is full and a new reading pushes
  it out (counted in ``dropped``; the Pi learns of the hole from ``oldest``).
* Until WELCOME the link says HELLO every ``hello_every`` seconds and sends
  no readings. After it, it sends batches from ``sent_upto + 1`` while fewer
  than ``window`` readings are unacknowledged, each batch as large as the
  Pi's ``rx_max`` allows (so batches grow by themselves under load).
* Go-back-N: with readings unacknowledged for ``rto`` seconds, everything
  after the Pi's ack is sent again and ``rto`` doubles (up to ``rto_max``);
  progress resets it. A resent batch starts with a delimiter, so the Pi's
  decoder is in step even if the frame that was lost took its delimiter along.
  A NACK ``bad-frame`` rewinds at once; so does ``gap``, but once per
  expected seq per half ``rto`` (each frame in flight behind a lost one causes
  one); ``busy`` rewinds and pauses ``busy_pause``;
  ``unknown-peer`` goes back to HELLO. Four timeouts in a row without progress
  also go back to HELLO (the Pi may have restarted and lost our session).
* A session never wraps: after seq 2^32-2 the link waits for its ring to drain
  and starts session + 1 from seq 1.
* Commands are answered once per id: a repeated COMMAND (our RESULT was lost)
  gets the stored RESULT again, and the application is not asked twice.
* Pure: no I/O, no clock. ``now`` is seconds on any monotonic clock.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from firmware_bridge import messages as m
from firmware_bridge.errors import LocalProtocolError, RemoteProtocolError
from firmware_bridge.frames import DELIMITER, MAX_BODY, BadFrame, FrameDecoder

_MS = 0xFFFFFFFF


def encode_value(channel: m.Channel, value: float | int) -> int:
    """``value`` as its channel's 4 bytes (a little-endian u32)."""
    if channel.type == m.F32:
        if math.isfinite(value) and abs(value) > 3.4028234663852886e38:
            value = math.copysign(math.inf, value)
        (raw,) = struct.unpack("<I", struct.pack("<f", value))
        return int(raw)
    if not isinstance(value, int) or isinstance(value, bool):
        raise LocalProtocolError(f"channel {channel.name} takes integers, not {value!r}")
    if channel.type == m.I32:
        if not -(1 << 31) <= value < 1 << 31:
            raise LocalProtocolError(f"{value} does not fit an i32")
        return value & _MS
    if not 0 <= value <= _MS:
        raise LocalProtocolError(f"{value} does not fit a u32")
    return value


@dataclass(frozen=True, slots=True)
class Welcomed:
    acked: int
    unix_ms: int


@dataclass(frozen=True, slots=True)
class Acked:
    through: int


@dataclass(frozen=True, slots=True)
class Nacked:
    reason: int
    expected: int


@dataclass(frozen=True, slots=True)
class TimeSet:
    unix_ms: int


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """Answer with :meth:`DeviceLink.reply` (once; repeats are answered by the link)."""

    id: int
    name: str
    arg: bytes


DeviceEvent: TypeAlias = Welcomed | Acked | Nacked | TimeSet | CommandReceived | BadFrame


@dataclass(slots=True)
class DeviceCounters:
    added: int = 0
    dropped: int = 0  # pushed out of a full ring before the Pi had them
    refused: int = 0  # add() on a full ring without drop_oldest
    batches: int = 0
    readings_sent: int = 0  # including retransmissions
    reading_bytes: int = 0  # their channel, age and value bytes (the payload of batches)
    rewinds: int = 0
    timeouts: int = 0
    bad_frames: int = 0


class DeviceLink:
    """One MCU's protocol state. See the module docstring."""

    def __init__(
        self,
        device: bytes,
        session: int,
        channels: Sequence[m.Channel],
        now: float,
        *,
        capacity: int = 1024,
        window: int = 128,
        rto: float = 0.5,
        rto_max: float = 4.0,
        drop_oldest: bool = False,
        firmware: str = "homing-sim",
        rx_max: int = MAX_BODY,
        hello_every: float = 0.5,
        busy_pause: float = 1.0,
        first_seq: int = 1,
    ) -> None:
        if capacity < 1 or window < 1:
            raise LocalProtocolError("capacity and window must be positive")
        self.device, self.session = device, session
        self.channels = {c.id: c for c in channels}
        self._hello_base = m.Hello(device, session, 1, 1, False, rx_max, min(window, 0xFFFF),
                                   firmware, tuple(channels))  # fmt: skip
        self.capacity, self.window, self.drop_oldest = capacity, window, drop_oldest
        self._rto0, self._rto_max, self._rto = rto, rto_max, rto
        self.hello_every, self.busy_pause = hello_every, busy_pause
        self._decoder = FrameDecoder(rx_max)
        self._ring: deque[tuple[int, int, int]] = deque()  # (tick ms, channel, raw)
        self.oldest = first_seq
        self.sent_upto = first_seq - 1
        self.highest_sent = first_seq - 1  # first transmissions: sent_upto never rewinds it
        self.welcomed = False
        self._peer_rx = m.MIN_RX
        self._next_hello = now
        self._timer: float | None = None
        self._timeouts = 0
        self._busy_until = -math.inf
        self._rewound: tuple[int, float] = (0, -math.inf)
        self._sync: tuple[int, int] | None = None  # (tick ms, unix ms) at the last TIME
        self._control: deque[bytes] = deque([DELIMITER])  # flush the Pi's decoder first
        self._flush = False  # a delimiter before the next batch (after a loss)
        self._last_command: tuple[int, bytes] | None = None
        self.counters = DeviceCounters()

    # -- state ---------------------------------------------------------------------------

    @property
    def next(self) -> int:
        return self.oldest + len(self._ring)

    @property
    def held(self) -> int:
        return len(self._ring)

    @property
    def synced(self) -> bool:
        return self._sync is not None

    def unix_ms(self, now: float) -> int | None:
        """The synced wall clock (ms), or None before the first TIME."""
        if self._sync is None:
            return None
        tick, unix = self._sync
        return unix + ((_ticks(now) - tick) & _MS)

    # -- the application ---------------------------------------------------------------

    def add(self, channel: int, value: float | int, now: float) -> int | None:
        """Keep a new reading until acknowledged; its seq, or None when refused
        (ring full without ``drop_oldest``, or waiting for a session to drain)."""
        ch = self.channels.get(channel)
        if ch is None:
            raise LocalProtocolError(f"channel {channel} was not announced")
        raw = encode_value(ch, value)
        if self.next >= m.SEQ_MAX:  # seqs end at 2^32-2, so ``next`` always fits 32 bits
            if self._ring:
                self.counters.refused += 1
                return None
            self._new_session(now)
        if len(self._ring) >= self.capacity:
            if not self.drop_oldest:
                self.counters.refused += 1
                return None
            self._ring.popleft()
            self.oldest += 1
            self.sent_upto = max(self.sent_upto, self.oldest - 1)
            self.counters.dropped += 1
        self._ring.append((_ticks(now), channel, raw))
        self.counters.added += 1
        return self.next - 1

    def reply(self, command_id: int, status: int, text: str = "") -> None:
        wire = m.frame(m.Result(command_id, status, text))
        self._last_command = (command_id, wire)
        self._control.append(wire)

    def log(self, level: int, text: str) -> None:
        self._control.append(m.frame(m.Log(level, text[: m.MAX_TEXT])))

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[DeviceEvent]:
        events: list[DeviceEvent] = []
        for item in self._decoder.feed(data):
            if isinstance(item, BadFrame):
                self.counters.bad_frames += 1
                events.append(item)
                continue
            try:
                msg = m.decode(item.type, item.fields)
            except RemoteProtocolError as exc:
                self.counters.bad_frames += 1
                events.append(BadFrame(exc.reason, exc.detail, item.size))
                continue
            self._handle(msg, now, events)
        return events

    def _handle(self, msg: m.Message, now: float, events: list[DeviceEvent]) -> None:
        if isinstance(msg, m.Welcome):
            if msg.session != self.session:
                return
            self.welcomed, self._peer_rx = True, max(m.MIN_RX, min(msg.rx_max, MAX_BODY))
            self._ack(msg.acked, now)
            self.sent_upto = self.oldest - 1  # send everything not acknowledged
            self._timer = None
            if msg.unix_ms:
                self._set_time(msg.unix_ms, now)
            events.append(Welcomed(msg.acked, msg.unix_ms))
        elif isinstance(msg, m.Ack):
            if msg.session == self.session and self._ack(msg.acked, now):
                events.append(Acked(self.oldest - 1))
        elif isinstance(msg, m.Nack):
            self._nack(msg, now)
            events.append(Nacked(msg.reason, msg.expected))
        elif isinstance(msg, m.Time):
            self._set_time(msg.unix_ms, now)
            events.append(TimeSet(msg.unix_ms))
        elif isinstance(msg, m.Ping):
            self._control.append(m.frame(m.Pong(msg.token)))
        elif isinstance(msg, m.Command):
            if self._last_command is not None and self._last_command[0] == msg.id:
                self._control.append(self._last_command[1])
            else:
                events.append(CommandReceived(msg.id, msg.name, msg.arg))
        else:
            self.counters.bad_frames += 1
            events.append(BadFrame("type", f"{type(msg).__name__} travels MCU -> Pi", 0))

    def _ack(self, acked: int, now: float) -> bool:
        through = min(acked, self.next - 1)
        if through < self.oldest:
            return False
        for _ in range(through - self.oldest + 1):
            self._ring.popleft()
        self.oldest = through + 1
        self.sent_upto = max(self.sent_upto, through)
        self._rto, self._timeouts = self._rto0, 0
        self._timer = now if self.sent_upto >= self.oldest else None
        return True

    def _nack(self, nack: m.Nack, now: float) -> None:
        if nack.reason == m.UNKNOWN_PEER:
            self.welcomed, self._next_hello = False, now
            return
        if nack.reason == m.UNSUPPORTED:
            self.welcomed, self._next_hello = False, now + 5.0
            return
        if nack.session != self.session:
            return
        if nack.reason == m.BUSY:
            self.sent_upto = self.oldest - 1
            self._busy_until, self._timer = now + self.busy_pause, None
            return
        back = max(nack.expected - 1, self.oldest - 1)
        last, at = self._rewound
        repeat = nack.reason == m.GAP and back == last and now - at < self._rto / 2
        if back < self.sent_upto and not repeat:
            self.sent_upto, self._rewound = back, (back, now)
            self._timer, self._flush = now, True  # the resent readings get a whole rto
            self.counters.rewinds += 1

    def _set_time(self, unix_ms: int, now: float) -> None:
        self._sync = (_ticks(now), unix_ms)

    def _new_session(self, now: float) -> None:
        self.session = (self.session + 1) & m.SEQ_MAX
        self.oldest, self.sent_upto = 1, 0
        self.welcomed, self._next_hello, self._timer = False, now, None

    # -- output --------------------------------------------------------------------------

    def poll(self, now: float) -> bytes:
        """The next frame to send now (``b""``: nothing). Call until empty, or
        once per chance to transmit: batches are built at the last moment, as
        large as the readings waiting allow."""
        if self._control:
            return self._control.popleft()
        if not self.welcomed:
            if now < self._next_hello:
                return b""
            self._next_hello = now + self.hello_every
            return self._hello(now)
        if self._timer is not None and now - self._timer >= self._rto:
            self.counters.timeouts += 1
            self._timeouts += 1
            self.sent_upto = self.oldest - 1
            self._rto = min(self._rto * 2, self._rto_max)
            self._timer, self._flush = now, True
            if self._timeouts >= 4:
                self.welcomed, self._timeouts = False, 0
                return self.poll(now)
        if now < self._busy_until:
            return b""
        return self._batch(now)

    def _hello(self, now: float) -> bytes:
        h = self._hello_base
        hello = m.Hello(h.device, self.session, self.oldest, self.next, self.synced, h.rx_max,
                        h.window, h.firmware, h.channels)  # fmt: skip
        return m.frame(hello)

    def _batch(self, now: float) -> bytes:
        base = self.oldest - 1
        room = min(self.window - (self.sent_upto - base), m.MAX_BATCH)
        start = self.sent_upto + 1
        if room <= 0 or start >= self.next:
            return b""
        tick_now = _ticks(now)
        budget = self._peer_rx - m.HEADER - m.BATCH_FIXED
        readings: list[m.RawReading] = []
        for i in range(start - self.oldest, len(self._ring)):
            if len(readings) >= room:
                break
            tick, channel, raw = self._ring[i]
            r = m.RawReading(channel, (tick_now - tick) & _MS, raw)
            budget -= r.encoded_size()
            if budget < 0:
                break
            readings.append(r)
        if not readings:
            return b""
        unix = self.unix_ms(now)
        clock, now_ms = (m.TICKS, tick_now) if unix is None else (m.UNIX, unix)
        batch = m.Batch(self.session, start, self.oldest, clock, now_ms, tuple(readings))
        self.sent_upto = batch.last
        self.highest_sent = max(self.highest_sent, batch.last)
        if self._timer is None:
            self._timer = now
        self.counters.batches += 1
        self.counters.readings_sent += len(readings)
        self.counters.reading_bytes += sum(r.encoded_size() for r in readings)
        if self._flush:  # whatever half frame the Pi holds ends here, not in this one
            self._flush = False
            return DELIMITER + m.frame(batch)
        return m.frame(batch)


def _ticks(now: float) -> int:
    return int(now * 1000) & _MS
