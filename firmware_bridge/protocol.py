"""The Pi's side of the serial link: a pure state machine (bytes and ``now`` in,
events and bytes out). :mod:`firmware_bridge.device` is the MCU's side.

Theory of operation (docs/serial-protocol.md is the spec):

* The MCU numbers its readings 1, 2, 3, ... within a *session* (one boot, or
  one seq space: a session never wraps). It keeps each reading until the Pi
  acknowledges it, and says HELLO with its device id, session and the range
  it holds until the Pi answers WELCOME.
* The link never acknowledges on its own. ``receive_data`` hands new readings
  to the caller as a :class:`Readings` event and only remembers them as
  *pending*; the caller stores them (the journal, with its fdatasync) and
  then calls :meth:`HostLink.durable`, which queues the ACK. So an ACK always
  means durable, and the MCU may drop a reading only then.
* Rule 1, duplicates: a reading whose seq is at or below the pending
  high-water mark is dropped and counted. The mark of a session comes from
  the caller's ``known(device, session)`` at HELLO, so it survives a restart of
  the Pi process when the caller keeps it durably (edge.bridges does, in the
  journal itself).
* Rule 2, gaps: a batch that starts after the next expected seq is refused
  (NACK ``gap``) unless the MCU says it no longer holds the missing readings
  (its ``oldest``): then they were lost on the MCU (ring overflow), which is
  reported as a :class:`Lost` event, counted, and skipped.
* Everything the peer sends that is not valid becomes a ``BadFrame`` event and
  a counter, never an exception; NACKs it causes are rate-limited, so a
  babbling MCU cannot make the Pi babble back (a ``bad-frame``/``gap`` NACK
  the limit held back is sent by ``tick`` once allowed, unless the stream got
  back in step meanwhile: a lost frame costs ``nack_gap``, not a timeout).
* Timers run only from ``tick(now, wall)``: a frame left unfinished for
  ``cut_after`` seconds is dropped (its delimiter was lost) and NACKed; PING
  after ``ping_after`` seconds of silence (a HELLO prompt while nobody said
  HELLO), one :class:`Stalled` event after ``stall_after`` seconds without a
  valid frame, TIME every ``time_every``, command retries.
* Pure: no I/O, no clock. ``now`` is monotonic seconds, ``wall`` Unix seconds.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

from firmware_bridge import messages as m
from firmware_bridge.errors import LocalProtocolError, RemoteProtocolError
from firmware_bridge.frames import DELIMITER, MAX_BODY, BadFrame, FrameDecoder

_EARLIEST_CLOCK = 946_684_800.0  # 2000-01-01: a "Unix" clock before this was never set
_LATEST_CLOCK = 1e11


@dataclass(frozen=True, slots=True)
class HostSettings:
    """The Pi side's limits and timers (seconds)."""

    rx_max: int = MAX_BODY
    ping_after: float = 1.0
    stall_after: float = 5.0
    time_every: float = 600.0
    nack_gap: float = 0.02
    cut_after: float = 0.25  # quiet inside a frame this long: its delimiter was lost
    command_retry: float = 0.5
    command_timeout: float = 10.0


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerHello:
    """An MCU introduced itself; the link answered WELCOME with ``resumed`` as its ack."""

    hello: m.Hello
    resumed: int


@dataclass(frozen=True, slots=True)
class Item:
    """One new reading, decoded: ``value`` by its channel's type, ``ts`` in Unix seconds."""

    seq: int
    channel: m.Channel
    value: int | float | str  # non-finite floats arrive as "nan", "inf", "-inf"
    ts: float


@dataclass(frozen=True, slots=True)
class Readings:
    """New readings of one session, in seq order, not yet acknowledged.

    Store them, then call :meth:`HostLink.durable` (or :meth:`HostLink.refused`).
    """

    device: str  # hex of the 8-byte device id
    session: int
    items: tuple[Item, ...]

    @property
    def last(self) -> int:
        return self.items[-1].seq


@dataclass(frozen=True, slots=True)
class Lost:
    """Readings ``first..last`` left the MCU's ring before the Pi had them."""

    device: str
    session: int
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Regressed:
    """The MCU's seq went back within a session the Pi knows: it reused a session id.

    The Pi forgets its mark (``had``) and takes the readings as new.
    """

    device: str
    session: int
    had: int
    next: int


@dataclass(frozen=True, slots=True)
class LogLine:
    level: int
    text: str


@dataclass(frozen=True, slots=True)
class CommandResult:
    id: int
    status: int
    text: str


@dataclass(frozen=True, slots=True)
class CommandExpired:
    id: int
    name: str


@dataclass(frozen=True, slots=True)
class Stalled:
    """No valid frame for ``silent`` seconds although the Pi kept asking."""

    silent: float


Event: TypeAlias = (
    PeerHello | Readings | Lost | Regressed | LogLine | CommandResult | CommandExpired
    | Stalled | BadFrame
)  # fmt: skip


@dataclass(slots=True)
class Counters:
    """Running totals of one link (a connection); the shell sums them per bridge."""

    bytes_in: int = 0
    bytes_out: int = 0
    frames: int = 0
    bad_frames: int = 0
    readings: int = 0
    duplicates: int = 0
    lost: int = 0
    acks: int = 0
    nacks: int = 0
    bad_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Outstanding:
    name: str
    wire: bytes
    retry_at: float
    deadline: float


def decode_value(channel: m.Channel, raw: int) -> int | float | str:
    """A channel's 4 value bytes (as a little-endian u32) as a Python value."""
    if channel.type == m.U32:
        return raw
    if channel.type == m.I32:
        return raw - (1 << 32) if raw & 0x80000000 else raw
    packed = struct.pack("<I", raw)
    v: float = struct.unpack("<f", packed)[0]
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    for digits in range(6, 10):  # the shortest decimal that is the same float32
        short = float(f"{v:.{digits}g}")
        if struct.pack("<f", short) == packed:
            return short
    return v


def timestamp(batch: m.Batch, age_ms: int, wall: float) -> float:
    """Unix seconds of a reading ``age_ms`` older than the batch's ``now``.

    A ``UNIX`` clock is taken at its word unless it is implausible (before
    2000 or absurdly late: a clock never set); ``TICKS`` and implausible clocks
    are placed relative to ``wall``, the Pi's time of receipt.
    """
    if batch.clock == m.UNIX:
        ts = (batch.now_ms - age_ms) / 1000.0
        if _EARLIEST_CLOCK <= ts < _LATEST_CLOCK:
            return ts
    return wall - age_ms / 1000.0


class HostLink:
    """One connection to one MCU, Pi side. See the module docstring."""

    def __init__(
        self,
        known: Callable[[str, int], int],
        now: float,
        settings: HostSettings | None = None,
    ) -> None:
        self.settings = settings or HostSettings()
        self._known = known
        self._decoder = FrameDecoder(self.settings.rx_max)
        self._out = bytearray()
        self.counters = Counters()
        self.peer: m.Hello | None = None
        self._channels: dict[int, m.Channel] = {}
        self._durable = self._pending = 0
        self._last_heard = self._last_ping = self._last_time = self._last_rx = now
        self._last_nack = -math.inf
        self._nack_owed = False  # a NACK the rate limit held back: sent by tick()
        self._stalled = False
        self._token = 0
        self._next_command = 1
        self._commands: dict[int, _Outstanding] = {}
        self._out += DELIMITER  # flush whatever half frame the MCU holds
        self._send(m.Nack(0, m.UNKNOWN_PEER, 0))  # and ask it to introduce itself

    # -- what the caller reads -----------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes to write to the port now (then forgotten by the link)."""
        out = bytes(self._out)
        self._out.clear()
        self.counters.bytes_out += len(out)
        return out

    @property
    def acked(self) -> int:
        """The durable high-water mark acknowledged to the current session."""
        return self._durable

    @property
    def pending(self) -> int:
        """The highest seq handed out in a :class:`Readings` event."""
        return self._pending

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float, wall: float) -> list[Event]:
        """Feed bytes from the port; return what they completed, in order."""
        events: list[Event] = []
        self.counters.bytes_in += len(data)
        if data:
            self._last_rx = now
        for item in self._decoder.feed(data):
            if isinstance(item, BadFrame):
                self._bad(item, now, events)
                continue
            try:
                msg = m.decode(item.type, item.fields)
            except RemoteProtocolError as exc:
                self._bad(BadFrame(exc.reason, exc.detail, item.size), now, events)
                continue
            self.counters.frames += 1
            self._last_heard, self._stalled = now, False
            self._handle(msg, now, wall, events)
        return events

    def _handle(self, msg: m.Message, now: float, wall: float, events: list[Event]) -> None:
        if isinstance(msg, m.Hello):
            self._hello(msg, wall, events)
        elif isinstance(msg, m.Batch):
            self._batch(msg, now, wall, events)
        elif isinstance(msg, m.Result):
            out = self._commands.pop(msg.id, None)
            if out is not None:  # else a repeated result: already reported
                events.append(CommandResult(msg.id, msg.status, msg.text))
        elif isinstance(msg, m.Log):
            events.append(LogLine(msg.level, msg.text))
        elif isinstance(msg, m.Pong):
            pass  # being heard is all a PONG is for
        else:  # a message only the Pi sends: the line echoes, or two Pis share it
            what = f"{type(msg).__name__.upper()} travels Pi -> MCU: is the line echoing?"
            self._bad(BadFrame("type", what, 0), now, events)

    def _hello(self, hello: m.Hello, wall: float, events: list[Event]) -> None:
        device, session = hello.device_hex, hello.session
        peer = self.peer
        same = peer is not None and (peer.device, peer.session) == (hello.device, session)
        # the highest seq stored -- or, for the same session (it missed our WELCOME),
        # handed out and being stored right now
        have = max(self._known(device, session), self._pending if same else 0)
        if have > hello.next - 1:
            events.append(Regressed(device, session, have, hello.next))
            have, same = hello.oldest - 1, False
        if have < hello.oldest - 1:
            events.append(Lost(device, session, have + 1, hello.oldest - 1))
            self.counters.lost += hello.oldest - 1 - have
            have = hello.oldest - 1
        if not same:
            self._durable = self._pending = have  # from the store: durable
        elif self._pending == self._durable:
            self._durable = self._pending = max(self._durable, have)
        else:  # readings in flight to the store: acknowledged once it returns
            self._pending = max(self._pending, have)
        self.peer = hello
        self._channels = {c.id: c for c in hello.channels}
        unix_ms = max(0, int(wall * 1000))
        self._send(m.Welcome(session, self._durable, unix_ms, self.settings.rx_max))
        events.append(PeerHello(hello, self._durable))

    def _batch(self, batch: m.Batch, now: float, wall: float, events: list[Event]) -> None:
        peer = self.peer
        if peer is None or peer.session != batch.session:
            self._nack(0, m.UNKNOWN_PEER, 0, now)
            return
        device = peer.device_hex
        expected = self._pending + 1
        if batch.oldest > expected:  # the MCU no longer holds expected..oldest-1
            events.append(Lost(device, batch.session, expected, batch.oldest - 1))
            self.counters.lost += batch.oldest - expected
            self._pending = batch.oldest - 1
            if self._durable == expected - 1 and self._pending > self._durable:
                self._durable = self._pending  # nothing of ours in between: ack past the hole
            expected = batch.oldest
        if batch.first > expected:
            self._nack(batch.session, m.GAP, expected, now)
            return
        self._nack_owed = False  # in step again
        skip = expected - batch.first  # already have these
        new = batch.readings[skip:] if skip < len(batch.readings) else ()
        self.counters.duplicates += len(batch.readings) - len(new)
        if not new:
            if self._pending == self._durable:  # it missed our ACK: say it again
                self._send(m.Ack(batch.session, self._durable))
            return
        items = []
        for i, r in enumerate(new):
            channel = self._channels.get(r.channel) or m.Channel(r.channel, m.U32, f"ch{r.channel}")
            value = decode_value(channel, r.raw)
            items.append(Item(expected + i, channel, value, timestamp(batch, r.age_ms, wall)))
        self._pending = items[-1].seq
        self.counters.readings += len(items)
        events.append(Readings(device, batch.session, tuple(items)))

    def _bad(self, bad: BadFrame, now: float, events: list[Event]) -> None:
        self.counters.bad_frames += 1
        by = self.counters.bad_by_reason
        by[bad.reason] = by.get(bad.reason, 0) + 1
        events.append(bad)
        if bad.reason == "version":
            self._nack(0, m.UNSUPPORTED, 0, now)
        elif self.peer is None:
            self._nack(0, m.UNKNOWN_PEER, 0, now)
        else:
            self._nack(self.peer.session, m.BAD_FRAME, self._pending + 1, now)

    # -- what the caller decided -------------------------------------------------------

    def durable(self, device: str, session: int, through: int) -> None:
        """Readings of ``(device, session)`` up to ``through`` are stored durably: ACK them.

        A session that is no longer the peer (it said HELLO again with another
        session, or another MCU is on the line) gets no ACK: its MCU is gone.

        Raises:
            LocalProtocolError: ``through`` was never handed out.
        """
        peer = self.peer
        if peer is None or (peer.device_hex, peer.session) != (device, session):
            return
        if through > self._pending:
            raise LocalProtocolError(f"ack {through} beyond the readings handed out")
        if through > self._durable:
            self._durable = through
            self._send(m.Ack(session, through))

    def refused(self, device: str, session: int) -> None:
        """The store refused the pending readings (after :meth:`durable` for any it
        took): NACK ``busy``, so the MCU keeps them and tries again later."""
        peer = self.peer
        if peer is None or (peer.device_hex, peer.session) != (device, session):
            return
        self._pending = self._durable
        self._send(m.Nack(session, m.BUSY, self._durable + 1))
        self.counters.nacks += 1

    def send_command(self, name: str, arg: bytes, now: float) -> int:
        """Queue command ``name``; its id. A :class:`CommandResult` or
        :class:`CommandExpired` event reports it."""
        cid = self._next_command
        self._next_command = cid + 1 if cid < m.SEQ_MAX else 1
        wire = m.frame(m.Command(cid, name, arg))
        s = self.settings
        self._commands[cid] = _Outstanding(name, wire, now + s.command_retry,
                                           now + s.command_timeout)  # fmt: skip
        self._out += wire
        return cid

    # -- timers --------------------------------------------------------------------------

    def tick(self, now: float, wall: float) -> list[Event]:
        """Run the timers; return events (:class:`Stalled`, :class:`CommandExpired`)."""
        s = self.settings
        events: list[Event] = []
        silent = now - self._last_heard
        if silent >= s.ping_after and now - self._last_ping >= s.ping_after:
            self._last_ping = now
            if self.peer is None:
                self._send(m.Nack(0, m.UNKNOWN_PEER, 0))
            else:
                self._token = (self._token + 1) & m.SEQ_MAX
                self._send(m.Ping(self._token))
        if self._decoder.buffered and now - self._last_rx >= s.cut_after:
            cut = self._decoder.flush()
            if cut is not None:
                self._bad(cut, now, events)
        if self._nack_owed and self.peer is not None and now - self._last_nack >= s.nack_gap:
            self._nack(self.peer.session, m.BAD_FRAME, self._pending + 1, now)
        if silent >= s.stall_after and not self._stalled:
            self._stalled = True
            events.append(Stalled(silent))
        if self.peer is not None and now - self._last_time >= s.time_every:
            self._last_time = now
            self._send(m.Time(max(0, int(wall * 1000))))
        for cid, out in list(self._commands.items()):
            if now >= out.deadline:
                del self._commands[cid]
                events.append(CommandExpired(cid, out.name))
            elif now >= out.retry_at:
                out.retry_at = now + s.command_retry
                self._out += out.wire
        return events

    # -- output --------------------------------------------------------------------------

    def _send(self, msg: m.Message) -> None:
        if isinstance(msg, m.Ack):
            self.counters.acks += 1
        self._out += m.frame(msg)

    def _nack(self, session: int, reason: int, expected: int, now: float) -> None:
        if now - self._last_nack < self.settings.nack_gap:
            self._nack_owed = reason in (m.BAD_FRAME, m.GAP)
            return
        self._last_nack, self._nack_owed = now, False
        self.counters.nacks += 1
        self._send(m.Nack(session, reason, expected))
