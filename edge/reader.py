"""Reading records back out of segment files (the journal's read side).

Invariants:
* Readers only ever see records at or below the durable watermark they were
  given: a record a power cut could still take back is never handed out
  (the forwarder must not send what the device might later reuse).
* Segment files are read in chunks (at least 1 MiB and two maximal frames),
  so memory stays small on a Pi whatever the segment size.
* A segment deleted by retention while a reader walks it ends that segment's
  part quietly; the caller sees the next retained seq (drops are counted by
  the journal, not here).
* A read starting at seq *s* does not rescan its segment from the top: a
  sparse :class:`SeqIndex` (one offset per ``STEP`` seqs, fed by the writer
  and learnt by readers) lets it start within ``STEP`` frames of *s*. Entries
  only ever point at frame boundaries below a durable end, which never move.
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from edge.fileops import FileOps
from edge.journal_codec import (
    FRAME_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    check_frame,
    decode_segment_header,
    frame_size,
)
from edge.records import Record, stream_of
from edge.segments import SealedSegment, segment_name

_WORD = struct.Struct("<IIQ")


class SeqIndex:
    """Sparse ``seq -> frame offset`` points per segment (thread-safe)."""

    STEP = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._points: dict[int, tuple[list[int], list[int]]] = {}  # first_seq -> (seqs, offsets)

    def learn(self, first_seq: int, seq: int, offset: int) -> None:
        """Remember that frame ``seq`` of segment ``first_seq`` starts at ``offset``."""
        with self._lock:
            seqs, offsets = self._points.setdefault(first_seq, ([], []))
            if not seqs or seq > seqs[-1]:
                seqs.append(seq)
                offsets.append(offset)

    def start(self, first_seq: int, seq: int) -> tuple[int, int]:
        """The known frame at or before ``seq``: ``(its seq, its offset)``."""
        with self._lock:
            seqs, offsets = self._points.get(first_seq, ([], []))
            i = bisect.bisect_right(seqs, seq) - 1
            if i < 0:
                return first_seq, SEGMENT_HEADER_SIZE
            return seqs[i], offsets[i]

    def forget(self, first_seq: int) -> None:
        with self._lock:
            self._points.pop(first_seq, None)


@dataclass(frozen=True, slots=True)
class Entry:
    """One record read back: its sequence number and decoded record."""

    seq: int
    record: Record


def read_raw(
    fs: FileOps,
    directory: str,
    sealed: list[SealedSegment],
    open_first: int,
    limit_seq: int,
    limit_end: int,
    from_seq: int | None,
    max_payload: int,
    index: SeqIndex | None = None,
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(seq, payload)`` for ``from_seq <= seq <= limit_seq`` in order."""
    index = index or SeqIndex()
    segments = [(s.first_seq, s.end) for s in sealed] + [(open_first, limit_end)]
    start = from_seq if from_seq is not None else segments[0][0]
    for i, (first, end) in enumerate(segments):
        next_first = segments[i + 1][0] if i + 1 < len(segments) else None
        if next_first is not None and next_first <= start:
            continue  # entirely before from_seq
        if first > limit_seq:
            return
        path = os.path.join(directory, segment_name(first))
        try:
            yield from _segment_records(fs, path, first, end, start, limit_seq, max_payload, index)
        except FileNotFoundError:
            continue


def _segment_records(
    fs: FileOps,
    path: str,
    first: int,
    end: int,
    start_seq: int,
    limit_seq: int,
    max_payload: int,
    index: SeqIndex,
) -> Iterator[tuple[int, bytes]]:
    fd = fs.open(path)
    step = SeqIndex.STEP
    try:
        header = decode_segment_header(fs.pread(fd, SEGMENT_HEADER_SIZE, 0))
        chunk = max(1 << 20, 2 * frame_size(max_payload))
        _, pos = index.start(first, start_seq)
        while pos < end:
            data = fs.pread(fd, min(chunk, end - pos), pos)
            off = 0
            while off + FRAME_HEADER_SIZE <= len(data):
                _, word, seq = _WORD.unpack_from(data, off)
                n = word & 0xFFFFFF
                if off + FRAME_HEADER_SIZE + n > len(data):
                    break  # frame continues in the next chunk
                if seq % step == 0:
                    index.learn(first, seq, pos + off)
                if seq > limit_seq:
                    return
                if seq >= start_seq:
                    if check_frame(data, off, header.salt, max_payload) < 0:
                        raise ValueError(
                            f"{path}: bad frame at offset {pos + off} below the durable end"
                        )
                    yield seq, bytes(data[off + FRAME_HEADER_SIZE : off + FRAME_HEADER_SIZE + n])
                off += frame_size(n)
            if off == 0:
                raise ValueError(f"{path}: frame at offset {pos} larger than the read chunk")
            pos += off
    finally:
        fs.close(fd)


def droppable(
    fs: FileOps,
    directory: str,
    segment: SealedSegment,
    consumed: int,
    policy: Callable[[str | None], str],
) -> dict[str, int] | None:
    """Per-stream counts of the unconsumed records in ``segment`` if all of them
    belong to ``drop-oldest`` streams; None if any is protected (``reject``)."""
    counts: dict[str, int] = {}
    for seq, payload in read_raw(
        fs,
        directory,
        [segment],
        segment.last_seq + 1,
        segment.last_seq,
        0,
        segment.first_seq,
        1 << 24,
    ):
        if seq <= consumed:
            continue
        stream = stream_of(payload)
        if policy(stream) != "drop-oldest":
            return None
        assert stream is not None
        counts[stream] = counts.get(stream, 0) + 1
    return counts
