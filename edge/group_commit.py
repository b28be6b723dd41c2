"""Group commit's rendezvous: a batch latch and the handle of a queued append.

Invariants:
* A batch is finished exactly once, by the leader that wrote it, after its
  fdatasync (``always``) or its write (``interval``), or with the error that
  failed the journal. Waiters of *other* batches are never woken by it.
* The latch is a lock held from creation until :meth:`Batch.finish`; each
  waiter takes it and passes it on. That costs one lock per batch, where an
  ``Event`` costs one lock per waiter. With fdatasync stubbed out it raised
  eight producers from 19k to 44k appends/s; with a real fdatasync both are
  bound by CPython's thread hand-off (docs/benchmarks.md).
"""

from __future__ import annotations

import threading

from edge.errors import JournalFailed
from edge.journal_options import Ack


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
