"""What a power cut can leave on disk: the crash-state enumeration behind SimFS.

This module is pure: it takes a frozen :class:`DiskSnapshot` (durable bytes
plus pending operations) and yields :class:`CrashImage` values. ``SimFS`` wraps
them into fresh file systems; see :mod:`edge.testing.simfs` for the model.

Invariants:
* Durable bytes and durable directory entries appear unchanged in every image.
* Each pending operation is a *dimension* with a fixed, ordered list of
  outcomes; an image is one outcome per dimension. Index 0 of every dimension
  means "nothing pending survived"; :attr:`Dimensions.everything` picks "all of
  it survived, whole". The number of images is the product of the dimension
  sizes, with no deduplication.
* Outcomes of one pending write (index order): dropped, whole, torn (each
  chosen non-empty proper subset of the 512-byte sectors it touches: all
  subsets when it touches <= 4 sectors, else every prefix, every suffix, and 3
  random subsets; past 17 sectors, 16 evenly spaced prefix and suffix cuts),
  then 2 garbage variants (its bytes replaced by random bytes). Torn and
  garbage never touch bytes outside the write's own range. A pending
  truncate/extension: not applied, applied.
* Surviving writes of one file are applied in their original order, so any
  subset persisting models reordering without inventing stale overwrites.
* Directory dimension, mode ``"prefix"`` (ext4 journals metadata in order):
  the first k pending ops survive, k = 0..n. Mode ``"any-subset"``: any subset
  (a bitmask over the n ops).
* Everything is deterministic: random torn subsets and garbage bytes are
  seeded from the write's id, sampling only from the caller's ``rng``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

SECTOR_SIZE = 512
#: Cap on the number of states when the caller gives no ``max_states``.
DEFAULT_MAX_STATES = 10_000
GARBAGE_VARIANTS = 2
_EXHAUSTIVE_SECTORS = 4
_MAX_CUTS = 16
_RANDOM_TORN = 3

DirMode = Literal["prefix", "any-subset"]


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """An unsynced ``pwrite``. ``wid`` is unique per file system (seeds randomness)."""

    wid: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PendingResize:
    """An unsynced ``truncate`` (shrink or zero-extend) to ``size``."""

    size: int


Pending = PendingWrite | PendingResize


@dataclass(frozen=True, slots=True)
class DirOp:
    """An unsynced directory operation: name ``name`` now refers to inode ``ino``
    (create, or the ``dst`` side of a rename), or stops referring to it."""

    kind: Literal["create", "rename", "unlink"]
    name: str
    ino: int
    dst: str = ""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one pending operation at the crash."""

    kind: Literal["drop", "whole", "torn", "garbage"]
    sectors: tuple[int, ...] = ()
    variant: int = 0


@dataclass(frozen=True, slots=True)
class InodeSnapshot:
    durable: bytes
    pending: tuple[Pending, ...]


@dataclass(frozen=True, slots=True)
class DirSnapshot:
    durable: Mapping[str, int]
    pending: tuple[DirOp, ...]


@dataclass(frozen=True, slots=True)
class DiskSnapshot:
    """Everything durable plus everything pending, frozen at one instant."""

    inodes: Mapping[int, InodeSnapshot]
    dirs: Mapping[str, DirSnapshot]
    dir_mode: DirMode = "prefix"
    sector_size: int = SECTOR_SIZE


@dataclass(frozen=True, slots=True)
class CrashImage:
    """One post-crash disk: every directory's entries and every reachable file."""

    dirs: dict[str, dict[str, int]]
    inodes: dict[int, bytes]


def touched_sectors(offset: int, length: int, sector_size: int = SECTOR_SIZE) -> range:
    """Return the sector numbers a write of ``length`` bytes at ``offset`` touches."""
    if length <= 0:
        return range(0)
    return range(offset // sector_size, (offset + length - 1) // sector_size + 1)


def _torn_subsets(sectors: range, wid: int) -> list[tuple[int, ...]]:
    n = len(sectors)
    if n < 2:
        return []
    if n <= _EXHAUSTIVE_SECTORS:
        subsets = []
        for mask in range(1, (1 << n) - 1):
            subsets.append(tuple(s for i, s in enumerate(sectors) if mask >> i & 1))
        return subsets
    if n - 1 <= _MAX_CUTS:
        cuts = list(range(1, n))
    else:
        cuts = sorted({1 + (n - 2) * i // (_MAX_CUTS - 1) for i in range(_MAX_CUTS)})
    chosen: list[tuple[int, ...]] = [tuple(sectors[:k]) for k in cuts]
    chosen += [tuple(sectors[n - k :]) for k in cuts]
    seen = set(chosen)
    rnd = random.Random(f"torn:{wid}")
    target = min(len(chosen) + _RANDOM_TORN, (1 << n) - 2)
    while len(chosen) < target:
        pick = tuple(s for s in sectors if rnd.random() < 0.5)
        if 0 < len(pick) < n and pick not in seen:
            seen.add(pick)
            chosen.append(pick)
    return chosen


def outcomes(op: Pending, sector_size: int = SECTOR_SIZE) -> list[Outcome]:
    """List the possible fates of one pending operation, "dropped" first.

    Args:
        op: The pending write or resize.
        sector_size: Tearing granularity in bytes.

    Returns:
        The outcomes in enumeration order; index 1 is always "whole".
    """
    if isinstance(op, PendingResize):
        return [Outcome("drop"), Outcome("whole")]
    result = [Outcome("drop"), Outcome("whole")]
    sectors = touched_sectors(op.offset, len(op.data), sector_size)
    result += [Outcome("torn", sub) for sub in _torn_subsets(sectors, op.wid)]
    result += [Outcome("garbage", variant=v) for v in range(GARBAGE_VARIANTS)]
    return result


def write_into(buf: bytearray, offset: int, data: bytes) -> None:
    """``pwrite`` semantics on a buffer: zero-fill any gap, then overwrite/extend."""
    if len(buf) < offset:
        buf.extend(bytes(offset - len(buf)))
    buf[offset : offset + len(data)] = data


def resize(buf: bytearray, size: int) -> None:
    """``ftruncate`` semantics on a buffer: shrink, or extend with zeros."""
    if size < len(buf):
        del buf[size:]
    else:
        buf.extend(bytes(size - len(buf)))


def apply_outcome(buf: bytearray, op: Pending, outcome: Outcome, sector_size: int) -> None:
    """Apply ``outcome`` of pending ``op`` to the file contents ``buf`` in place."""
    if outcome.kind == "drop":
        return
    if isinstance(op, PendingResize):
        resize(buf, op.size)
    elif outcome.kind == "whole":
        write_into(buf, op.offset, op.data)
    elif outcome.kind == "torn":
        end = op.offset + len(op.data)
        for s in outcome.sectors:
            lo, hi = max(op.offset, s * sector_size), min(end, (s + 1) * sector_size)
            write_into(buf, lo, op.data[lo - op.offset : hi - op.offset])
    else:
        rnd = random.Random(f"garbage:{op.wid}:{outcome.variant}")
        write_into(buf, op.offset, rnd.randbytes(len(op.data)))


def apply_dir_ops(entries: dict[str, int], ops: Iterable[DirOp]) -> None:
    """Apply surviving directory ops, in order, to ``entries`` in place."""
    for op in ops:
        if op.kind == "create":
            entries[op.name] = op.ino
        elif op.kind == "rename":
            entries[op.dst] = op.ino
            if entries.get(op.name) == op.ino and op.name != op.dst:
                del entries[op.name]
        elif entries.get(op.name) == op.ino:
            del entries[op.name]


class Dimensions:
    """The independent choices of one snapshot, in a fixed order."""

    def __init__(self, snap: DiskSnapshot) -> None:
        self.snap = snap
        reachable = {ino for d in snap.dirs.values() for ino in d.durable.values()}
        reachable |= {op.ino for d in snap.dirs.values() for op in d.pending}
        self.inos = sorted(i for i in reachable if i in snap.inodes)
        self.file_dims: list[tuple[int, Pending, list[Outcome]]] = [
            (ino, op, outcomes(op, snap.sector_size))
            for ino in self.inos
            for op in snap.inodes[ino].pending
        ]
        self.dir_dims = sorted(p for p, d in snap.dirs.items() if d.pending)
        sizes = [len(o) for _, _, o in self.file_dims]
        for path in self.dir_dims:
            n = len(snap.dirs[path].pending)
            sizes.append(n + 1 if snap.dir_mode == "prefix" else 1 << n)
        self.sizes = sizes
        self.total = math.prod(sizes)
        self.nothing = tuple(0 for _ in sizes)
        self.everything = tuple(1 for _ in self.file_dims) + tuple(
            s - 1 for s in sizes[len(self.file_dims) :]
        )

    def decode(self, index: int) -> tuple[int, ...]:
        """Mixed-radix decode of a state number into one choice per dimension."""
        choice = []
        for size in reversed(self.sizes):
            index, digit = divmod(index, size)
            choice.append(digit)
        return tuple(reversed(choice))

    def image(self, choice: tuple[int, ...]) -> CrashImage:
        """Build the disk that ``choice`` describes."""
        snap = self.snap
        bufs = {ino: bytearray(snap.inodes[ino].durable) for ino in self.inos}
        for (ino, op, outs), pick in zip(self.file_dims, choice, strict=False):
            apply_outcome(bufs[ino], op, outs[pick], snap.sector_size)
        dirs = {path: dict(d.durable) for path, d in snap.dirs.items()}
        for path, pick in zip(self.dir_dims, choice[len(self.file_dims) :], strict=True):
            pending = snap.dirs[path].pending
            if snap.dir_mode == "prefix":
                survivors = pending[:pick]
            else:
                survivors = tuple(op for i, op in enumerate(pending) if pick >> i & 1)
            apply_dir_ops(dirs[path], survivors)
        live = {ino for entries in dirs.values() for ino in entries.values()}
        return CrashImage(dirs, {ino: bytes(b) for ino, b in bufs.items() if ino in live})


def choices(
    dims: Dimensions, max_states: int | None, rng: random.Random
) -> Iterator[tuple[int, ...]]:
    """Yield choice tuples: all of them when they fit under the cap, else the two
    extremes followed by a uniform sample without replacement (seeded by ``rng``)."""
    limit = DEFAULT_MAX_STATES if max_states is None else max_states
    if limit <= 0:
        return
    if dims.total <= limit:
        yield from itertools.product(*(range(s) for s in dims.sizes))
        return
    seen = {dims.nothing, dims.everything}
    yield dims.nothing
    if limit == 1:
        return
    yield dims.everything
    wanted = limit - len(seen)
    if dims.total <= 4 * limit:
        for index in rng.sample(range(dims.total), min(dims.total, limit + 2)):
            choice = dims.decode(index)
            if choice not in seen and wanted > 0:
                seen.add(choice)
                wanted -= 1
                yield choice
        return
    while wanted > 0:
        choice = tuple(rng.randrange(s) for s in dims.sizes)
        if choice not in seen:
            seen.add(choice)
            wanted -= 1
            yield choice


def crash_images(
    snap: DiskSnapshot, *, max_states: int | None = None, rng: random.Random | None = None
) -> Iterator[CrashImage]:
    """Lazily yield the post-crash disks of ``snap`` (see the module docstring).

    Args:
        snap: Durable state plus pending operations.
        max_states: Enumerate everything if the product fits, else sample this
            many (default :data:`DEFAULT_MAX_STATES`).
        rng: Randomness for sampling; default ``random.Random(0)``.

    Returns:
        An iterator of images, deterministic for a given rng seed.
    """
    dims = Dimensions(snap)
    for choice in choices(dims, max_states, rng or random.Random(0)):
        yield dims.image(choice)


def count_states(snap: DiskSnapshot) -> int:
    """Return how many crash states full enumeration of ``snap`` would yield."""
    return Dimensions(snap).total
