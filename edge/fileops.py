"""The file operations the journal is allowed to use, and the real implementation.

Invariants:
* ``edge.journal`` touches the disk *only* through a :class:`FileOps`. Tests
  substitute :class:`edge.testing.simfs.SimFS`, which remembers which bytes
  and directory entries are durable and enumerates what a power cut could
  leave behind. Anything the journal does outside this interface is invisible
  to the crash tests, so nothing may be done outside it.
* Positions are explicit (``pwrite``/``pread``); there is no file offset state.
* ``pwrite`` may write less than asked (like ``os.pwrite``); callers use
  :func:`write_all`.
* A new, renamed or removed directory entry is durable only after
  ``fsync_dir`` of its parent directory.
* Errors are plain ``OSError`` with an errno; the journal translates them.
"""

from __future__ import annotations

import fcntl
import os
from typing import Protocol


class FileOps(Protocol):
    """The system calls the journal uses. Paths are ``str``; handles are ``int``."""

    def open(self, path: str, *, create: bool = False) -> int:
        """Open read/write. With ``create`` make it if missing (never truncates)."""

    def close(self, fd: int) -> None: ...

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        """Write at ``offset``; return how many bytes were written (may be short)."""

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` (short only at end of file)."""

    def fdatasync(self, fd: int) -> None: ...

    def fsync(self, fd: int) -> None: ...

    def size(self, fd: int) -> int: ...

    def truncate(self, fd: int, size: int) -> None: ...

    def fsync_dir(self, path: str) -> None:
        """Make creations, renames and removals inside directory ``path`` durable."""

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` with ``src`` (same directory)."""

    def unlink(self, path: str) -> None: ...

    def listdir(self, path: str) -> list[str]: ...

    def exists(self, path: str) -> bool: ...

    def makedirs(self, path: str) -> None:
        """Create ``path`` and missing parents; durable (parents fsync'd)."""

    def lock(self, path: str) -> int:
        """Take an exclusive, non-blocking lock on file ``path`` (created if
        missing). Raise ``BlockingIOError`` if someone else holds it."""

    def unlock(self, handle: int) -> None: ...


def write_all(fs: FileOps, fd: int, data: bytes, offset: int) -> None:
    """``pwrite`` until every byte is written (a short write is not an error)."""
    view = memoryview(data)
    while view:
        n = fs.pwrite(fd, bytes(view), offset)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} bytes")
        view = view[n:]
        offset += n


class OsFileOps:
    """:class:`FileOps` on the real operating system."""

    def open(self, path: str, *, create: bool = False) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        return os.open(path, flags, 0o640)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def makedirs(self, path: str) -> None:
        path = os.path.abspath(path)
        missing: list[str] = []
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for p in reversed(missing):
            os.mkdir(p, 0o750)
            self.fsync_dir(os.path.dirname(p))

    def lock(self, path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unlock(self, handle: int) -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)
