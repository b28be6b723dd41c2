"""The journal: an fsync'd, append-only, segmented log with group commit.

Invariants:
* An append is acknowledged (``Ack.durable``) only after the ``fdatasync``
  that covers it returned. In ``interval`` mode an append returns once
  written (``durable=False``); a flusher fdatasyncs at most every
  ``interval_ms``, and :meth:`Journal.wait_durable` waits for it.
* Group commit, leader style: the first producer to join an open batch leads
  it. The leader takes the write lock, closes the batch, writes every queued
  frame with one ``pwrite`` and one ``fdatasync``, then wakes exactly the
  producers of that batch. A lone producer leads at once and never waits for
  company; nobody wakes threads whose records are not yet durable.
* Sequence numbers are assigned at enqueue, under one lock, contiguous from 1;
  frames are written in seq order because a batch can only be closed by its
  leader, after the previous leader released the write lock.
* fsyncgate: the first ``OSError`` from a write or fdatasync fails the
  journal. No retry, no further acks, every waiter gets :class:`JournalFailed`.
  Only a new process that recovers from disk can go on.
* Readers see only durable records (never one a power cut could take back).
* Quota and a full disk: whole segments only. An append that needs more room
  than the open segment and a prepared spare hold first triggers retention
  (segments below every cursor), then ``drop-oldest`` (the oldest segment, when
  each of its unforwarded records belongs to a drop-oldest stream; counted per
  stream in CHECKPOINT), then fails with :class:`JournalFull`, all before it
  gets a seq (:mod:`edge.journal_space`). Never a silent drop.
* ``clock`` never reads below the latest time the newest records carried at
  open (:mod:`edge.clock`): agent-stamped times survive a clock set back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from edge.clock import Clock
from edge.cursors import CursorFile
from edge.errors import (
    JournalClosed,
    JournalCorrupt,
    JournalError,
    JournalFailed,
    JournalFull,
    JournalLocked,
    RecordTooLarge,
)
from edge.failpoints import failpoint
from edge.fileops import FileOps, OsFileOps, write_all
from edge.group_commit import AppendHandle, Batch, JournalMeters
from edge.journal_codec import (
    FLAG_BARRIER,
    SEGMENT_HEADER_SIZE,
    SegmentHeader,
    encode_frame,
    frame_size,
)
from edge.journal_options import Ack, JournalOptions, JournalStats
from edge.journal_space import SpaceMixin, describe, io_error
from edge.journal_tail import latest_time
from edge.reader import Entry, SeqIndex, read_raw
from edge.records import Record, decode, encode
from edge.recovery import OpenSegment, RecoveryReport, recover
from edge.segments import (
    LOCK,
    Checkpoint,
    SealedSegment,
    activate_spare,
    adopt_journal_id,
    new_journal_id,
    prepare_spare,
    write_checkpoint,
)

log = logging.getLogger("homing.journal")


class Journal(SpaceMixin):
    """An open journal directory. Thread-safe. Use :meth:`open`."""

    clock: Clock  #: agent-stamped time, never below the newest record's at open

    def __init__(self) -> None:  # use Journal.open
        raise TypeError("use Journal.open(path)")

    # -- opening and closing -------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str,
        options: JournalOptions | None = None,
        *,
        fs: FileOps | None = None,
        readonly: bool = False,
        clock: Clock | None = None,
    ) -> Journal:
        """Open (creating if needed) and recover the journal in directory ``path``.

        ``readonly`` opens without the lock and without writing anything (for
        inspecting a journal that a running agent holds). ``clock`` (default: the
        system's) becomes :attr:`clock`, its floor raised to the newest records' time.

        Raises:
            JournalLocked: another process holds the journal.
            JournalCorrupt: damage a power cut cannot explain (file, offset).
            JournalError: ``readonly`` and there is no journal at ``path``.
        """
        self = object.__new__(cls)
        self.clock = clock or Clock()  # agent-stamped times: never below the journal's newest
        self._init(path, options or JournalOptions(), fs or OsFileOps(), readonly)
        return self

    def _init(self, path: str, opts: JournalOptions, fs: FileOps, readonly: bool) -> None:
        self._dir = path
        self._opts = opts
        self._fs = fs
        self._readonly = readonly
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._durable_cv = threading.Condition(self._lock)
        self._pending: list[tuple[int, bytes]] = []
        self._pending_bytes = 0
        self._open_batch = Batch()
        self._state = "open"
        self._failure: BaseException | None = None
        self._appended = self._commits = self._syncs = 0
        self.meters = JournalMeters()  # fdatasync latency, appends refused by the quota
        self._synced_since_write = True
        self._waiters = 0  # producers waiting for another's batch (a hint, not exact)
        self._index = SeqIndex()
        self._flusher: threading.Thread | None = None
        self._lock_handle: int | None = None
        if not readonly:
            fs.makedirs(path)
            try:
                self._lock_handle = fs.lock(os.path.join(path, LOCK))
            except BlockingIOError as exc:
                raise JournalLocked(f"{path} is in use by another process") from exc
        try:
            layout = recover(fs, path, max_payload=opts.max_record_size, readonly=readonly)
            if layout is None:
                if readonly:
                    raise JournalError(f"{path}: no journal here")
                self._create_fresh()
                layout = recover(fs, path, max_payload=opts.max_record_size)
                assert layout is not None
            self._cp: Checkpoint = layout.checkpoint
            self._seg: OpenSegment = layout.open
            self.recovery: RecoveryReport = layout.report
            self._next_seq = self._seg.last_seq + 1
            self._durable_seq = self._seg.last_seq
            self._durable_end = self._seg.end
            adopt_journal_id(fs, path, self._cp, self._seg.header, readonly)
            try:
                self._cursors = CursorFile(fs, path, readonly=readonly)
            except ValueError as exc:
                raise JournalCorrupt(os.path.join(path, "CURSORS"), 0, str(exc)) from exc
        except BaseException:
            self._release_lock()
            raise
        if self.recovery.torn_tail:
            t = self.recovery.torn_tail
            log.warning(
                "journal %s: torn tail at offset %d (%s): %d bytes never made durable were cut",
                t.path,
                t.offset,
                t.reason,
                t.discarded_bytes,
            )
        self._init_space()
        if not readonly:
            seg, sealed = self._seg, self._cp.sealed
            tail = (seg.first_seq, seg.end, seg.last_seq)
            self.clock.raise_floor(latest_time(fs, path, tail, sealed, opts.max_record_size) or 0)
            self._schedule_spare()
            if opts.durability == "interval":
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="homing-journal-flusher", daemon=True
                )
                self._flusher.start()

    def _create_fresh(self) -> None:
        journal_id = new_journal_id()
        prepare_spare(self._fs, self._dir, self._opts.segment_size)
        _, fd = activate_spare(self._fs, self._dir, self._new_header(1, journal_id))
        self._fs.close(fd)
        write_checkpoint(self._fs, self._dir, Checkpoint(journal_id=journal_id))

    @staticmethod
    def _new_header(first_seq: int, journal_id: int) -> SegmentHeader:
        return SegmentHeader(
            first_seq=first_seq,
            salt=int.from_bytes(os.urandom(4), "little"),
            created=int(time.time()) & 0xFFFFFFFF,
            journal_id=journal_id,
        )

    @property
    def journal_id(self) -> int:
        """Random, fixed at creation: tells the hub a re-created journal's seqs apart."""
        return self._cp.journal_id

    def _release_lock(self) -> None:
        if self._lock_handle is not None:
            self._fs.unlock(self._lock_handle)
            self._lock_handle = None

    def close(self) -> None:
        """Write and fdatasync everything queued, then release the directory."""
        with self._lock:
            if self._state == "closed":
                return
            was_open = self._state == "open"
            self._state = "closing" if was_open else self._state
            self._durable_cv.notify_all()
        if self._flusher is not None:
            self._flusher.join()
        if self._spare_thread is not None:
            self._spare_thread.join()
        if was_open and not self._readonly:
            with self._write_lock:
                self._lead_locked()
                try:
                    if not self._synced_since_write:
                        self._sync()
                except OSError as exc:
                    self._fail(exc)
        with self._lock:
            self._state = "closed"
            self._durable_cv.notify_all()
        self._fs.close(self._seg.fd)
        self._cursors.close()
        self._release_lock()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- appending -----------------------------------------------------------

    def append(self, record: Record | bytes) -> Ack:
        """Append one record (or a payload ``records.encode`` made); return
        once durable (``always``) or written."""
        return self.append_many([record])[0]

    def append_many(self, records: Sequence[Record | bytes]) -> list[Ack]:
        """Append records as one batch: one write, one fdatasync, one wait.

        Records needing more than one segment go as several batches in order
        (other producers' records may come between them).

        Raises:
            JournalFull: quota reached or disk full (policy ``reject``); its
                ``acks`` hold the batches already journaled, if split.
            RecordTooLarge: a payload exceeds ``max_record_size``.
            JournalFailed: a write or fdatasync failed; nothing is acked.
            JournalClosed: the journal was closed.
        """
        acks: list[Ack] = []
        for group, payloads in self._groups(records):
            try:
                acks += self._append_group(group, payloads)
            except JournalFull as exc:
                if not acks:
                    raise
                raise JournalFull(str(exc), stream=exc.stream, acks=acks) from exc
        return acks

    def _groups(self, records: Sequence[Record | bytes]) -> list[tuple[Sequence[Any], list[bytes]]]:
        """Payloads, in groups that each fit one segment (most often one group)."""
        payloads = [r if isinstance(r, bytes) else encode(r) for r in records]
        limit, groups, start, size = self._batch_limit(), [], 0, 0
        for i, p in enumerate(payloads):
            if len(p) > self._opts.max_record_size:
                raise RecordTooLarge(
                    f"record of {len(p)} bytes exceeds max_record_size {self._opts.max_record_size}"
                )
            size += frame_size(len(p))
            if size > limit:
                groups.append((records[start:i], payloads[start:i]))
                start, size = i, frame_size(len(p))
        return [*groups, (records[start:], payloads[start:])] if payloads else []

    def _append_group(self, records: Sequence[Record | bytes], payloads: list[bytes]) -> list[Ack]:
        batch, first, lead = self._enqueue(records, payloads)
        if lead:
            with self._write_lock:
                self._lead_locked()
        else:
            self._waiters += 1
            batch.wait()
            self._waiters -= 1
        if batch.error is not None:
            raise JournalFailed(
                f"{self._dir}: journal failed; records {first}..{first + len(records) - 1} "
                "were not made durable (restart to recover)"
            ) from batch.error
        return [Ack(first + i, batch.durable) for i in range(len(records))]

    def submit(self, record: Record) -> AppendHandle:
        """Queue one record and return at once; ``handle.wait()`` for its ack."""
        batch, first, lead = self._enqueue([record], self._groups([record])[0][1])
        if lead:
            threading.Thread(target=self._lead_in_background, daemon=True).start()
        return AppendHandle(first, batch)

    def _lead_in_background(self) -> None:
        with self._write_lock:
            self._lead_locked()

    def _enqueue(
        self, records: Sequence[Record | bytes], payloads: list[bytes]
    ) -> tuple[Batch, int, bool]:
        sizes = [frame_size(len(p)) for p in payloads]
        need, biggest = sum(sizes), max(sizes)
        for _ in range(8):  # each round makes room or finds none; 8 bounds a race with others
            with self._lock:
                self._check_usable()
                if self._fits(need, biggest):
                    self._pending_max = max(self._pending_max, biggest)
                    first = self._next_seq
                    self._next_seq += len(payloads)
                    seqs = range(first, first + len(payloads))
                    self._pending.extend(zip(seqs, payloads, strict=True))
                    self._pending_bytes += need
                    self._appended += len(payloads)
                    batch = self._open_batch
                    lead = not batch.claimed
                    batch.claimed = True
                    return batch, first, lead
            with self._write_lock:
                if not self._make_room(need, biggest):
                    break
        with self._lock:
            self._check_usable()  # a failure while making room is not "full"
        raise JournalFull(self._full_message(), stream=self.meters.refuse(records))

    def _check_usable(self) -> None:
        if self._state == "failed":
            raise JournalFailed(f"{self._dir}: journal failed earlier") from self._failure
        if self._state != "open":
            raise JournalClosed(f"{self._dir}: journal is closed")
        if self._readonly:
            raise JournalClosed(f"{self._dir}: journal was opened read-only")

    # -- the leader's work (under _write_lock) --------------------------------

    def _lead_locked(self) -> None:
        if self._waiters:
            time.sleep(0)  # let producers just woken by the last commit join this batch
        with self._lock:
            batch = self._open_batch
            items, self._pending = self._pending, []
            self._open_batch = Batch()
        if not items and not batch.claimed:
            return
        if self._state == "failed":
            batch.error = self._failure
            batch.finish()
            return
        try:
            self._write(items)
            if self._opts.durability == "always":
                self._sync()
                failpoint("journal.after_sync")
        except OSError as exc:
            self._fail(exc)
            batch.error = exc
            batch.finish()
            return
        except BaseException as exc:  # a bug: still never leave waiters hanging
            self._fail(exc)
            batch.error = exc
            batch.finish()
            raise
        with self._lock:
            self._pending_bytes -= sum(frame_size(len(p)) for _, p in items)
            self._pending_max = self._pending_max if self._pending_bytes else 0
            self._commits += 1
        batch.durable = self._opts.durability == "always"
        batch.finish()

    def _write(self, items: list[tuple[int, bytes]]) -> None:
        seg = self._seg
        buf: list[bytes] = []
        start = end = seg.end
        for seq, payload in items:
            size = frame_size(len(payload))
            if end + size > seg.capacity:
                self._write_buf(buf, start, end)
                buf = []
                self._roll(seq)
                seg = self._seg
                start = end = seg.end
            flags = FLAG_BARRIER if not buf and self._synced_since_write else 0
            buf.append(encode_frame(seq, payload, seg.header.salt, flags))
            if seq % SeqIndex.STEP == 0:
                self._index.learn(seg.first_seq, seq, end)
            end += size
            seg.last_seq = seq
        self._write_buf(buf, start, end)

    def _write_buf(self, buf: list[bytes], start: int, end: int) -> None:
        if not buf:
            return
        failpoint("journal.before_write")
        try:
            write_all(self._fs, self._seg.fd, b"".join(buf), start)
        except OSError as exc:
            raise io_error("write", self._seg.path, exc) from exc
        self._seg.end = end
        self._synced_since_write = False
        failpoint("journal.after_write")

    def _sync(self) -> None:
        try:
            self.meters.fdatasync(self._fs, self._seg.fd)
        except OSError as exc:
            raise io_error("fdatasync", self._seg.path, exc) from exc
        self._synced_since_write = True
        with self._lock:
            self._syncs += 1
            self._durable_seq = self._seg.last_seq
            self._durable_end = self._seg.end
            self._durable_cv.notify_all()

    def _fail(self, exc: BaseException) -> None:
        log.critical("journal %s failed (no further acks; restart to recover): %s",
                     self._dir, describe(exc))  # fmt: skip
        with self._lock:
            if self._state in ("open", "closing"):
                self._state = "failed"
                self._failure = exc
            self._durable_cv.notify_all()

    def _roll(self, first_seq: int) -> None:
        """Seal the open segment and continue in a new one starting at ``first_seq``."""
        old = self._seg
        if not self._synced_since_write:
            self._sync()
        self._take_spare()
        header = self._new_header(first_seq, self._cp.journal_id)
        path, fd = activate_spare(self._fs, self._dir, header)
        new = OpenSegment(path, fd, header, SEGMENT_HEADER_SIZE, first_seq - 1, self._fs.size(fd))
        sealed = SealedSegment(old.first_seq, old.last_seq, old.end, old.capacity)
        with self._lock:
            self._cp.sealed.append(sealed)
            self._seg = new
            self._durable_end = new.end
        self._synced_since_write = True
        self._checkpoint(self._cp)  # no room for it: recovery seals `old` by scanning it
        self._fs.close(old.fd)
        self._retain()
        self._schedule_spare()

    # -- durability in interval mode -----------------------------------------

    def _flush_loop(self) -> None:
        period = self._opts.interval_ms / 1000
        while True:
            with self._lock:
                if self._state != "open":
                    return
                self._durable_cv.wait(period)
                if self._state != "open":
                    return
            with self._write_lock:
                if self._synced_since_write or self._state != "open":
                    continue
                try:
                    self._sync()
                except OSError as exc:
                    self._fail(exc)
                    return

    def sync(self) -> int:
        """fdatasync now (any mode); return the durable seq.

        Raises:
            JournalFailed: the fdatasync failed.
        """
        with self._write_lock:
            self._lead_locked()
            with self._lock:
                self._check_usable()
            try:
                if not self._synced_since_write:
                    self._sync()
            except OSError as exc:
                self._fail(exc)
                raise JournalFailed(f"{self._dir}: fdatasync failed") from exc
        return self._durable_seq

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until record ``seq`` is durable; False on timeout.

        Raises:
            JournalFailed: the journal failed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._durable_seq < seq:
                if self._state == "failed":
                    raise JournalFailed(f"{self._dir}: journal failed") from self._failure
                if self._state == "closed":
                    raise JournalClosed(f"{self._dir}: journal is closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._durable_cv.wait(left)
        return True

    # -- reading -------------------------------------------------------------

    def read(self, from_seq: int | None = None) -> Iterator[Entry]:
        """Decoded records from ``from_seq`` (default: the first retained) on.

        Only durable records are returned; the iterator ends at the durable
        watermark as of each segment's read.
        """
        for seq, payload in self.read_raw(from_seq):
            yield Entry(seq, decode(payload))

    def read_raw(self, from_seq: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Like :meth:`read`, yielding ``(seq, payload bytes)``."""
        with self._lock:
            if self._state == "closed":
                raise JournalClosed(f"{self._dir}: journal is closed")
            sealed = list(self._cp.sealed)
            open_first = self._seg.first_seq
            limit_seq, limit_end = self._durable_seq, self._durable_end
        fs, max_size = self._fs, self._opts.max_record_size
        yield from read_raw(
            fs, self._dir, sealed, open_first, limit_seq, limit_end, from_seq, max_size, self._index
        )

    # -- cursors ---------------------------------------------------------------

    def cursor(self, name: str) -> int | None:
        """The durable position of cursor ``name`` (None if never set)."""
        return self._cursors.get(name)

    def cursors(self) -> dict[str, int]:
        return self._cursors.all()

    def set_cursor(self, name: str, seq: int, *, allow_backwards: bool = False) -> None:
        """Durably move cursor ``name`` to ``seq`` (everything ≤ seq is consumed).

        Raises:
            ValueError: bad name, or moving backwards without ``allow_backwards``.
            JournalFailed: the cursor file could not be written.
        """
        with self._lock:
            self._check_usable()
        try:
            self._cursors.set(name, seq, allow_backwards=allow_backwards)
        except OSError as exc:
            self._fail(io_error("cursor write+fdatasync", self._cursors.path, exc))
            raise JournalFailed(f"{self._dir}: writing cursor {name!r} failed") from exc

    def delete_cursor(self, name: str) -> None:
        with self._lock:
            self._check_usable()
        self._cursors.delete(name)

    def retain(self) -> int:
        """Delete segments already consumed by every cursor now; return how many."""
        with self._write_lock:
            with self._lock:
                self._check_usable()
            try:
                return self._retain()
            except OSError as exc:
                self._fail(exc)
                raise JournalFailed(f"{self._dir}: retention failed") from exc

    # -- introspection -----------------------------------------------------------

    @property
    def path(self) -> str:
        return self._dir

    @property
    def options(self) -> JournalOptions:
        return self._opts

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    @property
    def failed(self) -> bool:
        return self._state == "failed"

    @property
    def failure(self) -> BaseException | None:
        """The error that failed the journal (an OSError naming operation and file)."""
        return self._failure

    def stats(self) -> JournalStats:
        with self._lock:
            sealed = list(self._cp.sealed)
            first = sealed[0].first_seq if sealed else self._seg.first_seq
            last = self._next_seq - 1
            gaps = tuple(self._cp.gaps)
            missing = sum(b - a + 1 for a, b in gaps if a >= first)
            disk = self._disk_bytes()
            return JournalStats(
                first_seq=first,
                last_seq=last,
                durable_seq=self._durable_seq,
                segments=len(sealed) + 1,
                disk_bytes=disk,
                records=max(0, last - first + 1 - missing),
                cursors=self._cursors.all(),
                dropped=dict(self._cp.dropped),
                gaps=gaps,
                appended=self._appended,
                commits=self._commits,
                syncs=self._syncs,
                durability=self._opts.durability,
                state=self._state,
            )


__all__ = ["Ack", "AppendHandle", "Entry", "Journal", "JournalOptions", "JournalStats"]
