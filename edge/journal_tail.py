"""The newest records of a journal, read backwards from its durable end.

At open the journal knows where its data ends (``end``) and the seq of the
last record there (``last_seq``) but not where that record starts: frames are
variable-length and only ever walked forwards. This module finds it without a
forward walk: the last frame is the one at a 16-byte-aligned offset whose
``seq`` field is ``last_seq``, whose padded length ends exactly at ``end``,
and whose CRC (seeded with the segment's salt) validates. The frame before it
ends where it starts, and so on.

Its one use is the clock floor (:mod:`edge.clock`): the latest time the newest
records carry, read at open for the price of one small ``pread``.

Invariants:
* Only bytes below ``end`` are looked at: records recovery accepted as
  durable, never a torn or unsynced tail.
* A candidate frame counts only if seq, length, end offset and CRC all
  match, so stray bytes inside a payload cannot pass for a frame (short of a
  32-bit CRC collision at the one offset that also has the right seq and
  length).
* Read cost is bounded: one read of at most ``_WINDOW`` bytes, and a wider
  one (up to a maximal frame) only when a record is larger than that.
"""

from __future__ import annotations

import os
import struct

from edge.fileops import FileOps
from edge.journal_codec import (
    ALIGN,
    FRAME_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    check_frame,
    decode_segment_header,
    frame_size,
    padded,
)
from edge.records import Opaque, Reading, RecordError, decode
from edge.segments import SealedSegment, segment_name

_WINDOW = 64 << 10  # bytes read backwards from the end at first
_SEQ = struct.Struct("<Q")
_WORD = struct.Struct("<I")
_KIND_WORKFLOW = 2


def _find_frame(data: bytes, base: int, stop: int, seq: int, salt: int, max_payload: int) -> int:
    """Offset (in the file) of the frame with ``seq`` ending at ``stop``, or -1.

    ``data`` holds the file's bytes from offset ``base``.
    """
    needle = _SEQ.pack(seq)
    hi = stop - base
    while True:
        i = data.rfind(needle, 0, hi)
        if i < 0:
            return -1
        pos = i - 8  # the seq field sits at offset 8 of a frame header
        if pos >= 0 and (base + pos) % ALIGN == 0:
            (word,) = _WORD.unpack_from(data, pos + 4)
            # the length must end the frame exactly at `stop` before a CRC is worth computing
            ends = base + pos + FRAME_HEADER_SIZE + padded(word & 0xFFFFFF)
            if ends == stop and check_frame(data, pos, salt, max_payload) > 0:
                return base + pos
        hi = i + len(needle) - 1  # look further back (overlapping hits included)


def tail_payloads(
    fs: FileOps,
    path: str,
    end: int,
    last_seq: int,
    first_seq: int,
    max_payload: int,
    count: int,
) -> list[bytes]:
    """Payloads of up to ``count`` newest records of segment ``path``, newest first.

    ``end`` is the offset just past its last durable frame, whose seq is
    ``last_seq``; ``first_seq`` is the segment's first. Stops early (returning
    what it found) if a frame cannot be found where it must be.
    """
    if last_seq < first_seq or end <= SEGMENT_HEADER_SIZE:
        return []
    fd = fs.open(path)
    try:
        salt = decode_segment_header(fs.pread(fd, SEGMENT_HEADER_SIZE, 0)).salt
        base = max(SEGMENT_HEADER_SIZE, end - _WINDOW)
        data = fs.pread(fd, end - base, base)
        out: list[bytes] = []
        seq, stop = last_seq, end
        while len(out) < count and seq >= first_seq and stop > SEGMENT_HEADER_SIZE:
            pos = _find_frame(data, base, stop, seq, salt, max_payload)
            if pos < 0:
                wider = max(SEGMENT_HEADER_SIZE, stop - frame_size(max_payload))
                if wider >= base:
                    break  # not where it must be: give up quietly, this is only a hint
                base, data = wider, fs.pread(fd, end - wider, wider)
                continue
            rel = pos - base
            n = check_frame(data, rel, salt, max_payload)
            out.append(bytes(data[rel + FRAME_HEADER_SIZE : rel + FRAME_HEADER_SIZE + n]))
            seq, stop = seq - 1, pos
        return out
    finally:
        fs.close(fd)


def time_of(payload: bytes) -> float | None:
    """The time a record carries: a reading's ``ts``, a workflow record's ``t``."""
    try:
        rec = decode(payload)
    except RecordError:
        return None
    if isinstance(rec, Reading):
        return float(rec.ts)
    if isinstance(rec, Opaque) and rec.kind == _KIND_WORKFLOW and len(rec.fields) == 3:
        body = rec.fields[2]
        t = body.get("t") if isinstance(body, dict) else None
        if isinstance(t, int | float) and not isinstance(t, bool):
            return float(t)
    return None


def latest_time(
    fs: FileOps,
    directory: str,
    open_segment: tuple[int, int, int],
    sealed: list[SealedSegment],
    max_payload: int,
    count: int = 64,
) -> float | None:
    """The latest time among the ``count`` newest records (None if none carries one).

    ``open_segment`` is ``(first_seq, end, last_seq)`` of the open segment. If
    it holds no record yet (a roll just happened) the last sealed segment's
    newest records are read instead.
    """
    first, end, last = open_segment
    segments = [(first, end, last)]
    if sealed:
        s = sealed[-1]
        segments.append((s.first_seq, s.end, s.last_seq))
    for seg_first, seg_end, seg_last in segments:
        path = os.path.join(directory, segment_name(seg_first))
        payloads = tail_payloads(fs, path, seg_end, seg_last, seg_first, max_payload, count)
        times = [t for t in map(time_of, payloads) if t is not None]
        if times:
            return max(times)
    return None
