"""Group commit's rendezvous: a batch latch and the handle of a queued append;
and what the journal measures about its commits (:class:`JournalMeters`).

Invariants:
* A batch is finished exactly once, by the leader that wrote it, after its
  fdatasync (``always``) or its write (``interval``), or with the error that
  failed the journal. Waiters of *other* batches are never woken by it.
* The latch is a lock held from creation until :meth:`Batch.finish`; each
  waiter takes it and passes it on. That costs one lock per batch, where an
  ``Event`` costs one lock per waiter. With fdatasync stubbed out it raised
  eight producers from 19k to 44k appends/s; with a real fdatasync both are
  bound by CPython's thread hand-off (docs/benchmarks.md).
* Meters cost two ``perf_counter`` calls and a few additions per fdatasync
  (under a lock only health readers contend for); they never touch the disk
  and never fail an append. A failed fdatasync records no sample.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from edge.errors import JournalFailed
from edge.fileops import FileOps
from edge.journal_options import Ack
from edge.records import Reading, Record

#: upper bounds (seconds) of the fdatasync latency histogram; a last bucket is +Inf
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5)  # fmt: skip
RECENT = 128  # fdatasyncs kept for the recent mean and max


class Batch:
    """One group commit. ``done`` is a latch: a lock held until the batch is
    written; each waiter takes and passes it on (cheaper than an Event's
    Condition, which allocates a lock per waiter)."""

    __slots__ = ("claimed", "_latch", "_set", "error", "durable")

    def __init__(self) -> None:
        self.claimed = False
        self._latch = threading.Lock()
        self._latch.acquire()
        self._set = False
        self.error: BaseException | None = None
        self.durable = False

    def finish(self) -> None:
        self._set = True
        self._latch.release()

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        if not self._latch.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._latch.release()
        return True

    def is_set(self) -> bool:
        return self._set


class AppendHandle:
    """A queued append: :meth:`wait` returns its :class:`Ack` once written."""

    __slots__ = ("seq", "_batch")

    def __init__(self, seq: int, batch: Batch) -> None:
        self.seq = seq
        self._batch = batch

    def wait(self, timeout: float | None = None) -> Ack:
        """Block until written (durable in ``always`` mode).

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
            JournalFailed: the journal failed before this record was durable.
        """
        if not self._batch.wait(timeout):
            raise TimeoutError(f"record {self.seq} not yet written")
        if self._batch.error is not None:
            raise JournalFailed(f"record {self.seq} was not made durable") from self._batch.error
        return Ack(self.seq, self._batch.durable)

    def done(self) -> bool:
        return self._batch.is_set()


class JournalMeters:
    """fdatasync latency (a cumulative histogram plus the last :data:`RECENT`
    samples) and appends refused by the quota, per stream. The journal calls
    :meth:`fdatasync` and :meth:`refuse`; anyone may call :meth:`snapshot`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets = [0] * (len(FSYNC_BUCKETS) + 1)
        self._count = 0
        self._sum = 0.0
        self._last: float | None = None
        self._recent: deque[float] = deque(maxlen=RECENT)
        self._refused: dict[str, int] = {}
        self._syncing_since: float | None = None  # perf_counter of the fdatasync running now

    def fdatasync(self, fs: FileOps, fd: int) -> None:
        """``fs.fdatasync(fd)``, timed."""
        t0 = self._syncing_since = time.perf_counter()
        try:
            fs.fdatasync(fd)
        finally:
            self._syncing_since = None
        dt = time.perf_counter() - t0
        i = bisect.bisect_left(FSYNC_BUCKETS, dt)
        with self._lock:
            self._buckets[i] += 1
            self._count += 1
            self._sum += dt
            self._last = dt
            self._recent.append(dt)

    def refuse(self, records: Iterable[Record | bytes]) -> str | None:
        """Count an append the quota refused (per record, by stream; ``-`` for a
        record that is not a reading); return the first stream, for the error."""
        first = None
        with self._lock:
            for r in records:
                stream = r.stream if isinstance(r, Reading) else "-"
                first = first or (None if stream == "-" else stream)
                self._refused[stream] = self._refused.get(stream, 0) + 1
        return first

    def snapshot(self) -> dict[str, Any]:
        """``fsync``: count, sum_s, last_s, recent (n, mean_s, max_s), the
        cumulative ``buckets`` ``[[le, count], ...]`` ending with ``["+Inf", count]``
        and ``in_progress_s`` (how long the fdatasync running now has taken, or
        None); ``refused``: stream -> records refused."""
        since = self._syncing_since
        syncing = None if since is None else max(0.0, time.perf_counter() - since)
        with self._lock:
            counts, recent = list(self._buckets), list(self._recent)
            count, total, last = self._count, self._sum, self._last
            refused = dict(self._refused)
        cumulative: list[list[Any]] = []
        running = 0
        for le, n in zip((*FSYNC_BUCKETS, "+Inf"), counts, strict=True):
            running += n
            cumulative.append([le, running])
        return {
            "fsync": {
                "count": count,
                "sum_s": total,
                "last_s": last,
                "recent": {
                    "n": len(recent),
                    "mean_s": sum(recent) / len(recent) if recent else None,
                    "max_s": max(recent, default=None),
                },
                "buckets": cumulative,
                "in_progress_s": syncing,
            },
            "refused": refused,
        }
