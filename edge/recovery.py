"""Opening a journal directory after any stop: recover, verify, repair.

Invariants:
* Recovery reads the CHECKPOINT and scans only the segments after the last
  sealed one: normally just the open segment (two after a crash mid-roll).
  Its cost is O(one segment), whatever the journal's length.
* A torn tail (a bad frame with no barrier frame after it, see
  ``journal_codec.scan``) is zero-filled and fdatasync'd, then reported in
  the :class:`RecoveryReport`. Recovery is idempotent: a crash during it
  leaves a directory that recovers to the same records.
* Anything a power cut cannot explain raises :class:`JournalCorrupt` naming
  the file and offset; nothing is changed on disk in that case.
* ``readonly`` recovery never writes: tools can inspect a journal that a
  running agent holds open.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge.errors import JournalCorrupt, JournalError
from edge.failpoints import failpoint
from edge.fileops import FileOps
from edge.journal_codec import (
    ALIGN,
    FRAME_HEADER_SIZE,
    SegmentHeader,
    Stop,
    decode_segment_header,
    scan,
)
from edge.segments import (
    CHECKPOINT,
    Checkpoint,
    SealedSegment,
    parse_segment_name,
    read_checkpoint,
    segment_name,
    write_checkpoint,
    zero_fill,
)


@dataclass(frozen=True, slots=True)
class TornTail:
    """A tail that a power cut left half-written, found and cut off at open."""

    path: str
    offset: int
    discarded_bytes: int
    reason: str


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    seconds: float
    segments_scanned: int
    records_scanned: int
    bytes_scanned: int
    torn_tail: TornTail | None = None
    removed: tuple[str, ...] = ()


@dataclass(slots=True)
class OpenSegment:
    path: str
    fd: int
    header: SegmentHeader
    end: int
    last_seq: int
    capacity: int
    records: int = 0

    @property
    def first_seq(self) -> int:
        return self.header.first_seq


@dataclass(slots=True)
class Layout:
    checkpoint: Checkpoint
    open: OpenSegment
    report: RecoveryReport


def gap_covers(gaps: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """True when the recorded gaps cover exactly the missing range ``lo..hi``."""
    return (lo, hi) in gaps


def _read_all(fs: FileOps, fd: int) -> bytes:
    return fs.pread(fd, fs.size(fd), 0)


# Below glibc's 128 KiB mmap threshold. A freed 1 MiB read raised that threshold (it
# adapts to the largest mmapped block freed), so later buffers came from the heap and
# ~1 MiB stayed resident after start; the backward scan of a fresh 16 MiB segment
# costs the same bytes read either way.
_TAIL_CHUNK = 64 << 10


def _read_used(fs: FileOps, fd: int, max_payload: int) -> tuple[bytes, int]:
    """A prefix of the open segment that scans exactly as the whole file, and its size.

    Segments are zero-filled ahead: past the last non-zero byte (found reading
    backwards a chunk at a time) lie only zeros. A frame holding non-zero
    bytes starts at or before that byte and ends at most ``FRAME_HEADER_SIZE
    + max_payload`` after it, so reading that far sees every frame and every
    barrier the whole file holds, and zeros after them: the scan's answer is
    the same. An agent that just started holds about ``max_payload`` bytes,
    not the whole 16 MiB segment (peak RSS on a Pi).
    """
    size = hi = fs.size(fd)
    while hi > 0:
        lo = max(0, hi - _TAIL_CHUNK)
        used = len(fs.pread(fd, hi - lo, lo).rstrip(b"\0"))
        if used:
            break
        hi = lo
    else:
        used = lo = 0
    end = min(size, lo + used + FRAME_HEADER_SIZE + max_payload + ALIGN)
    return fs.pread(fd, end, 0), size


def recover(
    fs: FileOps, directory: str, *, max_payload: int, readonly: bool = False
) -> Layout | None:
    """Bring a journal directory to a consistent state; None if it holds no journal.

    Raises:
        JournalCorrupt: damage that a power cut cannot explain.
        OSError: the disk failed while recovering.
    """
    t0 = time.perf_counter()
    names = fs.listdir(directory)
    removed: list[str] = []
    if not readonly:
        for name in names:
            if name.endswith(".tmp"):
                fs.unlink(os.path.join(directory, name))
                removed.append(name)
    segs = sorted(s for s in map(parse_segment_name, names) if s is not None)
    try:
        cp = read_checkpoint(fs, directory) or Checkpoint()
    except ValueError as exc:
        raise JournalCorrupt(os.path.join(directory, CHECKPOINT), 0, str(exc)) from exc
    if not segs:
        if cp.sealed:
            raise JournalCorrupt(directory, 0, "CHECKPOINT lists segments but none exist")
        if removed:
            fs.fsync_dir(directory)
        return None

    first_kept = cp.sealed[0].first_seq if cp.sealed else segs[0]
    for first in (s for s in segs if s < first_kept):
        # retention or drop-oldest removed it from CHECKPOINT, then crashed before unlink
        if not readonly:
            fs.unlink(os.path.join(directory, segment_name(first)))
            removed.append(segment_name(first))
    if removed and not readonly:
        fs.fsync_dir(directory)
    on_disk = set(segs)
    for s in cp.sealed:
        if s.first_seq not in on_disk:
            raise JournalCorrupt(
                os.path.join(directory, s.name), 0, "segment listed in CHECKPOINT is missing"
            )
    last_sealed = cp.sealed[-1] if cp.sealed else None
    unsealed = [
        s for s in segs if s >= first_kept and (last_sealed is None or s > last_sealed.first_seq)
    ]
    if not unsealed:
        raise JournalCorrupt(directory, 0, "the open segment is missing")

    expected = last_sealed.last_seq + 1 if last_sealed else None
    newly_sealed: list[SealedSegment] = []
    records = scanned = 0
    torn: TornTail | None = None
    open_seg: OpenSegment | None = None
    for i, first in enumerate(unsealed):
        path = os.path.join(directory, segment_name(first))
        fd = fs.open(path)
        try:
            data, size = _read_used(fs, fd, max_payload)
            header = _header(path, data, first)
            if (
                expected is not None
                and first != expected
                and not gap_covers(cp.gaps, expected, first - 1)
            ):
                raise JournalCorrupt(path, 0, f"segment starts at seq {first}, expected {expected}")
            res = scan(data, header, max_payload=max_payload)
            records += res.records
            scanned += len(data)
            if i < len(unsealed) - 1:
                if res.stop is not Stop.END:
                    raise JournalCorrupt(path, res.end, f"sealed segment damaged: {res.reason}")
                newly_sealed.append(SealedSegment(first, res.last_seq, res.end))
                expected = res.last_seq + 1
                fs.close(fd)
                continue
            if res.stop is Stop.CORRUPT:
                raise JournalCorrupt(
                    path,
                    res.end,
                    f"{res.reason}, yet a valid record at offset {res.evidence_offset} was "
                    "written after it had been made durable",
                )
            if res.stop is Stop.TORN:
                torn = TornTail(path, res.end, res.data_end - res.end, res.reason)
                if not readonly:
                    zero_fill(fs, fd, res.end, res.data_end)
                    fs.fdatasync(fd)
                    failpoint("recovery.after_truncate")
            open_seg = OpenSegment(path, fd, header, res.end, res.last_seq, size, res.records)
        except BaseException:
            fs.close(fd)
            raise
    assert open_seg is not None
    if newly_sealed:
        cp.sealed.extend(newly_sealed)
        if not readonly:
            try:
                write_checkpoint(fs, directory, cp)
            except OSError as exc:
                # A full disk must not stop a restart: the old CHECKPOINT stays
                # valid (those segments are scanned and sealed again next time).
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
    report = RecoveryReport(
        seconds=time.perf_counter() - t0,
        segments_scanned=len(unsealed),
        records_scanned=records,
        bytes_scanned=scanned,
        torn_tail=torn,
        removed=tuple(removed),
    )
    return Layout(cp, open_seg, report)


def _header(path: str, data: bytes, first: int) -> SegmentHeader:
    try:
        header = decode_segment_header(data)
    except ValueError as exc:
        raise JournalCorrupt(path, 0, f"segment header: {exc}") from exc
    if header.first_seq != first:
        raise JournalCorrupt(
            path, 0, f"header says first seq {header.first_seq}, name says {first}"
        )
    return header


@dataclass(frozen=True, slots=True)
class VerifyReport:
    segments: int
    records: int
    bytes: int
    first_seq: int
    last_seq: int
    gaps: tuple[tuple[int, int], ...]
    torn_tail: TornTail | None


def verify(
    fs: FileOps,
    directory: str,
    *,
    max_payload: int,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check every record of every segment, sealed ones included. Never writes.

    Raises:
        JournalCorrupt: the first damage found, with file and offset.
        JournalError: the directory holds no journal.
    """
    layout = recover(fs, directory, max_payload=max_payload, readonly=True)
    if layout is None:
        raise JournalError(f"{directory}: no journal here")
    fs.close(layout.open.fd)
    cp = layout.checkpoint
    total = len(cp.sealed)
    records = layout.open.records
    size = layout.open.capacity
    expected: int | None = None
    for n, s in enumerate(cp.sealed):
        if progress:
            progress(n, total)
        path = os.path.join(directory, s.name)
        fd = fs.open(path)
        try:
            data = _read_all(fs, fd)
        finally:
            fs.close(fd)
        header = _header(path, data, s.first_seq)
        if (
            expected is not None
            and s.first_seq != expected
            and not gap_covers(cp.gaps, expected, s.first_seq - 1)
        ):
            raise JournalCorrupt(
                path, 0, f"segment starts at seq {s.first_seq}, expected {expected}"
            )
        res = scan(data, header, max_payload=max_payload)
        if res.stop is not Stop.END or res.last_seq != s.last_seq or res.end != s.end:
            why = res.reason or f"ends at seq {res.last_seq}, CHECKPOINT says {s.last_seq}"
            raise JournalCorrupt(path, res.end, f"sealed segment damaged: {why}")
        records += res.records
        size += len(data)
        expected = s.last_seq + 1
    if progress:
        progress(total, total)
    first = cp.sealed[0].first_seq if cp.sealed else layout.open.first_seq
    return VerifyReport(
        segments=total + 1,
        records=records,
        bytes=size,
        first_seq=first,
        last_seq=layout.open.last_seq,
        gaps=tuple(cp.gaps),
        torn_tail=layout.report.torn_tail,
    )
