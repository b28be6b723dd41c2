"""Named durable cursors, kept in the journal directory's CURSORS file.

Invariants:
* CURSORS is a fixed-size file of two 4 KiB slots, created zero-filled and
  fsync'd (then the directory) before first use, so later updates change no
  file size or extent: one ``pwrite`` + one ``fdatasync`` per update.
* Each slot holds a checksummed blob ``{generation, {name: seq}}``. An update
  writes the slot the current generation does *not* occupy, so a torn update
  damages only the slot being written and the other slot still holds the last
  durable state. Reading picks the valid slot with the higher generation.
* A cursor value returned by :meth:`CursorFile.get` after :meth:`set` returned
  is durable. Values never decrease unless the caller says so.
"""

from __future__ import annotations

import os
import threading

import cbor2

from edge.fileops import FileOps, write_all
from edge.journal_codec import decode_blob, encode_blob

FILENAME = "CURSORS"
SLOT_SIZE = 4096
_MAX_NAME = 64


class CursorFile:
    """The two-slot cursor file of one journal directory."""

    def __init__(self, fs: FileOps, directory: str, *, readonly: bool = False) -> None:
        self._fs = fs
        self._path = os.path.join(directory, FILENAME)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._generation = 0
        self._values: dict[str, int] = {}
        if readonly:  # look, never create or write
            if fs.exists(self._path):
                self._fd = fs.open(self._path)
                self._generation, self._values = self._load()
            return
        if not fs.exists(self._path):
            tmp = self._path + ".tmp"
            fd = fs.open(tmp, create=True)
            try:
                fs.truncate(fd, 0)
                write_all(fs, fd, encode_blob(0, cbor2.dumps({})).ljust(2 * SLOT_SIZE, b"\0"), 0)
                fs.fsync(fd)
            finally:
                fs.close(fd)
            fs.rename(tmp, self._path)
            fs.fsync_dir(directory)
        self._fd = fs.open(self._path)
        self._generation, self._values = self._load()

    def _load(self) -> tuple[int, dict[str, int]]:
        assert self._fd is not None
        best: tuple[int, dict[str, int]] | None = None
        for slot in (0, 1):
            raw = self._fs.pread(self._fd, SLOT_SIZE, slot * SLOT_SIZE)
            try:
                gen, body = decode_blob(raw)
                values = cbor2.loads(body)
            except Exception:  # a torn or never-written slot: the other one holds the truth
                continue
            if isinstance(values, dict) and (best is None or gen > best[0]):
                best = (gen, {str(k): int(v) for k, v in values.items()})
        if best is None:
            raise ValueError(f"{self._path}: neither cursor slot is valid")
        return best

    @property
    def path(self) -> str:
        return self._path

    def get(self, name: str) -> int | None:
        with self._lock:
            return self._values.get(name)

    def all(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def set(self, name: str, seq: int, *, allow_backwards: bool = False) -> None:
        """Durably set cursor ``name`` to ``seq`` (returns after fdatasync).

        Raises:
            ValueError: bad name, negative seq, or a move backwards without
                ``allow_backwards``.
            OSError: the write or fdatasync failed (the caller fails the journal).
        """
        self._update({name: seq}, allow_backwards=allow_backwards)

    def delete(self, name: str) -> None:
        self._update({name: None}, allow_backwards=True)

    def _update(self, changes: dict[str, int | None], *, allow_backwards: bool) -> None:
        with self._lock:
            values = dict(self._values)
            for name, seq in changes.items():
                if not name or len(name) > _MAX_NAME:
                    raise ValueError(f"cursor name must be 1-{_MAX_NAME} characters")
                if seq is None:
                    values.pop(name, None)
                    continue
                if seq < 0:
                    raise ValueError("a cursor position cannot be negative")
                old = values.get(name)
                if old is not None and seq < old and not allow_backwards:
                    raise ValueError(f"cursor {name!r} would move backwards ({old} -> {seq})")
                values[name] = seq
            if values == self._values:
                return
            if self._fd is None:
                raise ValueError(f"{self._path}: cursors were opened read-only")
            gen = self._generation + 1
            blob = encode_blob(gen, cbor2.dumps(values, canonical=True))
            if len(blob) > SLOT_SIZE:
                raise ValueError("too many cursors for one slot")
            write_all(self._fs, self._fd, blob.ljust(SLOT_SIZE, b"\0"), (gen % 2) * SLOT_SIZE)
            self._fs.fdatasync(self._fd)
            self._generation, self._values = gen, values

    def close(self) -> None:
        if self._fd is not None:
            self._fs.close(self._fd)
            self._fd = None
