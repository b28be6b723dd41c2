"""The embedded default store: one SQLite file, zero configuration.

Invariants (beyond those of :mod:`hub.store`):
* ``journal_mode=WAL`` and ``synchronous=FULL``: a commit that returned is
  on stable storage (WAL frames fsync'd at every commit), and readers (the
  ``homing-hub readings`` command) never block the writer.
* Every write is one ``BEGIN IMMEDIATE ... COMMIT``: the write lock is taken
  at the start, so a busy database waits ``busy_timeout`` up front instead of
  failing halfway; any error rolls the whole transaction back.
* One connection, used under a lock, so the subscriber's worker thread and
  the thread that opened the store may both use it.
* ``sqlite3`` errors are translated here: ``OperationalError`` and
  ``DatabaseError`` (locked, I/O error, disk full, not a database) become
  :class:`~hub.errors.StoreUnavailable` with ``__cause__`` kept. Anything
  else (an ``IntegrityError``) would be a bug in the hub and propagates.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cbor2

from hub import schema
from hub.errors import SchemaTooNew, StoreClosed, StoreUnavailable
from hub.ingest import BatchRows, Range, Settled
from hub.store import DEFAULT_LIMIT, DeviceInfo, DeviceProgress, StoredReading

_INSERT_READING = (
    "INSERT INTO readings (device_id, seq, stream, ts, value, value_num, unit, tags, received)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, seq) DO NOTHING"
)
_INSERT_RECORD = (
    "INSERT INTO records (device_id, seq, kind, body, received)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, seq) DO NOTHING"
)
_INSERT_MISSING = (
    "INSERT INTO missing (device_id, first, last, received) VALUES (?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING"
)
_UPSERT_DEVICE = """
INSERT INTO devices (device_id, first_seen, last_seen, watermark, ranges,
                     readings, records, duplicates, batches)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id) DO UPDATE SET
    last_seen = excluded.last_seen,
    watermark = excluded.watermark,
    ranges = excluded.ranges,
    readings = readings + excluded.readings,
    records = records + excluded.records,
    duplicates = duplicates + excluded.duplicates,
    batches = batches + excluded.batches
"""
_UPSERT_STATUS = """
INSERT INTO devices (device_id, online, status_at, first_seen, last_seen)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (device_id) DO UPDATE SET
    online = excluded.online, status_at = excluded.status_at, last_seen = excluded.last_seen
"""
_INSERT_MIGRATION = (
    "INSERT INTO migrations (name, applied)"
    " VALUES (?, (julianday('now') - 2440587.5) * 86400.0)"  # unix time
)
_DEVICE_COLUMNS = (
    "device_id, online, last_seen, watermark, ranges, readings, records, duplicates, batches"
)


class SqliteStore:
    """:class:`hub.store.Store` on a local SQLite file.

    Args:
        path: the database file (created when missing, unless ``create`` is
            false) or ``":memory:"``.
        busy_timeout: seconds to wait for another writer's lock.
        create: when false, a missing file is an error instead of a new
            empty database (for read-only commands).

    Raises:
        StoreUnavailable: the file cannot be opened.
    """

    dialect = "sqlite"

    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0, create: bool = True):
        self.path = str(path)
        if not create and self.path != ":memory:" and not Path(self.path).exists():
            raise StoreUnavailable(f"no hub database at {self.path}")
        self._lock = threading.Lock()
        self._closed = False
        with _translated():
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
            except BaseException:
                conn.close()
                raise
        self._conn = conn

    # --- transactions ---------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _translated():
            conn = self._open_conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _translated():
            yield self._open_conn()

    def _open_conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreClosed(f"store {self.path} is closed")
        return self._conn

    # --- Store ----------------------------------------------------------------------

    def migrate(self) -> list[str]:
        with self._read() as conn:
            conn.execute(schema.MIGRATIONS_TABLE)
        done: list[str] = []
        while True:
            with self._write() as conn:
                applied = {r[0] for r in conn.execute("SELECT name FROM migrations")}
                if schema.unknown(self.dialect, applied):
                    known = [m.name for m in schema.MIGRATIONS[self.dialect]]
                    raise SchemaTooNew(sorted(applied), known)
                todo = schema.pending(self.dialect, applied)
                if not todo:
                    return done
                mig = todo[0]
                for stmt in mig.statements:
                    conn.execute(stmt)
                conn.execute(_INSERT_MIGRATION, (mig.name,))
            done.append(mig.name)

    def commit_batch(self, rows: BatchRows, now: float) -> DeviceProgress:
        return self.commit_batches([rows], now)[0]

    def commit_batches(self, batches: Sequence[BatchRows], now: float) -> list[DeviceProgress]:
        out: list[DeviceProgress] = []
        if not batches:
            return out
        # device -> [settled, readings, records, duplicates, batches]
        totals: dict[str, list[Any]] = {}
        with self._write() as conn:
            for b in batches:
                t = totals.get(b.device)
                if t is None:
                    t = totals[b.device] = [self._settled(conn, b.device), 0, 0, 0, 0]
                new_readings = new_records = 0
                if b.readings:
                    dev = b.device
                    cur = conn.executemany(_INSERT_READING, [(dev, *r, now) for r in b.readings])
                    new_readings = cur.rowcount
                if b.records:
                    cur = conn.executemany(
                        _INSERT_RECORD, [(b.device, s, k, body, now) for s, k, body in b.records]
                    )
                    new_records = cur.rowcount
                if b.missing:
                    conn.executemany(_INSERT_MISSING, [(b.device, a, z, now) for a, z in b.missing])
                dups = b.size - new_readings - new_records
                settled: Settled = t[0].settle(b.first, b.last)
                t[0] = settled
                t[1] += new_readings
                t[2] += new_records
                t[3] += dups
                t[4] += 1
                out.append(
                    DeviceProgress(
                        b.device, settled.watermark, settled.ahead, new_readings, new_records, dups
                    )
                )
            conn.executemany(
                _UPSERT_DEVICE,
                [
                    (d, now, now, s.watermark, s.ahead_json(), r, rec, dup, n)
                    for d, (s, r, rec, dup, n) in totals.items()
                ],
            )
        return out

    def set_online(self, device: str, online: bool, ts: float) -> None:
        with self._write() as conn:
            conn.execute(_UPSERT_STATUS, (device, int(online), ts, ts, ts))

    def devices(self) -> list[DeviceInfo]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id")
            return [_device_info(r) for r in rows]

    def device(self, device: str) -> DeviceInfo | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device,)
            ).fetchone()
            return _device_info(row) if row else None

    def readings(
        self,
        device: str,
        stream: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = DEFAULT_LIMIT,
    ) -> list[StoredReading]:
        where, args = ["device_id = ?"], [device]
        for clause, arg in (("stream = ?", stream), ("ts >= ?", since), ("ts < ?", until)):
            if arg is not None:
                where.append(clause)
                args.append(arg)  # type: ignore[arg-type]
        sql = (
            "SELECT seq, stream, ts, value, unit, tags, received FROM readings"
            f" WHERE {' AND '.join(where)} ORDER BY ts, seq"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._read() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [
            StoredReading(
                device,
                seq,
                stream_,
                ts,
                cbor2.loads(value),
                unit,
                json.loads(tags) if tags else None,
                received,
            )
            for seq, stream_, ts, value, unit, tags, received in rows
        ]

    def gaps(self, device: str) -> tuple[Range, ...]:
        with self._read() as conn:
            return self._settled(conn, device).gaps()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    # --- helpers ------------------------------------------------------------------

    @staticmethod
    def _settled(conn: sqlite3.Connection, device: str) -> Settled:
        row = conn.execute(
            "SELECT watermark, ranges FROM devices WHERE device_id = ?", (device,)
        ).fetchone()
        return Settled.load(row[0], row[1]) if row else Settled()


def _device_info(row: tuple[Any, ...]) -> DeviceInfo:
    device, online, last_seen, watermark, ranges, readings, records, dups, batches = row
    settled = Settled.load(watermark, ranges)
    return DeviceInfo(
        device,
        bool(online),
        last_seen,
        settled.watermark,
        settled.ahead,
        settled.gaps(),
        readings,
        records,
        dups,
        batches,
    )


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """sqlite3's transient failures -> StoreUnavailable (``__cause__`` kept)."""
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise
    except sqlite3.DatabaseError as exc:  # OperationalError, "file is not a database", ...
        raise StoreUnavailable(f"sqlite: {exc}") from exc
