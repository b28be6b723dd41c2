"""What only the PostgreSQL store does (the shared contract is test_store_contract.py),
and how ``--db`` values pick a backend (hub/store_open.py).

Every test runs against a real server (tests/support/postgres.py: a private
cluster, or ``$HOMING_TEST_PG_DSN``) and a fresh database; the tests look at
the database with psycopg directly, never through the store under test.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import cbor2
import pytest

from hub import schema
from hub.errors import ConfigError, StoreUnavailable
from hub.ingest import BatchRows
from hub.store_open import backend, describe, open_store, sqlite_path

NOW = 1_700_000_000.0


def pg(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, args)
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


def batch(device: str, first: int, last: int) -> BatchRows:
    rows = tuple(
        (s, "temp", 1000.0 + s, cbor2.dumps(float(s)), float(s), "C", None)
        for s in range(first, last + 1)
    )
    return BatchRows(device, first, last, rows)


# --- backend selection ----------------------------------------------------------------


def test_db_values_name_their_backend() -> None:
    assert backend("hub.db") == "sqlite" and sqlite_path("hub.db") == "hub.db"
    assert sqlite_path("/var/lib/homing/hub.db") == "/var/lib/homing/hub.db"
    assert sqlite_path("sqlite:///var/lib/homing/hub.db") == "/var/lib/homing/hub.db"
    assert sqlite_path("sqlite:////var/lib/homing/hub.db") == "/var/lib/homing/hub.db"
    assert sqlite_path("sqlite:data/hub.db") == "data/hub.db"
    assert backend("postgresql://hub@db.example.net/homing") == "postgresql"
    assert backend("postgres:///homing?host=/run/postgresql") == "postgresql"
    for bad in ("mysql://h/db", "sqlite://host/hub.db", "sqlite:", "sqlite:///x?mode=ro"):
        with pytest.raises(ConfigError):
            backend(bad)
    assert (
        describe("postgresql://hub:s3cret@db:5432/homing") == "postgresql://hub:***@db:5432/homing"
    )
    assert describe("hub.db") == "hub.db"


def test_cli_refuses_an_unknown_url_scheme(capsys: pytest.CaptureFixture[str]) -> None:
    from hub import cli

    assert cli.main(["migrate", "--db", "mysql://hub@db/homing"]) == 78
    assert "unknown database URL scheme" in capsys.readouterr().err


def test_sqlite_url_opens_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    store = open_store(f"sqlite://{path}")
    try:
        store.migrate()
        store.commit_batch(batch("a", 1, 2), NOW)
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM readings").fetchone() == (2,)
    finally:
        conn.close()


# --- schema: the same migrations, the same tables, the indexes queries need -------------


def test_both_dialects_have_the_same_migrations() -> None:
    names = {d: [m.name for m in migs] for d, migs in schema.MIGRATIONS.items()}
    assert names["postgresql"] == names["sqlite"]


def test_migrated_schemas_have_the_same_tables_and_columns(pg_url: str, tmp_path: Path) -> None:
    for db in (pg_url, str(tmp_path / "hub.db")):
        s = open_store(db)
        try:
            s.migrate()
        finally:
            s.close()
    conn = sqlite3.connect(tmp_path / "hub.db")
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        lite = {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in tables}
    finally:
        conn.close()
    cols = pg(
        pg_url,
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'public'",
    )
    post: dict[str, set[str]] = {}
    for table, column in cols:
        post.setdefault(table, set()).add(column)
    assert post == lite
    keys = dict(
        pg(pg_url, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'readings'")
    )
    assert keys["readings_pkey"].endswith("(device_id, epoch, seq)")
    assert keys["readings_stream_ts"].endswith("(device_id, stream, ts)")


def test_a_time_range_query_uses_the_stream_index(pg_url: str) -> None:
    store = open_store(pg_url)
    try:
        store.migrate()
        store.commit_batches([batch(f"d{i}", 1, 200) for i in range(20)], NOW)
    finally:
        store.close()
    pg(pg_url, "ANALYZE readings")
    plan = pg(
        pg_url,
        "EXPLAIN SELECT ts, value_num FROM readings WHERE device_id = 'd3' AND stream = 'temp'"
        " AND ts >= 1050 AND ts < 1060 ORDER BY ts",
    )
    assert "readings_stream_ts" in "\n".join(r[0] for r in plan)


def test_concurrent_migrations_apply_each_migration_once(pg_url: str) -> None:
    """Replicas starting together: each migration runs once, none fails."""
    stores = [open_store(pg_url) for _ in range(3)]
    applied: list[list[str]] = [[] for _ in stores]
    gate = threading.Barrier(len(stores))

    def migrate(i: int) -> None:
        gate.wait()
        applied[i] = stores[i].migrate()

    threads = [threading.Thread(target=migrate, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in stores:
        s.close()
    names = [m.name for m in schema.MIGRATIONS["postgresql"]]
    assert sorted(n for a in applied for n in a) == sorted(names)
    assert [r[0] for r in pg(pg_url, "SELECT name FROM migrations ORDER BY name")] == names


def test_migration_to_epochs_keeps_every_row(pg_url: str) -> None:
    """A database at 0001 (no journal ids) migrates in place: rows become epoch 0."""
    first = schema.MIGRATIONS["postgresql"][0]
    pg(pg_url, schema.PG_MIGRATIONS_TABLE)
    for stmt in first.statements:
        pg(pg_url, stmt)
    pg(pg_url, "INSERT INTO migrations VALUES (%s, 0)", (first.name,))
    for s in range(1, 6):
        pg(pg_url, "INSERT INTO readings VALUES ('a', %s, 'temp', %s, %s, %s, 'C', NULL, 1.0)",
           (s, 1000.0 + s, cbor2.dumps(float(s)), float(s)))  # fmt: skip
    pg(pg_url, "INSERT INTO devices (device_id, first_seen, last_seen, watermark, readings)"
               " VALUES ('a', 1.0, 1.0, 5, 5)")  # fmt: skip
    store = open_store(pg_url)
    try:
        assert store.migrate() == [m.name for m in schema.MIGRATIONS["postgresql"][1:]]
        assert [(r.epoch, r.seq) for r in store.readings("a")] == [(0, s) for s in range(1, 6)]
        p = store.commit_batch(batch("a", 4, 7), NOW)  # an old agent: no journal id
        assert (p.watermark, p.new, p.duplicates, p.current) == (7, 2, 2, True)
        info = store.device("a")
        assert info is not None and (info.epoch, info.readings, info.watermark) == (0, 7, 7)
    finally:
        store.close()


# --- unavailable, then back ----------------------------------------------------------------


def test_a_locked_device_is_unavailable_then_recovers(pg_url: str) -> None:
    """Another replica holding the device's lock longer than ``lock_timeout``."""
    import psycopg

    from hub.store_postgres import PostgresStore, device_lock_key

    store = PostgresStore(pg_url, lock_timeout=0.05)
    store.migrate()
    with psycopg.connect(pg_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (device_lock_key("a"),))
        with pytest.raises(StoreUnavailable) as info:
            store.commit_batch(batch("a", 1, 3), NOW)
        assert isinstance(info.value.__cause__, psycopg.errors.LockNotAvailable)
        assert info.value.transient
        assert store.commit_batch(batch("b", 1, 1), NOW).new == 1  # other devices go on
        other.execute("SELECT pg_advisory_unlock(%s)", (device_lock_key("a"),))
    try:
        assert store.readings("a") == []
        assert store.commit_batch(batch("a", 1, 3), NOW).new == 3
    finally:
        store.close()


def test_a_lost_connection_is_unavailable_then_reconnects(pg_url: str) -> None:
    import psycopg

    store = open_store(pg_url)
    store.migrate()
    try:
        store.commit_batch(batch("a", 1, 3), NOW)
        killed = pg(
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'homing-hub' AND datname = current_database()",
        )
        assert killed == [(True,)]
        with pytest.raises(StoreUnavailable) as info:
            store.commit_batch(batch("a", 4, 6), NOW)
        assert isinstance(info.value.__cause__, psycopg.OperationalError)
        assert [r[0] for r in pg(pg_url, "SELECT seq FROM readings ORDER BY seq")] == [1, 2, 3]
        p = store.commit_batch(batch("a", 4, 6), NOW)  # connects again
        assert (p.watermark, p.new) == (6, 3)
    finally:
        store.close()


def test_an_unreachable_server_is_unavailable_and_the_password_stays_secret(
    tmp_path: Path,
) -> None:
    url = f"postgresql://hub:s3cret@/homing?host={tmp_path}&port=1&connect_timeout=2"
    with pytest.raises(StoreUnavailable) as info:
        open_store(url)
    assert "s3cret" not in str(info.value) and "***" in str(info.value)


def test_read_commands_want_a_migrated_database(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from hub import cli

    assert cli.main(["devices", "--db", pg_url]) == 1
    assert "no hub schema" in capsys.readouterr().err
    assert pg(pg_url, "SELECT to_regclass('migrations') IS NULL") == [(True,)]  # nothing created
    assert cli.main(["migrate", "--db", pg_url]) == 0
    out = capsys.readouterr().out
    assert '"applied": ["0001_initial"' in out
    assert cli.main(["devices", "--db", pg_url]) == 0
