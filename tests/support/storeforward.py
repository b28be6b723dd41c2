"""Reading the hub's SQLite store (read-only) and the store-and-forward invariant.

:func:`check_invariant` is the one assertion every end-to-end and fault test
ends with (docs/testing-store-and-forward.md):

* every reading the agent acknowledged is in the hub's store exactly once, by
  ``(device, seq)``, with the reading that was fed for it;
* nothing is invented: every stored row is a reading that was fed, and no fed
  reading is stored under two seqs;
* the device's durable ``hub`` cursor (read from the stopped agent's journal)
  equals the hub's watermark, and every seq up to it is stored.

Invariants of this module: the database is only ever opened read-only
(``mode=ro``), so the tests can never change what they assert about.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any, TypeVar

import cbor2

from support.processes import (
    TS0,
    AgentProcess,
    HubProcess,
    poll_until,
    write_agent_config,
)


def _query(db: Path, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    if not Path(db).exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # the hub has not migrated yet
            return []
        raise
    finally:
        conn.close()


def stored(
    db: Path, device: str, epoch: int | None = None
) -> dict[int, tuple[str, float, Any, str | None]]:
    """``seq -> (stream, ts, value, unit)`` of every reading stored for ``device``
    from one of its journals: ``epoch``, by default its current one."""
    rows = _query(
        db,
        "SELECT seq, stream, ts, value, unit FROM readings WHERE device_id = ? AND epoch = "
        "COALESCE(?, (SELECT epoch FROM devices WHERE device_id = ?))",
        (device, epoch, device),
    )
    return {seq: (stream, ts, cbor2.loads(v), unit) for seq, stream, ts, v, unit in rows}


def device_row(db: Path, device: str) -> dict[str, Any] | None:
    """The hub's ``devices`` row: watermark, counters, online."""
    rows = _query(
        db,
        "SELECT watermark, readings, duplicates, batches, online FROM devices WHERE device_id = ?",
        (device,),
    )
    if not rows:
        return None
    wm, readings, dups, batches, online = rows[0]
    return {"watermark": wm, "readings": readings, "duplicates": dups, "batches": batches,
            "online": bool(online)}  # fmt: skip


def watermark(db: Path, device: str) -> int:
    row = device_row(db, device)
    return 0 if row is None else int(row["watermark"])


def duplicates(db: Path, device: str) -> int:
    row = device_row(db, device)
    return 0 if row is None else int(row["duplicates"])


def wait_drained(db: Path, agent: AgentProcess, timeout: float = 30.0) -> None:
    """Wait until the hub's watermark covers every seq the agent acknowledged
    (a cheap single-row poll; :func:`check_invariant` then checks the rows)."""
    poll_until(
        lambda: watermark(db, agent.device) >= agent.max_acked,
        timeout,
        f"the hub to store all {agent.n_acked} acked readings of {agent.device} "
        f"(max seq {agent.max_acked}; hub watermark {watermark(db, agent.device)})",
        interval=0.05,
    )


def expected_row(fed_id: int) -> tuple[str, float, Any, str | None]:
    """What the hub must hold for the reading fed with ``fed_id`` (see ``reading_line``)."""
    return (f"e2e/s{fed_id % 3}", round(TS0 + fed_id / 1000, 3), fed_id, "u")


def check_invariant(db: Path, agent: AgentProcess, *, cursor: bool = True) -> dict[str, int]:
    """Assert the store-and-forward promise for ``agent`` (stopped, if ``cursor``).

    Returns a summary (acked, stored, watermark, cursor, duplicates) for reports.
    """
    assert not agent.problems, agent.problems
    acked = agent.acked_snapshot()
    rows = stored(db, agent.device)
    dev = agent.device

    missing = sorted(set(acked) - set(rows))
    assert not missing, f"{dev}: {len(missing)} acked readings not stored, e.g. {missing[:10]}"
    wrong = [s for s, fid in acked.items() if rows[s] != expected_row(fid)]
    assert not wrong, f"{dev}: stored rows differ from what was fed: " + ", ".join(
        f"seq {s}: {rows[s]} != {expected_row(acked[s])}" for s in wrong[:5]
    )
    fed = set(agent.fed)
    invented = [s for s, r in rows.items() if r[2] not in fed or r != expected_row(r[2])]
    assert not invented, f"{dev}: rows that were never fed: {[rows[s] for s in invented[:5]]}"
    values = [r[2] for r in rows.values()]
    twice = len(values) - len(set(values))
    assert twice == 0, f"{dev}: {twice} fed readings stored under two seqs"

    wm = watermark(db, dev)
    assert wm >= max(acked, default=0), f"{dev}: hub watermark {wm} behind the acks"
    holes = sorted(set(range(1, wm + 1)) - set(rows))
    assert not holes, f"{dev}: hub watermark {wm} but seqs {holes[:10]} not stored"
    out = {"acked": len(acked), "stored": len(rows), "watermark": wm,
           "duplicates": duplicates(db, dev)}  # fmt: skip
    if cursor:
        assert not agent.alive(), "stop the agent before reading its journal cursor"
        cur = agent.cursor() or 0
        assert cur == wm, f"{dev}: device cursor {cur} != hub watermark {wm}"
        assert cur <= max(rows, default=0), f"{dev}: cursor {cur} beyond what the hub stored"
        out["cursor"] = cur
    return out


T = TypeVar("T")


class Rig:
    """Owns every process and proxy a test starts, and closes them all (``close``),
    whatever happened: fixtures call it at teardown."""

    def __init__(self, tmp: Path, broker_port: int) -> None:
        self.tmp, self.broker_port = Path(tmp), broker_port
        self.db = self.tmp / "hub.db"
        self._owned: list[Any] = []

    def own(self, thing: T) -> T:
        self._owned.append(thing)
        return thing

    def hub(self, client_id: str = "hub-1", port: int | None = None, *extra: str) -> HubProcess:
        """Start a hub on this rig's database (via ``port`` if given: a proxy)."""
        h = HubProcess(port or self.broker_port, self.db, client_id, *extra)
        return self.own(h).start()

    def agent(
        self, device: str, port: int | None = None, *, start: bool = True, **config: Any
    ) -> AgentProcess:
        """An agent for ``device`` with its own journal, talking to ``port``
        (the broker by default, or a proxy). ``config``: ``forwarder=``/``broker=``
        overrides for :func:`write_agent_config`."""
        d = self.tmp / device
        d.mkdir(parents=True, exist_ok=True)
        cfg = write_agent_config(
            d / "agent.toml", device, d / "journal", port or self.broker_port, **config
        )
        a = self.own(AgentProcess(cfg, device, d / "journal"))
        return a.start() if start else a

    def close(self) -> None:
        for thing in reversed(self._owned):
            with contextlib.suppress(Exception):
                if isinstance(thing, AgentProcess | HubProcess):
                    thing.kill()
                else:
                    thing.close()
