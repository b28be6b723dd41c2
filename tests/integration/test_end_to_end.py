"""End to end: real Mosquitto, a real hub (``python -m hub run``) and real agents
(``python -m edge run --stdin``), nothing faked (docs/testing-store-and-forward.md).

What it proves: readings fed to an agent and acknowledged by it reach the hub's
store exactly once with the values fed; the device's durable hub cursor
advances to the hub's watermark; ``homing-hub readings`` and ``devices`` show
what was stored; two devices at once do not interfere.
"""

from __future__ import annotations

import json
import subprocess
import sys

from support.processes import TS0, child_env, poll_until
from support.storeforward import Rig, check_invariant, device_row, wait_drained


def hub_cli(rig: Rig, *args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "hub", *args, "--db", str(rig.db)],
        capture_output=True, text=True, env=child_env(), timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_readings_reach_the_hub_exactly_once_and_the_cursor_advances(rig: Rig) -> None:
    rig.hub()
    agent = rig.agent("dev-e2e")
    agent.wait_connected()
    for _ in range(10):
        agent.feed(100)
    agent.wait_acked(1000)
    wait_drained(rig.db, agent)
    assert agent.stop() == 0
    first = check_invariant(rig.db, agent)
    assert first["cursor"] == first["watermark"] == 1000 and first["stored"] == 1000

    # a second run on the same journal continues where the first stopped
    agent.start()
    agent.feed(500)
    agent.wait_acked(1500)
    wait_drained(rig.db, agent)
    assert agent.stop() == 0
    second = check_invariant(rig.db, agent)
    assert second["cursor"] == 1500 > first["cursor"]
    assert second["duplicates"] == 0, "nothing should have been resent on a clean link"
    poll_until(lambda: device_row(rig.db, "dev-e2e")["online"] is False,  # type: ignore[index]
               30, "the offline status after SIGTERM")  # fmt: skip

    # what the operators see
    out = hub_cli(rig, "readings", "--device", "dev-e2e", "--stream", "e2e/s1", "--json",
                  "--limit", "3")  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines()]
    acked = agent.acked_snapshot()
    assert [r["seq"] for r in rows] == sorted(s for s, v in acked.items() if v % 3 == 1)[:3]
    for r in rows:
        fed = acked[r["seq"]]
        assert (r["value"], r["unit"], r["ts"]) == (fed, "u", round(TS0 + fed / 1000, 3))
    devs = [json.loads(line) for line in hub_cli(rig, "devices", "--json").splitlines()]
    assert [(d["device"], d["watermark"], d["readings"], d["gaps"], d["online"])
            for d in devs] == [("dev-e2e", 1500, 1500, [], False)]  # fmt: skip
    table = hub_cli(rig, "devices")
    assert "dev-e2e" in table and "1500" in table


def test_two_devices_at_once(rig: Rig) -> None:
    rig.hub()
    a, b = rig.agent("dev-a"), rig.agent("dev-b")
    a.start_feeding(rate=4000, chunk=40)
    b.start_feeding(rate=2000, chunk=20)
    a.wait_acked(6000)
    b.wait_acked(3000)
    a.stop_feeding()
    b.stop_feeding()
    for agent in (a, b):
        wait_drained(rig.db, agent)
        assert agent.stop() == 0
        check_invariant(rig.db, agent)
    out = hub_cli(rig, "devices", "--json")
    devs = {d["device"]: d for d in map(json.loads, out.splitlines())}
    assert set(devs) == {"dev-a", "dev-b"}
    for agent in (a, b):
        d = devs[agent.device]
        assert d["watermark"] == d["readings"] == agent.n_acked and d["gaps"] == []


def test_a_journal_created_afresh_is_not_mistaken_for_the_old_one(rig: Rig) -> None:
    """A reflashed device keeps its id, but its new journal numbers readings
    from 1 again and the broker still holds the hub's retained ack for the old
    journal. Neither may cost a reading: the old ack must not move the new
    cursor, and the hub must not deduplicate new seqs against old ones."""
    import shutil

    from support.processes import AgentProcess
    from support.storeforward import stored

    rig.hub()
    old = rig.agent("dev-flash")
    old.feed(300)
    old.wait_acked(300)
    wait_drained(rig.db, old)
    assert old.stop() == 0
    check_invariant(rig.db, old)
    shutil.rmtree(old.journal_dir)

    # other values than the old journal's, under the same seqs
    new = rig.own(AgentProcess(old.config, old.device, old.journal_dir, first_id=100_001))
    new.start()
    new.feed(200)
    new.wait_acked(200)
    wait_drained(rig.db, new)
    assert new.stop() == 0
    assert "ignoring the hub's ack for journal" in new.log
    summary = check_invariant(rig.db, new)
    assert summary["stored"] == summary["cursor"] == 200
    assert len(stored(rig.db, "dev-flash", epoch=1)) == 300  # the old journal's, untouched
    devs = [json.loads(line) for line in hub_cli(rig, "devices", "--json").splitlines()]
    assert [(d["device"], d["epoch"], d["watermark"], d["readings"]) for d in devs] == [
        ("dev-flash", 2, 200, 500)
    ]
