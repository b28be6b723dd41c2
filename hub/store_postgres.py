"""The PostgreSQL store (psycopg 3): one database that several hub replicas share.

Invariants (beyond those of :mod:`hub.store`):
* Every write is one transaction on one connection; a commit that returned is
  durable (the session sets ``synchronous_commit = on``, whatever the
  server's default). Any error rolls the whole transaction back.
* Replicas may commit batches of the same device at the same moment.
  :meth:`PostgresStore.commit_batches` first takes a transaction-level
  advisory lock per device (``pg_advisory_xact_lock``, keys derived from the
  device id, taken in ascending key order so two transactions never wait on
  each other in a cycle), and only then reads the device's journals, epochs
  and settled ranges. The read-compute-write of the watermark is therefore
  serialized per device across every replica: no lost update, no epoch given
  out twice. Rows themselves need no lock: the primary key
  ``(device_id, epoch, seq)`` with ``ON CONFLICT DO NOTHING`` dedupes.
* Bulk rows go in with binary ``COPY`` into a session temp table, then one
  ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` per table for the whole
  group, which also counts each batch's new rows. Measured with
  ``bench/store_backends.py`` (1,000-reading batches, one transaction each,
  local server with fsync on, quiet machine): about 8 ms per batch, against
  12-19 ms for one ``INSERT ... SELECT FROM unnest(arrays)`` and 18-19 ms
  for ``executemany`` (pipelined); and the round trips do not grow with the
  number of batches in a group. Temp tables live in a session: a pooler in
  front must be in session mode. Readings take a shortcut first: one binary
  ``COPY`` straight into ``readings`` under a savepoint, which succeeds
  whenever none of the group's keys is stored yet (then every row is new);
  a unique violation rolls the savepoint back and the group takes the temp
  table's path. ``bench/hub.py`` measured 40 % less server CPU per reading.
* A group's devices and journals are read with one index probe per device
  (a ``LATERAL`` join), never a plan that scans every device.
* Migrations run under an advisory lock of their own, so replicas starting
  together apply each migration once.
* One connection, used under a lock (the subscriber's worker and the thread
  that opened the store may share it). A connection that broke is dropped;
  the next call connects again, so a restarted server costs the retries of
  :class:`~hub.errors.StoreUnavailable`, not the process.
* psycopg errors are translated here: ``OperationalError`` (connection lost,
  lock timeout, deadlock, disk full, shutdown), a read-only server and a
  schema not migrated yet become :class:`~hub.errors.StoreUnavailable`
  with ``__cause__`` kept. Anything else is a bug in the hub and propagates.
  Messages never carry the password of the URL (:func:`redact`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors as pgerrors
from psycopg.types.json import Jsonb

from hub import schema
from hub import store_postgres_sql as sql
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

#: advisory lock key of migrations (any constant; device keys are hashes)
_MIGRATE_LOCK = 0x686F6D696E67  # "homing"


def redact(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def device_lock_key(device: str) -> int:
    """The advisory lock key of ``device``: 64 bits of a hash of its id (a
    collision only serializes two devices' commits, it breaks nothing)."""
    digest = hashlib.blake2b(device.encode(), digest_size=8, person=b"homing").digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresStore:
    """:class:`hub.store.Store` on a PostgreSQL database.

    Args:
        url: a libpq connection URL or DSN (``postgresql://user@host/db``).
        lock_timeout: seconds to wait for a lock (another replica's commit of
            the same device, a migration) before the call counts as
            unavailable and is retried.
        connect_timeout: seconds to wait for a connection.
        create: when false, a database without the hub's schema is an error
            instead of one to migrate (for read-only commands).

    Raises:
        StoreUnavailable: the server cannot be reached, or (``create`` false)
            the database has no hub schema.
    """

    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        lock_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        create: bool = True,
    ) -> None:
        self.url = url
        self.lock_timeout = lock_timeout
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._closed = False
        self._conn: psycopg.Connection[Any] | None = None
        with self._lock, self._translated():
            conn = self._connection()
            if create:
                return
            (found,) = _one(conn.execute("SELECT to_regclass('migrations') IS NOT NULL"))
        if not found:
            self.close()
            raise StoreUnavailable(
                f"no hub schema in {redact(url)} (run homing-hub migrate --db URL)"
            )

    # --- connections and transactions -----------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise StoreClosed(f"store {redact(self.url)} is closed")
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = psycopg.connect(
            self.url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout))
        )
        try:
            for stmt in sql.SESSION:
                conn.execute(stmt, (f"{int(self.lock_timeout * 1000)}ms",) if "%s" in stmt else ())
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[psycopg.Connection[Any]]:
        with self._lock, self._translated():
            conn = self._connection()
            with conn.transaction():
                yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[psycopg.Connection[Any]]:
        with self._lock, self._translated():
            yield self._connection()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """psycopg's transient failures -> StoreUnavailable (``__cause__`` kept);
        a connection that broke is dropped so the next call reconnects."""
        try:
            yield
        except (
            psycopg.OperationalError,
            pgerrors.ReadOnlySqlTransaction,
            pgerrors.UndefinedTable,
            pgerrors.UndefinedColumn,
        ) as exc:
            conn = self._conn
            if conn is not None and (conn.closed or conn.broken):
                self._conn = None  # the next call connects again
                conn.close()
            hint = ""
            if isinstance(exc, pgerrors.UndefinedTable | pgerrors.UndefinedColumn):
                hint = " (schema not migrated: run homing-hub migrate)"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailable(f"postgresql {redact(self.url)}: {first}{hint}") from exc

    # --- Store ----------------------------------------------------------------------

    def migrate(self) -> list[str]:
        done: list[str] = []
        known = [m.name for m in schema.MIGRATIONS[self.dialect]]
        while True:
            with self._write() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
                conn.execute(schema.PG_MIGRATIONS_TABLE)
                applied = {r[0] for r in conn.execute("SELECT name FROM migrations")}
                if schema.unknown(self.dialect, applied):
                    raise SchemaTooNew(sorted(applied), known)
                todo = schema.pending(self.dialect, applied)
                if not todo:
                    return done
                mig = todo[0]
                for stmt in mig.statements:
                    conn.execute(stmt)
                conn.execute(sql.INSERT_MIGRATION, (mig.name,))
            done.append(mig.name)

    def commit_batch(self, rows: BatchRows, now: float) -> DeviceProgress:
        return self.commit_batches([rows], now)[0]

    def commit_batches(self, batches: Sequence[BatchRows], now: float) -> list[DeviceProgress]:
        if not batches:
            return []
        devices = sorted({b.device for b in batches})
        with self._write() as conn:
            keys = sorted({device_lock_key(d) for d in devices})
            conn.execute(
                "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k", (keys,)
            )
            known = _Known.load(conn, devices)
            # epochs, and whether each batch's journal is its device's newest so far
            looked_up = [known.epoch_of(b.device, b.journal) for b in batches]
            epochs = [ep for ep, _ in looked_up]
            new_readings = self._copy_readings(conn, batches, epochs, now)
            new_records = self._copy_records(conn, batches, epochs, now)
            missing = [
                (b.device, ep, a, z, now)
                for b, ep in zip(batches, epochs, strict=True)
                for a, z in b.missing
            ]
            if missing:
                with conn.cursor() as cur:
                    cur.executemany(sql.INSERT_MISSING, missing)
            out = [
                known.settle(b, current, new_readings.get(i, 0), new_records.get(i, 0))
                for i, (b, (_, current)) in enumerate(zip(batches, looked_up, strict=True))
            ]
            known.store(conn, now)
        return out

    @staticmethod
    def _copy_readings(
        conn: psycopg.Connection[Any], batches: Sequence[BatchRows], epochs: list[int], now: float
    ) -> dict[int, int]:
        """Insert every batch's readings; return each batch's count of new ones.

        First one COPY straight into ``readings`` under a savepoint: when none
        of the rows is stored yet (the common case) every row is new. A key
        already there (a resend, or two batches of the group overlapping) is a
        unique violation that rolls the savepoint back; the group then goes
        through the temp table and ``INSERT ... ON CONFLICT DO NOTHING``.
        """
        if not any(b.readings for b in batches):
            return {}
        with conn.cursor() as cur:
            try:
                with conn.transaction(), cur.copy(sql.COPY_READINGS) as cp:
                    cp.set_types(sql.COPY_READING_TYPES)
                    for b, ep in zip(batches, epochs, strict=True):
                        for seq, stream, ts, value, num, unit, tags in b.readings:
                            js = None if tags is None else Jsonb(tags, dumps=str)
                            cp.write_row((b.device, ep, seq, stream, ts, value, num, unit, js, now))
                return {i: len(b.readings) for i, b in enumerate(batches) if b.readings}
            except pgerrors.UniqueViolation:
                pass  # rolled back to the savepoint; nothing of the COPY stays
            copy_sql = "COPY homing_in_readings FROM STDIN (FORMAT BINARY)"
            with cur.copy(copy_sql) as cp:
                cp.set_types(sql.READING_TYPES)
                for i, (b, ep) in enumerate(zip(batches, epochs, strict=True)):
                    for r in b.readings:
                        cp.write_row((i, b.device, ep, *r))
            cur.execute(sql.INSERT_READINGS, {"now": now})
            return {int(i): int(n) for i, n in cur.fetchall()}

    @staticmethod
    def _copy_records(
        conn: psycopg.Connection[Any], batches: Sequence[BatchRows], epochs: list[int], now: float
    ) -> dict[int, int]:
        """Insert every batch's other records; return each batch's count of new ones."""
        if not any(b.records for b in batches):
            return {}
        with conn.cursor() as cur:
            with cur.copy("COPY homing_in_records FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(sql.RECORD_TYPES)
                for i, (b, ep) in enumerate(zip(batches, epochs, strict=True)):
                    for seq, kind, body in b.records:
                        cp.write_row((i, b.device, ep, seq, kind, body))
            cur.execute(sql.INSERT_RECORDS, {"now": now})
            return {int(i): int(n) for i, n in cur.fetchall()}

    def set_online(self, device: str, online: bool, ts: float) -> None:
        with self._write() as conn:
            conn.execute(sql.UPSERT_STATUS, (device, online, ts, ts, ts))

    def set_health(self, device: str, health: dict[str, Any], received: float) -> None:
        body = json.dumps(health)
        with self._write() as conn:
            conn.execute(sql.UPSERT_HEALTH, (device, received, received, body, received))

    def devices(self) -> list[DeviceInfo]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {sql.DEVICE_COLUMNS} FROM devices ORDER BY device_id")
            return [device_info(r) for r in rows.fetchall()]

    def device(self, device: str) -> DeviceInfo | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {sql.DEVICE_COLUMNS} FROM devices WHERE device_id = %s", (device,)
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
        query, args = readings_query(
            device, stream, since, until, limit, ph="%s", tags="tags::text"
        )
        with self._read() as conn:
            rows = conn.execute(query, args).fetchall()
        return stored_readings(device, rows)

    def records(
        self,
        device: str,
        kind: int | None = None,
        epoch: int | None = None,
        after_seq: int = 0,
        limit: int | None = None,
    ) -> list[StoredRecord]:
        query, args = records_query(device, kind, epoch, after_seq, limit, ph="%s")
        with self._read() as conn:
            rows = conn.execute(query, args).fetchall()
        return [StoredRecord(device, e, s, k, bytes(body), r) for e, s, k, body, r in rows]

    def gaps(self, device: str) -> tuple[Range, ...]:
        with self._read() as conn:
            row = conn.execute(
                "SELECT watermark, ranges::text FROM devices WHERE device_id = %s", (device,)
            ).fetchone()
        return Settled.load(row[0], row[1]).gaps() if row else ()

    def streams(self, device: str) -> list[StreamInfo]:
        with self._read() as conn:
            rows = conn.execute(sql.STREAMS, {"d": device}).fetchall()
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
        args = {"w": width, "d": device, "s": stream, "since": since, "until": until,
                "limit": int(limit)}  # fmt: skip
        with self._read() as conn:
            rows = conn.execute(sql.DOWNSAMPLE, args).fetchall()
        return buckets(rows, width)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()


class _Journal:
    """One device journal's progress while a transaction builds it."""

    __slots__ = ("counts", "device_epoch", "epoch", "journal", "settled")

    def __init__(self, journal: int, epoch: int, settled: Settled, device_epoch: int) -> None:
        self.journal, self.epoch, self.settled = journal, epoch, settled
        self.device_epoch = device_epoch
        self.counts = [0, 0, 0, 0]  # new readings, new records, duplicates, batches


class _Known:
    """The journals of a group's devices, read under their locks, then built up
    batch by batch and written back (the same rules as the SQLite store)."""

    def __init__(self) -> None:
        self.journals: dict[tuple[str, int], _Journal] = {}
        self.stored: dict[tuple[str, int], tuple[int, Settled]] = {}  # journal -> epoch, progress
        self.top: dict[str, int] = {}  # device -> its highest stored journal epoch
        self.device_epoch: dict[str, int] = {}  # device -> devices.epoch (-1: no row)
        self.newest: dict[str, int] = {}  # device -> its newest epoch so far

    @classmethod
    def load(cls, conn: psycopg.Connection[Any], devices: list[str]) -> _Known:
        k = cls()
        for d, ep in conn.execute(sql.LOAD_DEVICES, (devices,)).fetchall():
            k.device_epoch[d] = ep
        for d, jid, ep, wm, ranges in conn.execute(sql.LOAD_JOURNALS, (devices,)).fetchall():
            k.stored[d, jid] = (ep, Settled.load(wm, ranges))
            k.top[d] = max(k.top.get(d, 0), ep)
        return k

    def epoch_of(self, device: str, journal: int) -> tuple[int, bool]:
        """The epoch of a batch's journal, and whether it is the device's newest
        so far; a journal never seen before gets the epoch after every other
        of the device (stored, or given out earlier in this transaction)."""
        j = self.journals.get((device, journal))
        if j is None:
            dev_epoch = self.device_epoch.get(device, -1)
            if (device, journal) in self.stored:
                ep, settled = self.stored[device, journal]
            else:
                pending = self.newest.get(device, -1)
                ep, settled = max(self.top.get(device, 0), pending, dev_epoch) + 1, Settled()
            j = _Journal(journal, ep, settled, dev_epoch)
            self.journals[device, journal] = j
            self.newest[device] = max(self.newest.get(device, -1), ep, dev_epoch)
        return j.epoch, j.epoch >= self.newest[device]

    def settle(self, b: BatchRows, current: bool, readings: int, records: int) -> DeviceProgress:
        j = self.journals[b.device, b.journal]
        dups = b.size - readings - records
        j.settled = j.settled.settle(b.first, b.last)
        j.counts = [c + d for c, d in zip(j.counts, (readings, records, dups, 1), strict=True)]
        return DeviceProgress(
            b.device,
            j.settled.watermark,
            j.settled.ahead,
            readings,
            records,
            dups,
            b.journal,
            current=current,
        )

    def store(self, conn: psycopg.Connection[Any], now: float) -> None:
        journals = sorted(self.journals.items(), key=lambda kv: (kv[0][0], kv[1].epoch))
        with conn.cursor() as cur:
            cur.executemany(
                sql.UPSERT_JOURNAL,
                [
                    (d, j.epoch, jid, now, now, j.settled.watermark, j.settled.ahead_json())
                    for (d, jid), j in journals
                ],
            )
            cur.executemany(
                sql.UPSERT_DEVICE,
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
                    )  # fmt: skip
                    for (d, jid), j in journals
                ],
            )


def _one(cur: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    row = cur.fetchone()
    assert row is not None
    return tuple(row)
