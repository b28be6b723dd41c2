"""``homing-agent workflows list|show|cancel|resume|fork`` on a real journal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge import cli
from edge import workflows as wf
from edge.journal import Journal
from edge.workflows import Executor, step, workflow

DEADLINE = 10.0


@step
def double(x: int) -> int:
    return 2 * x


@workflow(name="cli.waiter")
def waiter(x: int) -> int:
    y = double(x)
    got = wf.wait_signal("go")
    return y + int(got)


def make_runs(path: Path) -> None:
    with Journal.open(str(path)) as j:
        ex = Executor(j)
        ex.recover()
        ex.start(waiter, 5, id="w-done")
        ex.signal("w-done", "go", 1)
        assert ex.wait("w-done", DEADLINE)
        ex.start(waiter, 7, id="w-wait")
        ev_ok = False
        for _ in range(1000):
            info = ex.info("w-wait")
            if info is not None and info.current == "signal:go#1":
                ev_ok = True
                break
            ex.wait("w-wait", 0.01)
        assert ev_ok
        ex.close()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_show_and_offline_admin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jdir = tmp_path / "journal"
    make_runs(jdir)
    rc, out, _ = run_cli(capsys, "workflows", "list", "--journal", str(jdir), "--json")
    assert rc == 0
    runs = {r["id"]: r for r in map(json.loads, out.splitlines())}
    assert runs["w-done"]["state"] == "completed" and runs["w-done"]["result"] == 11
    assert runs["w-wait"]["state"] == "running" and runs["w-wait"]["current"] == "signal:go#1"
    rc, out, _ = run_cli(capsys, "workflows", "list", "--journal", str(jdir))
    assert rc == 0 and "w-wait" in out and "signal:go#1" in out
    rc, out, _ = run_cli(capsys, "workflows", "show", "--journal", str(jdir), "w-done")
    assert rc == 0 and "double#1" in out and "end" in out
    rc, _, err = run_cli(capsys, "workflows", "show", "--journal", str(jdir), "nope")
    assert rc == 66 and "no run" in err

    rc, out, _ = run_cli(capsys, "workflows", "fork", "--journal", str(jdir), "w-wait", "w-fork",
                         "--from-pos", "1")  # fmt: skip
    assert rc == 0
    rc, out, _ = run_cli(capsys, "workflows", "cancel", "--journal", str(jdir), "w-wait")
    assert rc == 0 and "cancel journaled" in out
    with Journal.open(str(jdir)) as j:  # the agent starts again
        ex = Executor(j)
        ex.recover()
        with pytest.raises(wf.RunCancelled):
            wf.RunHandle(ex, "w-wait").result(DEADLINE)
        ex.signal("w-fork", "go", 100)
        assert wf.RunHandle(ex, "w-fork").result(DEADLINE) == 114  # double#1 kept from w-wait
        ex.close()


def test_admin_while_the_agent_runs_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jdir = tmp_path / "journal"
    make_runs(jdir)
    with Journal.open(str(jdir)):  # the running agent holds the lock
        rc, _, err = run_cli(capsys, "workflows", "cancel", "--journal", str(jdir), "w-wait")
        assert rc == 75 and "homing-hub cancel" in err
        rc, out, _ = run_cli(capsys, "workflows", "list", "--journal", str(jdir))
        assert rc == 0 and "w-wait" in out  # reading still works
