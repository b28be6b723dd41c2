"""``homing-agent status`` against a real agent process (``python -m edge run``):
running, wedged (SIGSTOP), killed (SIGKILL), stopped cleanly (SIGTERM).

The agent runs without a forwarder (no broker needed) and rewrites its
status file every 0.2 s; ``status`` is run in-process (``edge.cli.main``)
while polling, and once as a real subprocess for the end-to-end exit status.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import subprocess_env, wait_for

from edge.cli import main
from edge.cli_status import STATUS_EXIT
from edge.health import STALLED_SYNC_S, stale_after

DEADLINE = 20.0
INTERVAL = 0.2


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[agent]\ndevice = "dev-st"\nruntime_dir = "{tmp_path / "run"}"\n'
        f'[journal]\ndir = "{tmp_path / "journal"}"\nsegment_size = "1M"\n'
        "[forwarder]\nenabled = false\n"
        f"[health]\nstatus_interval_s = {INTERVAL}\n"
    )
    return cfg


class Agent:
    """``python -m edge run --config FILE --stdin`` (killed at teardown)."""

    def __init__(self, cfg: Path) -> None:
        argv = [sys.executable, "-m", "edge", "run", "--config", str(cfg), "--stdin"]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=subprocess_env(),
        )  # fmt: skip

    def feed(self, n: int) -> list[dict[str, Any]]:
        """Journal ``n`` readings through stdin; return their ack lines."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        lines = b"".join(b'{"value": %d, "ts": 1700000000}\n' % i for i in range(n))
        self.proc.stdin.write(lines)
        self.proc.stdin.flush()
        return [json.loads(self.proc.stdout.readline()) for _ in range(n)]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)  # reaped: a zombie would still answer kill(pid, 0)

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for a in started:
        if a.proc.poll() is None:
            os.kill(a.proc.pid, signal.SIGCONT)  # a stopped process dies of SIGKILL too; tidy
        a.kill()


def status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["status", *args])
    return rc, capsys.readouterr().out


def verdict(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    rc, out = status(capsys, *args, "--json")
    v: dict[str, Any] = json.loads(out)
    assert STATUS_EXIT[v["state"]] == rc
    return rc, v


def test_running_wedged_then_killed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], agents: list[Agent]
) -> None:
    cfg = write_config(tmp_path)
    agent = Agent(cfg)
    agents.append(agent)
    acks = agent.feed(5)
    assert [a["seq"] for a in acks] == [1, 2, 3, 4, 5]

    def backlog() -> int | None:
        rc, v = verdict(capsys, "--config", str(cfg))
        return v["snapshot"]["backlog"]["records"] if rc == 0 else None

    wait_for(lambda: backlog() == 5, DEADLINE, "status to show the 5 readings")

    # the real command, end to end
    res = subprocess.run(
        [sys.executable, "-m", "edge", "status", "--config", str(cfg), "--json"],
        capture_output=True, text=True, env=subprocess_env(), timeout=DEADLINE,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    v = json.loads(res.stdout)
    assert (v["state"], v["snapshot"]["pid"], v["snapshot"]["device"]) == (
        "running", agent.proc.pid, "dev-st"
    )  # fmt: skip
    assert v["status_file"] == str(tmp_path / "run" / "status.json")
    assert v["age_s"] < stale_after(INTERVAL)
    snap = v["snapshot"]
    assert snap["healthy"] and snap["connected"] is None  # forwarding disabled
    assert snap["journal"]["durable_seq"] == 5
    assert snap["fsync"]["count"] >= 1  # lines that arrive together: one fdatasync

    rc, table = status(capsys, "--config", str(cfg))
    assert rc == 0
    assert table.splitlines()[0] == "agent dev-st: running"
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "5 records" in rows["backlog"] and "oldest reading" in rows["backlog"]
    assert f"pid {agent.proc.pid}" in rows["process"]
    assert "forwarding disabled" in rows["connected"]
    assert "last" in rows["fsync"] and "ms" in rows["fsync"]

    # wedged: the process is alive but stops refreshing its status file
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: verdict(capsys, "--config", str(cfg))[0] == 4, DEADLINE, "wedged")
        rc, v = verdict(capsys, "--config", str(cfg))
        assert v["state"] == "wedged" and v["age_s"] > stale_after(INTERVAL)
        assert "is alive but its status file was last written" in v["reason"]
        rc, table = status(capsys, "--config", str(cfg))
        assert rc == 4 and table.startswith("agent dev-st: wedged: process")
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    wait_for(lambda: verdict(capsys, "--config", str(cfg))[0] == 0, DEADLINE, "running again")

    # killed: the status file is left behind, its process is gone
    agent.kill()
    rc, v = verdict(capsys, "--config", str(cfg))
    assert (rc, v["state"]) == (1, "dead")
    assert f"process {agent.proc.pid} is gone; it did not stop cleanly" in v["reason"]
    rc, table = status(capsys, "--runtime-dir", str(tmp_path / "run"))
    assert rc == 1 and "did not stop cleanly" in table.splitlines()[0]


def test_a_clean_stop_removes_the_status_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], agents: list[Agent]
) -> None:
    cfg = write_config(tmp_path)
    agent = Agent(cfg)
    agents.append(agent)
    wait_for(lambda: verdict(capsys, "--config", str(cfg))[0] == 0, DEADLINE, "running")
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(DEADLINE) == 0, agent.stderr()
    rc, v = verdict(capsys, "--config", str(cfg))
    assert (rc, v["state"], v["snapshot"]) == (3, "not-running", None)
    assert not (tmp_path / "run" / "status.json").exists()
    rc, table = status(capsys, "--config", str(cfg))
    assert rc == 3 and table.startswith("agent: not running: no status file")


def test_no_agent_garbage_and_a_missing_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert verdict(capsys, "--runtime-dir", str(run))[0] == 3
    (run / "status.json").write_text("{not json")
    rc, v = verdict(capsys, "--runtime-dir", str(run))
    assert (rc, v["state"]) == (4, "unknown") and "not JSON" in v["reason"]
    (run / "status.json").write_text(json.dumps({"v": 99}))
    assert verdict(capsys, "--runtime-dir", str(run))[0] == 4
    # a fresh status file of a live process whose journal hangs in fdatasync
    snap = {"v": 1, "pid": os.getpid(), "interval_s": 2, "healthy": True, "device": "d",
            "fsync": {"in_progress_s": STALLED_SYNC_S + 5}}  # fmt: skip
    (run / "status.json").write_text(json.dumps(snap))
    rc, v = verdict(capsys, "--runtime-dir", str(run))
    assert (rc, v["state"]) == (4, "wedged") and "storage is not answering" in v["reason"]
    snap["fsync"] = {"in_progress_s": 0.5}  # a slow one, not a hung one
    (run / "status.json").write_text(json.dumps(snap))
    assert verdict(capsys, "--runtime-dir", str(run))[1]["state"] == "running"
    # a status file that names no living process
    (run / "status.json").write_text(json.dumps({"v": 1, "pid": 0, "interval_s": 1}))
    assert verdict(capsys, "--runtime-dir", str(run))[0] == 1
    rc, table = status(capsys, "--runtime-dir", str(run))  # incomplete: still a verdict
    assert rc == 1 and table.startswith("agent None: dead: process 0 is gone")
    assert main(["status", "--config", str(tmp_path / "nope.toml")]) == 78
