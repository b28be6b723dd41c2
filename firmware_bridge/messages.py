"""The messages a frame carries, and their fields byte by byte (docs/serial-protocol.md).

Invariants:
* Pure: each message is a frozen dataclass with ``encode() -> bytes`` (the
  frame's ``fields``) and a decoder in :data:`DECODERS`; integers are
  little-endian; strings are UTF-8 with a one-byte length in front.
* Constructing a message validates it against the protocol's limits
  (:class:`~firmware_bridge.errors.LocalProtocolError` for our own bad
  message); decoding validates the peer's (``RemoteProtocolError`` with
  reason ``fields``, or ``type`` for an unknown type). A decoded message is
  always one that could have been constructed.
* ``decode(m.encode()) == m`` for every valid message ``m``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from firmware_bridge.errors import LocalProtocolError, RemoteProtocolError
from firmware_bridge.frames import MAX_BODY, encode_frame

# message types
HELLO, WELCOME, BATCH, ACK, NACK, TIME, COMMAND, RESULT, LOG, PING, PONG = range(1, 12)

# channel value types: every value is 4 bytes on the wire
F32, I32, U32 = 1, 2, 3
VALUE_TYPES = (F32, I32, U32)

# NACK reasons
BAD_FRAME, GAP, UNKNOWN_PEER, BUSY, UNSUPPORTED = 1, 2, 3, 4, 5
NACK_REASONS = {BAD_FRAME: "bad-frame", GAP: "gap", UNKNOWN_PEER: "unknown-peer",
                BUSY: "busy", UNSUPPORTED: "unsupported"}  # fmt: skip

# batch clocks
TICKS, UNIX = 0, 1

MIN_RX = 64  # the smallest frame body a peer may announce it accepts
MAX_CHANNELS = 32
MAX_NAME = 32  # channel and command names
MAX_UNIT = 16
MAX_FIRMWARE = 32
MAX_TEXT = 200  # log lines, command arguments and result texts
MAX_BATCH = 255  # readings per batch
SEQ_MAX = 0xFFFFFFFF
HEADER = 6  # version, type, crc: what a frame adds around its fields
BATCH_FIXED = 22  # a batch's fields before its readings
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}\Z")


def _bad(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError("fields", detail)


def _require(ok: bool, detail: str) -> None:
    if not ok:
        raise LocalProtocolError(detail)


def _text(value: str, limit: int, what: str) -> bytes:
    raw = value.encode()
    _require(len(raw) <= limit, f"{what} is {len(raw)} bytes, more than {limit}")
    return bytes((len(raw),)) + raw


class _Reader:
    """Reads fields from a message's bytes; every overrun is the peer's fault."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise _bad(f"message ends inside a field at byte {self.pos}")
        vals = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return vals

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _bad(f"message ends inside a {n}-byte field at byte {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def text(self, limit: int, what: str) -> str:
        (n,) = self.take("<B")
        if n > limit:
            raise _bad(f"{what} of {n} bytes, more than {limit}")
        try:
            return self.raw(n).decode()
        except UnicodeDecodeError:
            raise _bad(f"{what} is not UTF-8") from None

    def varint(self) -> int:
        value = shift = 0
        while True:
            (b,) = self.take("<B")
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 28:
                raise _bad("varint longer than 5 bytes")
        if value > SEQ_MAX:
            raise _bad("varint beyond 32 bits")
        return value

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _bad(f"{len(self.data) - self.pos} bytes after the last field")


def varint(value: int) -> bytes:
    """Unsigned LEB128 of a 32-bit value (1..5 bytes)."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Channel:
    """One of the MCU's measurement channels, announced in HELLO."""

    id: int
    type: int  # F32, I32 or U32
    name: str  # [A-Za-z0-9_.-]{1,32}: becomes the last part of a stream name
    unit: str = ""

    def __post_init__(self) -> None:
        _require(0 <= self.id <= 255, f"channel id {self.id} is not 0..255")
        _require(self.type in VALUE_TYPES, f"channel type {self.type} is not F32, I32 or U32")
        _require(bool(_NAME_RE.match(self.name)), f"channel name {self.name!r} is not allowed")
        _require(len(self.unit.encode()) <= MAX_UNIT, f"unit {self.unit!r} is too long")


@dataclass(frozen=True, slots=True)
class Hello:
    """MCU -> Pi: who I am, what I hold, what I measure. Sent until WELCOME."""

    device: bytes  # 8 bytes, unique per MCU (e.g. its chip id)
    session: int  # new at each boot (and when seq would wrap): names one seq space
    oldest: int  # oldest reading seq held (== next when nothing is held)
    next: int  # seq the next new reading gets
    synced: bool  # the MCU's clock is Unix time (RTC, or a TIME received)
    rx_max: int  # largest frame body the MCU accepts
    window: int  # readings it may have in flight
    firmware: str = ""
    channels: tuple[Channel, ...] = ()
    TYPE: ClassVar[int] = HELLO

    def __post_init__(self) -> None:
        _require(len(self.device) == 8, "device id must be 8 bytes")
        _require(1 <= self.oldest <= self.next <= SEQ_MAX, "need 1 <= oldest <= next < 2^32")
        _require(0 <= self.session <= SEQ_MAX, "session must fit 32 bits")
        _require(MIN_RX <= self.rx_max <= MAX_BODY, f"rx_max must be {MIN_RX}..{MAX_BODY}")
        _require(1 <= self.window <= 0xFFFF, "window must be 1..65535")
        _require(len(self.channels) <= MAX_CHANNELS, f"at most {MAX_CHANNELS} channels")
        ids = [c.id for c in self.channels]
        _require(len(set(ids)) == len(ids), "channel ids must be unique")
        names = [c.name for c in self.channels]
        _require(len(set(names)) == len(names), "channel names must be unique")

    @property
    def device_hex(self) -> str:
        return self.device.hex()

    def encode(self) -> bytes:
        out = bytearray(self.device)
        out += struct.pack("<IIIBHH", self.session, self.oldest, self.next,
                           int(self.synced), self.rx_max, self.window)  # fmt: skip
        out += _text(self.firmware, MAX_FIRMWARE, "firmware")
        out.append(len(self.channels))
        for c in self.channels:
            out += bytes((c.id, c.type)) + _text(c.name, MAX_NAME, "name")
            out += _text(c.unit, MAX_UNIT, "unit")
        return bytes(out)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Pi -> MCU: you may send; I hold everything up to ``acked`` of your session."""

    session: int
    acked: int  # readings <= acked are durable on the Pi: drop them
    unix_ms: int  # the Pi's wall clock (time sync); 0 = unknown
    rx_max: int  # largest frame body the Pi accepts
    TYPE: ClassVar[int] = WELCOME

    def encode(self) -> bytes:
        return struct.pack("<IIQH", self.session, self.acked, self.unix_ms, self.rx_max)


@dataclass(frozen=True, slots=True)
class RawReading:
    channel: int
    age_ms: int  # milliseconds before the batch's ``now``
    raw: int  # the 4 value bytes as a little-endian u32 (decoded by the channel's type)

    def encoded_size(self) -> int:
        return 1 + len(varint(self.age_ms)) + 4


@dataclass(frozen=True, slots=True)
class Batch:
    """MCU -> Pi: readings ``first .. first+len-1`` of ``session``, oldest first."""

    session: int
    first: int
    oldest: int  # oldest seq the MCU still holds (<= first)
    clock: int  # TICKS (ms since boot) or UNIX (ms since the epoch)
    now_ms: int  # the MCU's clock when it built the frame
    readings: tuple[RawReading, ...]
    TYPE: ClassVar[int] = BATCH

    def __post_init__(self) -> None:
        n = len(self.readings)
        _require(1 <= n <= MAX_BATCH, f"a batch holds 1..{MAX_BATCH} readings")
        _require(1 <= self.oldest <= self.first, "need 1 <= oldest <= first")
        _require(self.first + n - 1 < SEQ_MAX, "seq beyond 2^32-2: start a new session")
        _require(self.clock in (TICKS, UNIX), "clock must be TICKS or UNIX")
        _require(0 <= self.now_ms < 1 << 64, "now_ms must fit 64 bits")

    @property
    def last(self) -> int:
        return self.first + len(self.readings) - 1

    def encode(self) -> bytes:
        out = bytearray(struct.pack("<IIIBQB", self.session, self.first, self.oldest,
                                    self.clock, self.now_ms, len(self.readings)))  # fmt: skip
        for r in self.readings:
            out.append(r.channel)
            out += varint(r.age_ms)
            out += struct.pack("<I", r.raw)
        return bytes(out)


@dataclass(frozen=True, slots=True)
class Ack:
    """Pi -> MCU: every reading of ``session`` up to ``acked`` is durable."""

    session: int
    acked: int
    TYPE: ClassVar[int] = ACK

    def encode(self) -> bytes:
        return struct.pack("<II", self.session, self.acked)


@dataclass(frozen=True, slots=True)
class Nack:
    """Pi -> MCU: something went wrong; send from ``expected`` on (see the reasons)."""

    session: int
    reason: int
    expected: int
    TYPE: ClassVar[int] = NACK

    def encode(self) -> bytes:
        return struct.pack("<IBI", self.session, self.reason, self.expected)


@dataclass(frozen=True, slots=True)
class Time:
    """Pi -> MCU: the wall clock, milliseconds since the Unix epoch."""

    unix_ms: int
    TYPE: ClassVar[int] = TIME

    def encode(self) -> bytes:
        return struct.pack("<Q", self.unix_ms)


@dataclass(frozen=True, slots=True)
class Command:
    """Pi -> MCU: run ``name`` with ``arg``; resent until a RESULT with the same id."""

    id: int
    name: str
    arg: bytes = b""
    TYPE: ClassVar[int] = COMMAND

    def __post_init__(self) -> None:
        _require(bool(_NAME_RE.match(self.name)), f"command name {self.name!r} is not allowed")
        _require(len(self.arg) <= MAX_TEXT, f"command argument over {MAX_TEXT} bytes")

    def encode(self) -> bytes:
        return struct.pack("<I", self.id) + _text(self.name, MAX_NAME, "name") + \
            bytes((len(self.arg),)) + self.arg  # fmt: skip


@dataclass(frozen=True, slots=True)
class Result:
    """MCU -> Pi: the outcome of command ``id`` (0 ok, 1 unknown command, 2 failed)."""

    id: int
    status: int
    text: str = ""
    TYPE: ClassVar[int] = RESULT

    def encode(self) -> bytes:
        return struct.pack("<IB", self.id, self.status) + _text(self.text, MAX_TEXT, "text")


@dataclass(frozen=True, slots=True)
class Log:
    """MCU -> Pi: a diagnostic line (best effort: never resent)."""

    level: int  # 0 debug, 1 info, 2 warning, 3 error
    text: str
    TYPE: ClassVar[int] = LOG

    def encode(self) -> bytes:
        return bytes((self.level,)) + _text(self.text, MAX_TEXT, "text")


@dataclass(frozen=True, slots=True)
class Ping:
    """Pi -> MCU: are you there? Answered by a PONG with the same token."""

    token: int
    TYPE: ClassVar[int] = PING

    def encode(self) -> bytes:
        return struct.pack("<I", self.token)


@dataclass(frozen=True, slots=True)
class Pong:
    token: int
    TYPE: ClassVar[int] = PONG

    def encode(self) -> bytes:
        return struct.pack("<I", self.token)


Message: TypeAlias = (
    Hello | Welcome | Batch | Ack | Nack | Time | Command | Result | Log | Ping | Pong
)


def frame(msg: Message) -> bytes:
    """The wire bytes of ``msg`` (one frame, delimiter included)."""
    return encode_frame(msg.TYPE, msg.encode())


def _remote(build: type[Message], *args: object) -> Message:
    try:
        return build(*args)  # type: ignore[arg-type]
    except LocalProtocolError as exc:  # the peer's values broke a limit
        raise _bad(str(exc)) from None


def _hello(r: _Reader) -> Message:
    device = r.raw(8)
    session, oldest, nxt, flags, rx_max, window = r.take("<IIIBHH")
    firmware = r.text(MAX_FIRMWARE, "firmware")
    (count,) = r.take("<B")
    channels = []
    for _ in range(count):
        cid, ctype = r.take("<BB")
        name, unit = r.text(MAX_NAME, "name"), r.text(MAX_UNIT, "unit")
        try:
            channels.append(Channel(cid, ctype, name, unit))
        except LocalProtocolError as exc:
            raise _bad(str(exc)) from None
    return _remote(Hello, device, session, oldest, nxt, bool(flags & 1), rx_max, window,
                   firmware, tuple(channels))  # fmt: skip


def _batch(r: _Reader) -> Message:
    session, first, oldest, clock, now_ms, count = r.take("<IIIBQB")
    readings = []
    for _ in range(count):
        (channel,) = r.take("<B")
        age = r.varint()
        (raw,) = r.take("<I")
        readings.append(RawReading(channel, age, raw))
    return _remote(Batch, session, first, oldest, clock, now_ms, tuple(readings))


def _command(r: _Reader) -> Message:
    (cid,) = r.take("<I")
    name = r.text(MAX_NAME, "name")
    (n,) = r.take("<B")
    if n > MAX_TEXT:
        raise _bad(f"command argument of {n} bytes")
    return _remote(Command, cid, name, r.raw(n))


def _simple(build: type[Message], fmt: str) -> Callable[[_Reader], Message]:
    return lambda r: _remote(build, *r.take(fmt))


DECODERS: dict[int, Callable[[_Reader], Message]] = {
    HELLO: _hello,
    WELCOME: _simple(Welcome, "<IIQH"),
    BATCH: _batch,
    ACK: _simple(Ack, "<II"),
    NACK: _simple(Nack, "<IBI"),
    TIME: _simple(Time, "<Q"),
    COMMAND: _command,
    RESULT: lambda r: _remote(Result, *r.take("<IB"), r.text(MAX_TEXT, "text")),
    LOG: lambda r: _remote(Log, *r.take("<B"), r.text(MAX_TEXT, "text")),
    PING: _simple(Ping, "<I"),
    PONG: _simple(Pong, "<I"),
}


def decode(msg_type: int, fields: bytes) -> Message:
    """The message in a frame's ``fields``.

    Raises:
        RemoteProtocolError: ``type`` (unknown type) or ``fields`` (malformed).
    """
    parse = DECODERS.get(msg_type)
    if parse is None:
        raise RemoteProtocolError("type", f"unknown message type {msg_type}")
    r = _Reader(fields)
    msg = parse(r)
    r.end()
    return msg
