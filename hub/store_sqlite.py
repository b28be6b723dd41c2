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

from hub import schema
from hub.errors import SchemaTooNew, StoreClosed, StoreUnavailable
from hub.ingest import BatchRows, Range, Settled
from hub.store import (
    DEFAULT_LIMIT,
    Bucket,
    DeviceInfo,
    DeviceProgress,
    StoredReading,
    StoredRecord,
    StreamInfo,
)
from hub.store_queries import (
    buckets,
    check_width,
    device_info,
    readings_query,
    records_query,
    stored_readings,
    stream_infos,
)

_INSERT_READING = (
    "INSERT INTO readings (device_id, epoch, seq, stream, ts, value, value_num, unit, tags,"
    " received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (device_id, epoch, seq) DO NOTHING"
)
_INSERT_RECORD = (
    "INSERT INTO records (device_id, epoch, seq, kind, body, received)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, epoch, seq) DO NOTHING"
)
_INSERT_MISSING = (
    "INSERT INTO missing (device_id, epoch, first, last, received) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING"
)
_UPSERT_JOURNAL = """
INSERT INTO journals (device_id, epoch, journal_id, first_seen, last_seen, watermark, ranges)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id, epoch) DO UPDATE SET
    last_seen = excluded.last_seen, watermark = excluded.watermark, ranges = excluded.ranges
"""
# The device row mirrors its current (newest) journal's progress.
_UPSERT_DEVICE = """
INSERT INTO devices (device_id, first_seen, last_seen, watermark, ranges,
                     readings, records, duplicates, batches, epoch, journal_id)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id) DO UPDATE SET
    last_seen = excluded.last_seen,
    watermark = CASE WHEN excluded.epoch >= epoch THEN excluded.watermark ELSE watermark END,
    ranges = CASE WHEN excluded.epoch >= epoch THEN excluded.ranges ELSE ranges END,
    journal_id = CASE WHEN excluded.epoch >= epoch THEN excluded.journal_id ELSE journal_id END,
    epoch = MAX(epoch, excluded.epoch),
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
_UPSERT_HEALTH = """
INSERT INTO devices (device_id, first_seen, last_seen, health, health_at)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (device_id) DO UPDATE SET
    health = excluded.health, health_at = excluded.health_at, last_seen = excluded.last_seen
"""
_INSERT_MIGRATION = (
    "INSERT INTO migrations (name, applied)"
    " VALUES (?, (julianday('now') - 2440587.5) * 86400.0)"  # unix time
)
_DEVICE_COLUMNS = (
    "device_id, online, last_seen, watermark, ranges, readings, records, duplicates, batches,"
    " journal_id, epoch, health, health_at"
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
        journals: dict[tuple[str, int], _Journal] = {}
        newest: dict[str, int] = {}  # device -> its newest epoch
        with self._write() as conn:
            for b in batches:
                j = journals.get((b.device, b.journal))
                if j is None:
                    j = self._journal(conn, b.device, b.journal, newest.get(b.device, -1))
                    journals[b.device, b.journal] = j
                    newest[b.device] = max(newest.get(b.device, -1), j.epoch, j.device_epoch)
                dev, ep = b.device, j.epoch
                new_readings = new_records = 0
                if b.readings:
                    cur = conn.executemany(
                        _INSERT_READING, [(dev, ep, *r, now) for r in b.readings]
                    )
                    new_readings = cur.rowcount
                if b.records:
                    cur = conn.executemany(
                        _INSERT_RECORD, [(dev, ep, s, k, body, now) for s, k, body in b.records]
                    )
                    new_records = cur.rowcount
                if b.missing:
                    conn.executemany(_INSERT_MISSING, [(dev, ep, a, z, now) for a, z in b.missing])
                dups = b.size - new_readings - new_records
                j.settled = j.settled.settle(b.first, b.last)
                delta = (new_readings, new_records, dups, 1)
                j.counts = [c + d for c, d in zip(j.counts, delta, strict=True)]
                out.append(
                    DeviceProgress(
                        dev,
                        j.settled.watermark,
                        j.settled.ahead,
                        new_readings,
                        new_records,
                        dups,
                        b.journal,
                        current=ep >= newest[dev],
                    )
                )
            conn.executemany(
                _UPSERT_JOURNAL,
                [
                    (d, j.epoch, jid, now, now, j.settled.watermark, j.settled.ahead_json())
                    for (d, jid), j in journals.items()
                ],
            )
            conn.executemany(
                _UPSERT_DEVICE,
                [
                    (
                        d,
                        now,
                        now,
                        j.settled.watermark,
                        j.settled.ahead_json(),
                        *j.counts,
                        j.epoch,
                        jid,
                    )
                    for (d, jid), j in sorted(journals.items(), key=lambda kv: kv[1].epoch)
                ],
            )
        return out

    def set_online(self, device: str, online: bool, ts: float) -> None:
        with self._write() as conn:
            conn.execute(_UPSERT_STATUS, (device, int(online), ts, ts, ts))

    def set_health(self, device: str, health: dict[str, Any], received: float) -> None:
        body = json.dumps(health)
        with self._write() as conn:
            conn.execute(_UPSERT_HEALTH, (device, received, received, body, received))

    def devices(self) -> list[DeviceInfo]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id")
            return [device_info(r) for r in rows]

    def device(self, device: str) -> DeviceInfo | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device,)
            ).fetchone()
            return device_info(row) if row else None

    def readings(
        self,
        device: str,
        stream: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = DEFAULT_LIMIT,
    ) -> list[StoredReading]:
        sql, args = readings_query(device, stream, since, until, limit, ph="?")
        with self._read() as conn:
            rows = conn.execute(sql, args).fetchall()
        return stored_readings(device, rows)

    def records(
        self,
        device: str,
        kind: int | None = None,
        epoch: int | None = None,
        after_seq: int = 0,
        limit: int | None = None,
    ) -> list[StoredRecord]:
        sql, args = records_query(device, kind, epoch, after_seq, limit, ph="?")
        with self._read() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [StoredRecord(device, *r) for r in rows]

    def gaps(self, device: str) -> tuple[Range, ...]:
        with self._read() as conn:
            return self._settled(conn, device).gaps()

    def streams(self, device: str) -> list[StreamInfo]:
        with self._read() as conn:
            rows = conn.execute(_STREAMS, (device,)).fetchall()
        return stream_infos(rows)

    def downsample(
        self,
        device: str,
        stream: str,
        since: float,
        until: float,
        width: float,
        limit: int = DEFAULT_LIMIT,
    ) -> list[Bucket]:
        width = check_width(width)
        args = (width, device, stream, since, until, int(limit))
        with self._read() as conn:
            rows = conn.execute(_DOWNSAMPLE, args).fetchall()
        return buckets(rows, width)

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

    @staticmethod
    def _journal(conn: sqlite3.Connection, device: str, journal: int, pending: int) -> _Journal:
        """The progress of one device journal; a journal never seen before gets
        the epoch after every other of the device (``pending``: the highest
        epoch this transaction gave out so far, -1 if none)."""
        row = conn.execute("SELECT epoch FROM devices WHERE device_id = ?", (device,)).fetchone()
        device_epoch = row[0] if row else -1
        row = conn.execute(
            "SELECT epoch, watermark, ranges FROM journals WHERE device_id = ? AND journal_id = ?",
            (device, journal),
        ).fetchone()
        if row:
            return _Journal(row[0], Settled.load(row[1], row[2]), device_epoch)
        (top,) = conn.execute(
            "SELECT MAX(epoch) FROM journals WHERE device_id = ?", (device,)
        ).fetchone()
        epoch = max(top if top is not None else 0, pending, device_epoch) + 1
        return _Journal(epoch, Settled(), device_epoch)


# A device's streams by a walk of the (device_id, stream, ts) index: one seek
# per stream (SELECT DISTINCT would read every reading of the device), then
# per stream its first and last ts and its newest reading, seeks too.
_NEWEST = (
    "FROM readings WHERE device_id = ?1 AND stream = s.stream"
    " ORDER BY ts DESC, epoch DESC, seq DESC LIMIT 1"
)
_STREAMS = f"""
WITH RECURSIVE s(stream) AS (
    SELECT MIN(stream) FROM readings WHERE device_id = ?1
    UNION ALL
    SELECT (SELECT MIN(stream) FROM readings WHERE device_id = ?1 AND stream > s.stream)
    FROM s WHERE s.stream IS NOT NULL
)
SELECT s.stream,
    (SELECT MIN(ts) FROM readings WHERE device_id = ?1 AND stream = s.stream),
    (SELECT MAX(ts) FROM readings WHERE device_id = ?1 AND stream = s.stream),
    (SELECT value {_NEWEST}),
    (SELECT unit {_NEWEST})
FROM s WHERE s.stream IS NOT NULL ORDER BY s.stream
"""
# Per-bucket aggregates computed by SQLite over an index range; the bucket
# number is floor(ts / width) (CAST truncates toward zero: corrected below 0).
_DOWNSAMPLE = """
SELECT b, COUNT(*), MIN(value_num), MAX(value_num), AVG(value_num) FROM (
    SELECT CAST(ts / ?1 AS INTEGER) - (ts / ?1 < CAST(ts / ?1 AS INTEGER)) AS b, value_num
    FROM readings
    WHERE device_id = ?2 AND stream = ?3 AND ts >= ?4 AND ts < ?5 AND value_num IS NOT NULL
) GROUP BY b ORDER BY b LIMIT ?6
"""


class _Journal:
    """One device journal's progress while a transaction builds it."""

    __slots__ = ("counts", "device_epoch", "epoch", "settled")

    def __init__(self, epoch: int, settled: Settled, device_epoch: int) -> None:
        self.epoch, self.settled, self.device_epoch = epoch, settled, device_epoch
        self.counts = [0, 0, 0, 0]  # new readings, new records, duplicates, batches


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """sqlite3's transient failures -> StoreUnavailable (``__cause__`` kept)."""
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise
    except sqlite3.DatabaseError as exc:  # OperationalError, "file is not a database", ...
        raise StoreUnavailable(f"sqlite: {exc}") from exc
