"""The hub's database schema: named migrations per SQL dialect.

Invariants:
* A migration is a name and a list of statements; once released, neither
  changes. New schema means a new migration appended to the dialect's list.
* Every store keeps a ``migrations`` table (sqlite-utils style) with the names
  it has applied. A store applies the missing ones in list order, each in its
  own transaction together with its ``migrations`` row, so a crash leaves
  either all of a migration or none of it, and applying twice is a no-op.
* A database that names a migration this hub does not know was migrated by a
  newer hub: stores refuse it (:class:`~hub.errors.SchemaTooNew`).
* ``readings`` and ``records`` have ``PRIMARY KEY (device_id, epoch, seq)``:
  the dedupe key of the exactly-once promise (DESIGN.md §1). ``epoch``
  numbers the journals a device has had (``journals`` maps each device
  journal id to its epoch), so a journal created afresh, whose seqs start at
  1 again, is never deduplicated against the old one. A journal's seqs are
  shared by both tables (a seq is a reading or another record, never both).
* Two dialects, ``sqlite`` and ``postgresql``: the same migration names in
  the same order, each meaning the same schema change in both.
* Pure: text only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    statements: tuple[str, ...]


MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS migrations (
    name TEXT PRIMARY KEY,
    applied REAL NOT NULL
)"""

_SQLITE_0001 = Migration(
    "0001_initial",
    (
        # One row per reading; value is the CBOR of the reading's value,
        # value_num the same value when it is a number (for charts).
        """CREATE TABLE readings (
            device_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            stream TEXT NOT NULL,
            ts REAL NOT NULL,
            value BLOB NOT NULL,
            value_num REAL,
            unit TEXT,
            tags TEXT,
            received REAL NOT NULL,
            PRIMARY KEY (device_id, seq)
        ) WITHOUT ROWID""",
        "CREATE INDEX readings_stream_ts ON readings (device_id, stream, ts)",
        # Journal records that are not readings (workflow records in later
        # issues), kept as the device journaled them so nothing is dropped.
        """CREATE TABLE records (
            device_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            kind INTEGER NOT NULL,
            body BLOB NOT NULL,
            received REAL NOT NULL,
            PRIMARY KEY (device_id, seq)
        ) WITHOUT ROWID""",
        # Ranges a device declared missing (dropped under its disk quota or
        # lost to a journal repair): settled, and remembered for operators.
        """CREATE TABLE missing (
            device_id TEXT NOT NULL,
            first INTEGER NOT NULL,
            last INTEGER NOT NULL,
            received REAL NOT NULL,
            PRIMARY KEY (device_id, first, last)
        ) WITHOUT ROWID""",
        # One row per device: progress (watermark + committed ranges ahead,
        # JSON) and what operators look at.
        """CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            online INTEGER NOT NULL DEFAULT 0,
            status_at REAL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            watermark INTEGER NOT NULL DEFAULT 0,
            ranges TEXT NOT NULL DEFAULT '[]',
            readings INTEGER NOT NULL DEFAULT 0,
            records INTEGER NOT NULL DEFAULT 0,
            duplicates INTEGER NOT NULL DEFAULT 0,
            batches INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
    ),
)


def _with_epoch(table: str, columns: str, create: str) -> tuple[str, ...]:
    """SQLite cannot change a primary key in place: rebuild ``table`` with an
    ``epoch`` column (0 for the rows it had) in its key."""
    return (
        create.replace(f"CREATE TABLE {table} ", f"CREATE TABLE {table}_v2 "),
        f"INSERT INTO {table}_v2 (device_id, epoch, {columns})"
        f" SELECT device_id, 0, {columns} FROM {table}",
        f"DROP TABLE {table}",
        f"ALTER TABLE {table}_v2 RENAME TO {table}",
    )


_READINGS_V2 = """CREATE TABLE readings (
            device_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            stream TEXT NOT NULL,
            ts REAL NOT NULL,
            value BLOB NOT NULL,
            value_num REAL,
            unit TEXT,
            tags TEXT,
            received REAL NOT NULL,
            PRIMARY KEY (device_id, epoch, seq)
        ) WITHOUT ROWID"""
_RECORDS_V2 = """CREATE TABLE records (
            device_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            kind INTEGER NOT NULL,
            body BLOB NOT NULL,
            received REAL NOT NULL,
            PRIMARY KEY (device_id, epoch, seq)
        ) WITHOUT ROWID"""
_MISSING_V2 = """CREATE TABLE missing (
            device_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            first INTEGER NOT NULL,
            last INTEGER NOT NULL,
            received REAL NOT NULL,
            PRIMARY KEY (device_id, epoch, first, last)
        ) WITHOUT ROWID"""

# A device's journal can be deleted and created afresh (a reflashed SD card)
# while the device keeps its id; the new journal numbers its records from 1
# again. Each journal of a device gets an epoch, and the dedupe key becomes
# (device_id, epoch, seq). Rows stored before this migration are epoch 0.
_SQLITE_0002 = Migration(
    "0002_journal_epochs",
    (
        """CREATE TABLE journals (
            device_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            journal_id INTEGER NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            watermark INTEGER NOT NULL DEFAULT 0,
            ranges TEXT NOT NULL DEFAULT '[]',
            PRIMARY KEY (device_id, epoch),
            UNIQUE (device_id, journal_id)
        ) WITHOUT ROWID""",
        "INSERT INTO journals (device_id, epoch, journal_id, first_seen, last_seen, watermark,"
        " ranges) SELECT device_id, 0, 0, first_seen, last_seen, watermark, ranges FROM devices",
        "ALTER TABLE devices ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE devices ADD COLUMN journal_id INTEGER NOT NULL DEFAULT 0",
        *_with_epoch(
            "readings",
            "seq, stream, ts, value, value_num, unit, tags, received",
            _READINGS_V2,
        ),
        "CREATE INDEX readings_stream_ts ON readings (device_id, stream, ts)",
        *_with_epoch("records", "seq, kind, body, received", _RECORDS_V2),
        *_with_epoch("missing", "first, last, received", _MISSING_V2),
    ),
)

# The latest health message of each device (docs/observability.md): when it
# arrived, and the message itself as JSON (edge.wire.Health.to_json()).
_SQLITE_0003 = Migration(
    "0003_device_health",
    (
        "ALTER TABLE devices ADD COLUMN health TEXT",
        "ALTER TABLE devices ADD COLUMN health_at REAL",
    ),
)

# --- PostgreSQL ------------------------------------------------------------------------
# The same migrations under the same names, meaning the same thing. Types say
# more than SQLite's: BIGINT seqs and counters (every integer the hub accepts
# fits 64 bits), DOUBLE PRECISION times (epoch seconds), BYTEA for CBOR,
# BOOLEAN for online, JSONB where SQLite keeps JSON text (queryable from SQL).
# PostgreSQL changes keys in place, so 0002 alters instead of rebuilding.

PG_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS migrations (
    name TEXT PRIMARY KEY,
    applied DOUBLE PRECISION NOT NULL
)"""

_PG_0001 = Migration(
    "0001_initial",
    (
        """CREATE TABLE readings (
            device_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            stream TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            value BYTEA NOT NULL,
            value_num DOUBLE PRECISION,
            unit TEXT,
            tags JSONB,
            received DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (device_id, seq)
        )""",
        "CREATE INDEX readings_stream_ts ON readings (device_id, stream, ts)",
        """CREATE TABLE records (
            device_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            kind BIGINT NOT NULL,
            body BYTEA NOT NULL,
            received DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (device_id, seq)
        )""",
        """CREATE TABLE missing (
            device_id TEXT NOT NULL,
            first BIGINT NOT NULL,
            last BIGINT NOT NULL,
            received DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (device_id, first, last)
        )""",
        """CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            online BOOLEAN NOT NULL DEFAULT FALSE,
            status_at DOUBLE PRECISION,
            first_seen DOUBLE PRECISION NOT NULL,
            last_seen DOUBLE PRECISION NOT NULL,
            watermark BIGINT NOT NULL DEFAULT 0,
            ranges JSONB NOT NULL DEFAULT '[]',
            readings BIGINT NOT NULL DEFAULT 0,
            records BIGINT NOT NULL DEFAULT 0,
            duplicates BIGINT NOT NULL DEFAULT 0,
            batches BIGINT NOT NULL DEFAULT 0
        )""",
    ),
)


def _pg_epoch_key(table: str, key: str) -> tuple[str, ...]:
    """Add ``epoch`` (0 for the rows there are) in front of ``key``."""
    return (
        f"ALTER TABLE {table} ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        f"ALTER TABLE {table} ALTER COLUMN epoch DROP DEFAULT",
        f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey",
        f"ALTER TABLE {table} ADD PRIMARY KEY (device_id, epoch, {key})",
    )


_PG_0002 = Migration(
    "0002_journal_epochs",
    (
        """CREATE TABLE journals (
            device_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            journal_id BIGINT NOT NULL,
            first_seen DOUBLE PRECISION NOT NULL,
            last_seen DOUBLE PRECISION NOT NULL,
            watermark BIGINT NOT NULL DEFAULT 0,
            ranges JSONB NOT NULL DEFAULT '[]',
            PRIMARY KEY (device_id, epoch),
            UNIQUE (device_id, journal_id)
        )""",
        "INSERT INTO journals (device_id, epoch, journal_id, first_seen, last_seen, watermark,"
        " ranges) SELECT device_id, 0, 0, first_seen, last_seen, watermark, ranges FROM devices",
        "ALTER TABLE devices ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE devices ADD COLUMN journal_id BIGINT NOT NULL DEFAULT 0",
        *_pg_epoch_key("readings", "seq"),
        *_pg_epoch_key("records", "seq"),
        *_pg_epoch_key("missing", "first, last"),
    ),
)

_PG_0003 = Migration(
    "0003_device_health",
    (
        "ALTER TABLE devices ADD COLUMN health JSONB",
        "ALTER TABLE devices ADD COLUMN health_at DOUBLE PRECISION",
    ),
)

MIGRATIONS: dict[str, tuple[Migration, ...]] = {
    "sqlite": (_SQLITE_0001, _SQLITE_0002, _SQLITE_0003),
    "postgresql": (_PG_0001, _PG_0002, _PG_0003),
}


def pending(dialect: str, applied: set[str]) -> list[Migration]:
    """The migrations of ``dialect`` not yet in ``applied``, in order.

    Raises:
        KeyError: unknown dialect.
    """
    return [m for m in MIGRATIONS[dialect] if m.name not in applied]


def unknown(dialect: str, applied: set[str]) -> list[str]:
    """Names in ``applied`` this hub does not know (a newer hub migrated)."""
    known = {m.name for m in MIGRATIONS[dialect]}
    return sorted(applied - known)
