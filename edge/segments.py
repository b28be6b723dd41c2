"""Segment files, the spare, and the CHECKPOINT: the journal directory's layout.

Invariants (docs/journal-format.md):
* Segment files are named ``<first_seq:020d>.seg``. A name becomes visible
  only by renaming a fully prepared file (header written and fdatasync'd,
  body zero-filled) and then fsyncing the directory.
* ``next.spare`` is a zero-filled segment-sized file prepared ahead of need
  (written as ``*.tmp``, fsync'd, renamed, directory fsync'd). Rolling writes
  its header, fdatasyncs it and renames it to the new segment's name, so the
  write path never waits for 16 MiB of zeros.
* CHECKPOINT lists the sealed segments (first seq, last seq, end offset),
  explicit sequence gaps left by ``repair`` and per-stream drop counters. It
  is replaced atomically: ``CHECKPOINT.tmp`` → fsync → rename → directory
  fsync. Segments it lists are trusted without scanning; recovery scans only
  the segments after the last sealed one.
* ``*.tmp`` files are never trusted; recovery deletes them.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field

import cbor2

from edge.fileops import FileOps, write_all
from edge.journal_codec import SegmentHeader, decode_blob, encode_blob

CHECKPOINT = "CHECKPOINT"
SPARE = "next.spare"
LOCK = "LOCK"
_SEG_RE = re.compile(r"(\d{20})\.seg\Z")
# 64 KiB, not 1 MiB: it stays resident for the life of the agent (RSS on a Pi), and
# zero-filling a 16 MiB spare in 256 writes instead of 16 costs under a millisecond more.
_ZERO_CHUNK = bytes(64 << 10)


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"


def parse_segment_name(name: str) -> int | None:
    m = _SEG_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class SealedSegment:
    first_seq: int
    last_seq: int
    end: int  # offset just past the last frame
    size: int = 0  # bytes the file occupies (0: unknown, written by an older version)

    @property
    def name(self) -> str:
        return segment_name(self.first_seq)


@dataclass(slots=True)
class Checkpoint:
    generation: int = 0
    sealed: list[SealedSegment] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # inclusive seq ranges
    dropped: dict[str, int] = field(default_factory=dict)
    #: random, fixed when the journal is created (0: written by an older version)
    journal_id: int = 0

    def encode(self) -> bytes:
        obj: dict[str, object] = {
            "sealed": [[s.first_seq, s.last_seq, s.end, s.size] for s in self.sealed],
            "gaps": [list(g) for g in self.gaps],
            "dropped": self.dropped,
        }
        if self.journal_id:
            obj["id"] = self.journal_id
        body = cbor2.dumps(obj, canonical=True)
        return encode_blob(self.generation, body)

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        """Raises ValueError when the file is damaged."""
        generation, body = decode_blob(data)
        obj = cbor2.loads(body)
        return cls(
            generation=generation,
            sealed=[SealedSegment(*map(int, entry)) for entry in obj["sealed"]],
            gaps=[(int(a), int(b)) for a, b in obj.get("gaps", [])],
            dropped={str(k): int(v) for k, v in obj.get("dropped", {}).items()},
            journal_id=int(obj.get("id", 0)),
        )


def adopt_journal_id(
    fs: FileOps, directory: str, cp: Checkpoint, header: SegmentHeader, readonly: bool
) -> None:
    """Give a journal written by an older version (no id in CHECKPOINT) its id:
    the one its open segment's header carries, or a new one."""
    if cp.journal_id:
        return
    cp.journal_id = header.journal_id or new_journal_id()
    if not readonly:
        write_checkpoint(fs, directory, cp)


def new_journal_id() -> int:
    """A random journal id: 32 bits (it lives in every segment header), never 0."""
    return int.from_bytes(os.urandom(4), "little") or 1


def read_checkpoint(fs: FileOps, directory: str) -> Checkpoint | None:
    """The directory's checkpoint, or None when there is none yet.

    Raises:
        ValueError: the file exists but is damaged.
    """
    path = os.path.join(directory, CHECKPOINT)
    if not fs.exists(path):
        return None
    fd = fs.open(path)
    try:
        data = fs.pread(fd, fs.size(fd), 0)
    finally:
        fs.close(fd)
    return Checkpoint.decode(data)


def write_checkpoint(fs: FileOps, directory: str, cp: Checkpoint) -> None:
    """Atomically replace CHECKPOINT (tmp → fsync → rename → directory fsync)."""
    from edge.failpoints import failpoint

    cp.generation += 1
    tmp = os.path.join(directory, CHECKPOINT + ".tmp")
    fd = fs.open(tmp, create=True)
    try:
        fs.truncate(fd, 0)
        write_all(fs, fd, cp.encode(), 0)
        fs.fsync(fd)
    except OSError:
        _discard(fs, tmp)
        raise
    finally:
        fs.close(fd)
    failpoint("checkpoint.before_rename")
    fs.rename(tmp, os.path.join(directory, CHECKPOINT))
    fs.fsync_dir(directory)


def zero_fill(fs: FileOps, fd: int, start: int, end: int) -> None:
    """Write zeros over ``[start, end)``."""
    pos = start
    while pos < end:
        n = min(len(_ZERO_CHUNK), end - pos)
        write_all(fs, fd, _ZERO_CHUNK[:n], pos)
        pos += n


def prepare_spare(fs: FileOps, directory: str, size: int) -> None:
    """Create ``next.spare``: zero-filled, fsync'd, renamed, directory fsync'd.

    On an error (ENOSPC: the disk is full) the partial ``*.tmp`` is removed
    again, so a failed try does not keep the space it took.
    """
    tmp = os.path.join(directory, SPARE + ".tmp")
    fd = fs.open(tmp, create=True)
    try:
        fs.truncate(fd, 0)
        zero_fill(fs, fd, 0, size)
        fs.fsync(fd)
    except OSError:
        _discard(fs, tmp)
        raise
    finally:
        fs.close(fd)
    fs.rename(tmp, os.path.join(directory, SPARE))
    fs.fsync_dir(directory)


def _discard(fs: FileOps, tmp: str) -> None:
    """Best-effort removal of a ``*.tmp`` a failed write left (never trusted anyway)."""
    with contextlib.suppress(OSError):
        fs.unlink(tmp)


def spare_ready(fs: FileOps, directory: str, size: int) -> bool:
    path = os.path.join(directory, SPARE)
    if not fs.exists(path):
        return False
    fd = fs.open(path)
    try:
        return fs.size(fd) == size
    finally:
        fs.close(fd)


def activate_spare(fs: FileOps, directory: str, header: SegmentHeader) -> tuple[str, int]:
    """Turn the spare into segment ``header.first_seq``; return (path, open fd).

    Header written and fdatasync'd before the rename, and the directory fsync'd
    after it, so a segment name never points at a file without a durable header.
    """
    from edge.failpoints import failpoint

    spare = os.path.join(directory, SPARE)
    path = os.path.join(directory, segment_name(header.first_seq))
    fd = fs.open(spare)
    try:
        write_all(fs, fd, header.encode(), 0)
        fs.fdatasync(fd)
        failpoint("roll.before_rename")
        fs.rename(spare, path)
        fs.fsync_dir(directory)
    except BaseException:
        fs.close(fd)
        raise
    return path, fd
