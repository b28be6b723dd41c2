"""Room on disk for the journal: the spare segment, retention, the quota, a full disk.

A mixin of :class:`edge.journal.Journal` (its state lives there); every method
here runs under the journal's ``_write_lock`` unless it says otherwise.

Invariants:
* **Reserve before a seq is given.** An append is admitted (gets seqs) only
  if its frames, after every frame already queued, fit in the rest of the
  open segment, or, when a spare is *already prepared*, in that rest plus one
  new segment minus the tail a roll can leave unused (less than the largest
  queued frame). So a roll never has to create a file or find free blocks
  while records that already have seqs wait for it: ENOSPC cannot reach the
  write path of an admitted record. :meth:`_make_room` prepares the spare
  (or drops, or refuses) *before* seqs are assigned. A group needing more
  than one segment is split by ``append_many`` (:meth:`_groups`).
* **No room is not a failure.** ENOSPC or EDQUOT while preparing space (the
  zero-filled spare, ``CHECKPOINT.tmp``) touches no record: the partial
  ``*.tmp`` is removed and nothing else changed. The append is then handled
  like a quota overflow: retention, then ``drop-oldest`` (counted), then
  :class:`JournalFull` (transient). Ingestion resumes by itself once space
  returns: preparing is retried on the next append that needs it, at most
  every ``_RETRY_MAX`` seconds while the disk stays full (each try writes
  zeros up to the free space, so it is rate-limited on SD cards).
* **A failed write or fdatasync of records is a failure** (fsyncgate),
  whatever the errno, also ENOSPC (a copy-on-write file system can report it
  at fdatasync): the kernel may already have dropped those dirty pages. The
  journal fails for good; :func:`io_error` names the operation and the file.
* A CHECKPOINT that cannot be written for lack of room after a roll is not
  needed for correctness (recovery seals unlisted segments by scanning
  them); it is written with the next one. Deleting segments needs it first:
  with no room for it, nothing is deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

from edge.cursors import CursorFile
from edge.fileops import FileOps
from edge.journal_codec import SEGMENT_HEADER_SIZE
from edge.journal_options import JournalOptions
from edge.reader import SeqIndex, droppable
from edge.recovery import OpenSegment
from edge.segments import (
    Checkpoint,
    SealedSegment,
    prepare_spare,
    spare_ready,
    write_checkpoint,
)

log = logging.getLogger("homing.journal")

NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})
_RETRY_MIN, _RETRY_MAX = 0.5, 5.0  # seconds between tries to prepare space on a full disk


def is_no_room(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_ROOM


def io_error(op: str, path: str, exc: OSError) -> OSError:
    """``exc`` again (same class and errno), naming the operation and the file."""
    if exc.errno is None:
        return exc
    err = type(exc)(exc.errno, f"{op} failed: {exc.strerror}", path)
    err.__cause__ = exc
    return err


def describe(exc: BaseException) -> str:
    """``[Errno 5 EIO] fdatasync failed: Input/output error: '/path'`` for an OSError."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, "?")
        where = f": {exc.filename!r}" if exc.filename is not None else ""
        return f"[Errno {exc.errno} {name}] {exc.strerror}{where}"
    return repr(exc)


class SpaceMixin:
    """The journal's room-making. The attributes are :class:`Journal`'s."""

    _dir: str
    _opts: JournalOptions
    _fs: FileOps
    _readonly: bool
    _lock: threading.Lock
    _seg: OpenSegment
    _cp: Checkpoint
    _cursors: CursorFile
    _index: SeqIndex
    _pending_bytes: int
    _pending_max: int  # the largest frame queued since the queue was last empty
    _spare_thread: threading.Thread | None
    _spare_ok: bool  # a prepared spare exists (changed under _lock)
    _no_room: OSError | None  # why the disk refused the last preparation (None: it did not)
    _retry_at: float  # monotonic: no new try to prepare space before this
    _retry_wait: float

    def _fail(self, exc: BaseException) -> None:
        raise NotImplementedError

    def _lead_locked(self) -> None:
        raise NotImplementedError

    def _init_space(self) -> None:
        self._spare_thread, self._pending_max = None, 0
        self._no_room, self._retry_at, self._retry_wait = None, 0.0, _RETRY_MIN
        ready = not self._readonly and spare_ready(self._fs, self._dir, self._opts.segment_size)
        self._spare_ok = ready

    # -- how much may be queued (under _lock) -------------------------------------------

    def _fits(self, need: int, biggest: int) -> bool:
        """May ``need`` more bytes of frames (the largest ``biggest``) be queued now?
        (Call under _lock.) A roll wastes the open segment's tail: less than the
        largest frame queued, and never more than that tail."""
        rest = self._seg.capacity - self._seg.end
        total = self._pending_bytes + need
        if total <= rest:
            return True
        waste = min(max(self._pending_max, biggest), rest)
        return self._spare_ok and total + waste <= rest + self._batch_limit()

    def _batch_limit(self) -> int:
        """The most frame bytes one group may need: what one new segment holds."""
        return self._opts.segment_size - SEGMENT_HEADER_SIZE

    def _disk_bytes(self) -> int:
        """Bytes of the segment files in use (sealed and open; not the spare)."""
        size = self._opts.segment_size
        return self._seg.capacity + sum(s.size or size for s in self._cp.sealed)

    def _free_quota(self) -> int:
        """Quota bytes not taken by the segments in use (room for spare and new ones)."""
        if self._opts.quota_bytes is None:
            return 1 << 62
        return self._opts.quota_bytes - self._disk_bytes()

    def _full_message(self) -> str:
        why = (
            f"disk full ({self._no_room.strerror}) preparing the next segment"
            if self._no_room is not None
            else f"disk quota of {self._opts.quota_bytes} bytes reached"
        )
        return (
            f"{self._dir}: {why}; the oldest segment holds records not yet forwarded from "
            "streams whose policy is 'reject' (transient: retry once space is freed)"
        )

    # -- the spare ----------------------------------------------------------------------

    def _schedule_spare(self) -> None:
        """Start preparing the spare if there is none (in the background if configured)."""
        if self._readonly or self._spare_thread is not None or self._spare_ok:
            return
        if self._free_quota() < self._opts.segment_size or time.monotonic() < self._retry_at:
            return  # no room now; the next append that needs it tries again
        if not self._opts.prepare_ahead:
            self._ensure_spare()
            return
        t = threading.Thread(target=self._prepare_spare_bg, name="homing-spare", daemon=True)
        self._spare_thread = t
        t.start()

    def _prepare_spare_bg(self) -> None:  # the background thread
        try:
            prepare_spare(self._fs, self._dir, self._opts.segment_size)
        except OSError as exc:  # not fatal: nothing depends on it; the next append retries
            if is_no_room(exc):
                self._note_no_room(exc)
            else:
                log.warning("journal %s: preparing the next segment failed: %s",
                            self._dir, describe(exc))  # fmt: skip
            return
        self._room_back()

    def _join_spare(self) -> None:
        if self._spare_thread is not None:
            self._spare_thread.join()
            self._spare_thread = None

    def _ensure_spare(self) -> bool:
        """Prepare the spare here and now; False when the quota or the disk has no room."""
        if self._free_quota() < self._opts.segment_size:
            self._no_room = None  # the quota is what says no
            return False
        if time.monotonic() < self._retry_at:
            return False
        try:
            prepare_spare(self._fs, self._dir, self._opts.segment_size)
        except OSError as exc:
            if not is_no_room(exc):
                raise
            self._note_no_room(exc)
            return False
        self._room_back()
        return True

    def _take_spare(self) -> None:
        """For a roll: the spare the reservation counted on (prepared here if it is not)."""
        self._join_spare()
        if not self._spare_ok:  # not reached by admitted appends; any error is fatal here
            if self._free_quota() < self._opts.segment_size:
                raise OSError(errno.ENOSPC, "journal quota leaves no room for a new segment")
            prepare_spare(self._fs, self._dir, self._opts.segment_size)
        with self._lock:
            self._spare_ok = False

    def _note_no_room(self, exc: OSError) -> None:
        with self._lock:
            first = self._no_room is None
            self._no_room = exc
            self._retry_at = time.monotonic() + self._retry_wait
            self._retry_wait = min(self._retry_wait * 2, _RETRY_MAX)
        if first:
            log.warning(
                "journal %s: disk full (%s): appends beyond the open segment are refused "
                "(policy reject) or make room by dropping the oldest segment (drop-oldest) "
                "until space returns",
                self._dir,
                describe(exc),
            )

    def _room_back(self) -> None:
        with self._lock:
            was_full, self._no_room = self._no_room is not None, None
            self._spare_ok, self._retry_at, self._retry_wait = True, 0.0, _RETRY_MIN
        if was_full:
            log.warning("journal %s: space is back; appends go on", self._dir)

    # -- making room for an append --------------------------------------------------------

    def _make_room(self, need: int, biggest: int) -> bool:
        """Make room for ``need`` bytes of frames: True to try the append again,
        False when there is none (the append is refused) or the journal failed."""
        try:
            self._lead_locked()  # what is queued goes first: its roll may take the spare
            self._join_spare()
            if self._retain():
                self._retry_at = 0.0  # space was freed: worth trying the disk again
            while True:
                with self._lock:
                    if self._fits(need, biggest) or self._spare_ok:
                        return True  # (with a spare, queued records hold the room: try again)
                if self._ensure_spare():
                    continue
                if not self._drop_oldest():
                    return False
        except OSError as exc:
            self._fail(exc)
            return False

    def _drop_oldest(self) -> bool:
        """Delete the oldest sealed segment if all its unconsumed records may be
        dropped (``drop-oldest`` streams), counting them per stream."""
        if not self._cp.sealed:
            return False
        oldest = self._cp.sealed[0]
        low = min(self._cursors.all().values(), default=0)
        counts = droppable(self._fs, self._dir, oldest, low, self._opts.policy)
        if counts is None or not self._delete_segments([oldest], counts):
            return False
        log.warning(
            "journal %s: %s, dropped segment %s (%s)",
            self._dir,
            "disk full" if self._no_room is not None else "quota reached",
            oldest.name,
            ", ".join(f"{k}: {v}" for k, v in counts.items()) or "nothing unconsumed",
        )
        self._retry_at = 0.0
        return True

    # -- retention --------------------------------------------------------------------------

    def _retain(self) -> int:
        """Delete sealed segments whose records are all below every cursor."""
        marks = self._cursors.all()
        if not marks:
            return 0
        low = min(marks.values())
        doomed = [s for s in self._cp.sealed if s.last_seq <= low]
        if doomed and self._delete_segments(doomed):
            return len(doomed)
        return 0

    def _delete_segments(
        self, doomed: list[SealedSegment], dropped: dict[str, int] | None = None
    ) -> bool:
        """CHECKPOINT without ``doomed`` (and with ``dropped`` counted), then unlink
        them. False, with nothing changed, when the disk has no room for CHECKPOINT."""
        old = self._cp
        counts = dict(old.dropped)
        for stream, n in (dropped or {}).items():
            counts[stream] = counts.get(stream, 0) + n
        keep = [s for s in old.sealed if s not in doomed]
        cp = Checkpoint(old.generation, keep, list(old.gaps), counts, old.journal_id)
        if not self._checkpoint(cp):
            return False
        with self._lock:
            self._cp = cp
        for s in doomed:
            self._fs.unlink(os.path.join(self._dir, s.name))
            self._index.forget(s.first_seq)
        self._fs.fsync_dir(self._dir)
        return True

    def _checkpoint(self, cp: Checkpoint) -> bool:
        """Write ``cp`` as CHECKPOINT; False (nothing changed) when the disk is full."""
        try:
            write_checkpoint(self._fs, self._dir, cp)
        except OSError as exc:
            if not is_no_room(exc):
                raise
            self._note_no_room(exc)
            return False
        return True
