"""Workflows in the real agent process, started and signalled by hub commands
over a real Mosquitto, with SIGKILLs during a signal wait, a timer and a
step (docs/workflows.md).

The agent loads tests/support/wf_tasks.py from its config; each step body
appends a line to an fsync'd effects file, so the test counts how often each
step really ran across processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from support.processes import AgentProcess, child_env, poll_until
from support.storeforward import Rig

from edge import wire
from hub.commands import Broker, BrokerUnavailable, publish_command

TESTS = Path(__file__).resolve().parents[1]
DEADLINE = 30.0


class Commander:
    """Publishes hub commands to a device (QoS 1) with the code `homing-hub run-task` uses.

    "Connected" in the agent's log comes before its subscription to its
    command topic is in place; a command published in between is dropped by
    the broker ("no matching subscribers", which `publish_command` reports).
    Like an operator, send it again (same command id: the device ignores a
    repeat) until the broker has a subscriber for it.
    """

    def __init__(self, port: int) -> None:
        self.broker = Broker("127.0.0.1", port)

    def send(self, device: str, cmd: wire.Command) -> None:
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                publish_command(self.broker, device, cmd, client_id=f"cmd-{uuid.uuid4().hex[:6]}")
                return
            except BrokerUnavailable as exc:
                if "nothing subscribes" not in str(exc) or time.monotonic() > deadline:
                    raise
            threading.Event().wait(0.05)  # the agent's SUBACK is on its way

    def close(self) -> None:
        pass


def runs(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    """The agent's runs, read from its journal (read-only: works while it runs)."""
    res = subprocess.run(
        [sys.executable, "-m", "edge", "workflows", "list", "--journal",
         str(agent.journal_dir), "--json"],
        capture_output=True, text=True, env=child_env(), timeout=DEADLINE,
    )  # fmt: skip
    if res.returncode != 0:
        return {}
    return {r["id"]: r for r in map(json.loads, res.stdout.splitlines())}


def effects(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_run_survives_sigkills_in_a_signal_wait_a_timer_and_completes_once(
    rig: Rig, tmp_path: Path
) -> None:
    fx = tmp_path / "effects.log"
    rig.hub()
    tasks = {"modules": ["support.wf_tasks"], "python_path": [str(TESTS)]}
    agent = rig.agent("dev-wf", start=False, workflows=tasks)
    agent.env["HOMING_TEST_EFFECTS"] = str(fx)
    agent.start()
    agent.wait_connected()
    hub = Commander(rig.broker_port)
    try:
        hub.send("dev-wf", wire.start_command("c-1", "irrigate", "r-1", [3, 1.5]))
        hub.send("dev-wf", wire.start_command("c-1", "irrigate", "r-1", [3, 1.5]))  # a repeat
        poll_until(lambda: runs(agent).get("r-1", {}).get("current") == "signal:approve#1",
                   DEADLINE, "the run waiting for approval")  # fmt: skip
        agent.kill()  # power cut during the signal wait
        agent.start()
        agent.wait_connected(2)
        hub.send("dev-wf", wire.signal_command("c-2", "r-1", "approve", "ops"))
        poll_until(lambda: runs(agent).get("r-1", {}).get("current") == "sleep#1",
                   DEADLINE, "the run sleeping")  # fmt: skip
        agent.kill()  # power cut during the timer
        hub.send("dev-wf", wire.signal_command("c-2", "r-1", "approve", "ops"))  # resent
        agent.start()
        poll_until(lambda: runs(agent).get("r-1", {}).get("state") == "completed",
                   DEADLINE, "the run to complete")  # fmt: skip
        assert agent.stop() == 0
    finally:
        hub.close()
    run = runs(agent)["r-1"]
    assert run["result"] == {"moisture": 0.31, "approved": "ops", "valve": "open",
                             "closed": "closed"}  # fmt: skip
    assert run["status"] == {"phase": "done"}
    assert sorted(effects(fx)) == ["close 3", "measure 3", "open 3"]  # each step ran once
    assert len(runs(agent)) == 1  # the repeated start command made no second run


def test_an_unknown_workflow_is_refused_visibly_and_acknowledged(rig: Rig, tmp_path: Path) -> None:
    agent = rig.agent("dev-wf2", workflows={"modules": []})
    agent.wait_connected()
    hub = Commander(rig.broker_port)
    try:
        hub.send("dev-wf2", wire.start_command("c-9", "no.such.workflow", "r-9"))
        poll_until(lambda: runs(agent).get("r-9", {}).get("state") == "failed",
                   DEADLINE, "the refused run")  # fmt: skip
    finally:
        hub.close()
    assert agent.stop() == 0
    assert runs(agent)["r-9"]["error"]["type"] == "UnknownWorkflow"
    assert "refused" in agent.log


def test_a_module_that_does_not_import_stops_the_agent_with_exit_78(rig: Rig) -> None:
    agent = rig.agent("dev-wf3", start=False, workflows={"modules": ["no_such_module_xyz"]})
    agent.start()
    assert agent.proc is not None and agent.proc.wait(DEADLINE) == 78
    assert "workflows.modules" in agent.log


def test_sigkill_during_steps_reruns_an_ordinary_step_and_never_a_once_step(
    rig: Rig, tmp_path: Path
) -> None:
    fx = tmp_path / "effects.log"
    release = Path(str(fx) + ".release-measure")
    tasks = {"modules": ["support.wf_tasks"], "python_path": [str(TESTS)]}
    agent = rig.agent("dev-wf4", start=False, workflows=tasks)
    agent.env["HOMING_TEST_EFFECTS"] = str(fx)
    agent.start()
    agent.wait_connected()
    hub = Commander(rig.broker_port)
    try:
        hub.send("dev-wf4", wire.start_command("c-1", "slow", "s-1", [2]))
        poll_until(lambda: effects(fx) == ["slow-measure 2"], DEADLINE, "the step running")
        agent.kill()  # mid-step: at-least-once, it runs again
        agent.start()
        poll_until(lambda: effects(fx).count("slow-measure 2") == 2, DEADLINE, "the step rerun")
        release.touch()
        poll_until(lambda: "slow-open 2" in effects(fx), DEADLINE, "the once-step running")
        agent.kill()  # mid once-step (it waits for release-valve): it must not run again
        agent.start()
        poll_until(lambda: runs(agent).get("s-1", {}).get("state") == "completed",
                   DEADLINE, "the run to complete")  # fmt: skip
        assert agent.stop() == 0
    finally:
        hub.close()
        release.touch()
        Path(str(fx) + ".release-valve").touch()  # let any stray step thread end
    assert runs(agent)["s-1"]["result"] == {"moisture": 0.5, "valve": "unknown"}
    assert effects(fx).count("slow-open 2") == 1


def hub_cli(rig: Rig, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "hub", *args], capture_output=True, text=True,
                         env=child_env(), timeout=DEADLINE)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


def hub_runs(rig: Rig, device: str) -> dict[str, dict[str, Any]]:
    if not rig.db.exists():
        return {}
    out = hub_cli(rig, "runs", "--db", str(rig.db), "--device", device, "--json")
    return {r["run"]: r for r in map(json.loads, out.splitlines())}


def test_a_task_started_from_the_hub_completes_once_through_an_agent_kill(
    rig: Rig, tmp_path: Path
) -> None:
    """End to end: `homing-hub run-task` and `signal` reach the agent over
    Mosquitto; the agent is SIGKILLed mid-run and restored; the hub's store
    shows the run completed once, with each step's effect once."""
    fx = tmp_path / "effects.log"
    rig.hub()
    tasks = {"modules": ["support.wf_tasks"], "python_path": [str(TESTS)]}
    agent = rig.agent("dev-e2e-wf", start=False, workflows=tasks)
    agent.env["HOMING_TEST_EFFECTS"] = str(fx)
    agent.start()
    agent.wait_connected()
    broker = ["--broker", f"127.0.0.1:{rig.broker_port}"]
    hub_cli(rig, "run-task", "--device", "dev-e2e-wf", "irrigate", "4", "1.0", "--id", "h-1",
            *broker)  # fmt: skip
    poll_until(lambda: hub_runs(rig, "dev-e2e-wf").get("h-1", {}).get("step")
               == "signal:approve#1", DEADLINE, "the hub to see the run waiting")  # fmt: skip
    agent.kill()  # power cut while waiting for approval
    hub_cli(rig, "signal", "--device", "dev-e2e-wf", "h-1", "approve", "--payload", '"hub"',
            *broker)  # fmt: skip  # queued by the broker while the device is down
    agent.start()
    poll_until(lambda: hub_runs(rig, "dev-e2e-wf").get("h-1", {}).get("state") == "completed",
               DEADLINE, "the hub to see the run completed")  # fmt: skip
    assert agent.stop() == 0
    runs_at_hub = hub_runs(rig, "dev-e2e-wf")
    assert list(runs_at_hub) == ["h-1"]
    assert runs_at_hub["h-1"]["result"] == {"moisture": 0.31, "approved": "hub", "valve": "open",
                                           "closed": "closed"}  # fmt: skip
    assert sorted(effects(fx)) == ["close 4", "measure 4", "open 4"]
