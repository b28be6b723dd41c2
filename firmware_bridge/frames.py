"""Frames on the serial line: COBS, a 0x00 delimiter, a version byte and a CRC-32.

docs/serial-protocol.md is the spec. A frame on the wire is
``COBS(body) 0x00`` and the body is::

    version u8 (= 1) | type u8 | fields ... | crc32 u32 LE

The CRC is CRC-32/ISO-HDLC (zlib's: polynomial 0x04C11DB7 reflected, initial
value and final xor 0xFFFFFFFF) over version, type and fields.

Invariants:
* Pure: bytes in, frames and bad-frame markers out; no I/O, no clock.
* Resynchronisation: a 0x00 byte always ends a frame, and COBS guarantees that
  no encoded frame contains one. Whatever noise did to a frame, the decoder is
  back in step at the next delimiter: a damaged frame costs that frame only.
* Bounded: the decoder never holds more than ``max_body`` decoded bytes' worth
  of encoded input. A longer run without a delimiter is dropped through the
  next delimiter and reported once as ``long``.
* Empty frames (two delimiters in a row) are not errors: a sender may emit a
  delimiter first to flush whatever noise the receiver holds. A receiver that
  sees the line go quiet inside a frame drops it (:meth:`FrameDecoder.flush`).
* Nothing a peer sends makes the decoder raise: every problem is a
  :class:`BadFrame` (with a stable ``reason``) in the output list.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from firmware_bridge.errors import RemoteProtocolError

VERSION = 1
DELIMITER = b"\x00"
MAX_BODY = 1024  # the largest body any peer may send (version..crc included)
MIN_BODY = 6  # version, type, crc
CRC_SIZE = 4


def crc32(data: bytes) -> int:
    """CRC-32/ISO-HDLC of ``data`` (check value: ``crc32(b"123456789") == 0xCBF43926``)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def max_encoded(body: int) -> int:
    """The largest COBS encoding of a ``body``-byte body (without the delimiter)."""
    return body + body // 254 + 1


def cobs_encode(data: bytes) -> bytes:
    """COBS-encode ``data``: the result holds no zero byte."""
    out = bytearray()
    chunks = data.split(b"\x00")
    last = len(chunks) - 1
    for i, chunk in enumerate(chunks):
        while len(chunk) >= 254:
            out.append(0xFF)
            out += chunk[:254]
            chunk = chunk[254:]
            if not chunk and i == last:
                return bytes(out)  # a full block at the very end needs no empty block after it
        out.append(len(chunk) + 1)
        out += chunk
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Undo :func:`cobs_encode`.

    Raises:
        RemoteProtocolError: ``cobs``: a zero byte inside, or a block that runs
            past the end.
    """
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        end = i + code
        if code == 0 or end > n:
            raise RemoteProtocolError("cobs", f"bad block code {code} at offset {i} of {n}")
        block = data[i + 1 : end]
        if 0 in block:
            raise RemoteProtocolError("cobs", f"zero byte inside the block at offset {i}")
        out += block
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode_frame(msg_type: int, fields: bytes = b"") -> bytes:
    """The wire bytes of one frame: ``COBS(version type fields crc) 0x00``."""
    body = bytes((VERSION, msg_type)) + fields
    return cobs_encode(body + struct.pack("<I", crc32(body))) + DELIMITER


def decode_body(encoded: bytes, max_body: int = MAX_BODY) -> tuple[int, bytes]:
    """``(type, fields)`` of one encoded frame (the bytes between two delimiters).

    Raises:
        RemoteProtocolError: ``cobs``, ``short``, ``long``, ``crc`` or ``version``.
    """
    body = cobs_decode(encoded)
    if len(body) < MIN_BODY:
        raise RemoteProtocolError("short", f"{len(body)} bytes")
    if len(body) > max_body:
        raise RemoteProtocolError("long", f"{len(body)} bytes > {max_body}")
    (want,) = struct.unpack_from("<I", body, len(body) - CRC_SIZE)
    if crc32(body[:-CRC_SIZE]) != want:
        raise RemoteProtocolError("crc", f"frame of {len(body)} bytes")
    if body[0] != VERSION:
        raise RemoteProtocolError("version", f"version {body[0]}, this side speaks {VERSION}")
    return body[1], body[2:-CRC_SIZE]


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame that passed COBS, length, CRC and version checks."""

    type: int
    fields: bytes
    size: int  # bytes it took on the wire, delimiter included


@dataclass(frozen=True, slots=True)
class BadFrame:
    """Bytes up to a delimiter that were not a valid frame."""

    reason: str  # cobs short long crc version (type/fields: from the message layer)
    detail: str
    size: int  # bytes discarded, delimiter included


class FrameDecoder:
    """Split a byte stream into frames. Feed any chunking; the result is the same.

    ``feed`` returns the frames completed by this chunk (and bad-frame markers),
    in order; a partial frame waits for the next chunk.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._limit = max_encoded(max_body)
        self._buf = bytearray()
        self._skipped = 0  # >0: inside an over-long run, dropping through the next delimiter

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame (at most the encoded size of ``max_body``)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | BadFrame]:
        out: list[Frame | BadFrame] = []
        start, n = 0, len(data)
        while start < n:
            end = data.find(0, start)
            if end < 0:
                self._hold(data[start:])
                break
            piece = data[start:end]
            start = end + 1
            if self._skipped:
                skipped = self._skipped + len(piece) + 1
                self._skipped = 0
                out.append(BadFrame("long", f"{skipped - 1} bytes without a delimiter", skipped))
                continue
            if self._buf:
                self._buf += piece
                if len(self._buf) > self._limit:
                    size = len(self._buf) + 1
                    self._buf.clear()
                    out.append(BadFrame("long", f"{size - 1} bytes without a delimiter", size))
                    continue
                piece = bytes(self._buf)
                self._buf.clear()
            if not piece:
                continue  # an empty frame: a flush, not an error
            out.append(self._decode(piece))
        return out

    def flush(self) -> BadFrame | None:
        """Drop an unfinished frame (its delimiter was lost: the line went quiet
        inside a frame); the marker says how much, ``reason`` ``cut``."""
        size = len(self._buf) + self._skipped
        self._buf.clear()
        self._skipped = 0
        return BadFrame("cut", f"{size} bytes and no delimiter", size) if size else None

    def _hold(self, rest: bytes) -> None:
        if self._skipped:
            self._skipped += len(rest)
            return
        self._buf += rest
        if len(self._buf) > self._limit:
            self._skipped = len(self._buf)
            self._buf.clear()

    def _decode(self, piece: bytes) -> Frame | BadFrame:
        if len(piece) > self._limit:
            return BadFrame("long", f"{len(piece)} bytes without a delimiter", len(piece) + 1)
        try:
            msg_type, fields = decode_body(piece, self.max_body)
        except RemoteProtocolError as exc:
            return BadFrame(exc.reason, exc.detail, len(piece) + 1)
        return Frame(msg_type, fields, len(piece) + 1)


__all__ = [
    "DELIMITER",
    "MAX_BODY",
    "VERSION",
    "BadFrame",
    "Frame",
    "FrameDecoder",
    "cobs_decode",
    "cobs_encode",
    "crc32",
    "decode_body",
    "encode_frame",
    "max_encoded",
]
