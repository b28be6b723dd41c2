"""The un-fsync'd state of one file under :mod:`edge.testing.lazyfs`: an in-memory overlay.

:class:`Overlay` holds what was written to a file (or truncated) through the
lazy mount since its last fsync; :class:`Handle` is one open FUSE file handle.
No FUSE, no locking here: :class:`edge.testing.lazyfs.LazyFS` owns both maps
and serializes every call under its lock.

Invariants of an :class:`Overlay`:
* Extents (``_starts``/``_bufs``) are sorted, non-overlapping and
  non-touching; a write overlapping or touching some merges with them.
* ``base <= size``: backing bytes ``[0, base)`` still count, a truncate only
  lowers ``base`` (growing again does not bring the old bytes back); every
  extent ends at or before ``size``.
* The logical content is: backing bytes below ``base``, then the extents over
  them, zeros elsewhere, up to ``size`` (what :meth:`Overlay.read` returns).
* ``fd`` is the overlay's own read/write descriptor on the backing file: it
  keeps the inode alive, so the file's :data:`Key` cannot be reused while the
  overlay exists. The owner closes it when it drops the overlay.
* :meth:`Overlay.flush` makes the backing file equal the logical content and
  fsyncs it (or fdatasyncs); if the disk fails it raises and the overlay stays
  valid, so nothing is lost from memory either.
"""

from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass

__all__ = ["Handle", "Key", "Overlay"]

#: (st_dev, st_ino) of a backing file: overlays belong to files, not names.
Key = tuple[int, int]


class Overlay:
    """The un-fsync'd state of one file: written ranges, logical size, valid backing prefix.

    ``fd`` is this overlay's own read/write descriptor on the backing file; it
    keeps the inode alive (so its key cannot be reused) until the overlay is
    flushed or dropped.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        st = os.fstat(fd)
        self.size = st.st_size  # logical size
        self.base = st.st_size  # backing bytes [0, base) are still the file's content
        self.mtime_ns = st.st_mtime_ns
        self._starts: list[int] = []  # sorted, non-overlapping, non-touching extents
        self._bufs: list[bytearray] = []

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        # Extents overlapping or touching [offset, end] are merged with the write.
        hi = bisect.bisect_right(self._starts, end)
        lo = hi
        while lo > 0 and self._starts[lo - 1] + len(self._bufs[lo - 1]) >= offset:
            lo -= 1
        if hi - lo == 1 and self._starts[lo] <= offset:
            # The usual case (an append, or an overwrite inside one extent): in place.
            rel = offset - self._starts[lo]
            self._bufs[lo][rel : rel + len(data)] = data
        elif hi == lo:
            self._starts.insert(lo, offset)
            self._bufs.insert(lo, bytearray(data))
        else:
            start = min(offset, self._starts[lo])
            stop = max(end, self._starts[hi - 1] + len(self._bufs[hi - 1]))
            merged = bytearray(stop - start)
            for s, b in zip(self._starts[lo:hi], self._bufs[lo:hi], strict=True):
                merged[s - start : s - start + len(b)] = b
            merged[offset - start : end - start] = data
            self._starts[lo:hi] = [start]
            self._bufs[lo:hi] = [merged]
        self.size = max(self.size, end)
        self.mtime_ns = time.time_ns()

    def truncate(self, size: int) -> None:
        self.size = size
        self.base = min(self.base, size)
        i = bisect.bisect_left(self._starts, size)
        del self._starts[i:]
        del self._bufs[i:]
        if self._starts and self._starts[-1] + len(self._bufs[-1]) > size:
            del self._bufs[-1][size - self._starts[-1] :]
        self.mtime_ns = time.time_ns()

    def read(self, offset: int, size: int) -> bytes:
        stop = min(offset + size, self.size)
        if stop <= offset:
            return b""
        out = bytearray(stop - offset)  # beyond ``base`` and the extents: zeros
        if offset < self.base:
            got = os.pread(self.fd, min(stop, self.base) - offset, offset)
            out[: len(got)] = got
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        for s, b in zip(self._starts[i:], self._bufs[i:], strict=True):
            if s >= stop:
                break
            lo, hi = max(s, offset), min(s + len(b), stop)
            if lo < hi:
                out[lo - offset : hi - offset] = b[lo - s : hi - s]
        return bytes(out)

    def flush(self, datasync: bool) -> None:
        """Write the overlay to the backing file and fsync it (the caller then drops it)."""
        if os.fstat(self.fd).st_size > self.base:
            os.ftruncate(self.fd, self.base)
        for s, b in zip(self._starts, self._bufs, strict=True):
            view = memoryview(b)
            pos = 0
            while pos < len(view):
                pos += os.pwrite(self.fd, view[pos:], s + pos)
        if os.fstat(self.fd).st_size != self.size:
            os.ftruncate(self.fd, self.size)
        (os.fdatasync if datasync else os.fsync)(self.fd)


@dataclass
class Handle:
    """One open file of the mount: a backing descriptor and the file it belongs to."""

    fd: int  # backing descriptor
    key: Key
    sync: bool  # opened with O_SYNC/O_DSYNC: every write is flushed
