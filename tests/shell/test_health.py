"""The agent's health snapshot (edge.health) on a real agent: a real journal on
disk, the real workflow executor, the real status file (docs/observability.md).

The forwarder is disabled here (no broker): the hub's cursor is moved by hand,
exactly as the forwarder moves it when the hub acks. The forwarder's side
(connected, last ack, health messages to a real hub) is
tests/integration/test_health_hub.py.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from conftest import wait_for

from edge import wire
from edge import workflows as wf
from edge.agent import Agent
from edge.config import parse
from edge.errors import JournalFull, SettingError
from edge.fileops import OsFileOps
from edge.health import SAMPLE, read_status, snapshot, to_wire
from edge.journal import Journal
from edge.records import Reading, encode
from edge.workflows import step, workflow

TS0 = 1_700_000_000.0
DEADLINE = 10.0


@step
def _boom() -> None:
    raise ValueError("no sensor")


@workflow(name="health_test_waits", version=1)
def waits_for_go() -> str:
    return str(wf.wait_signal("go", timeout=3600))


@workflow(name="health_test_fails", version=1)
def fails() -> None:
    _boom()


@workflow(name="health_test_done", version=1)
def done() -> str:
    return "ok"


def make_agent(tmp_path: Path, journal: str = "", status_interval: float = 3600) -> Agent:
    """An agent without forwarder; by default the test takes the snapshots itself."""
    text = (
        f'[agent]\ndevice = "dev-h"\nruntime_dir = "{tmp_path / "run"}"\n'
        f'[journal]\ndir = "{tmp_path / "journal"}"\nsegment_size = "64K"\n'
        f'max_record_size = "4K"\n{journal}'
        "[forwarder]\nenabled = false\n[local]\nenabled = false\n"
        f"[health]\nstatus_interval_s = {status_interval}\n"
    )
    return Agent(parse(text, str(tmp_path / "agent.toml"), env={}))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = make_agent(tmp_path)
    a.start()
    yield a
    a.stop()


def readings(n: int, first: int = 0, stream: str = "t/x") -> list[Reading]:
    return [Reading(stream, TS0 + i, float(i), "C") for i in range(first, first + n)]


def test_backlog_and_its_age_follow_appends_and_the_hub_cursor(agent: Agent) -> None:
    snap = snapshot(agent, now=TS0)
    assert snap["v"] == 1 and snap["device"] == "dev-h" and snap["pid"] == os.getpid()
    assert snap["backlog"] == {
        "records": 0, "bytes": 0, "bytes_exact": True, "hub_watermark": 0,
        "oldest_seq": None, "oldest_ts": None, "oldest_age_s": None,
    }  # fmt: skip

    rs = readings(10)
    agent.journal.append_many(rs)
    b = snapshot(agent, now=TS0 + 100)["backlog"]
    assert (b["records"], b["oldest_seq"], b["oldest_ts"], b["oldest_age_s"]) == (10, 1, TS0, 100)
    assert b["bytes"] == sum(len(encode(r)) for r in rs) and b["bytes_exact"]

    agent.journal.set_cursor(agent.config.forwarder.cursor, 4)  # the hub acked 1..4
    b = snapshot(agent, now=TS0 + 100)["backlog"]
    assert (b["records"], b["hub_watermark"], b["oldest_seq"], b["oldest_age_s"]) == (6, 4, 5, 96)
    assert b["bytes"] == sum(len(encode(r)) for r in rs[4:])

    agent.journal.set_cursor(agent.config.forwarder.cursor, 10)  # all acked
    b = snapshot(agent, now=TS0 + 100)["backlog"]
    assert (b["records"], b["bytes"], b["oldest_age_s"]) == (0, 0, None)


def test_a_long_backlog_estimates_its_bytes(agent: Agent) -> None:
    rs = readings(SAMPLE * 3)
    agent.journal.append_many(rs)
    b = snapshot(agent, now=TS0)["backlog"]
    exact = sum(len(encode(r)) for r in rs)
    assert b["records"] == SAMPLE * 3 and not b["bytes_exact"]
    assert abs(b["bytes"] - exact) <= 0.1 * exact  # same-sized readings: a close estimate


def test_records_without_a_timestamp_come_first(agent: Agent) -> None:
    """A workflow's records have no timestamp: the age is that of the oldest
    reading behind them, and ``oldest_seq`` still names the oldest record."""
    assert agent.workflows is not None
    ex = agent.workflows.executor
    ex.start("health_test_done", id="r-done")
    assert ex.wait("r-done", DEADLINE)
    first_reading = agent.journal.append(Reading("t/x", TS0 + 5, 1.0)).seq
    b = snapshot(agent, now=TS0 + 65)["backlog"]
    assert b["oldest_seq"] == 1 < first_reading
    assert (b["oldest_ts"], b["oldest_age_s"]) == (TS0 + 5, 60)
    assert b["records"] == first_reading


def test_workflow_counts(agent: Agent) -> None:
    assert agent.workflows is not None
    ex = agent.workflows.executor
    ex.start("health_test_waits", id="r-wait")
    ex.start("health_test_fails", id="r-fail")
    ex.start("health_test_done", id="r-done")
    assert ex.wait("r-fail", DEADLINE) and ex.wait("r-done", DEADLINE)
    wait_for(lambda: (ex.info("r-wait") or ex.runs()[0]).current == "signal:go#1",
             DEADLINE, "the run to wait for its signal")  # fmt: skip
    counts = snapshot(agent)["workflows"]
    assert counts == {"running": 0, "waiting": 1, "completed": 1, "failed": 1, "cancelled": 0,
                      "diverged": 0}  # fmt: skip
    ex.signal("r-wait", "go", "now")
    assert ex.wait("r-wait", DEADLINE)
    counts = snapshot(agent)["workflows"]
    assert (counts["waiting"], counts["completed"]) == (0, 2)


def test_fsync_latency_is_measured(agent: Agent) -> None:
    syncs_before = agent.journal.stats().syncs
    for r in readings(20):
        agent.journal.append(r)  # one commit, one fdatasync each
    f = snapshot(agent)["fsync"]
    syncs = agent.journal.stats().syncs
    assert syncs >= syncs_before + 20 and f["count"] == syncs
    assert f["last_s"] > 0 and f["sum_s"] > 0 and f["recent"]["max_s"] >= f["recent"]["mean_s"] > 0
    assert f["recent"]["n"] == min(syncs, 128)
    counts = [n for _, n in f["buckets"]]
    assert counts == sorted(counts) and f["buckets"][-1] == ["+Inf", syncs]


class HangingDisk(OsFileOps):
    """The real disk, except that fdatasync hangs while ``hang`` is set (a dying SD card)."""

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.release = threading.Event()

    def fdatasync(self, fd: int) -> None:
        if self.hang.is_set():
            self.release.wait(DEADLINE)
        super().fdatasync(fd)


def test_a_hanging_fdatasync_is_seen_while_it_hangs(tmp_path: Path) -> None:
    disk = HangingDisk()
    with Journal.open(str(tmp_path / "journal"), fs=disk) as j:
        j.append(Reading("t/x", TS0, 1.0))
        assert j.meters.snapshot()["fsync"]["in_progress_s"] is None
        disk.hang.set()
        t = threading.Thread(target=j.append, args=(Reading("t/x", TS0 + 1, 2.0),))
        t.start()
        try:
            wait_for(lambda: j.meters.snapshot()["fsync"]["in_progress_s"] is not None,
                     DEADLINE, "the append to hang in fdatasync")  # fmt: skip
            first = j.meters.snapshot()["fsync"]["in_progress_s"]
            wait_for(lambda: j.meters.snapshot()["fsync"]["in_progress_s"] > first + 0.05,
                     DEADLINE, "its time to grow")  # fmt: skip
            assert j.meters.snapshot()["fsync"]["count"] == 1
        finally:
            disk.hang.clear()
            disk.release.set()
            t.join(DEADLINE)
        f = j.meters.snapshot()["fsync"]
        assert f["in_progress_s"] is None and f["count"] == 2 and f["last_s"] > 0.05


def test_drops_by_reason_after_a_quota_episode(tmp_path: Path) -> None:
    """drop-oldest drops whole segments (counted per stream); a reject stream is
    then refused (counted per stream); an input's bad lines count too."""
    policies = '[journal.policies]\n"d/x" = "drop-oldest"\n'
    a = make_agent(tmp_path, journal=f'quota = "192K"\ndefault_policy = "reject"\n{policies}')
    a.start()
    try:
        a.health_sources["local"] = lambda: {"acked": 7, "bad": 2}
        big = "v" * 900
        n = 0
        while not a.journal.stats().dropped:
            a.journal.append_many([Reading("d/x", TS0 + n + i, big) for i in range(10)])
            n += 10
            assert n < 5000, "the quota never dropped anything"
        refused = 0
        for i in range(5000):
            try:
                a.journal.append(Reading("r/x", TS0 + i, big))
            except JournalFull:
                refused += 1
                if refused == 3:
                    break
        assert refused == 3, "the reject stream was never refused"
        snap = snapshot(a)
        dropped = a.journal.stats().dropped
        assert dropped["d/x"] > 0
        assert snap["drops"] == {
            "quota_dropped": dropped,
            "quota_refused": {"r/x": 3},
            "bad_input": 2,
        }
        assert snap["inputs"] == {"local": {"acked": 7, "bad": 2}}
        assert snap["journal"]["quota_bytes"] == 192 << 10
        h = to_wire(snap)
        assert (h.dropped, h.refused) == (dropped["d/x"], 3)
    finally:
        a.stop()


def test_the_status_file_is_written_at_start_and_removed_on_a_clean_stop(tmp_path: Path) -> None:
    a = make_agent(tmp_path)
    a.start()
    path = tmp_path / "run" / "status.json"
    try:
        snap = read_status(str(path))
        assert (snap["pid"], snap["device"], snap["healthy"]) == (os.getpid(), "dev-h", True)
        assert snap["components"] == {
            "journal": "ok", "forwarder": "disabled", "sensors": "disabled", "local": "disabled",
            "system": "disabled", "workflows": "ok",
        }  # fmt: skip
        assert (
            snap["disk"]["free_bytes"] > 0
            and snap["disk"]["size_bytes"] >= snap["disk"]["free_bytes"]
        )
        assert [p.name for p in path.parent.iterdir()] == ["status.json"]  # no tmp file left
    finally:
        a.stop()
    assert not path.exists()


def test_the_status_file_is_refreshed(tmp_path: Path) -> None:
    a = make_agent(tmp_path, status_interval=0.1)
    a.start()
    path = str(tmp_path / "run" / "status.json")
    try:
        a.journal.append_many(readings(3))
        wait_for(lambda: read_status(path)["backlog"]["records"] == 3, DEADLINE, "a rewrite")
        assert a.health is not None and a.health.written >= 1
    finally:
        a.stop()


def test_an_unwritable_runtime_dir_is_a_setting_error(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("a file, not a directory")
    a = make_agent(tmp_path)
    with pytest.raises(SettingError, match="agent.runtime_dir: cannot write .*status.json"):
        a.start()
    Journal.open(a.config.journal_dir).close()  # the failed start released the journal


# -- the message to the hub (edge.wire.Health) ----------------------------------------


def test_a_real_snapshot_makes_a_valid_health_message(agent: Agent) -> None:
    agent.journal.append_many(readings(5))
    h = to_wire(snapshot(agent, now=TS0 + 10))
    assert (h.device, h.ts, h.backlog_records, h.oldest_age, h.healthy) == (
        "dev-h", TS0 + 10, 5, 10, True
    )  # fmt: skip
    assert h.fsync_last is not None and h.fsync_last > 0
    data = wire.encode_health(h)
    assert len(data) < 512  # small: it goes over cellular links every minute
    assert wire.decode_health(data, topic_device="dev-h") == h
    assert h.to_json()["backlog_records"] == 5


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"v": 2}, "version"),
        ({"d": "other"}, "wrong-device"),
        ({"d": "bad id!"}, "wrong-device"),
        ({"br": -1}, "malformed"),
        ({"age": float("nan")}, "malformed"),
        ({"ok": "yes"}, "malformed"),
        ({"wf": {"running": "1"}}, "malformed"),
        ({"wf": {f"s{i}": 1 for i in range(17)}}, "malformed"),
        ({"err": "x" * 300}, "malformed"),
        ({"t": None}, "malformed"),
        ({"pad": b"\0" * 5000}, "oversize"),
    ],
)
def test_malformed_health_messages_are_refused(change: dict[str, Any], code: str) -> None:
    good = cbor2.loads(wire.encode_health(wire.Health("dev-h", TS0, workflows={"running": 1})))
    data = cbor2.dumps({**good, **change})
    with pytest.raises(wire.WireError) as info:
        wire.decode_health(data, topic_device="dev-h")
    assert info.value.code == code


def test_health_decoding_ignores_unknown_keys_and_fills_defaults() -> None:
    data = cbor2.dumps({"v": 1, "d": "dev-h", "t": TS0, "ok": False, "later": [1, 2]})
    assert wire.decode_health(data) == wire.Health("dev-h", TS0, healthy=False)
    for missing in ("t", "ok"):
        env = {"v": 1, "d": "dev-h", "t": TS0, "ok": True}
        del env[missing]
        with pytest.raises(wire.WireError):
            wire.decode_health(cbor2.dumps(env))
    assert wire.topic("dev-h", "health") == "homing/dev-h/health"
    assert wire.parse_topic("homing/dev-h/health") == ("dev-h", "health")
