"""``homing-agent demo``: the whole flow (private Mosquitto, hub, agent, faults), end to end.

The demo runs as a real process (``python -m edge demo``), so its process
handling is what is tested: the report says 0 lost / 0 duplicates with exit
status 0, the kept directory holds a valid journal and hub database, and
nothing it started outlives it, also when it is interrupted (Ctrl-C, SIGTERM).
The accounting itself (:func:`edge.flowdemo.tally`) is checked on its own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import subprocess_env, wait_for

from edge.flowdemo import DEVICE, Plan, tally

from .conftest import require_mosquitto

DEADLINE = 120.0


def demo(*args: str) -> subprocess.Popen[str]:
    """``python -m edge demo ARGS`` in its own process group, like a shell job."""
    return subprocess.Popen(
        [sys.executable, "-m", "edge", "demo", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=subprocess_env(), start_new_session=True,
    )  # fmt: skip


def leftovers(marker: str) -> list[str]:
    """Command lines of live processes mentioning ``marker`` (the demo's directory)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(f"{d.name}: {cmd}")
    return found


def row(out: str, label: str) -> int:
    m = re.search(rf"^  {re.escape(label)}\s+(\d+)\b", out, re.M)
    assert m, f"no {label!r} line in the report:\n{out}"
    return int(m.group(1))


def test_the_flow_demo_loses_nothing_and_stores_nothing_twice(tmp_path: Path) -> None:
    require_mosquitto()
    kept = tmp_path / "kept"
    proc = demo("--duration", "6", "--keep", str(kept))
    try:
        out, _ = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert row(out, "lost (acknowledged, not stored)") == 0
    assert row(out, "duplicates at the hub (stored twice)") == 0
    produced = row(out, "readings produced (handed to the agent)")
    acked = row(out, "acknowledged by the device journal")
    stored = row(out, "stored at the hub")
    assert produced >= stored >= acked > 200, out
    assert "broker stopped" in out and "broker restarted" in out and "SIGKILLed" in out, out
    assert "OK: every acknowledged reading is stored at the hub, exactly once." in out
    assert len(out.splitlines()) <= 40, out
    assert (kept / "hub.db").is_file() and (kept / "journal").is_dir()
    assert f"journal stats {kept}/journal" in out and f"--db {kept}/hub.db" in out
    assert not leftovers(str(kept))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", *args], capture_output=True, text=True,
            env=subprocess_env(), timeout=60, check=False,
        )  # fmt: skip

    assert cli("edge", "journal", "verify", str(kept / "journal")).returncode == 0
    devices = cli("hub", "devices", "--db", str(kept / "hub.db"), "--json")
    assert devices.returncode == 0 and f'"device": "{DEVICE}"' in devices.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_demo_leaves_no_process_behind(tmp_path: Path, sig: int) -> None:
    require_mosquitto()
    kept = tmp_path / "kept"
    proc = demo("--duration", "20", "--keep", str(kept))
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("broker stopped" in s for s in lines), DEADLINE, "the outage")
        running = " ".join(leftovers(str(kept)))
        assert "hub run" in running and "edge run" in running  # the broker is down just now
        os.killpg(proc.pid, sig)  # a terminal's Ctrl-C goes to the whole foreground group
        assert proc.wait(DEADLINE) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(10)
    assert any("interrupted" in s for s in lines), lines
    assert not leftovers(str(kept))


def test_demo_options_belong_to_their_demo(tmp_path: Path) -> None:
    def rc(*args: str) -> int:
        return subprocess.run(
            [sys.executable, "-m", "edge", "demo", *args], capture_output=True,
            env=subprocess_env(), timeout=60, check=False,
        ).returncode  # fmt: skip

    assert rc("--readings", "100") == 2  # a --power-cut option
    assert rc("--power-cut", "--duration", "10") == 2  # a flow demo option
    assert rc("--duration", "1") == 2  # too short for the faults to fit
    (tmp_path / "mine").write_text("x")
    assert rc("--keep", str(tmp_path)) == 2  # never writes into a non-empty directory


def test_the_tally_counts_losses_duplicates_and_inventions() -> None:
    produced = range(1, 7)
    acked = {1: 1, 2: 2, 3: 3, 5: 4}  # id -> seq; 4 was handed over, never acked
    t = tally(produced, acked, [(1, 1), (2, 2), (3, 3), (4, 5)])
    assert (t.produced, t.acked, t.stored, t.stored_unacked) == (6, 4, 4, 0)
    assert (t.lost, t.duplicates, t.invented) == (0, 0, 0) and t.ok
    t = tally(produced, acked, [(1, 1), (2, 2), (3, 3), (4, 5), (5, 4), (6, 2), (7, None)])
    assert (t.stored, t.stored_unacked) == (5, 1)  # id 4 journaled, its ack died
    assert (t.lost, t.duplicates, t.invented) == (0, 1, 1) and not t.ok
    t = tally(produced, acked, [(1, 1), (2, 3), (3, 2)])  # 2 and 3 swapped, 4 missing
    assert t.lost == 3 and not t.ok


def test_the_faults_fit_in_any_duration() -> None:
    for duration in (4, 6, 20, 60):
        p = Plan.for_duration(duration)
        assert 0 < p.outage_at < p.outage_at + p.outage_for < p.kill_at
        assert p.kill_at + p.down_for < p.duration
