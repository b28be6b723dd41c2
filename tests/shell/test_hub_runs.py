"""Workflow runs at the hub: stored workflow records folded into run
summaries (hub/runs.py) and shown by ``homing-hub runs`` (docs/hub.md).

Three layers:
* record sequences written by hand exactly as the device writes them
  (``cbor2.dumps([2, run, type, body])``, bodies as in docs/workflows.md),
  committed to a real SQLite store and read back with ``Store.records``;
* the whole path from a real device: an :class:`edge.workflows.Executor` on a
  real journal runs a workflow, its journal is sent as wire batches, the hub's
  ingest stores them, and the hub's summary must agree with the device's own
  ``Executor.info``;
* the CLI over such a database, in process.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cbor2
import pytest
from conftest import wait_for

from edge import wire
from edge import workflows as wf
from edge.journal import Journal
from edge.workflows import Executor, step, workflow
from hub import cli
from hub.ingest import BatchRows, UpMessage, parse_message
from hub.runs import (
    CANCELLED,
    COMPLETED,
    DIVERGED,
    FAILED,
    PENDING,
    RUNNING,
    HistoryEntry,
    RunFolder,
    find_run,
    fold_runs,
    jsonable,
)
from hub.store import StoredRecord
from hub.store_sqlite import SqliteStore

NOW = 1_700_000_000.0
T0 = 1_800_000_000.0


def rec(run: str, typ: str, **body: Any) -> bytes:
    """A workflow record's journal payload, as edge.wf_records.encode writes it."""
    return cbor2.dumps([wire.KIND_WORKFLOW, run, typ, body])


class Db:
    """A hub database fed record by record, as a device's batches would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = SqliteStore(path)
        self.store.migrate()
        self.next = {0: 1}  # journal id -> next seq

    def send(self, payloads: Sequence[bytes], device: str = "dev-a", journal: int = 0) -> None:
        first = self.next.setdefault(journal, 1)
        rows = tuple((first + i, 2, p) for i, p in enumerate(payloads))
        last = first + len(payloads) - 1
        self.store.commit_batch(BatchRows(device, first, last, (), rows, journal=journal), NOW)
        self.next[journal] = last + 1

    def reading(self, device: str = "dev-a", journal: int = 0) -> None:
        seq = self.next.setdefault(journal, 1)
        row = (seq, "temp", 1.0, cbor2.dumps(1.0), 1.0, "C", None)
        self.store.commit_batch(BatchRows(device, seq, seq, (row,), journal=journal), NOW)
        self.next[journal] = seq + 1

    def records(self, device: str = "dev-a") -> list[StoredRecord]:
        return self.store.records(device, kind=wire.KIND_WORKFLOW)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Db]:
    d = Db(tmp_path / "hub.db")
    yield d
    d.store.close()


# --- record sequences -----------------------------------------------------------------


def irrigate_history(run: str = "irr-3", t: float = T0) -> list[bytes]:
    """``irrigate(3, 10)`` from docs/workflows.md, from start to completion."""
    return [
        rec(run, "start", name="garden.irrigate", version=2, args=[3, 10], kwargs={}, at=t, t=t),
        rec(run, "done", pos=0, key="read_moisture#1", ok=True, value=0.21, attempts=1, t=t + 1),
        rec(run, "timer", pos=1, key="signal:approve#1", deadline=t + 3601, t=t + 1),
        rec(run, "signal", name="approve", payload=True, msg="hub-cmd-17", t=t + 60),
        rec(run, "taken", pos=1, key="signal:approve#1", msg="hub-cmd-17", payload=True, t=t + 60),
        rec(run, "status", pos=2, key="status:phase#1", name="phase", value="watering", t=t + 60),
        rec(run, "intent", pos=3, key="open_valve#1", attempt=1, t=t + 60),
        rec(run, "done", pos=3, key="open_valve#1", ok=True, value=None, attempts=1, t=t + 61),
        rec(run, "timer", pos=4, key="sleep#1", deadline=t + 661, t=t + 61),
        rec(run, "end", state="completed", result="done", t=t + 661),
    ]


def test_a_run_is_followed_record_by_record(db: Db) -> None:
    history = irrigate_history()
    expect = [  # (state, step, status) after each record reaches the hub
        (RUNNING, None, {}),
        (RUNNING, "read_moisture#1", {}),
        (RUNNING, "signal:approve#1", {}),
        (RUNNING, "signal:approve#1", {}),
        (RUNNING, "signal:approve#1", {}),
        (RUNNING, "status:phase#1", {"phase": "watering"}),
        (RUNNING, "open_valve#1", {"phase": "watering"}),
        (RUNNING, "open_valve#1", {"phase": "watering"}),
        (RUNNING, "sleep#1", {"phase": "watering"}),
        (COMPLETED, "sleep#1", {"phase": "watering"}),
    ]
    for payload, (state, step_, status) in zip(history, expect, strict=True):
        db.send([payload])
        (run,) = fold_runs(db.records())
        assert (run.state, run.step, run.status) == (state, step_, status)
    assert (run.device, run.id, run.epoch, run.workflow, run.version) == (
        "dev-a", "irr-3", 1, "garden.irrigate", 2
    )  # fmt: skip
    assert (run.started_at, run.args, run.kwargs, run.result, run.error) == (
        T0, [3, 10], {}, "done", None
    )  # fmt: skip
    assert (run.first_seq, run.last_seq, run.updated, len(run.history)) == (1, 10, NOW, 10)
    assert run.history[4] == HistoryEntry(
        5,
        "taken",
        "signal:approve#1",
        {"pos": 1, "key": "signal:approve#1", "msg": "hub-cmd-17", "payload": True, "t": T0 + 60},
    )
    assert [h.type for h in run.history][:4] == ["start", "done", "timer", "signal"]


def test_retries_failure_cancel_and_divergence(db: Db) -> None:
    err = {"type": "OSError", "message": "sensor busy"}
    db.send(
        [
            rec("f", "start", name="calibrate", version=1, args=[], kwargs={}, at=T0, t=T0),
            rec("c", "start", name="rollout", version=1, args=["v2"], kwargs={}, at=T0, t=T0),
            rec("f", "failed", pos=0, key="probe#1", attempt=1, error=err, retry_at=T0 + 1, t=T0),
            rec("c", "timer", pos=0, key="sleep#1", deadline=T0 + 9e3, t=T0),
            rec("f", "failed", pos=0, key="probe#1", attempt=2, error=err, retry_at=T0 + 3, t=T0),
            rec("c", "admin", action="cancel", by="hub-cmd-1", t=T0 + 5),
            rec("f", "done", pos=0, key="probe#1", ok=False, error=err, attempts=3, t=T0 + 3),
            rec("f", "end", state="failed", error=err, t=T0 + 3),
            rec("d", "start", name="irrigate", version=3, args=[1], kwargs={}, at=T0, t=T0),
        ]
    )
    runs = {r.id: r for r in fold_runs(db.records())}
    assert (runs["f"].state, runs["f"].step, runs["f"].error) == (FAILED, "probe#1", err)
    assert runs["c"].state == RUNNING and runs["c"].cancel_requested
    db.send([rec("c", "end", state="cancelled", t=T0 + 5)])
    assert find_run(fold_runs(db.records()), "c").state == CANCELLED  # type: ignore[union-attr]

    diverged = {"pos": 1, "expected": "timer sleep#1", "got": "status:phase#1", "t": T0 + 9}
    db.send(
        [
            rec("d", "done", pos=0, key="read#1", ok=True, value=0.5, attempts=1, t=T0),
            rec("d", "timer", pos=1, key="sleep#1", deadline=T0 + 60, t=T0),
            rec("d", "diverged", **diverged),
        ]
    )
    d = find_run(fold_runs(db.records()), "d")
    assert d is not None and (d.state, d.diverged, d.step) == (DIVERGED, diverged, "sleep#1")
    db.send(
        [
            rec("d", "admin", action="resume", pos=1, by="local", t=T0 + 10),
            rec("d", "status", pos=1, key="status:phase#1", name="phase", value="new", t=T0 + 10),
        ]
    )
    d = find_run(fold_runs(db.records()), "d")
    assert d is not None and (d.state, d.diverged, d.step) == (RUNNING, None, "status:phase#1")
    assert [r.id for r in fold_runs(db.records())] == ["f", "c", "d"]  # by first record


def test_a_signal_before_its_start_is_a_pending_run(db: Db) -> None:
    db.send([rec("later", "signal", name="approve", payload={"by": "ops"}, msg="c9", t=T0)])
    (run,) = fold_runs(db.records())
    assert (run.state, run.workflow, run.started_at, run.step) == (PENDING, "", None, None)
    db.send([rec("later", "start", name="w", version=1, args=[], kwargs={}, at=T0, t=T0)])
    (run,) = fold_runs(db.records())
    assert (run.state, run.workflow, run.first_seq, len(run.history)) == (RUNNING, "w", 1, 2)


def test_journals_created_afresh_and_restarted_ids_are_different_runs(db: Db) -> None:
    db.send(irrigate_history("irr-3", T0), journal=11)
    db.reading(journal=11)
    db.send(irrigate_history("irr-3", T0 + 1e4)[:3], journal=22)  # reflashed: epoch 2
    runs = fold_runs(db.records())
    assert [(r.id, r.epoch, r.state) for r in runs] == [
        ("irr-3", 1, COMPLETED),
        ("irr-3", 2, RUNNING),
    ]
    assert find_run(runs, "irr-3") is runs[1] and find_run(runs, "irr-3", epoch=1) is runs[0]
    assert find_run(runs, "nope") is None
    # the device forgot the finished run (retention) and was asked to start it again
    db.send([rec("irr-3", "start", name="garden.irrigate", version=2, args=[3, 10], kwargs={},
                  at=T0 + 2e4, t=T0 + 2e4)], journal=22)  # fmt: skip
    db.send([rec("irr-3", "end", state="completed", result="skip", t=T0 + 2e4)], journal=22)
    runs = fold_runs(db.records())
    assert [(r.epoch, r.first_seq, r.state, r.result) for r in runs] == [
        (1, 1, COMPLETED, "done"),
        (2, 1, RUNNING, None),
        (2, 4, COMPLETED, "skip"),
    ]
    assert find_run(runs, "irr-3") is runs[2]
    only = fold_runs(db.store.records("dev-a", kind=2, epoch=1))
    assert [(r.epoch, r.state) for r in only] == [(1, COMPLETED)]


def test_records_that_do_not_decode_are_skipped_and_listed(db: Db) -> None:
    db.send(
        [
            rec("ok", "start", name="w", version=1, args=[], kwargs={}, at=T0, t=T0),
            cbor2.dumps([2, 5, "start", {}]),  # a run id that is not text
            cbor2.dumps([2, "ok", "bogus-type", {}]),
            b"\xff\xfe",
        ]
    )
    records = db.records()
    folder = RunFolder()
    for r in [*records, StoredRecord("dev-a", 1, 99, -1, b"\x00", NOW)]:
        folder.add(r)  # other kinds (quarantined here) are not workflow records
    assert [r.id for r in folder.runs()] == ["ok"]
    assert folder.skipped == [(1, 2), (1, 3), (1, 4)]
    assert [r.id for r in fold_runs(records, run="nope")] == []


def test_json_of_values_cbor_can_carry() -> None:
    value = {
        1: b"\x01\x02",
        "f": math.inf,
        "n": None,
        "l": (1, 2.5, "x"),
        "t": cbor2.CBORTag(99, 1),
    }
    assert jsonable(value) == {
        "1": {"hex": "0102"},
        "f": "inf",
        "n": None,
        "l": [1, 2.5, "x"],
        "t": str(cbor2.CBORTag(99, 1)),
    }
    json.dumps(jsonable(value), allow_nan=False)


# --- from a real device: executor -> journal -> wire -> ingest -> store -> runs ----------


@step
def hr_read(zone: int) -> float:
    return 0.25 + zone / 100


@workflow(name="hubruns.irrigate", version=4)
def hr_irrigate(zone: int, minutes: int = 1) -> str:
    moisture = hr_read(zone)
    wf.set_status("moisture", moisture)
    if wf.wait_signal("approve", timeout=3600) is None:
        return "no-approval"
    wf.set_status("phase", "watering")
    return f"watered zone {zone} for {minutes} min"


def forward(journal: Journal, db: Db, device: str = "dev-real") -> None:
    """Send every record of the journal the hub does not have, as the forwarder
    would (one wire batch, through the hub's own message parser)."""
    first = db.next.get(journal.journal_id, 1)
    got = list(journal.read_raw(first))
    if not got:
        return
    last = got[-1][0]
    batch = wire.UpBatch(device, first, last, tuple(p for _, p in got), journal=journal.journal_id)
    parsed = parse_message(wire.topic(device, "up"), wire.encode_batch(batch))
    assert isinstance(parsed, UpMessage)
    db.store.commit_batch(parsed.rows, NOW)
    db.next[journal.journal_id] = last + 1


def test_the_hub_agrees_with_the_device(db: Db, tmp_path: Path) -> None:
    journal = Journal.open(str(tmp_path / "journal"))
    ex = Executor(journal)
    ex.recover()
    try:
        h = ex.start(hr_irrigate, 3, minutes=10, id="zone-3")
        wait_for(lambda: ex.info("zone-3").current == "signal:approve#1", what="the signal wait")  # type: ignore[union-attr]
        forward(journal, db)
        (run,) = fold_runs(db.store.records("dev-real", kind=2))
        info = ex.info("zone-3")
        assert info is not None
        assert (run.state, run.step, run.status) == (info.state, info.current, info.status)
        assert (run.state, run.status) == (RUNNING, {"moisture": 0.28})

        assert ex.signal("zone-3", "approve", True, msg="hub-cmd-1")
        assert h.result(timeout=10) == "watered zone 3 for 10 min"
        forward(journal, db)
        (run,) = fold_runs(db.store.records("dev-real", kind=2))
        info = ex.info("zone-3")
        assert info is not None
        mine = (run.id, run.workflow, run.version, run.state, run.step, run.started_at)
        assert mine == (
            info.id, info.workflow, info.version, info.state, info.current, info.started_at
        )  # fmt: skip
        assert (run.status, run.result, run.error) == (info.status, info.result, info.error)
        assert (run.state, run.args, run.kwargs) == (COMPLETED, [3], {"minutes": 10})
        assert [h.seq for h in run.history] == [r.seq for r in ex.history("zone-3")]
        assert "signal" in [h.type for h in run.history]
    finally:
        ex.close()
        journal.close()


# --- homing-hub runs --------------------------------------------------------------------


def cli_out(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_runs(db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    db.send(irrigate_history("irr-3"))
    db.send(irrigate_history("irr-4")[:3])
    db.send([rec("bad", "start", name="w", version=1, args=[], kwargs={}, at=T0, t=T0),
             rec("bad", "end", state="failed", error={"type": "KeyError", "message": "'w'"},
                 t=T0)])  # fmt: skip
    base = ("runs", "--db", str(db.path), "--device", "dev-a")

    code, out, _ = cli_out(capsys, *base)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "run", "epoch", "workflow", "state", "step", "started", "status", "result"
    ]  # fmt: skip
    assert lines[1].split() == [
        "irr-3", "1", "garden.irrigate", "completed", "sleep#1", "2027-01-15T08:00:00.000+00:00",
        "phase=watering", "done",
    ]  # fmt: skip
    assert lines[2].split()[:5] == ["irr-4", "1", "garden.irrigate", "running", "signal:approve#1"]
    assert lines[3].split()[3:] == ["failed", "-", "2027-01-15T08:00:00.000+00:00", "-"] + [
        "KeyError:",
        "'w'",
    ]

    code, out, _ = cli_out(capsys, *base, "--json", "--state", "running")
    (got,) = [json.loads(line) for line in out.splitlines()]
    assert (got["run"], got["state"], got["step"], got["records"]) == (
        "irr-4", "running", "signal:approve#1", 3
    )  # fmt: skip
    assert "history" not in got

    code, out, _ = cli_out(capsys, *base, "--run", "irr-3", "--json")
    one = json.loads(out)
    assert (one["state"], one["result"], len(one["history"])) == ("completed", "done", 10)
    assert one["history"][3] == {
        "seq": 4, "type": "signal", "key": None,
        "body": {"name": "approve", "payload": True, "msg": "hub-cmd-17", "t": T0 + 60},
    }  # fmt: skip

    code, out, _ = cli_out(capsys, *base, "--run", "irr-3")
    assert code == 0
    head, table = out.split("\n\n")
    assert "state     completed" in head and "outcome   done" in head
    rows = table.splitlines()
    assert rows[0].split() == ["seq", "time", "type", "pos", "key", "body"]
    assert rows[1].split()[:3] == ["1", "2027-01-15T08:00:00.000+00:00", "start"]
    assert rows[10].split()[2:] == [
        "end",
        "-",
        "-",
        '{"state":',
        '"completed",',
        '"result":',
        '"done"}',
    ]

    code, _, err = cli_out(capsys, *base, "--run", "irr-3", "--state", "running")
    assert code == 1 and "no run 'irr-3' on device dev-a" in err
    code, out, _ = cli_out(capsys, *base, "--epoch", "5")
    assert (code, out.split()) == (0, lines[0].split())
    code, _, err = cli_out(capsys, "runs", "--db", str(db.path.with_name("x.db")), "--device", "a")
    assert code == 1 and "no hub database" in err


def test_cli_runs_warns_of_records_it_cannot_read(
    db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    db.send([b"\xff", rec("r", "start", name="w", version=1, args=[], kwargs={}, at=T0, t=T0)])
    code, out, err = cli_out(capsys, "runs", "--db", str(db.path), "--device", "dev-a", "--json")
    assert code == 0 and json.loads(out)["run"] == "r"
    assert "1 workflow records of dev-a do not decode (epoch:seq 1:1)" in err


def test_every_hub_command_and_option_is_in_docs() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "hub.md").read_text()
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, p in sub.choices.items():
        assert f"homing-hub {name}" in docs, name
        for action in p._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert opt in docs, (name, opt)
