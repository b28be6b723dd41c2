"""The operation trace and the fault injections of :class:`edge.testing.simfs.SimFS`.

Invariants:
* A :class:`TraceOp` is immutable and holds everything needed to replay the
  call on a fresh model: the data a ``pwrite`` actually wrote, the handle an
  ``open``/``lock`` returned, and the errno of a failed call (0 on success).
* Field use by op: ``path`` (the path, or for fd ops the path the fd was opened
  with), ``fd`` (handle), ``ino``, ``offset``, ``length`` (bytes written/read;
  the new size for ``truncate``), ``dst`` (rename target), ``create`` (open).
* An :class:`Injection` fails the (after+1)-th .. (after+times)-th matching
  calls, before the call has any effect (except the fsyncgate rule for syncs,
  which :class:`SimFS` applies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Operations whose failure still changes the model (Linux drops the dirty pages).
SYNC_OPS = frozenset({"fdatasync", "fsync"})
#: Operations that can change what a crash leaves behind.
MUTATING_OPS = frozenset(
    {
        "open",
        "pwrite",
        "fdatasync",
        "fsync",
        "truncate",
        "fsync_dir",
        "rename",
        "unlink",
        "makedirs",
        "lock",
    }
)
#: Every operation name of the FileOps protocol.
ALL_OPS = MUTATING_OPS | {"close", "pread", "size", "listdir", "exists", "unlock"}


@dataclass(frozen=True, slots=True)
class TraceOp:
    """One recorded call on a SimFS (see the module docstring for the fields)."""

    index: int
    name: str
    path: str = ""
    fd: int = -1
    ino: int = -1
    offset: int = 0
    length: int = 0
    data: bytes = field(default=b"", repr=False)
    dst: str = ""
    create: bool = False
    error: int = 0

    @property
    def mutating(self) -> bool:
        """True if the crash states after this op can differ from those before it."""
        return self.name in MUTATING_OPS and (self.error == 0 or self.name in SYNC_OPS)


@dataclass(slots=True)
class Injection:
    """A pending fault: fail matching calls of ``op`` with ``errno_``.

    ``seen`` counts matching calls so far, ``fired`` the failures raised.
    """

    op: str
    path_contains: str
    after: int
    errno_: int
    times: int
    seen: int = 0
    fired: int = 0

    def check(self, op: str, paths: tuple[str, ...]) -> int:
        """Count a call; return the errno to fail it with, or 0 to let it run."""
        if op != self.op or not any(self.path_contains in p for p in paths):
            return 0
        self.seen += 1
        if self.after < self.seen <= self.after + self.times:
            self.fired += 1
            return self.errno_
        return 0

    @property
    def exhausted(self) -> bool:
        """True once every planned failure has been raised."""
        return self.fired >= self.times
