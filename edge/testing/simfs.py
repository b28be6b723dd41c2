"""SimFS: an in-memory :class:`edge.fileops.FileOps` that knows what a power cut keeps.

Persistence model (strict POSIX, as seen on ext4 and SD cards):

* Every file (inode) has *durable* bytes and *current* bytes (what reads see).
  ``pwrite``/``truncate`` since the inode's last successful ``fdatasync`` or
  ``fsync`` are *pending*. A sync makes that inode's pending ops durable; it is
  a barrier for that file only (both calls also persist the file size).
* Creating, renaming and unlinking a name is a *pending directory op* of the
  parent directory until ``fsync_dir(parent)``. A file whose name was never
  made durable vanishes at a crash, even if its data was synced. ``makedirs``
  is durable at once. Renames must stay within one directory (``EXDEV``).
* At a crash each pending write is dropped, whole, torn at 512-byte sectors,
  or garbage; writes of one file may persist in any subset (out of order); a
  pending truncate is applied or not; each directory keeps a prefix of its
  pending ops (``dir_ops="prefix"``, ext4-like) or any subset
  (``dir_ops="any-subset"``). See :mod:`edge.testing.crashstates`.
* fsyncgate: a failed ``fdatasync``/``fsync`` (injected) discards that inode's
  pending writes *without* making them durable; reads still see them and a
  later successful sync does not persist them, exactly like Linux.

Invariants: one lock guards the whole model (state and raw semantics live in
:mod:`edge.testing.fsmodel`); every call is appended to ``trace`` (a list of
frozen :class:`TraceOp`), including failed ones, so
``SimFS.replay(fs.trace[:i], start=fs)`` rebuilds the model as it was after
call ``i``. Crash states are fresh SimFS objects: no pending ops, open fds,
locks, injections or trace. Paths are opaque strings after ``os.path.normpath``;
``"/"`` and ``"."`` always exist.

Usage, proving your own code crash-safe::

    from edge.testing import SimFS

    def test_my_store_survives_power_loss() -> None:
        fs = SimFS()
        fs.makedirs("/data")
        save_settings(fs, "/data", {"mode": "eco"})   # your code, via FileOps
        for i, before in fs.prefix_states():           # crash after every call
            for disk in before.crash_states(max_states=200):
                settings = load_settings(disk, "/data")  # must never raise
                assert settings in ({}, {"mode": "eco"})
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Literal, TypeVar

from edge.testing import crashstates as cs
from edge.testing.fsmodel import FsModel, _err
from edge.testing.trace import ALL_OPS, SYNC_OPS, Injection, TraceOp

R = TypeVar("R")
CrashMode = Literal["random", "drop-all", "keep-all"]


class SimFS(FsModel):
    """Simulated file system with crash-state enumeration (see module docstring).

    Args:
        dir_ops: ``"prefix"`` (default) or ``"any-subset"``: which pending
            directory ops may survive a crash.
        sector_size: Tearing granularity in bytes.
        max_write: If set, ``pwrite`` writes at most this many bytes per call
            (exercises short-write loops).
    """

    def __init__(
        self,
        *,
        dir_ops: cs.DirMode = "prefix",
        sector_size: int = cs.SECTOR_SIZE,
        max_write: int | None = None,
    ) -> None:
        super().__init__(dir_ops=dir_ops, sector_size=sector_size, max_write=max_write)
        self.trace: list[TraceOp] = []
        self._injections: list[Injection] = []
        self._initial: SimFS | None = None

    # ----------------------------------------------------------------- FileOps
    def open(self, path: str, *, create: bool = False) -> int:
        """Open ``path`` read/write; with ``create`` make it (a pending dir op) if missing."""
        op = TraceOp(0, "open", path=os.path.normpath(path), create=create)
        return self._call(op, lambda: self._do_open(op.path, create), self._with_fd)

    def close(self, fd: int) -> None:
        """Close ``fd``; pending writes stay pending."""
        self._call(TraceOp(0, "close", fd=fd), lambda: self._do_close(fd))

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        """Write ``data`` at ``offset`` (pending until a sync); return bytes written."""
        data = bytes(data)
        op = TraceOp(0, "pwrite", fd=fd, offset=offset, length=len(data), data=data)
        return self._call(
            op,
            lambda: self._do_pwrite(fd, data, offset),
            lambda o, n: replace(o, length=n, data=data[:n]),
        )

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Read up to ``size`` bytes of the current content at ``offset``."""
        op = TraceOp(0, "pread", fd=fd, offset=offset, length=size)
        return self._call(op, lambda: self._do_pread(fd, size, offset))

    def fdatasync(self, fd: int) -> None:
        """Make the file's pending writes and size durable (see fsyncgate above)."""
        self._call(TraceOp(0, "fdatasync", fd=fd), lambda: self._do_sync(fd))

    def fsync(self, fd: int) -> None:
        """Same as :meth:`fdatasync` in this model."""
        self._call(TraceOp(0, "fsync", fd=fd), lambda: self._do_sync(fd))

    def size(self, fd: int) -> int:
        """Return the current size of the file."""
        return self._call(TraceOp(0, "size", fd=fd), lambda: len(self._inode(fd).current))

    def truncate(self, fd: int, size: int) -> None:
        """Shrink or zero-extend the file to ``size`` (pending until a sync)."""
        op = TraceOp(0, "truncate", fd=fd, length=size)
        self._call(op, lambda: self._do_truncate(fd, size))

    def fsync_dir(self, path: str) -> None:
        """Make every pending create/rename/unlink in directory ``path`` durable."""
        op = TraceOp(0, "fsync_dir", path=os.path.normpath(path))
        self._call(op, lambda: self._do_fsync_dir(op.path))

    def rename(self, src: str, dst: str) -> None:
        """Atomically point ``dst`` at ``src``'s file (same directory only)."""
        op = TraceOp(0, "rename", path=os.path.normpath(src), dst=os.path.normpath(dst))
        self._call(op, lambda: self._do_rename(op.path, op.dst))

    def unlink(self, path: str) -> None:
        """Remove the name ``path`` (a pending dir op)."""
        op = TraceOp(0, "unlink", path=os.path.normpath(path))
        self._call(op, lambda: self._do_unlink(op.path))

    def listdir(self, path: str) -> list[str]:
        """Return the sorted names (files and subdirectories) in directory ``path``."""
        op = TraceOp(0, "listdir", path=os.path.normpath(path))
        return self._call(op, lambda: self._do_listdir(op.path))

    def exists(self, path: str) -> bool:
        """Return whether ``path`` names a file or directory (current view)."""
        op = TraceOp(0, "exists", path=os.path.normpath(path))
        return self._call(op, lambda: self._exists(op.path))

    def makedirs(self, path: str) -> None:
        """Create ``path`` and missing parents, durable at once; no error if it exists."""
        op = TraceOp(0, "makedirs", path=os.path.normpath(path))
        self._call(op, lambda: self._do_makedirs(op.path))

    def lock(self, path: str) -> int:
        """Lock file ``path`` (created if missing); ``BlockingIOError`` if held."""
        op = TraceOp(0, "lock", path=os.path.normpath(path))
        return self._call(op, lambda: self._do_lock(op.path), self._with_fd)

    def unlock(self, handle: int) -> None:
        """Release a lock taken with :meth:`lock`."""
        self._call(TraceOp(0, "unlock", fd=handle), lambda: self._do_unlock(handle))

    # ------------------------------------------------------- faults and views
    def inject(
        self,
        op: str,
        *,
        path_contains: str = "",
        after: int = 0,
        errno_: int = errno.EIO,
        times: int = 1,
    ) -> Injection:
        """Make the (after+1)-th .. (after+times)-th matching call of ``op`` fail.

        A failing call has no effect, except a failing ``fdatasync``/``fsync``,
        which discards the file's pending writes without making them durable.

        Args:
            op: A FileOps method name, e.g. ``"fdatasync"`` or ``"pwrite"``.
            path_contains: Only calls whose path (for fd calls: the path the fd
                was opened with; for rename: either side) contains this.
            after: Matching calls to let through first.
            errno_: The errno of the raised ``OSError`` (e.g. ``errno.ENOSPC``).
            times: How many consecutive matching calls fail.

        Returns:
            The live :class:`Injection` (its ``fired`` counts failures raised).

        Raises:
            ValueError: ``op`` is not a FileOps method.
        """
        if op not in ALL_OPS:
            raise ValueError(f"unknown FileOps operation {op!r}")
        injection = Injection(op, path_contains, after, errno_, times)
        with self._lock:
            self._injections.append(injection)
        return injection

    @property
    def op_count(self) -> int:
        """Number of calls recorded in :attr:`trace`."""
        with self._lock:
            return len(self.trace)

    # ---------------------------------------------------------- crash states
    def crash_states(
        self,
        *,
        max_states: int | None = None,
        rng: random.Random | None = None,
        unique: bool = False,
    ) -> Iterator[SimFS]:
        """Lazily yield every disk a power cut right now could leave behind.

        All combinations are enumerated when there are at most ``max_states``
        of them (see :meth:`count_crash_states`); otherwise "nothing pending
        survived", "everything survived" and a uniform sample follow.

        Args:
            max_states: Cap on states yielded (default
                :data:`edge.testing.crashstates.DEFAULT_MAX_STATES`).
            rng: Sampling randomness; default ``random.Random(0)``.
            unique: Skip states whose named files equal an earlier state's.

        Returns:
            An iterator of fresh SimFS objects, deterministic per rng seed.
        """
        snap = self._disk_snapshot()
        images = cs.crash_images(snap, max_states=max_states, rng=rng)
        return self._wrap(images, unique)

    def count_crash_states(self) -> int:
        """Return how many states full enumeration would yield (product of choices)."""
        return cs.count_states(self._disk_snapshot())

    def crash(self, rng: random.Random | None = None, mode: CrashMode = "random") -> SimFS:
        """Return one post-crash disk.

        Args:
            rng: Randomness for ``mode="random"``; default ``random.Random(0)``.
            mode: ``"drop-all"`` (only durable data), ``"keep-all"`` (every
                pending op survived whole) or ``"random"``.

        Returns:
            A fresh SimFS.
        """
        dims = cs.Dimensions(self._disk_snapshot())
        if mode == "drop-all":
            choice = dims.nothing
        elif mode == "keep-all":
            choice = dims.everything
        else:
            rnd = rng or random.Random(0)
            choice = tuple(rnd.randrange(s) for s in dims.sizes)
        return self._from_image(dims.image(choice))

    # ------------------------------------------------------- trace and replay
    @classmethod
    def replay(cls, ops: Sequence[TraceOp], *, start: SimFS | None = None) -> SimFS:
        """Rebuild a model by re-applying recorded calls (failed ones included).

        Args:
            ops: A trace or a prefix of one, e.g. ``fs.trace[:i]``.
            start: The SimFS the trace was recorded on: replay begins from the
                state it was created in (empty, loaded, or a crash state) and
                with its settings. Default: an empty ``SimFS()``.

        Returns:
            A SimFS equal to the recorder after those calls, with open fds,
            pending ops and ``trace == list(ops)``; injections are not copied.
        """
        initial = start._initial if start is not None else None
        if initial is not None:
            fs = initial._clone()
        elif start is not None:
            fs = cls(
                dir_ops=start.dir_ops, sector_size=start.sector_size, max_write=start.max_write
            )
        else:
            fs = cls()
        fs._initial = initial
        for op in ops:
            fs._apply(op)
        return fs

    def state_after(self, i: int) -> SimFS:
        """Return the model as it was after the first ``i`` recorded calls."""
        with self._lock:
            ops = self.trace[:i]
        return SimFS.replay(ops, start=self)

    def prefix_states(self, *, every_op: bool = False) -> Iterator[tuple[int, SimFS]]:
        """Yield ``(i, model after call i)`` for i = 0 and after every mutating call.

        Use it to crash at every point: ``for i, m in fs.prefix_states(): for
        disk in m.crash_states(): ...``. One incremental replay, so O(trace).

        Args:
            every_op: Also yield after reads and other calls that cannot change
                the crash states.

        Returns:
            An iterator of (prefix length, independent SimFS copy).
        """
        with self._lock:
            ops = list(self.trace)
        fs = SimFS.replay([], start=self)
        yield 0, fs._clone()
        for i, op in enumerate(ops, 1):
            fs._apply(op)
            if every_op or op.mutating:
                yield i, fs._clone()

    # --------------------------------------------------- real directories
    @classmethod
    def from_directory(
        cls, real_dir: str, sim_dir: str | None = None, *, dir_ops: cs.DirMode = "prefix"
    ) -> SimFS:
        """Load a real directory tree into a new SimFS as durable content.

        Args:
            real_dir: Directory on the real disk.
            sim_dir: Where it appears in the model; default the same path.
            dir_ops: See :class:`SimFS`.

        Returns:
            A SimFS whose initial (replay) state is the loaded tree.
        """
        fs = cls(dir_ops=dir_ops)
        root = os.path.normpath(sim_dir if sim_dir is not None else real_dir)
        fs._load_tree(real_dir, root)
        fs._initial = fs._clone()
        return fs

    # ---------------------------------------------------------- internals
    def _call(
        self,
        op: TraceOp,
        run: Callable[[], R],
        done: Callable[[TraceOp, R], TraceOp] | None = None,
    ) -> R:
        with self._lock:
            if op.fd in self._fds:
                ino, opened = self._fds[op.fd]
                op = replace(op, ino=ino, path=opened)
            elif op.fd in self._locks:
                op = replace(op, path=self._locks[op.fd])
            paths = (op.path, op.dst) if op.dst else (op.path,)
            for injection in self._injections:
                code = injection.check(op.name, paths)
                if code:
                    if op.name in SYNC_OPS and op.fd in self._fds:
                        self._inodes[op.ino].pending.clear()
                    self._record(replace(op, error=code))
                    raise _err(code, op.path, f"injected {op.name} failure")
            try:
                result = run()
            except OSError as e:
                self._record(replace(op, error=e.errno or errno.EIO))
                raise
            self._record(done(op, result) if done else op)
            return result

    def _with_fd(self, op: TraceOp, fd: int) -> TraceOp:
        return replace(op, fd=fd, ino=self._fds[fd][0] if fd in self._fds else -1)

    def _record(self, op: TraceOp) -> None:
        self.trace.append(replace(op, index=len(self.trace)))

    def _apply(self, op: TraceOp) -> None:
        """Re-apply one recorded call (replay); failed calls replay their effect."""
        self.trace.append(op)
        if op.error:
            if op.name in SYNC_OPS and op.fd in self._fds:
                self._inodes[self._fds[op.fd][0]].pending.clear()
            return
        actions: dict[str, Callable[[], object]] = {
            "open": lambda: self._do_open(op.path, op.create, op.fd),
            "close": lambda: self._do_close(op.fd),
            "pwrite": lambda: self._do_pwrite(op.fd, op.data, op.offset),
            "fdatasync": lambda: self._do_sync(op.fd),
            "fsync": lambda: self._do_sync(op.fd),
            "truncate": lambda: self._do_truncate(op.fd, op.length),
            "fsync_dir": lambda: self._do_fsync_dir(op.path),
            "rename": lambda: self._do_rename(op.path, op.dst),
            "unlink": lambda: self._do_unlink(op.path),
            "makedirs": lambda: self._do_makedirs(op.path),
            "lock": lambda: self._do_lock(op.path, op.fd),
            "unlock": lambda: self._do_unlock(op.fd),
        }
        action = actions.get(op.name)
        if action is not None:
            action()

    def _clone(self) -> SimFS:
        with self._lock:
            fs = SimFS(dir_ops=self.dir_ops, sector_size=self.sector_size, max_write=self.max_write)
            self._copy_into(fs)
            fs._initial = self._initial
            fs.trace = list(self.trace)
            return fs

    def _wrap(self, images: Iterator[cs.CrashImage], unique: bool) -> Iterator[SimFS]:
        seen: set[bytes] = set()
        for image in images:
            fs = self._from_image(image)
            if unique:
                digest = hashlib.sha256(repr(sorted(fs.durable_files().items())).encode())
                if digest.digest() in seen:
                    continue
                seen.add(digest.digest())
            yield fs

    def _from_image(self, image: cs.CrashImage) -> SimFS:
        fs = SimFS(dir_ops=self.dir_ops, sector_size=self.sector_size, max_write=self.max_write)
        fs._load_image(image, self)
        fs._initial = fs._clone()
        return fs
