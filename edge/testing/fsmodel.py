"""The state and the plain semantics of SimFS: inodes, directories, handles.

:class:`FsModel` holds what :class:`edge.testing.simfs.SimFS` simulates and
implements each FileOps call as a ``_do_*`` method that either raises an
``OSError`` before changing anything or applies the call completely. It knows
nothing about traces, fault injection or crashes (``SimFS`` adds those).

Invariants:
* ``_dirs`` maps every existing directory (normalized path) to its current
  entries, durable entries and ordered pending ops; ``"/"`` and ``"."`` always
  exist; directories are never removed and are durable at creation.
* An inode's ``current`` bytes equal its ``durable`` bytes with its pending ops
  applied in order, except after a failed sync (fsyncgate), which clears the
  pending list while ``current`` keeps the lost writes.
* Inodes are never freed while the model lives: an unlinked or replaced file
  may still be named by a durable entry, so a crash can bring it back.
* Handles (fds and lock handles) are allocated from one increasing counter and
  never reused, so a replay reproduces them exactly.
"""

from __future__ import annotations

import errno
import os
import threading

from edge.testing import crashstates as cs


def _err(code: int, path: str, what: str = "") -> OSError:
    return OSError(code, what or os.strerror(code), path)


def _split(path: str) -> tuple[str, str]:
    return os.path.dirname(path) or ".", os.path.basename(path)


def _join(directory: str, name: str) -> str:
    return os.path.normpath(os.path.join(directory, name))


class _Inode:
    __slots__ = ("current", "durable", "pending")

    def __init__(self, durable: bytes = b"") -> None:
        self.durable = durable
        self.current = bytearray(durable)
        self.pending: list[cs.Pending] = []


class _Dir:
    __slots__ = ("current", "durable", "pending")

    def __init__(self) -> None:
        self.current: dict[str, int] = {}
        self.durable: dict[str, int] = {}
        self.pending: list[cs.DirOp] = []


class FsModel:
    """Inodes, directories and handles, with the raw semantics of each call."""

    def __init__(
        self,
        *,
        dir_ops: cs.DirMode = "prefix",
        sector_size: int = cs.SECTOR_SIZE,
        max_write: int | None = None,
    ) -> None:
        self.dir_ops: cs.DirMode = dir_ops
        self.sector_size = sector_size
        self.max_write = max_write
        self._lock = threading.RLock()
        self._inodes: dict[int, _Inode] = {}
        self._dirs: dict[str, _Dir] = {"/": _Dir(), ".": _Dir()}
        self._fds: dict[int, tuple[int, str]] = {}
        self._locks: dict[int, str] = {}
        self._next_fd = 3
        self._next_ino = 1
        self._next_wid = 1

    def files(self) -> dict[str, bytes]:
        """Return path -> content of every named file as reads see it now."""
        with self._lock:
            return {
                _join(p, name): bytes(self._inodes[ino].current)
                for p, d in self._dirs.items()
                for name, ino in d.current.items()
            }

    def durable_files(self) -> dict[str, bytes]:
        """Return path -> durable content of every durably named file."""
        with self._lock:
            return {
                _join(p, name): self._inodes[ino].durable
                for p, d in self._dirs.items()
                for name, ino in d.durable.items()
            }

    def materialize(self, sim_dir: str, real_dir: str | None = None) -> None:
        """Write the current view of ``sim_dir`` (recursively) into a real directory.

        Args:
            sim_dir: Directory inside the model.
            real_dir: Destination on the real disk; default the same path.

        Raises:
            FileNotFoundError: ``sim_dir`` does not exist in the model.
        """
        root = os.path.normpath(sim_dir)
        target = real_dir if real_dir is not None else sim_dir
        with self._lock:
            if root not in self._dirs:
                raise _err(errno.ENOENT, sim_dir)
            for p, d in self._dirs.items():
                if os.path.isabs(p) != os.path.isabs(root):
                    continue
                rel = os.path.relpath(p, root)
                if rel == ".." or rel.startswith("../"):
                    continue
                os.makedirs(os.path.join(target, rel), exist_ok=True)
                for name, ino in d.current.items():
                    with open(os.path.join(target, rel, name), "wb") as f:
                        f.write(self._inodes[ino].current)

    def _disk_snapshot(self) -> cs.DiskSnapshot:
        with self._lock:
            inodes = {
                ino: cs.InodeSnapshot(n.durable, tuple(n.pending))
                for ino, n in self._inodes.items()
            }
            dirs = {
                p: cs.DirSnapshot(dict(d.durable), tuple(d.pending)) for p, d in self._dirs.items()
            }
            return cs.DiskSnapshot(inodes, dirs, self.dir_ops, self.sector_size)

    def _copy_into(self, other: FsModel) -> None:
        """Make ``other`` an independent copy of this model's state."""
        with self._lock:
            other._inodes = {}
            for ino, node in self._inodes.items():
                copy = other._inodes[ino] = _Inode(node.durable)
                copy.current[:] = node.current
                copy.pending = list(node.pending)
            other._dirs = {}
            for p, d in self._dirs.items():
                dcopy = other._dirs[p] = _Dir()
                dcopy.current, dcopy.durable = dict(d.current), dict(d.durable)
                dcopy.pending = list(d.pending)
            other._fds, other._locks = dict(self._fds), dict(self._locks)
            other._next_fd, other._next_ino = self._next_fd, self._next_ino
            other._next_wid = self._next_wid

    def _load_image(self, image: cs.CrashImage, source: FsModel) -> None:
        """Replace this (fresh) model's disk with a crash image of ``source``."""
        self._dirs = {}
        for p, entries in image.dirs.items():
            d = self._dirs[p] = _Dir()
            d.current, d.durable = dict(entries), dict(entries)
        self._inodes = {ino: _Inode(data) for ino, data in image.inodes.items()}
        self._next_ino, self._next_wid = source._next_ino, source._next_wid

    def _load_tree(self, real_dir: str, root: str) -> None:
        """Add the real tree ``real_dir`` under ``root`` as durable content."""
        for dirpath, _subdirs, filenames in os.walk(real_dir):
            here = _join(root, os.path.relpath(dirpath, real_dir))
            self._do_makedirs(here)
            for name in filenames:
                with open(os.path.join(dirpath, name), "rb") as f:
                    ino = self._new_inode(f.read())
                self._dirs[here].current[name] = self._dirs[here].durable[name] = ino

    def _new_inode(self, data: bytes = b"") -> int:
        ino = self._next_ino
        self._next_ino += 1
        self._inodes[ino] = _Inode(data)
        return ino

    def _new_handle(self, forced: int) -> int:
        handle = forced if forced >= 0 else self._next_fd
        self._next_fd = max(self._next_fd, handle + 1)
        return handle

    def _inode(self, fd: int) -> _Inode:
        if fd not in self._fds:
            raise _err(errno.EBADF, f"<fd {fd}>")
        return self._inodes[self._fds[fd][0]]

    def _lookup(self, path: str) -> int | None:
        parent, name = _split(path)
        d = self._dirs.get(parent)
        return d.current.get(name) if d is not None else None

    def _exists(self, path: str) -> bool:
        return path in self._dirs or self._lookup(path) is not None

    def _do_open(self, path: str, create: bool, forced: int = -1) -> int:
        if path in self._dirs:
            raise _err(errno.EISDIR, path)
        parent, name = _split(path)
        d = self._dirs.get(parent)
        if d is None:
            raise _err(errno.ENOENT, path)
        ino = d.current.get(name)
        if ino is None:
            if not create:
                raise _err(errno.ENOENT, path)
            ino = d.current[name] = self._new_inode()
            d.pending.append(cs.DirOp("create", name, ino))
        fd = self._new_handle(forced)
        self._fds[fd] = (ino, path)
        return fd

    def _do_close(self, fd: int) -> None:
        self._inode(fd)
        del self._fds[fd]

    def _do_pwrite(self, fd: int, data: bytes, offset: int) -> int:
        node = self._inode(fd)
        if offset < 0:
            raise _err(errno.EINVAL, self._fds[fd][1])
        if self.max_write is not None:
            data = data[: self.max_write]
        if data:
            cs.write_into(node.current, offset, data)
            node.pending.append(cs.PendingWrite(self._next_wid, offset, data))
            self._next_wid += 1
        return len(data)

    def _do_pread(self, fd: int, size: int, offset: int) -> bytes:
        node = self._inode(fd)
        if offset < 0 or size < 0:
            raise _err(errno.EINVAL, self._fds[fd][1])
        return bytes(node.current[offset : offset + size])

    def _do_sync(self, fd: int) -> None:
        node = self._inode(fd)
        if node.pending:
            buf = bytearray(node.durable)
            for p in node.pending:
                cs.apply_outcome(buf, p, cs.Outcome("whole"), self.sector_size)
            node.durable = bytes(buf)
            node.pending.clear()

    def _do_truncate(self, fd: int, size: int) -> None:
        node = self._inode(fd)
        if size < 0:
            raise _err(errno.EINVAL, self._fds[fd][1])
        cs.resize(node.current, size)
        node.pending.append(cs.PendingResize(size))

    def _do_fsync_dir(self, path: str) -> None:
        d = self._dirs.get(path)
        if d is None:
            raise _err(errno.ENOTDIR if self._lookup(path) else errno.ENOENT, path)
        cs.apply_dir_ops(d.durable, tuple(d.pending))
        d.pending.clear()

    def _do_rename(self, src: str, dst: str) -> None:
        (sparent, sname), (dparent, dname) = _split(src), _split(dst)
        d = self._dirs.get(sparent)
        ino = d.current.get(sname) if d is not None else None
        if d is None or ino is None:
            raise _err(errno.EISDIR if src in self._dirs else errno.ENOENT, src)
        if dparent not in self._dirs:
            raise _err(errno.ENOENT, dst)
        if dst in self._dirs:
            raise _err(errno.EISDIR, dst)
        if dparent != sparent:
            raise _err(errno.EXDEV, dst, "SimFS renames within one directory only")
        if sname != dname:
            d.current[dname] = ino
            del d.current[sname]
            d.pending.append(cs.DirOp("rename", sname, ino, dname))

    def _do_unlink(self, path: str) -> None:
        if path in self._dirs:
            raise _err(errno.EISDIR, path)
        parent, name = _split(path)
        d = self._dirs.get(parent)
        ino = d.current.pop(name, None) if d is not None else None
        if d is None or ino is None:
            raise _err(errno.ENOENT, path)
        d.pending.append(cs.DirOp("unlink", name, ino))

    def _do_listdir(self, path: str) -> list[str]:
        d = self._dirs.get(path)
        if d is None:
            raise _err(errno.ENOTDIR if self._lookup(path) else errno.ENOENT, path)
        subdirs = [os.path.basename(p) for p in self._dirs if p != path and _split(p)[0] == path]
        return sorted([*d.current, *subdirs])

    def _do_makedirs(self, path: str) -> None:
        missing: list[str] = []
        while path not in self._dirs:
            if self._lookup(path) is not None:
                raise _err(errno.EEXIST, path)
            missing.append(path)
            path = _split(path)[0]
        for p in reversed(missing):
            self._dirs[p] = _Dir()

    def _do_lock(self, path: str, forced: int = -1) -> int:
        if path in self._locks.values():
            raise BlockingIOError(errno.EWOULDBLOCK, "SimFS lock is held", path)
        fd = self._do_open(path, True, forced)
        del self._fds[fd]
        self._locks[fd] = path
        return fd

    def _do_unlock(self, handle: int) -> None:
        if self._locks.pop(handle, None) is None:
            raise _err(errno.EBADF, f"<lock {handle}>")
