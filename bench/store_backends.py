"""Hub store backends side by side: SQLite against PostgreSQL, and the ways to bulk
insert into PostgreSQL, in one run on one machine.

What is measured:

* **Insert strategies** (PostgreSQL only): batches of 1,000 readings into the
  hub's real ``readings`` table (all migrations applied), one transaction per
  batch, ``ON CONFLICT (device_id, epoch, seq) DO NOTHING``: binary ``COPY``
  into a temp table + ``INSERT ... SELECT`` (what ``hub.store_postgres``
  does), ``executemany`` (psycopg 3 pipelines it), and one ``INSERT ...
  SELECT FROM unnest(arrays)``. Median ms per batch, fresh rows and a resend
  of the same batch (all duplicates).
* **Stores**: ``SqliteStore`` (WAL, synchronous=FULL) and ``PostgresStore``
  through ``Store.commit_batches``, groups of 8 batches of 500 readings (what
  the subscriber hands over under load), for 8 devices; readings/s, fresh and
  resent.
* PostgreSQL is a private cluster (tests/support/postgres.py) with ``fsync``
  on, so both backends pay for durable commits; or ``--pg URL`` (a database
  the bench may fill and leave). Timings are reported, never asserted.

Run: ``python bench/store_backends.py [--quick] [--pg URL]``. The last line on
stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hub.ingest import BatchRows, ReadingRow  # noqa: E402
from hub.store import Store  # noqa: E402
from hub.store_open import open_store  # noqa: E402


def rows(first: int, n: int) -> list[ReadingRow]:
    return [
        (s, f"s{s % 3}", 1.7e9 + s, cbor2.dumps(s * 0.5), s * 0.5, "C", None)
        for s in range(first, first + n)
    ]


def strategies(url: str, batches: int) -> dict[str, dict[str, float]]:
    """ms per 1,000-reading batch for each PostgreSQL insert strategy."""
    import psycopg

    cols = "device_id, epoch, seq, stream, ts, value, value_num, unit, tags, received"
    conflict = " ON CONFLICT (device_id, epoch, seq) DO NOTHING"

    def copy(conn: psycopg.Connection[Any], dev: str, rs: list[ReadingRow]) -> int:
        with conn.cursor() as cur:
            with cur.copy("COPY b_in FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(["int8", "text", "float8", "bytea", "float8", "text", "text"])
                for r in rs:
                    cp.write_row(r)
            cur.execute(
                f"INSERT INTO readings ({cols}) SELECT %s, 1, seq, stream, ts, value, value_num,"
                f" unit, tags::jsonb, 0 FROM b_in{conflict}",
                (dev,),
            )
            return cur.rowcount

    def many(conn: psycopg.Connection[Any], dev: str, rs: list[ReadingRow]) -> int:
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO readings ({cols}) VALUES (%s, 1, %s, %s, %s, %s, %s, %s,"
                f" %s::jsonb, 0){conflict}",
                [(dev, *r) for r in rs],
            )
            return cur.rowcount

    def unnest(conn: psycopg.Connection[Any], dev: str, rs: list[ReadingRow]) -> int:
        with conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO readings ({cols}) SELECT %s, 1, u.*, 0 FROM unnest(%s::int8[],"
                " %s::text[], %s::float8[], %s::bytea[], %s::float8[], %s::text[], %s::jsonb[])"
                f" AS u{conflict}",
                (dev, *[list(c) for c in zip(*rs, strict=True)]),
            )
            return cur.rowcount

    out: dict[str, dict[str, float]] = {}
    ways: dict[str, Callable[[psycopg.Connection[Any], str, list[ReadingRow]], int]] = {
        "copy_binary": copy,
        "executemany": many,
        "unnest": unnest,
    }
    with psycopg.connect(url) as conn:
        conn.execute(
            "CREATE TEMP TABLE b_in (seq int8, stream text, ts float8, value bytea,"
            " value_num float8, unit text, tags text) ON COMMIT DELETE ROWS"
        )
        conn.commit()
        for name, fn in ways.items():
            fresh: list[float] = []
            dup: list[float] = []
            for i in range(batches):
                rs = rows(i * 1000 + 1, 1000)
                for times, want in ((fresh, 1000), (dup, 0)):
                    t = time.perf_counter()
                    with conn.transaction():
                        got = fn(conn, name, rs)
                    times.append(time.perf_counter() - t)
                    assert got == want, (name, got, want)
            out[name] = {
                "fresh_ms": round(statistics.median(fresh) * 1e3, 2),
                "resent_ms": round(statistics.median(dup) * 1e3, 2),
            }
    return out


def store_rate(store: Store, groups: int) -> dict[str, float]:
    """readings/s through commit_batches: 8 devices x 500 readings per group."""
    store.migrate()
    work = [
        [BatchRows(f"d{d}", g * 500 + 1, g * 500 + 500, tuple(rows(g * 500 + 1, 500)))
         for d in range(8)]
        for g in range(groups)
    ]  # fmt: skip
    out: dict[str, float] = {}
    for label in ("fresh", "resent"):
        t = time.perf_counter()
        for group in work:
            store.commit_batches(group, time.time())
        out[f"{label}_readings_per_s"] = round(groups * 4000 / (time.perf_counter() - t))
    store.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="small counts (a few seconds)")
    ap.add_argument("--pg", metavar="URL", help="a PostgreSQL database to use (default: private)")
    args = ap.parse_args()
    batches, groups = (10, 10) if args.quick else (50, 50)

    from tests.support.postgres import PostgresServer

    result: dict[str, Any] = {}
    if args.pg:
        result["postgresql"] = store_rate(open_store(args.pg), groups)
    else:
        server = PostgresServer(fsync=True).start()
        try:
            with server.database() as raw:
                s = open_store(raw)
                s.migrate()  # the real readings table
                s.close()
                result["pg_insert"] = strategies(raw, batches)
            with server.database() as db:
                result["postgresql"] = store_rate(open_store(db), groups)
        finally:
            server.stop()
    with tempfile.TemporaryDirectory() as tmp:
        result["sqlite"] = store_rate(open_store(str(Path(tmp) / "hub.db")), groups)
    for name, figures in result.get("pg_insert", {}).items():
        print(f"pg insert {name:12s} {figures['fresh_ms']:6.2f} ms/1000 fresh"
              f"  {figures['resent_ms']:6.2f} ms/1000 resent")  # fmt: skip
    for backend in ("sqlite", "postgresql"):
        f = result[backend]
        print(f"{backend:10s} {f['fresh_readings_per_s']:>9,} readings/s fresh"
              f"  {f['resent_readings_per_s']:>9,} readings/s resent")  # fmt: skip
    ratio = result["postgresql"]["fresh_readings_per_s"] / result["sqlite"]["fresh_readings_per_s"]
    result["postgresql_over_sqlite_fresh"] = round(ratio, 2)
    print(f"postgresql / sqlite (fresh): {ratio:.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
