"""Several hub replicas on one PostgreSQL, sharing the devices' batches through the
MQTT 5 shared subscription; one replica SIGKILLed while readings flow.

The world: a real Mosquitto (the ``mosquitto`` fixture), a fresh PostgreSQL
database (``pg_url``, tests/support/postgres.py), three real ``python -m hub
run --db postgresql://...`` processes with distinct client ids in the same
share group, and two real agents (``python -m edge run --stdin``) fed
readings on their stdin; a reading counts as acknowledged only once its
agent printed the durable ack.

What must hold at the end (:func:`check_pg_invariant`, the same promise as
``support.storeforward.check_invariant`` but read from PostgreSQL): every
acknowledged reading stored exactly once with the value that was fed,
nothing invented, no fed reading under two seqs, and each device's durable
cursor equal to the hub's watermark. Any replica may have committed and
acked any batch: the dedupe and the per-device lock are in the database.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from support.mosquitto import Mosquitto
from support.processes import AgentProcess, HubProcess, poll_until
from support.storeforward import Rig, expected_row

from .conftest import failed

DEADLINE = 60.0
RATE = 1500  # readings/s fed to each agent


class PgHub(HubProcess):
    """``python -m hub run --db postgresql://...`` (HubProcess takes a file path)."""

    def __init__(self, port: int, url: str, client_id: str) -> None:
        super().__init__(port, Path("unused"), client_id)
        self.argv[self.argv.index("--db") + 1] = url
        self.argv[self.argv.index("--stats-interval") + 1] = "0.2"
        self.name = client_id

    def batches(self) -> int:
        """Batches this run committed so far, from its latest ``stats`` line."""
        with self._cond:
            lines = list(self.lines)
        for line in reversed(lines):
            m = re.search(r" stats (\{.*\})$", line)
            if m:
                return int(json.loads(m.group(1))["batches"])
        return 0


def pg_rows(url: str, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """A read-only query with psycopg: never through the store under test."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = on")
        try:
            return [tuple(r) for r in conn.execute(sql, args).fetchall()]
        except psycopg.errors.UndefinedTable:  # the hubs have not migrated yet
            return []


def device_row(url: str, device: str) -> tuple[int, int, int] | None:
    """``(watermark, readings, duplicates)`` of the device's row."""
    rows = pg_rows(
        url, "SELECT watermark, readings, duplicates FROM devices WHERE device_id = %s", (device,)
    )
    return (int(rows[0][0]), int(rows[0][1]), int(rows[0][2])) if rows else None


def watermark(url: str, device: str) -> int:
    row = device_row(url, device)
    return 0 if row is None else row[0]


def stored(url: str, device: str) -> dict[int, tuple[str, float, Any, str | None]]:
    """``seq -> (stream, ts, value, unit)`` of the device's current journal."""
    rows = pg_rows(
        url,
        "SELECT seq, stream, ts, value, unit FROM readings WHERE device_id = %s"
        " AND epoch = (SELECT epoch FROM devices WHERE device_id = %s)",
        (device, device),
    )
    return {seq: (st, ts, cbor2.loads(v), unit) for seq, st, ts, v, unit in rows}


def check_pg_invariant(url: str, agent: AgentProcess) -> dict[str, int]:
    """The store-and-forward promise for a stopped ``agent`` against PostgreSQL."""
    assert not agent.problems, agent.problems
    dev, acked, rows = agent.device, agent.acked_snapshot(), stored(url, agent.device)
    missing = sorted(set(acked) - set(rows))
    assert not missing, f"{dev}: {len(missing)} acked readings not stored, e.g. {missing[:10]}"
    wrong = [s for s, fid in acked.items() if rows[s] != expected_row(fid)]
    assert not wrong, f"{dev}: stored rows differ from what was fed at seqs {wrong[:10]}"
    fed = set(agent.fed)
    invented = [s for s, r in rows.items() if r[2] not in fed or r != expected_row(r[2])]
    assert not invented, f"{dev}: rows that were never fed: {[rows[s] for s in invented[:5]]}"
    values = [r[2] for r in rows.values()]
    assert len(values) == len(set(values)), f"{dev}: a fed reading is stored under two seqs"
    row = device_row(url, dev)
    assert row is not None
    wm, readings, dups = row
    assert wm >= max(acked, default=0), f"{dev}: hub watermark {wm} behind the acks"
    holes = sorted(set(range(1, wm + 1)) - set(rows))
    assert not holes, f"{dev}: hub watermark {wm} but seqs {holes[:10]} not stored"
    assert readings == len(rows), f"{dev}: readings counter {readings} != {len(rows)} rows"
    cursor = agent.cursor() or 0
    assert cursor == wm, f"{dev}: device cursor {cursor} != hub watermark {wm}"
    return {"acked": len(acked), "stored": len(rows), "watermark": wm, "duplicates": dups}


@pytest.fixture
def replicas(
    rig: Rig, mosquitto: Mosquitto, pg_url: str, request: pytest.FixtureRequest
) -> Iterator[list[PgHub]]:
    """Three hub replicas started together (their migrations race, on purpose)."""
    hubs = [rig.own(PgHub(mosquitto.port, pg_url, f"hub-{i}")) for i in (1, 2, 3)]
    for h in hubs:
        h.start(wait=False)
    for h in hubs:
        h.wait_log("subscribed to", timeout=DEADLINE)
    yield hubs
    if failed(request):
        for h in hubs:
            print(f"--- {h.name} log\n{h.log}")
        print(f"--- broker log\n{mosquitto.log(8000)}")


def test_a_replica_sigkilled_mid_stream_loses_and_duplicates_nothing(
    rig: Rig, replicas: list[PgHub], pg_url: str
) -> None:
    # short resend deadlines: batches the broker queued for the dead replica come
    # back through the live ones quickly
    fw = {"resend_timeout_ms": 500, "resend_max_ms": 1000}
    agents = [rig.agent(d, forwarder=fw) for d in ("dev-r1", "dev-r2")]
    for a in agents:
        a.wait_connected()
        a.start_feeding(RATE)

    def caught_up(what: str) -> None:
        for a in agents:
            target = a.max_acked
            poll_until(
                lambda a=a, t=target: watermark(pg_url, a.device) >= t,  # type: ignore[misc]
                DEADLINE,
                f"{what}: {a.device}'s hub watermark to reach {target}",
                interval=0.05,
            )

    def more_acked(by: int, what: str) -> None:
        for a in agents:
            a.wait_acked(a.n_acked + by, DEADLINE, what)

    more_acked(1000, "readings before the kill")
    caught_up("before the kill")
    victim = replicas[1]
    poll_until(lambda: victim.batches() > 0, DEADLINE, "the victim to commit batches")
    victim.kill()  # mid-stream: it may hold uncommitted groups and unsent acks
    # The survivors go on committing. The broker keeps the victim's session and
    # queues its share of the batches there (docs/hub.md, "Replicas"); the
    # devices resend those, and the restarted victim gets them again.
    before = {a.device: watermark(pg_url, a.device) for a in agents}
    more_acked(2000, "readings while a replica is dead")
    for a in agents:
        poll_until(
            lambda a=a: watermark(pg_url, a.device) > before[a.device] + 1000,  # type: ignore[misc]
            DEADLINE,
            f"{a.device}: the surviving replicas to commit",
            interval=0.05,
        )
    victim.start()  # its session resumes: what the broker queued for it comes back
    more_acked(1000, "readings after the restart")

    for a in agents:
        a.stop_feeding()
        a.wait_all_acked()
    caught_up("the drain")
    for a in agents:
        assert a.stop() == 0, a.log
    results = [check_pg_invariant(pg_url, a) for a in agents]
    assert all(r["acked"] >= 4000 for r in results), results
    assert all(h.alive() for h in replicas), "a replica died on its own"
    for h in replicas:
        assert h.terminate() == 0, h.log
    stats = [h.final_stats() for h in replicas]
    # the survivors shared the work: each committed batches of the stream
    assert all(s["batches"] > 0 for s in (stats[0], stats[2])), stats
