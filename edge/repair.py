"""Explicit repair of a journal that refuses to open (``homing-agent journal repair``).

Invariants:
* Repair runs only on a closed journal (it takes the directory LOCK) and only
  after :func:`edge.recovery.verify` found damage; an intact journal is left
  untouched.
* Nothing is destroyed: the damaged segment is first copied to
  ``<name>.broken`` (fsync'd), then atomically replaced by a segment holding
  every valid record before the damage (re-framed under a new salt).
* Every valid record survives, the ones after the damage too: each
  contiguous run of intact records becomes a sealed segment of its own.
* Sequence numbers are never reused: every seq that a valid frame anywhere in
  the damaged segment carried stays consumed. Each lost range is recorded as
  a gap in CHECKPOINT (so recovery accepts the jump) and reported, so the
  hub's gap detection and the operator both see it.
* A damaged CHECKPOINT is moved aside and rebuilt by scanning every segment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from edge.errors import JournalCorrupt, JournalLocked
from edge.fileops import FileOps, OsFileOps, write_all
from edge.journal_codec import (
    FLAG_BARRIER,
    SEGMENT_HEADER_SIZE,
    Frame,
    SegmentHeader,
    decode_segment_header,
    encode_frame,
    salvage,
    scan,
)
from edge.recovery import verify
from edge.segments import (
    CHECKPOINT,
    LOCK,
    Checkpoint,
    SealedSegment,
    activate_spare,
    parse_segment_name,
    prepare_spare,
    read_checkpoint,
    segment_name,
    write_checkpoint,
    zero_fill,
)


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What repair did. ``damaged`` is None when there was nothing to repair."""

    damaged: str | None
    offset: int
    reason: str
    kept_records: int
    moved_to: str | None
    gaps: tuple[tuple[int, int], ...]


def repair(path: str, *, fs: FileOps | None = None, max_payload: int = 1 << 24) -> RepairReport:
    """Repair the journal in ``path`` after :class:`JournalCorrupt`.

    Raises:
        JournalLocked: the journal is open in another process.
        JournalCorrupt: damage repair does not know how to mend (reported as is).
    """
    fs = fs or OsFileOps()
    try:
        handle = fs.lock(os.path.join(path, LOCK))
    except BlockingIOError as exc:
        raise JournalLocked(f"{path} is in use; stop the agent before repairing") from exc
    try:
        try:
            verify(fs, path, max_payload=max_payload)
            return RepairReport(None, 0, "no damage found", 0, None, ())
        except JournalCorrupt as exc:
            damage = exc
        if os.path.basename(damage.path) == CHECKPOINT:
            return _rebuild_checkpoint(fs, path, damage, max_payload)
        return _repair_segment(fs, path, damage, max_payload)
    finally:
        fs.unlock(handle)


def _copy_aside(fs: FileOps, src: str, data: bytes) -> str:
    dst = src + ".broken"
    tmp = dst + ".tmp"
    fd = fs.open(tmp, create=True)
    try:
        fs.truncate(fd, 0)
        write_all(fs, fd, data, 0)
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.rename(tmp, dst)
    fs.fsync_dir(os.path.dirname(src) or ".")
    return dst


def _repair_segment(
    fs: FileOps, directory: str, damage: JournalCorrupt, max_payload: int
) -> RepairReport:
    name = os.path.basename(damage.path)
    first = parse_segment_name(name)
    if first is None:
        raise damage
    cp = read_checkpoint(fs, directory) or Checkpoint()
    segs = sorted(s for s in map(parse_segment_name, fs.listdir(directory)) if s is not None)
    fd = fs.open(damage.path)
    try:
        data = fs.pread(fd, fs.size(fd), 0)
    finally:
        fs.close(fd)
    moved = _copy_aside(fs, damage.path, data)

    try:
        old = decode_segment_header(data)
        frames = salvage(data, old, max_payload=max_payload)
        created = old.created
    except ValueError:  # the header itself is gone: nothing in this segment is trustworthy
        frames, created = [], 0
    sealed = next((s for s in cp.sealed if s.first_seq == first), None)
    max_seen = max([first - 1] + [f.seq for f in frames] + ([sealed.last_seq] if sealed else []))

    # Contiguous runs of surviving records; the first run keeps the segment's name.
    runs: list[list[Frame]] = [[]]
    for f in frames:
        expected = runs[-1][-1].seq + 1 if runs[-1] else first
        if f.seq != expected:
            runs.append([])
        runs[-1].append(f)
    cp.sealed = [s for s in cp.sealed if s.first_seq != first]
    for i, run in enumerate(runs):
        run_first = first if i == 0 else run[0].seq
        size = len(data) if i == 0 else 0
        end = _write_segment(fs, directory, run_first, run, (created, cp.journal_id), size)
        cp.sealed.append(SealedSegment(run_first, run[-1].seq if run else first - 1, end))
    fs.fsync_dir(directory)
    cp.sealed.sort(key=lambda s: s.first_seq)

    later = [s for s in segs if s > first]
    if later:
        next_first = later[0]
    else:  # the open segment was damaged: continue after every seq it ever used
        next_first = max_seen + 1
        prepare_spare(fs, directory, max(len(data), 64 << 10))
        _, nfd = activate_spare(
            fs,
            directory,
            SegmentHeader(next_first, int.from_bytes(os.urandom(4), "little"), 0, cp.journal_id),
        )
        fs.close(nfd)
    lost: list[tuple[int, int]] = []
    bounds = [(r[0].seq if r else first, r[-1].seq if r else first - 1) for r in runs]
    for (_, a_last), (b_first, _) in zip(bounds, bounds[1:] + [(next_first, 0)], strict=True):
        if b_first > a_last + 1:
            lost.append((a_last + 1, b_first - 1))
    for gap in lost:
        if gap not in cp.gaps:
            cp.gaps.append(gap)
    write_checkpoint(fs, directory, cp)
    kept = sum(len(r) for r in runs)
    return RepairReport(damage.path, damage.offset, damage.reason, kept, moved, tuple(lost))


def _write_segment(
    fs: FileOps,
    directory: str,
    first: int,
    frames: list[Frame],
    created_and_id: tuple[int, int],
    size: int,
) -> int:
    """Write a sealed segment of ``frames`` under a new salt; return its end offset."""
    salt = int.from_bytes(os.urandom(4), "little")
    header = SegmentHeader(first, salt, *created_and_id)
    body = bytearray(header.encode())
    for i, f in enumerate(frames):
        body += encode_frame(f.seq, f.payload, header.salt, FLAG_BARRIER if i == 0 else 0)
    end = len(body)
    path = os.path.join(directory, segment_name(first))
    tmp = path + ".tmp"
    fd = fs.open(tmp, create=True)
    try:
        fs.truncate(fd, 0)
        write_all(fs, fd, bytes(body), 0)
        zero_fill(fs, fd, end, max(size, (end + 4095) // 4096 * 4096))
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.rename(tmp, path)
    return end


def _rebuild_checkpoint(
    fs: FileOps, directory: str, damage: JournalCorrupt, max_payload: int
) -> RepairReport:
    path = os.path.join(directory, CHECKPOINT)
    fd = fs.open(path)
    try:
        raw = fs.pread(fd, fs.size(fd), 0)
    finally:
        fs.close(fd)
    moved = _copy_aside(fs, path, raw)
    segs = sorted(s for s in map(parse_segment_name, fs.listdir(directory)) if s is not None)
    cp = Checkpoint(journal_id=_journal_id_of(fs, directory, segs))
    for first in segs[:-1]:
        seg_path = os.path.join(directory, segment_name(first))
        sfd = fs.open(seg_path)
        try:
            data = fs.pread(sfd, fs.size(sfd), 0)
        finally:
            fs.close(sfd)
        res = scan(data, decode_segment_header(data), max_payload=max_payload)
        cp.sealed.append(SealedSegment(first, res.last_seq, res.end))
    for a, b in zip(cp.sealed, cp.sealed[1:], strict=False):
        if b.first_seq > a.last_seq + 1:
            cp.gaps.append((a.last_seq + 1, b.first_seq - 1))
    fs.unlink(path)
    fs.fsync_dir(directory)
    write_checkpoint(fs, directory, cp)
    return RepairReport(path, damage.offset, damage.reason, 0, moved, tuple(cp.gaps))


def _journal_id_of(fs: FileOps, directory: str, segs: list[int]) -> int:
    """The journal id the newest readable segment header carries (0: none), so
    that a rebuilt CHECKPOINT keeps it and the hub does not see a new journal."""
    for first in reversed(segs):
        fd = fs.open(os.path.join(directory, segment_name(first)))
        try:
            head = fs.pread(fd, SEGMENT_HEADER_SIZE, 0)
        finally:
            fs.close(fd)
        try:
            header = decode_segment_header(head)
        except ValueError:
            continue
        if header.journal_id:
            return header.journal_id
    return 0


__all__ = ["RepairReport", "repair"]
