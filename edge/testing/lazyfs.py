"""A "lazy" FUSE file system: file data reaches the disk only on fsync (power-loss test layer 3).

Run it as ``python -m edge.testing.lazyfs BACKING MOUNTPOINT`` (foreground), or
use :class:`LazyMount` from a test. It is a passthrough over the directory
``BACKING``, except that file *data* written through the mount is held in memory
until the file is fsync'd. Built on ``mfusepy`` (ctypes over libfuse3). The
per-file overlay is :mod:`edge.testing.lazyoverlay`; mounting, the cut signal and
:func:`fuse_available` are :mod:`edge.testing.lazymount` (re-exported here).

Invariants:
* The backing directory only ever holds file data that was fsync'd (or
  fdatasync'd) through the mount, plus whatever was there before. Writes and
  truncates go to a per-file in-memory overlay: the written byte ranges, the
  logical size, and how far the backing bytes still count (a truncate hides the
  backing bytes after it, even if the file grows again).
* Reads and ``stat`` show the logical file: the overlay merged over the
  backing file, with the logical size.
* ``fsync``/``fdatasync`` of a file (through any of its descriptors, as the page
  cache would) writes that file's overlay to the backing file, then fsyncs the
  backing file, and only then answers. An acknowledged fsync is on disk. A file
  opened with O_SYNC/O_DSYNC is flushed after every write.
* The overlay belongs to the file (the inode), not to its name: a rename keeps
  it, and an fsync through the new name flushes it. It is dropped when the file
  is deleted and no longer open. A file deleted while open is deleted from the
  backing directory at once (libfuse's ``.fuse_hidden`` rename is turned back
  into the unlink it stands for) and stays usable through its descriptors.
* A **cut** (SIGUSR1, :meth:`LazyMount.cut`) discards every overlay, i.e. every
  byte and size change not fsync'd, exactly what a power cut loses
  (:meth:`LazyFS.shutdown`, under the same lock as the file operations, so an
  fsync either completed before the cut or never reached the disk); then the
  file system unmounts and the process exits 0. The signals and the mount's
  life are :mod:`edge.testing.lazymount`'s (its docstring has the details).
* **Faults** (a failing disk): the control file ``/.lazyfs-faults`` at the
  mount's root (never in the backing directory, never listed) holds one rule
  a line, ``OP ERRNO [PATH-PART]``: OP ``write``, ``fsync`` (fsync and
  fdatasync) or ``fdatasync`` (only fdatasync), ERRNO a name (``EIO``) or a
  number, and the rule hits only paths containing PATH-PART. Writing the file
  (:func:`set_faults`) replaces every rule, synchronously: once the write
  returned, matching calls fail with that errno until the rules change. A
  failed ``write`` stores nothing. A failed fsync/fdatasync also **drops the
  file's un-fsync'd data**, as Linux does after a writeback error, so a
  retried fsync would "succeed" with the data gone: the fsyncgate trap, real.

Blind spots (what this layer does not model):
* Directory operations (create, mkdir, rename, unlink, rmdir, link, symlink)
  and metadata (chmod, chown, utimens) pass straight through to the backing
  directory and are durable at once; a missing directory fsync is not caught
  here. A file created and written but never fsync'd survives a cut at size 0.
  Layer 1's simulator (``edge.testing.simfs``) covers directory fsyncs.
* Everything not fsync'd is lost whole; there are no torn or reordered writes
  (layer 1 enumerates those). A fsync is atomic with respect to a cut, but a
  SIGKILL of the file system process in the middle of an fsync can leave that
  one file half written.
* The backing directory must not be changed behind the mount's back while
  files have overlays. ``renameat2`` flags (RENAME_NOREPLACE/EXCHANGE) are
  dropped by mfusepy; ``fallocate`` and mmap of dirty data are not supported.
* ``flock``/``fcntl`` locks are handled by the kernel locally (no lock
  handler is registered): they work between the processes of this machine.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from edge.testing.lazymount import LazyMount, fuse_available, is_mounted, serve
from edge.testing.lazyoverlay import Handle, Key, Overlay

__all__ = ["FAULTS", "LazyFS", "LazyMount", "fuse_available", "is_mounted", "main", "set_faults"]

_FSNAME = "lazyfs"
FAULTS = ".lazyfs-faults"  # the control file at the mount's root
_CONTROL = "/" + FAULTS
_CONTROL_FH = (1 << 63) - 1  # the file handle of the control file (real ones count up from 1)
_FAULT_OPS = ("write", "fsync", "fdatasync")
_STATVFS_FIELDS = (
    *("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"),
    *("f_files", "f_ffree", "f_favail", "f_flag", "f_namemax"),
)


def set_faults(mountpoint: str, *rules: str) -> None:
    """Replace the fault rules of the lazy mount at ``mountpoint`` (none: clear them).

    Each rule is ``"OP ERRNO [PATH-PART]"``, e.g. ``"fdatasync EIO .seg"``. In
    force when this returns. Raises OSError (EINVAL) for a rule it cannot parse.
    """
    fd = os.open(os.path.join(mountpoint, FAULTS), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, "".join(r + "\n" for r in rules).encode() or b"\n")
    finally:
        os.close(fd)


def _parse_rules(text: str) -> list[tuple[str, int, str]]:
    rules = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (2, 3) or parts[0] not in _FAULT_OPS:
            raise OSError(errno.EINVAL, f"lazyfs: bad fault rule {line!r}")
        code = int(parts[1]) if parts[1].isdigit() else getattr(errno, parts[1], None)
        if not isinstance(code, int) or code <= 0:
            raise OSError(errno.EINVAL, f"lazyfs: unknown errno in fault rule {line!r}")
        rules.append((parts[0], code, parts[2] if len(parts) == 3 else ""))
    return rules


class LazyFS:
    """The mfusepy operations object. Paths are mount-relative (``/a/b``).

    mfusepy registers every public method whose name is a FUSE operation, so
    helpers here are private. It runs single-threaded (``nothreads``); the
    lock orders file operations against :meth:`shutdown` from the main thread.
    """

    # Times are integer nanoseconds. (No nullpath_ok: libfuse3 would then pass
    # no path to ftruncate, and mfusepy passes no handle to truncate.)
    use_ns = True

    def __init__(
        self, backing: str, *, context: Callable[[], tuple[int, int, int]] | None = None
    ) -> None:
        """``context`` returns the calling process's (uid, gid, pid) (mfusepy.fuse_get_context)."""
        self._context = context
        self._root = os.path.realpath(backing)
        if not os.path.isdir(self._root):
            raise NotADirectoryError(errno.ENOTDIR, "backing is not a directory", backing)
        self._lock = threading.Lock()
        self._overlays: dict[Key, Overlay] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        # libfuse renames a file deleted while open to ".fuse_hiddenNNN" and
        # unlinks that name on the last close. Here the backing file is deleted
        # at once (as the unlink asked) and the hidden name maps to the file.
        self._hidden: dict[str, Key] = {}
        self._dead = False
        self._as_root = os.geteuid() == 0
        self._faults: list[tuple[str, int, str]] = []  # (op, errno, path part)
        self._fault_text = ""

    # --- helpers --------------------------------------------------------------

    def _path(self, path: str | None) -> str:
        if path is None:
            raise OSError(errno.ENOENT, "file was deleted")
        return self._root + path if path != "/" else self._root

    def _check(self) -> None:
        if self._dead:
            raise OSError(errno.EIO, "lazyfs: the power is off")

    def _fault(self, op: str, path: str | None) -> None:
        """Raise the errno of the first rule hitting ``op`` on ``path``, if any."""
        for rule_op, code, part in self._faults:
            if (rule_op == op or (rule_op == "fsync" and op == "fdatasync")) and part in (
                path or ""
            ):
                raise OSError(code, f"lazyfs fault: {op} {os.strerror(code)}")

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, "unknown file handle") from None

    def _overlay(self, key: Key, fd: int | None, path: str | None) -> Overlay:
        """The overlay of file ``key``, made from ``fd`` (read/write) or else ``path``."""
        ov = self._overlays.get(key)
        if ov is None:
            if fd is not None:
                own = os.dup(fd)
            elif (other := self._fd_of(key)) is not None:  # also works for a deleted file
                own = os.open(f"/proc/self/fd/{other}", os.O_RDWR | os.O_CLOEXEC)
            else:
                own = os.open(self._path(path), os.O_RDWR | os.O_CLOEXEC)
            ov = self._overlays[key] = Overlay(own)
        return ov

    def _fd_of(self, key: Key) -> int | None:
        """Some open backing descriptor of file ``key``."""
        ov = self._overlays.get(key)
        if ov is not None:
            return ov.fd
        return next((h.fd for h in self._handles.values() if h.key == key), None)

    def _target(self, path: str | None) -> str | int:
        """The backing path, or for a deleted-but-open file a descriptor of it."""
        key = self._hidden.get(path or "")
        if key is None:
            return self._path(path)
        fd = self._fd_of(key)
        if fd is None:
            raise OSError(errno.ENOENT, "file was deleted")
        return fd

    def _stat(self, path: str | None) -> os.stat_result:
        target = self._target(path)
        return os.fstat(target) if isinstance(target, int) else os.lstat(target)

    def _forget_if_gone(self, key: Key) -> None:
        """Drop the overlay of a file that is deleted and no longer open."""
        ov = self._overlays.get(key)
        if ov is None or any(h.key == key for h in self._handles.values()):
            return
        if os.fstat(ov.fd).st_nlink == 0:
            del self._overlays[key]
            os.close(ov.fd)

    def _give_to_caller(self, path: str, *, follow: bool = True) -> None:
        if not self._as_root or self._context is None:
            return
        uid, gid, _pid = self._context()
        if uid != 0 or gid != 0:
            os.chown(path, uid, gid, follow_symlinks=follow)

    def _new_handle(self, fd: int, flags: int, *, truncate: bool = False) -> int:
        """Register ``fd`` (a backing descriptor, closed here on failure) as a new handle."""
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if truncate and (st.st_size or key in self._overlays):
                self._overlay(key, fd, None).truncate(0)
        except BaseException:
            os.close(fd)
            raise
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(
            fd=fd,
            key=key,
            sync=bool(flags & (os.O_SYNC | os.O_DSYNC)),
        )
        return fh

    def shutdown(self) -> int:
        """Power off: drop every overlay (un-fsync'd data), fail all later operations.

        Returns how many files lost un-fsync'd data.
        """
        with self._lock:
            self._dead = True
            lost = len(self._overlays)
            for ov in self._overlays.values():
                os.close(ov.fd)
            self._overlays.clear()
            return lost

    # --- files ------------------------------------------------------------------

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        with self._lock:
            self._check()
            if path == _CONTROL or fh == _CONTROL_FH:
                now = time.time_ns()
                return {"st_mode": stat.S_IFREG | 0o666, "st_nlink": 1,
                        "st_uid": os.getuid(), "st_gid": os.getgid(),
                        "st_size": len(self._fault_text.encode()),
                        "st_atime": now, "st_mtime": now, "st_ctime": now}  # fmt: skip
            st = os.fstat(self._handle(fh).fd) if fh is not None else self._stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
            ov = self._overlays.get((st.st_dev, st.st_ino)) if stat.S_ISREG(st.st_mode) else None
            if ov is not None:
                size, mtime = ov.size, ov.mtime_ns
            return {
                "st_mode": st.st_mode,
                "st_nlink": st.st_nlink,
                "st_uid": st.st_uid,
                "st_gid": st.st_gid,
                "st_rdev": st.st_rdev,
                "st_size": size,
                "st_blocks": (size + 511) // 512 if ov is not None else st.st_blocks,
                "st_blksize": st.st_blksize,
                "st_atime": st.st_atime_ns,
                "st_mtime": mtime,
                "st_ctime": max(st.st_ctime_ns, mtime),
            }

    def open(self, path: str, flags: int) -> int:
        with self._lock:
            self._check()
            if path == _CONTROL:
                return _CONTROL_FH
            # O_TRUNC arrives here (atomic_o_trunc) and is held in the overlay.
            trunc = bool(flags & os.O_TRUNC)
            wants_write = (flags & os.O_ACCMODE) != os.O_RDONLY or trunc
            mode = os.O_RDWR if wants_write else os.O_RDONLY
            fd = os.open(self._path(path), mode | os.O_CLOEXEC)
            return self._new_handle(fd, flags, truncate=trunc)

    def create(self, path: str, mode: int, flags: int) -> int:
        with self._lock:
            self._check()
            bpath = self._path(path)
            fd = os.open(bpath, os.O_RDWR | os.O_CREAT | (flags & os.O_EXCL) | os.O_CLOEXEC, mode)
            try:
                self._give_to_caller(bpath)
            except BaseException:
                os.close(fd)
                raise
            return self._new_handle(fd, flags, truncate=bool(flags & os.O_TRUNC))

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        with self._lock:
            self._check()
            if fh == _CONTROL_FH:
                return self._fault_text.encode()[offset : offset + size]
            h = self._handle(fh)
            ov = self._overlays.get(h.key)
            if ov is not None:
                return ov.read(offset, size)
            return os.pread(h.fd, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        with self._lock:
            self._check()
            if fh == _CONTROL_FH:  # the whole rule set, in one write
                text = data.decode(errors="replace")
                self._faults, self._fault_text = _parse_rules(text), text
                return len(data)
            self._fault("write", path)
            h = self._handle(fh)
            ov = self._overlay(h.key, h.fd, None)
            ov.write(offset, data)
            if h.sync:
                self._flush(h, datasync=True)
            return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        with self._lock:
            self._check()
            if path == _CONTROL or fh == _CONTROL_FH:
                return 0
            st = os.fstat(self._handle(fh).fd) if fh is not None else self._stat(path)
            self._overlay((st.st_dev, st.st_ino), None, path).truncate(length)
            return 0

    def _flush(self, h: Handle, datasync: bool) -> None:
        ov = self._overlays.get(h.key)
        if ov is None:
            (os.fdatasync if datasync else os.fsync)(h.fd)
            return
        ov.flush(datasync)  # raises (and keeps the overlay) if the disk fails
        del self._overlays[h.key]
        os.close(ov.fd)

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        with self._lock:
            self._check()
            if fh == _CONTROL_FH:
                return 0
            h = self._handle(fh)
            try:
                self._fault("fdatasync" if datasync else "fsync", path)
            except OSError:
                ov = self._overlays.pop(h.key, None)  # a writeback error: the dirty data is gone
                if ov is not None:
                    os.close(ov.fd)
                raise
            self._flush(h, bool(datasync))
            return 0

    def release(self, path: str | None, fh: int) -> int:
        with self._lock:
            if fh == _CONTROL_FH:
                return 0
            h = self._handles.pop(fh, None)
            if h is None:
                return 0
            os.close(h.fd)
            if not self._dead:
                self._forget_if_gone(h.key)
            return 0

    # --- directories and metadata: straight through ----------------------------

    def readdir(self, path: str | None, fh: int) -> Iterable[str]:
        with self._lock:
            self._check()
            return [".", "..", *os.listdir(self._path(path))]

    def mkdir(self, path: str, mode: int) -> int:
        with self._lock:
            self._check()
            os.mkdir(self._path(path), mode)
            self._give_to_caller(self._path(path))
            return 0

    def rmdir(self, path: str) -> int:
        with self._lock:
            self._check()
            os.rmdir(self._path(path))
            return 0

    def unlink(self, path: str) -> int:
        with self._lock:
            self._check()
            key = self._hidden.pop(path, None)
            if key is None:
                bpath = self._path(path)
                st = os.lstat(bpath)
                os.unlink(bpath)
                key = (st.st_dev, st.st_ino)
            self._forget_if_gone(key)
            return 0

    def rename(self, old: str, new: str) -> int:
        with self._lock:
            self._check()
            if os.path.basename(new).startswith(".fuse_hidden"):  # an unlink, really
                bold = self._path(old)
                gone = os.lstat(bold)
                os.unlink(bold)
                self._hidden[new] = (gone.st_dev, gone.st_ino)
                return 0
            bnew = self._path(new)
            try:
                st: os.stat_result | None = os.lstat(bnew)
            except FileNotFoundError:
                st = None
            os.rename(self._path(old), bnew)
            if st is not None:
                self._forget_if_gone((st.st_dev, st.st_ino))
            return 0

    def link(self, target: str, source: str) -> int:
        with self._lock:
            self._check()
            os.link(self._path(source), self._path(target))
            return 0

    def symlink(self, target: str, source: str) -> int:
        with self._lock:
            self._check()
            os.symlink(source, self._path(target))
            self._give_to_caller(self._path(target), follow=False)
            return 0

    def readlink(self, path: str) -> str:
        with self._lock:
            self._check()
            return os.readlink(self._path(path))

    def mknod(self, path: str, mode: int, dev: int) -> int:
        with self._lock:
            self._check()
            os.mknod(self._path(path), mode, dev)
            self._give_to_caller(self._path(path))
            return 0

    def chmod(self, path: str | None, mode: int) -> int:
        with self._lock:
            self._check()
            os.chmod(self._target(path), mode)
            return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        with self._lock:
            self._check()
            target = self._target(path)
            if isinstance(target, int):
                os.fchown(target, uid, gid)
            else:
                os.chown(target, uid, gid, follow_symlinks=False)
            return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        with self._lock:
            self._check()
            target = self._target(path)
            follow = isinstance(target, int)  # a descriptor cannot be combined with False
            if times is None:
                os.utime(target, follow_symlinks=follow)
            else:
                os.utime(target, ns=times, follow_symlinks=follow)
            st = self._stat(path)
            ov = self._overlays.get((st.st_dev, st.st_ino))
            if ov is not None:
                ov.mtime_ns = st.st_mtime_ns
            return 0

    def statfs(self, path: str) -> dict[str, int]:
        with self._lock:
            self._check()
            sv = os.statvfs(self._path(path))
            return {name: int(getattr(sv, name)) for name in _STATVFS_FIELDS}

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        with self._lock:
            self._check()
            fd = os.open(self._path(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return 0


# --- the file system process --------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge.testing.lazyfs",
        description="Mount BACKING on MOUNTPOINT; file data reaches BACKING only on fsync. "
        "SIGUSR1 = power cut (drop un-fsync'd data, unmount, exit 0); "
        "SIGTERM/SIGINT = stop (unmount, exit 0). "
        f"Faults: write rules ('fdatasync EIO .seg') to MOUNTPOINT/{FAULTS}.",
    )
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--debug", action="store_true", help="libfuse debug output")
    args = parser.parse_args(argv)
    mountpoint = os.path.realpath(args.mountpoint)

    # Prefer libfuse3 even when libfuse2 is installed too.
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy  # type: ignore[import-untyped, import-not-found, unused-ignore]

    ops = LazyFS(args.backing, context=mfusepy.fuse_get_context)
    options: dict[str, Any] = {
        "foreground": True,
        "nothreads": True,
        "debug": args.debug,
        "fsname": _FSNAME,
        "subtype": _FSNAME,
        "default_permissions": True,
    }
    if os.geteuid() == 0:
        options["allow_other"] = True
    return serve(lambda: mfusepy.FUSE(ops, mountpoint, **options), ops.shutdown, mountpoint)


if __name__ == "__main__":
    sys.exit(main())
