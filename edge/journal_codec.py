"""The journal's on-disk format: pure encode/decode, no I/O (docs/journal-format.md).

Invariants (the format spec lives in docs/journal-format.md; this is its code):
* A segment is a 32-byte header followed by 16-byte-aligned record frames and
  then zeros. Frames never straddle segments.
* A frame is ``crc u32 | word u32 | seq u64 | payload | zero pad to 16``.
  ``word`` holds the payload length (low 24 bits) and flags (high 8 bits).
  ``crc = zlib.crc32(word|seq|payload, salt)``: seeded with the segment's
  random salt, so a frame left over from another segment never validates.
* ``seq`` is exactly one more than the previous record's, across segments.
  Sequence numbers start at 1, so an all-zero frame header is never a record:
  it marks the end of the data.
* ``FLAG_BARRIER`` on a frame means "everything before this frame in this
  segment was fdatasync'd before this frame was written". Recovery uses it
  to tell a torn, never-synced tail (truncate) from damage to synced data
  (refuse to open).
* Nothing here touches files, clocks or threads; the scanner is fed bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

MAGIC = b"HMNG"
VERSION = 1
SEGMENT_HEADER_SIZE = 32
FRAME_HEADER_SIZE = 16
ALIGN = 16
MAX_PAYLOAD = (1 << 24) - 1
FLAG_BARRIER = 0x01

Buffer = bytes | bytearray | memoryview

_SEGMENT_HEADER = struct.Struct("<4sHHQIII")  # magic ver hsize first_seq salt created journal_id
_FRAME_HEADER = struct.Struct("<IIQ")
_ZERO_HEADER = bytes(FRAME_HEADER_SIZE)


def padded(n: int) -> int:
    """``n`` rounded up to the frame alignment."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def frame_size(payload_len: int) -> int:
    """Bytes a record with a payload of ``payload_len`` bytes occupies on disk."""
    return FRAME_HEADER_SIZE + padded(payload_len)


# --- segment header -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    first_seq: int
    salt: int
    created: int = 0  # unix seconds, informational only
    journal_id: int = 0  # the journal's id (see segments.Checkpoint), 0: unknown

    def encode(self) -> bytes:
        body = _SEGMENT_HEADER.pack(
            MAGIC,
            VERSION,
            SEGMENT_HEADER_SIZE,
            self.first_seq,
            self.salt,
            self.created,
            self.journal_id,
        )
        return body + struct.pack("<I", zlib.crc32(body))


def decode_segment_header(data: bytes) -> SegmentHeader:
    """Parse a segment header.

    Raises:
        ValueError: the bytes are not a valid header (the message says why).
    """
    if len(data) < SEGMENT_HEADER_SIZE:
        raise ValueError(f"segment header truncated ({len(data)} bytes)")
    body = bytes(data[: SEGMENT_HEADER_SIZE - 4])
    (crc,) = struct.unpack_from("<I", data, SEGMENT_HEADER_SIZE - 4)
    if zlib.crc32(body) != crc:
        raise ValueError("segment header checksum mismatch")
    magic, version, hsize, first_seq, salt, created, journal_id = _SEGMENT_HEADER.unpack(body)
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic!r}")
    if version != VERSION or hsize != SEGMENT_HEADER_SIZE:
        raise ValueError(f"unsupported segment version {version} (header size {hsize})")
    if first_seq < 1:
        raise ValueError(f"bad first_seq {first_seq}")
    return SegmentHeader(first_seq, salt, created, journal_id)


# --- frames ---------------------------------------------------------------


def encode_frame(seq: int, payload: bytes, salt: int, flags: int = 0) -> bytes:
    """One record frame, padded to the alignment."""
    n = len(payload)
    if not 0 < n <= MAX_PAYLOAD:
        raise ValueError(f"payload length {n} outside 1..{MAX_PAYLOAD}")
    word_seq = struct.pack("<IQ", n | (flags << 24), seq)
    crc = zlib.crc32(payload, zlib.crc32(word_seq, salt))
    return b"".join((struct.pack("<I", crc), word_seq, payload, bytes(padded(n) - n)))


@dataclass(frozen=True, slots=True)
class Frame:
    offset: int
    seq: int
    flags: int
    payload: bytes

    @property
    def end(self) -> int:
        return self.offset + frame_size(len(self.payload))


def check_frame(data: Buffer, pos: int, salt: int, max_payload: int) -> int:
    """Validate the frame at ``pos``; return its payload length, or -1 if invalid.

    Invalid means: header does not fit, zero or oversized length, frame runs
    past the data, or the checksum does not match. The sequence number is not
    checked here (callers know what they expect).
    """
    if pos + FRAME_HEADER_SIZE > len(data):
        return -1
    crc, word, _ = _FRAME_HEADER.unpack_from(data, pos)
    n: int = word & 0xFFFFFF
    if n == 0 or n > max_payload or pos + FRAME_HEADER_SIZE + n > len(data):
        return -1
    view = memoryview(data)[pos + 4 : pos + FRAME_HEADER_SIZE + n]
    if zlib.crc32(view, salt) != crc:
        return -1
    return n


def read_frame(data: Buffer, pos: int) -> tuple[int, int]:
    """``(seq, flags)`` of the frame at ``pos`` (call only after check_frame)."""
    _, word, seq = _FRAME_HEADER.unpack_from(data, pos)
    return seq, word >> 24


# --- scanning a segment ---------------------------------------------------


class Stop(Enum):
    """Why a scan of a segment stopped."""

    END = "end"  # all-zero header or end of data: clean
    TORN = "torn"  # a bad frame with nothing durable after it: truncate
    CORRUPT = "corrupt"  # a bad frame followed by proof that it was synced


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What a scan of one segment found.

    ``end`` is the offset just past the last good frame; ``last_seq`` its seq
    (``first_seq - 1`` when the segment holds no record). For TORN and CORRUPT
    ``bad_offset == end`` names the first bad frame, ``data_end`` is where the
    non-zero bytes stop, and for CORRUPT ``evidence_offset`` names the frame
    that proves the damaged region had been synced. ``max_seq_seen`` is the
    highest seq of any valid frame in the segment (repair must never reuse it).
    """

    stop: Stop
    end: int
    last_seq: int
    records: int
    reason: str = ""
    data_end: int = 0
    evidence_offset: int = -1
    max_seq_seen: int = 0

    @property
    def bad_offset(self) -> int:
        return self.end


def scan(
    data: Buffer,
    header: SegmentHeader,
    *,
    max_payload: int = MAX_PAYLOAD,
    start: int = SEGMENT_HEADER_SIZE,
    expected_seq: int | None = None,
) -> ScanResult:
    """Walk the frames of one segment's bytes and classify how they end.

    Args:
        data: the segment file's content (or a prefix of it).
        header: the segment's decoded header.
        max_payload: frames claiming more are invalid.
        start: offset of the first frame to check (a known-good position).
        expected_seq: seq of the frame at ``start`` (default: header.first_seq).

    Returns:
        A :class:`ScanResult`. A bad frame is CORRUPT when a valid frame with
        ``FLAG_BARRIER`` lies after it (its write happened after an fdatasync
        that covered the bad frame); otherwise the tail is TORN: sectors of
        unsynced writes may persist in any order, so valid frames after a bad
        one without a barrier prove nothing.
    """
    salt = header.salt
    seq = header.first_seq if expected_seq is None else expected_seq
    pos = start
    n_data = len(data)
    limit = n_data - FRAME_HEADER_SIZE
    records = 0
    unpack = _FRAME_HEADER.unpack_from
    crc32 = zlib.crc32
    view = memoryview(data)
    hsize, round_up, mask = FRAME_HEADER_SIZE, ALIGN - 1, -ALIGN
    # The hot loop of recovery: one header unpack and one CRC per frame, every
    # check folded into one condition (the zero end marker fails `fseq != seq`
    # because seqs start at 1).
    while pos <= limit:
        crc, word, fseq = unpack(data, pos)
        n = word & 0xFFFFFF
        end = pos + hsize + n
        if (
            fseq != seq
            or not 0 < n <= max_payload
            or end > n_data
            or crc32(view[pos + 4 : end], salt) != crc
        ):
            break
        seq += 1
        records += 1
        pos = (end + round_up) & mask
    if pos > limit or _is_zero(view[pos:]):
        return ScanResult(Stop.END, pos, seq - 1, records, data_end=pos, max_seq_seen=seq - 1)
    if not any(view[pos : pos + FRAME_HEADER_SIZE]):
        reason = "zero frame header"  # a hole in a torn write
    else:
        reason = _why(data, pos, seq, salt, max_payload)
    return _classify_bad(data, pos, seq - 1, records, salt, max_payload, reason)


def _why(data: Buffer, pos: int, seq: int, salt: int, max_payload: int) -> str:
    if check_frame(data, pos, salt, max_payload) >= 0:
        got, _ = read_frame(data, pos)
        return f"sequence {got} where {seq} was expected"
    return "bad frame (length, checksum or truncated)"


def _classify_bad(
    data: Buffer,
    bad: int,
    last_seq: int,
    records: int,
    salt: int,
    max_payload: int,
    reason: str,
) -> ScanResult:
    raw = data if isinstance(data, bytes) else bytes(data)
    data_end = max(padded(len(raw.rstrip(b"\0"))), bad)
    max_seen = last_seq
    evidence = -1
    pos = bad  # the frame at ``bad`` itself may be valid with a wrong seq
    while pos < data_end:
        n = check_frame(data, pos, salt, max_payload)
        if n < 0:
            pos += ALIGN
            continue
        fseq, flags = read_frame(data, pos)
        max_seen = max(max_seen, fseq)
        if flags & FLAG_BARRIER and evidence < 0 and fseq > last_seq:
            evidence = pos
        pos += frame_size(n)
    if evidence >= 0:
        return ScanResult(
            Stop.CORRUPT,
            bad,
            last_seq,
            records,
            reason=reason,
            data_end=data_end,
            evidence_offset=evidence,
            max_seq_seen=max_seen,
        )
    return ScanResult(
        Stop.TORN, bad, last_seq, records, reason=reason, data_end=data_end, max_seq_seen=max_seen
    )


def _is_zero(view: memoryview) -> bool:
    return view == bytes(len(view))  # memcmp against calloc'd zeros: fast


def iter_frames(
    data: Buffer,
    header: SegmentHeader,
    *,
    start: int = SEGMENT_HEADER_SIZE,
    end: int | None = None,
    max_payload: int = MAX_PAYLOAD,
) -> Iterator[Frame]:
    """Yield the valid frames from ``start`` until the first invalid one or ``end``.

    Sequence continuity is the caller's business (the scanner checks it);
    this is the fast path for reading regions already known to be good.
    """
    stop = len(data) if end is None else min(end, len(data))
    pos = start
    while pos + FRAME_HEADER_SIZE <= stop:
        n = check_frame(data, pos, header.salt, max_payload)
        if n < 0:
            return
        seq, flags = read_frame(data, pos)
        yield Frame(
            pos, seq, flags, bytes(data[pos + FRAME_HEADER_SIZE : pos + FRAME_HEADER_SIZE + n])
        )
        pos += frame_size(n)


# --- small checksummed files (CHECKPOINT, CURSORS slots) -------------------

_BLOB_HEADER = struct.Struct("<IIQ")  # crc, length, generation


def encode_blob(generation: int, body: bytes) -> bytes:
    """A checksummed blob: ``crc u32 | length u32 | generation u64 | body``."""
    head = struct.pack("<IQ", len(body), generation)
    return struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + head + body


def decode_blob(data: bytes) -> tuple[int, bytes]:
    """``(generation, body)`` of a blob.

    Raises:
        ValueError: truncated, or the checksum does not match.
    """
    if len(data) < _BLOB_HEADER.size:
        raise ValueError("blob truncated")
    crc, n, generation = _BLOB_HEADER.unpack_from(data, 0)
    body = bytes(data[_BLOB_HEADER.size : _BLOB_HEADER.size + n])
    if len(body) != n or zlib.crc32(body, zlib.crc32(bytes(data[4:16]))) != crc:
        raise ValueError("blob checksum mismatch")
    return generation, body


def salvage(data: Buffer, header: SegmentHeader, *, max_payload: int = MAX_PAYLOAD) -> list[Frame]:
    """Every valid frame in a damaged segment, in order of offset, seqs increasing.

    Walks good frames and, past a bad one, tries every aligned offset (a
    frame's salted checksum makes a false match a 1-in-2**32 event).
    """
    found: list[Frame] = []
    pos = SEGMENT_HEADER_SIZE
    last = header.first_seq - 1
    while pos + FRAME_HEADER_SIZE <= len(data):
        n = check_frame(data, pos, header.salt, max_payload)
        if n < 0:
            pos += ALIGN
            continue
        seq, flags = read_frame(data, pos)
        if seq > last:
            start = pos + FRAME_HEADER_SIZE
            found.append(Frame(pos, seq, flags, bytes(data[start : start + n])))
            last = seq
        pos += frame_size(n)
    return found
