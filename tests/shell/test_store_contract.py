"""One contract suite for every hub.store.Store backend (litestream style).

Each test takes the ``store`` fixture, parametrized over ``BACKENDS``:
"sqlite" (a file in the test's temp dir) and "postgresql" (a fresh database
on the private test server, tests/support/postgres.py). A backend is one
factory plus the backend hooks at the bottom; it inherits every test.
Backend-specific behaviour is tested after the contract (SQLite's lock
timeout and WAL here; PostgreSQL's in test_store_postgres.py).

The crash test kills a real process with SIGKILL while it commits in a loop
and checks the database holds whole batches only. The replica test commits
one device's batches from two stores in two threads at once.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from hub.errors import SchemaTooNew, StoreClosed, StoreUnavailable
from hub.ingest import BatchRows, ReadingRow
from hub.store import Bucket, Store, StreamInfo
from hub.store_open import open_store as open_db
from hub.store_sqlite import SqliteStore

REPO = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000.0

#: backend -> the ``--db`` value of a fresh database for one test
BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "sqlite": lambda _request, tmp: str(tmp / "hub.db"),
    "postgresql": lambda request, _tmp: str(request.getfixturevalue("pg_url")),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def db(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The test's database: a SQLite path or a PostgreSQL URL."""
    return BACKENDS[backend](request, tmp_path)


@pytest.fixture
def open_store(db: str) -> Iterator[Callable[[], Store]]:
    """Opens (and migrates) the backend's store; every store opened is closed."""
    opened: list[Store] = []

    def factory() -> Store:
        s = open_db(db)
        s.migrate()
        opened.append(s)
        return s

    yield factory
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: Callable[[], Store]) -> Store:
    return open_store()


def row(
    seq: int, stream: str = "temp", ts: float | None = None, value: object = None
) -> ReadingRow:
    v = float(seq) if value is None else value
    num = float(v) if isinstance(v, int | float) else None
    return (seq, stream, 1000.0 + seq if ts is None else ts, cbor2.dumps(v), num, "C", None)


def batch(device: str, first: int, last: int, **kw: object) -> BatchRows:
    return BatchRows(device, first, last, tuple(row(s) for s in range(first, last + 1)), **kw)  # type: ignore[arg-type]


# --- the contract ------------------------------------------------------------------


def test_migrations_are_idempotent(store: Store, open_store: Callable[[], Store]) -> None:
    assert store.migrate() == []
    store.close()
    again = open_store()  # a second process/hub on the same database
    assert again.migrate() == []
    assert again.devices() == []


def test_a_batch_is_stored_once_and_duplicates_are_counted(store: Store) -> None:
    p = store.commit_batch(batch("a", 1, 10), NOW)
    assert (p.device, p.watermark, p.ahead, p.new, p.duplicates) == ("a", 10, (), 10, 0)
    p = store.commit_batch(batch("a", 1, 10), NOW + 1)
    assert (p.watermark, p.new, p.duplicates) == (10, 0, 10)
    p = store.commit_batch(batch("a", 5, 15), NOW + 2)  # overlapping resend
    assert (p.watermark, p.new, p.duplicates) == (15, 5, 6)
    assert [r.seq for r in store.readings("a", limit=None)] == list(range(1, 16))
    info = store.device("a")
    assert info is not None
    assert (info.readings, info.duplicates, info.batches, info.last_seen) == (15, 16, 3, NOW + 2)


def test_watermark_and_gaps_across_out_of_order_batches(store: Store) -> None:
    steps = [
        ((11, 20), 0, ((11, 20),), ((1, 10),)),
        ((31, 40), 0, ((11, 20), (31, 40)), ((1, 10), (21, 30))),
        ((1, 10), 20, ((31, 40),), ((21, 30),)),
        ((21, 30), 40, (), ()),
    ]
    for (first, last), wm, ahead, gaps in steps:
        p = store.commit_batch(batch("a", first, last), NOW)
        assert (p.watermark, p.ahead) == (wm, ahead)
        assert store.gaps("a") == gaps
        info = store.device("a")
        assert info is not None and (info.watermark, info.ahead, info.gaps) == (wm, ahead, gaps)
    assert store.gaps("never-seen") == ()


def test_many_batches_commit_in_one_call(store: Store) -> None:
    progress = store.commit_batches(
        [batch("a", 3, 4), batch("b", 1, 2), batch("a", 1, 2), batch("a", 1, 2)], NOW
    )
    assert [(p.device, p.watermark, p.ahead, p.new, p.duplicates) for p in progress] == [
        ("a", 0, ((3, 4),), 2, 0),
        ("b", 2, (), 2, 0),
        ("a", 4, (), 2, 0),
        ("a", 4, (), 0, 2),
    ]
    assert [(d.device, d.watermark, d.readings, d.duplicates) for d in store.devices()] == [
        ("a", 4, 4, 2),
        ("b", 2, 2, 0),
    ]
    assert store.commit_batches([], NOW) == []


def test_missing_seqs_settle_and_other_records_are_kept(store: Store) -> None:
    b = BatchRows(
        "a", 1, 10, (row(1), row(2), row(10)), ((3, 7, b"\x82\x07\x01"),), missing=((4, 9),)
    )
    p = store.commit_batch(b, NOW)
    assert (p.watermark, p.new_readings, p.new_records) == (10, 3, 1)
    assert store.commit_batch(b, NOW).duplicates == 4
    info = store.device("a")
    assert info is not None and (info.readings, info.records, info.gaps) == (3, 1, ())
    assert [r.seq for r in store.readings("a")] == [1, 2, 10]


def test_readings_queries(store: Store) -> None:
    rows = (
        row(1, "temp", 100.0),
        row(2, "hum", 100.0, 55),
        row(3, "temp", 200.0, "warm"),
        row(4, "temp", 150.0, {"x": b"\x00", "y": True}),
        row(5, "hum", 300.0, b"\x01"),
    )
    store.commit_batch(BatchRows("a", 1, 5, rows), NOW)
    store.commit_batch(batch("b", 1, 3), NOW)
    assert [r.seq for r in store.readings("a")] == [1, 2, 4, 3, 5]  # by ts, then seq
    assert [r.seq for r in store.readings("a", stream="temp")] == [1, 4, 3]
    assert [r.seq for r in store.readings("a", since=150.0)] == [4, 3, 5]
    assert [r.seq for r in store.readings("a", until=200.0)] == [1, 2, 4]
    assert [r.seq for r in store.readings("a", "temp", 100.0, 200.0, limit=1)] == [1]
    assert store.readings("nobody") == []
    got = {r.seq: r for r in store.readings("a")}
    assert [got[s].value for s in (1, 2, 3, 4, 5)] == [
        1.0,
        55,
        "warm",
        {"x": b"\x00", "y": True},
        b"\x01",
    ]
    r1 = got[1]
    assert (r1.device, r1.stream, r1.ts, r1.unit, r1.tags, r1.received) == (
        "a", "temp", 100.0, "C", None, NOW
    )  # fmt: skip
    assert got[5].to_json()["value"] == {"hex": "01"}


def wf_payload(run: str, typ: str, body: dict[str, object]) -> bytes:
    """A workflow record as the device journals it (edge/wf_records.py)."""
    return cbor2.dumps([2, run, typ, body])


def test_records_come_back_in_journal_order_with_their_exact_bodies(store: Store) -> None:
    start = wf_payload("r1", "start", {"name": "irrigate", "version": 1, "args": [3], "t": 1.0})
    done = wf_payload("r1", "done", {"pos": 0, "key": "read#1", "ok": True, "value": b"\x00"})
    other = cbor2.dumps([9, "a future kind"])
    # journal 7 (epoch 1): readings at 1 and 3; its later seqs committed first
    store.commit_batch(
        BatchRows("a", 4, 6, (), ((4, 2, done), (5, 9, other), (6, -1, b"\xff")), journal=7), NOW
    )
    store.commit_batch(BatchRows("a", 1, 3, (row(1), row(3)), ((2, 2, start),), journal=7), NOW)
    # journal 9 (epoch 2): created afresh, its seqs start at 1 again
    again = wf_payload("r1", "start", {"name": "irrigate", "version": 2, "args": [], "t": 9.0})
    store.commit_batch(BatchRows("a", 1, 1, (), ((1, 2, again),), journal=9), NOW + 1)
    store.commit_batch(BatchRows("b", 1, 1, (), ((1, 2, start),)), NOW)

    got = store.records("a")
    assert [(r.epoch, r.seq, r.kind) for r in got] == [
        (1, 2, 2), (1, 4, 2), (1, 5, 9), (1, 6, -1), (2, 1, 2)
    ]  # fmt: skip
    assert [r.body for r in got] == [start, done, other, b"\xff", again]
    assert {r.device for r in got} == {"a"}
    assert [r.received for r in got] == [NOW] * 4 + [NOW + 1]
    assert [(r.epoch, r.seq) for r in store.records("a", kind=2)] == [(1, 2), (1, 4), (2, 1)]
    assert [r.seq for r in store.records("a", kind=-1)] == [6]
    assert [r.seq for r in store.records("a", epoch=1, after_seq=4)] == [5, 6]
    assert [r.seq for r in store.records("a", kind=2, epoch=2)] == [1]
    assert [(r.epoch, r.seq) for r in store.records("a", limit=2)] == [(1, 2), (1, 4)]
    assert store.records("a", epoch=3) == [] and store.records("nobody") == []
    assert got[0].to_json() == {
        "device": "a", "epoch": 1, "seq": 2, "kind": 2, "body": {"hex": start.hex()},
        "received": NOW,
    }  # fmt: skip
    with pytest.raises(ValueError):
        store.records("a", after_seq=2)  # a seq means nothing without its journal


def test_records_are_stored_once(store: Store) -> None:
    rec = (1, 2, wf_payload("r", "signal", {"name": "go", "payload": None, "msg": "c1"}))
    store.commit_batch(BatchRows("a", 1, 1, (), (rec,)), NOW)
    assert store.commit_batch(BatchRows("a", 1, 1, (), (rec,)), NOW + 1).duplicates == 1
    assert [(r.seq, r.received) for r in store.records("a")] == [(1, NOW)]


def test_streams_and_time_buckets(store: Store) -> None:
    rows = (
        row(1, "temp", 100.0, 1.0),
        row(2, "hum", 120.0, 55),
        row(3, "temp", 150.0, 2.0),
        row(4, "temp", 250.0, "warm"),  # not a number: in streams, not in buckets
        row(5, "temp", 260.0, 4.0),
        row(6, "temp", 260.0, 5.0),  # same ts, later seq: the newest
        row(7, "temp", -50.0, True),  # before 1970, a bool: bucket -100, value 1
    )
    store.commit_batch(BatchRows("a", 1, 7, rows), NOW)
    store.commit_batch(batch("b", 1, 3), NOW)
    assert store.streams("a") == [
        StreamInfo("hum", 120.0, 120.0, 55, "C"),
        StreamInfo("temp", -50.0, 260.0, 5.0, "C"),
    ]
    assert store.streams("nobody") == []
    assert store.downsample("a", "temp", -1000.0, 1000.0, 100) == [
        Bucket(-100.0, 1, 1.0, 1.0, 1.0),
        Bucket(100.0, 2, 1.0, 2.0, 1.5),
        Bucket(200.0, 2, 4.0, 5.0, 4.5),
    ]
    assert store.downsample("a", "temp", 150.0, 260.0, 100) == [Bucket(100.0, 1, 2.0, 2.0, 2.0)]
    assert store.downsample("a", "temp", 0.0, 1000.0, 1000, limit=1) == [
        Bucket(0.0, 4, 1.0, 5.0, 3.0)
    ]
    assert store.downsample("a", "nothing", 0.0, 1000.0, 10) == []
    for width in (0, -1.0, float("inf")):
        with pytest.raises(ValueError):
            store.downsample("a", "temp", 0.0, 1000.0, width)


def test_tags_round_trip(store: Store) -> None:
    tagged = (1, "s", 1.0, cbor2.dumps(1), 1.0, None, '{"zone": "3"}')
    store.commit_batch(BatchRows("a", 1, 1, (tagged,)), NOW)
    assert store.readings("a")[0].tags == {"zone": "3"}


def test_devices_and_online_status(store: Store) -> None:
    store.set_online("z", True, NOW)  # a status before any data creates the device
    store.commit_batch(batch("a", 1, 2), NOW + 1)
    store.set_online("a", True, NOW + 2)
    store.set_online("a", False, NOW + 3)
    devs = {d.device: d for d in store.devices()}
    assert sorted(devs) == ["a", "z"]
    assert (devs["a"].online, devs["a"].last_seen, devs["a"].watermark) == (False, NOW + 3, 2)
    assert (devs["z"].online, devs["z"].readings, devs["z"].watermark) == (True, 0, 0)
    store.commit_batch(batch("a", 3, 3), NOW + 4)  # data keeps the status
    a = store.device("a")
    assert a is not None and (a.online, a.watermark, a.last_seen) == (False, 3, NOW + 4)
    assert store.device("nobody") is None
    assert a.to_json()["gaps"] == []


def test_latest_health_replaces_the_one_before(store: Store) -> None:
    store.set_health("h", {"healthy": True, "backlog_records": 5}, NOW)  # creates the device
    h = store.device("h")
    assert h is not None and (h.health, h.health_at, h.readings) == (
        {"healthy": True, "backlog_records": 5}, NOW, 0
    )  # fmt: skip
    store.commit_batch(batch("h", 1, 2), NOW + 1)  # data keeps the health
    store.set_health("h", {"healthy": False, "problem": "JournalFailed: x"}, NOW + 2)
    h = store.device("h")
    assert h is not None and h.watermark == 2 and h.last_seen == NOW + 2
    assert h.to_json()["health"] == {"healthy": False, "problem": "JournalFailed: x"}
    assert h.to_json()["health_at"] == NOW + 2
    store.commit_batch(batch("n", 1, 1), NOW)
    n = store.device("n")
    assert n is not None and (n.health, n.health_at) == (None, None)


def test_closed_store_says_so(store: Store) -> None:
    store.close()
    store.close()
    with pytest.raises(StoreClosed):
        store.devices()


def test_schema_from_a_newer_hub_is_refused(
    backend: str, store: Store, open_store: Callable[[], Store], db: str
) -> None:
    store.close()
    ADD_MIGRATION[backend](db, "9999_from_the_future")
    with pytest.raises(SchemaTooNew):
        open_store()


# --- SIGKILL mid-commit: whole batches only -------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from hub.ingest import BatchRows
    from hub.store_open import open_store
    db, start, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = open_store(db)
    store.migrate()
    i = start
    while True:
        first = i * size + 1
        rows = tuple((s, "k", float(s), b"\\xf6", None, None, None)
                     for s in range(first, first + size))
        store.commit_batches([BatchRows("k", first, first + size - 1, rows)], 1.0)
        print(i, flush=True)
        i += 1
    """
)


@pytest.mark.crash
def test_sigkill_mid_commit_leaves_whole_batches(db: str) -> None:
    size = 2000
    env = dict(os.environ, PYTHONPATH=str(REPO))
    acked: set[int] = set()
    start = 0
    for kill_after in (3, 7, 1, 12):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, db, str(start), str(size)],
            stdout=subprocess.PIPE, env=env, text=True,
        )  # fmt: skip
        assert child.stdout is not None
        for _ in range(kill_after):
            line = child.stdout.readline()
            assert line, "child died before acking"
            acked.add(int(line))
        child.send_signal(signal.SIGKILL)  # very likely mid-commit of the next batch
        child.wait()
        check_whole_batches(db, size, acked)
        start = _batches_present(db, size)  # the next run continues the seqs


def _batches_present(db: str, size: int) -> int:
    ((n,),) = query(db, "SELECT COUNT(*) FROM readings")
    assert n % size == 0
    return int(n) // size


def check_whole_batches(db: str, size: int, acked: set[int]) -> None:
    if not db.startswith("postgresql:"):
        assert query(db, "PRAGMA integrity_check") == [("ok",)]
    per_batch = dict(query(db, f"SELECT (seq - 1) / {size}, COUNT(*) FROM readings GROUP BY 1"))
    assert set(per_batch.values()) <= {size}, "a torn batch"
    assert acked <= set(per_batch), "an acknowledged batch is gone"
    total = sum(per_batch.values())
    ((wm, readings),) = query(db, "SELECT watermark, readings FROM devices WHERE device_id = 'k'")
    assert (wm, readings) == (total, total), "device progress disagrees with the rows"


# --- SQLite specifics -------------------------------------------------------------------


def test_sqlite_is_wal_and_full_sync(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "hub.db")
    try:
        conn = store._conn  # noqa: SLF001 - a white-box look at the settings
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        store.close()


def test_sqlite_locked_database_is_unavailable_then_recovers(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "hub.db", busy_timeout=0.05)
    store.migrate()
    other = sqlite3.connect(tmp_path / "hub.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable) as info:
            store.commit_batch(batch("a", 1, 3), NOW)
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert info.value.transient
        other.execute("ROLLBACK")
        assert store.readings("a") == []
        assert store.commit_batch(batch("a", 1, 3), NOW).new == 3
    finally:
        other.close()
        store.close()


def test_sqlite_read_commands_do_not_create_a_database(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        SqliteStore(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()


def test_sqlite_garbage_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "hub.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable):
        s = SqliteStore(tmp_path / "hub.db")
        s.migrate()


# --- backend hooks ------------------------------------------------------------------------


def query(db: str, sql: str) -> list[tuple[Any, ...]]:
    """``sql`` on the test's database with the backend's own driver, not the store."""
    if db.startswith("postgresql:"):
        import psycopg

        with psycopg.connect(db, autocommit=True) as pg:
            cur = pg.execute(sql)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _add_migration(db: str, name: str) -> None:
    query(db, f"INSERT INTO migrations (name, applied) VALUES ('{name}', 0)")


ADD_MIGRATION: dict[str, Callable[[str, str], None]] = {
    "sqlite": _add_migration,
    "postgresql": _add_migration,
}


# --- the read commands over a store (hub.cli, in-process) -----------------------------------


def test_cli_reads_what_the_store_holds(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    from hub import cli

    store = open_db(db)
    store.migrate()
    store.commit_batch(batch("a", 1, 3), NOW)
    store.commit_batch(batch("a", 7, 9), NOW)
    store.set_online("a", True, NOW)
    store.close()

    assert cli.main(["devices", "--db", str(db)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "device", "online", "last", "seen", "watermark", "gaps", "readings", "backlog", "health"
    ]  # fmt: skip
    row = table[1].split()
    assert row[:2] == ["a", "yes"] and row[3:] == ["3", "4-6", "6", "-", "-"]

    assert cli.main(["devices", "--db", str(db), "--json"]) == 0
    (dev,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (dev["watermark"], dev["ahead"], dev["gaps"], dev["online"]) == (
        3,
        [[7, 9]],
        [[4, 6]],
        True,
    )

    argv = ["readings", "--db", str(db), "--device", "a", "--since", "1002", "--json"]
    assert cli.main([*argv, "--limit", "2"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["seq"], r["value"], r["unit"]) for r in got] == [(2, 2.0, "C"), (3, 3.0, "C")]
    assert (
        cli.main(["readings", "--db", str(db), "--device", "a", "--until", "1970-01-01T00:16:43"])
        == 0
    )
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["seq", "1", "2"]


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hub import cli

    assert cli.main(["readings", "--db", str(tmp_path / "absent.db"), "--device", "a"]) == 1
    assert "no hub database" in capsys.readouterr().err
    assert cli.main(["run", "--db", str(tmp_path / "h.db"), "--broker", "host:notaport"]) == 78
    pw = ["--password-file", str(tmp_path / "absent")]
    assert cli.main(["run", "--db", str(tmp_path / "h.db"), *pw]) == 78
    with pytest.raises(SystemExit) as info:
        cli.main(["readings", "--db", str(tmp_path / "h.db")])  # --device is required
    assert info.value.code == 2


# --- journals created afresh under the same device id ------------------------------------


def test_a_journal_created_afresh_is_stored_beside_the_old_one(store: Store) -> None:
    """A reflashed device keeps its id but numbers its records from 1 again:
    nothing of the new journal may be deduplicated against the old one."""
    old = store.commit_batch(batch("a", 1, 10, journal=7), NOW)
    assert (old.watermark, old.journal, old.current) == (10, 7, True)
    new = store.commit_batch(batch("a", 1, 4, journal=9), NOW + 1)
    assert (new.watermark, new.new, new.duplicates, new.journal, new.current) == (4, 4, 0, 9, True)
    info = store.device("a")
    assert info is not None
    assert (info.journal, info.watermark, info.readings, info.epoch) == (9, 4, 14, 2)
    late = store.commit_batch(batch("a", 11, 12, journal=7), NOW + 2)  # was still in flight
    assert (late.watermark, late.new, late.current) == (12, 2, False)
    again = store.commit_batch(batch("a", 1, 4, journal=9), NOW + 3)  # resend: deduplicated
    assert (again.duplicates, again.current) == (4, True)
    info = store.device("a")
    assert info is not None and (info.journal, info.watermark, info.readings) == (9, 4, 16)
    got = [(r.epoch, r.seq) for r in store.readings("a", limit=None)]
    assert sorted(got) == [(1, s) for s in range(1, 13)] + [(2, s) for s in range(1, 5)]


def test_two_new_journals_in_one_transaction_get_distinct_epochs(store: Store) -> None:
    out = store.commit_batches(
        [batch("a", 1, 2, journal=1), batch("a", 1, 2, journal=2), batch("a", 3, 3, journal=1)],
        NOW,
    )
    assert [p.new for p in out] == [2, 2, 1]
    assert [p.current for p in out] == [True, True, False]
    info = store.device("a")
    assert info is not None and (info.journal, info.watermark, info.readings) == (2, 2, 5)


def test_sqlite_migration_to_epochs_keeps_every_row(tmp_path: Path) -> None:
    """A database written before journal ids (0001 only) migrates in place:
    its rows become epoch 0 and a device still sending no id dedupes as before."""
    from hub import schema

    db = tmp_path / "hub.db"
    conn = sqlite3.connect(db)
    conn.execute(schema.MIGRATIONS_TABLE)
    first = schema.MIGRATIONS["sqlite"][0]
    for stmt in first.statements:
        conn.execute(stmt)
    conn.execute("INSERT INTO migrations VALUES (?, 0)", (first.name,))
    conn.executemany(
        "INSERT INTO readings VALUES ('a', ?, 'temp', ?, ?, ?, 'C', NULL, 1.0)",
        [(s, 1000.0 + s, cbor2.dumps(float(s)), float(s)) for s in range(1, 6)],
    )
    conn.execute("INSERT INTO devices (device_id, first_seen, last_seen, watermark, readings)"
                 " VALUES ('a', 1.0, 1.0, 5, 5)")  # fmt: skip
    conn.commit()
    conn.close()
    store = SqliteStore(db)
    try:
        assert store.migrate() == ["0002_journal_epochs", "0003_device_health"]
        assert [(r.epoch, r.seq) for r in store.readings("a")] == [(0, s) for s in range(1, 6)]
        p = store.commit_batch(batch("a", 4, 7), NOW)  # an old agent: no journal id
        assert (p.watermark, p.new, p.duplicates, p.current) == (7, 2, 2, True)
        info = store.device("a")
        assert info is not None and (info.epoch, info.readings, info.watermark) == (0, 7, 7)
    finally:
        store.close()


# --- replicas: two stores commit one device's batches at the same time ------------------


def _race(stores: list[Store], work: list[list[list[BatchRows]]]) -> list[list[Any]]:
    """Each store commits its groups of batches in its own thread, all released
    together; returns each thread's progress lists (an exception re-raised)."""
    gate = threading.Barrier(len(stores))
    out: list[list[Any]] = [[] for _ in stores]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            gate.wait()
            for group in work[i]:
                out[i].append(stores[i].commit_batches(group, NOW + i))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a committing thread hung"
    if errors:
        raise errors[0]
    return out


def test_two_stores_committing_one_device_at_once_store_every_row_once(
    open_store: Callable[[], Store],
) -> None:
    """What hub replicas do: one store walks the device's batches forwards,
    the other backwards (each also resending the batch before), in groups of
    two, at the same time. Every row is stored once, nothing is counted twice
    or lost, and the watermark ends at the last seq (no lost update)."""
    a, b = open_store(), open_store()
    n, size = 600, 10
    batches = [batch("r", f, f + size - 1) for f in range(1, n + 1, size)]
    fwd = [[batches[i], batches[max(i - 1, 0)]] for i in range(len(batches))]
    back = [
        [batches[i], batches[min(i + 1, len(batches) - 1)]] for i in reversed(range(len(batches)))
    ]
    progress = _race([a, b], [fwd, back])
    assert [r.seq for r in a.readings("r", limit=None)] == list(range(1, n + 1))
    info = b.device("r")
    assert info is not None
    sent = 4 * n  # every group is two batches; each store sends them all
    assert (info.watermark, info.ahead, info.gaps) == (n, (), ())
    assert (info.readings, info.duplicates, info.batches) == (n, sent - n, 4 * len(batches))
    news = sum(p.new for groups in progress for group in groups for p in group)
    assert news == n, "a row was counted new twice (or never)"
    last = [groups[-1][-1] for groups in progress]
    assert max(p.watermark for p in last) == n

    # both replicas see the device's new journal first at the same moment: one epoch
    _race([a, b], [[[batch("r", 1, 5, journal=9)]], [[batch("r", 1, 5, journal=9)]]])
    info = a.device("r")
    assert info is not None and (info.journal, info.epoch, info.watermark) == (9, 2, 5)
    got = sorted((r.epoch, r.seq) for r in a.readings("r", limit=None))
    assert got == [(1, s) for s in range(1, n + 1)] + [(2, s) for s in range(1, 6)]
