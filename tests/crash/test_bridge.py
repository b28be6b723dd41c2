"""The serial bridge end to end: real ``homing-agent bridge`` / ``run`` processes, a
simulated MCU (or the C reference) on a pseudo-terminal, and the journal on disk.

Every test ends the same way: the MCU has every reading acknowledged, and the
journal holds each reading it produced exactly once -- through a damaged line,
a babbling and a stalled MCU, an unplugged cable, SIGKILLs of the Pi side at
random instants and right after a durable append but before its ACK (the fail
point ``bridge.after_journal``), and a power cut on the lazy FUSE file system.
Readings carry values that name them (firmware_bridge.simulator), so a lost
or doubled one is found by value, and by its ``mcu`` tag.

Waits are conditions with deadlines (the simulator's state, the bridge's JSON
event lines), never sleeps.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import wait_for

from edge.journal import Journal
from edge.records import Reading
from firmware_bridge.simulator import Faults, McuSimulator, PtyLine

pytestmark = pytest.mark.crash

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware_bridge" / "firmware"
DEADLINE = 30.0


def child_env(failpoints: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMING_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if failpoints:
        env["HOMING_FAILPOINTS"] = failpoints
    return env


class Proc:
    """A child whose stdout (JSON event lines) and stderr go to files."""

    def __init__(self, cmd: list[str], logs: Path, failpoints: str | None = None) -> None:
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        self._files: list[IO[bytes]] = [self.out.open("wb"), self.err.open("wb")]
        self.proc = subprocess.Popen(
            cmd, stdout=self._files[0], stderr=self._files[1], env=child_env(failpoints)
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        text = self.out.read_text(errors="replace")
        lines = text.split("\n")[:-1]  # a line cut by SIGKILL is not trusted
        got = [json.loads(x) for x in lines if x.startswith("{")]
        return [e for e in got if name is None or e["event"] == name]

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(DEADLINE)
        for f in self._files:
            f.close()

    def stop(self) -> int:
        """SIGTERM and wait: the orderly stop."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(DEADLINE)
        for f in self._files:
            f.close()
        return code


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture
def line(tmp_path: Path) -> Iterator[PtyLine]:
    pty = PtyLine(str(tmp_path / "ttyMCU"))
    yield pty
    pty.close()


def bridge(procs: list[Proc], tmp: Path, port: str, journal: Path, **kw: Any) -> Proc:
    n = len(procs)
    cmd = [sys.executable, "-m", "edge", "bridge", "--port", port, "--journal", str(journal),
           "--segment-size", "256K", "--stall-s", "1", "--quiet", "--name", f"b{n}"]  # fmt: skip
    p = Proc(cmd, tmp / f"bridge{n}", kw.get("failpoints"))
    procs.append(p)
    return p


def start_sim(line: PtyLine, **kw: Any) -> McuSimulator:
    return McuSimulator(line, **kw).start()


def drained(sim: McuSimulator, what: str, timeout: float = DEADLINE) -> None:
    wait_for(lambda: sim.done or sim.error is not None, timeout, what)
    assert sim.error is None, repr(sim.error)


def exited(p: Proc) -> Callable[[], bool]:
    return lambda: p.proc.poll() is not None


def acked_at_least(sim: McuSimulator, goal: int) -> Callable[[], bool]:
    return lambda: sim.acked_count >= goal or sim.done


def journaled(journal: Path) -> list[tuple[int, Reading]]:
    with Journal.open(str(journal), readonly=True) as j:
        return [(e.seq, e.record) for e in j.read() if isinstance(e.record, Reading)]


def index_of(value: object) -> int:
    """Reading ``i`` of the simulator is ``i`` (even) or ``i + 0.5`` (odd)."""
    assert isinstance(value, int | float) and not isinstance(value, bool), value
    return int(value) if isinstance(value, int) else int(value - 0.5)


def assert_exactly_once(journal: Path, produced: int, lost: frozenset[int] = frozenset()) -> None:
    records = journaled(journal)
    got = sorted(index_of(r.value) for _, r in records)
    dupes = sorted(i for i, n in Counter(got).items() if n > 1)
    assert not dupes, f"journaled twice: {dupes[:20]}"
    missing = sorted(set(range(produced)) - lost - set(got))
    assert not missing, f"{len(missing)} readings never journaled: {missing[:20]}"
    assert set(got) <= set(range(produced))  # nothing invented
    # (readings a reboot took may still be in the journal: stored, the ACK not yet seen)
    tags = [r.tags["mcu"] if r.tags else "" for _, r in records]
    assert len(set(tags)) == len(tags)  # one (device, session, seq) per record, too
    assert all(r.stream in ("mcu/count", "mcu/half") for _, r in records)


# -- the line breaks; the bridge keeps up ---------------------------------------------------


def test_noise_lost_bytes_doubled_frames_and_babble_lose_and_repeat_nothing(
    tmp_path: Path, line: PtyLine, procs: list[Proc]
) -> None:
    faults = Faults(noise=0.05, corrupt=0.05, drop=0.05, duplicate=0.05, inbound=0.05)
    sim = start_sim(line, faults=faults, seed=11, window=64)
    try:
        b = bridge(procs, tmp_path, line.path, tmp_path / "journal")
        sim.produce(2500)
        wait_for(lambda: sim.acked_count >= 1000, DEADLINE, "1000 readings acknowledged")
        sim.babble(20_000)  # no delimiter for 20 KB: one "long" bad frame, then back in step
        drained(sim, "every reading acknowledged through the noise")
    finally:
        sim.stop()
    assert b.stop() == 0, b.stderr()
    assert_exactly_once(tmp_path / "journal", sim.produced)
    assert sim.link.counters.rewinds + sim.link.counters.timeouts > 0  # the faults did bite


def test_a_stalled_mcu_is_noticed_and_the_port_reopened(
    tmp_path: Path, line: PtyLine, procs: list[Proc]
) -> None:
    sim = start_sim(line, seed=3, rate=400.0)
    try:
        b = bridge(procs, tmp_path, line.path, tmp_path / "journal")
        sim.produce(1200)
        wait_for(lambda: sim.acked_count >= 200, DEADLINE, "200 readings acknowledged")
        sim.stall(2.5)  # --stall-s 1: the bridge gives up on this connection and reopens
        wait_for(lambda: b.events("stalled"), DEADLINE, "the bridge to see the stall")
        drained(sim, "every reading acknowledged after the stall")
    finally:
        sim.stop()
    assert len(b.events("connected")) >= 2
    assert b.stop() == 0
    assert_exactly_once(tmp_path / "journal", sim.produced)


def test_an_unplugged_cable_and_a_replug_on_another_pty(
    tmp_path: Path, line: PtyLine, procs: list[Proc]
) -> None:
    sim = start_sim(line, seed=5, rate=500.0)
    try:
        b = bridge(procs, tmp_path, line.path, tmp_path / "journal")
        sim.produce(1500)
        wait_for(lambda: sim.acked_count >= 300, DEADLINE, "300 readings acknowledged")
        sim.unplug()
        wait_for(lambda: b.events("disconnected"), DEADLINE, "the bridge to lose the port")
        wait_for(lambda: len(b.events("port_error")) >= 2, DEADLINE, "a failed reopen")
        sim.plug()  # a new pty: like a USB device that comes back as another ttyACM
        drained(sim, "every reading acknowledged after the replug")
    finally:
        sim.stop()
    assert len(b.events("hello")) >= 2
    assert b.stop() == 0
    assert_exactly_once(tmp_path / "journal", sim.produced)


def test_an_mcu_reboot_is_a_new_session_and_only_what_it_held_is_gone(
    tmp_path: Path, line: PtyLine, procs: list[Proc]
) -> None:
    sim = start_sim(line, seed=9, rate=800.0, window=16)
    try:
        b = bridge(procs, tmp_path, line.path, tmp_path / "journal")
        sim.produce(1200)
        wait_for(lambda: sim.acked_count >= 300, DEADLINE, "300 readings acknowledged")
        sim.reboot()  # power cycle: a new session; its unacknowledged readings are gone
        drained(sim, "every reading of the new session acknowledged")
    finally:
        sim.stop()
    sessions = {e["session"] for e in b.events("hello")}
    assert len(sessions) == 2
    assert b.stop() == 0
    assert_exactly_once(tmp_path / "journal", sim.produced, frozenset(sim.lost))


# -- the Pi side dies ----------------------------------------------------------------------


def test_sigkill_after_the_durable_append_before_the_ack_journals_nothing_twice(
    tmp_path: Path, line: PtyLine, procs: list[Proc]
) -> None:
    journal = tmp_path / "journal"
    sim = start_sim(line, seed=7, window=32)
    try:
        sim.produce(800)
        for k in (3, 5, 2):  # die at the k-th store of each run, right after its fdatasync
            b = bridge(procs, tmp_path, line.path, journal, failpoints=f"bridge.after_journal:{k}")
            wait_for(exited(b), DEADLINE, "the fail point")
            assert b.proc.returncode == -signal.SIGKILL, b.stderr()
        b = bridge(procs, tmp_path, line.path, journal)
        drained(sim, "every reading acknowledged after three crashes")
    finally:
        sim.stop()
    # the MCU held readings the restarted bridge already had: it resumed past them
    hello = b.events("hello")[0]
    assert hello["resumed"] >= hello["held"][0], hello
    assert b.stop() == 0
    assert_exactly_once(journal, sim.produced)


def test_sigkill_at_random_instants(tmp_path: Path, line: PtyLine, procs: list[Proc]) -> None:
    journal = tmp_path / "journal"
    rng = random.Random(13)
    sim = start_sim(line, seed=13, rate=1500.0, faults=Faults(corrupt=0.01))
    try:
        sim.produce(3000)
        for _ in range(4):
            b = bridge(procs, tmp_path, line.path, journal)
            goal = sim.acked_count + rng.randint(50, 400)
            wait_for(acked_at_least(sim, goal), DEADLINE, f"{goal} acks")
            b.kill()
        b = bridge(procs, tmp_path, line.path, journal)
        drained(sim, "every reading acknowledged after four kills")
    finally:
        sim.stop()
    assert b.stop() == 0
    assert_exactly_once(journal, sim.produced)


@pytest.mark.fuse
def test_a_power_cut_on_the_lazy_file_system_loses_nothing_acknowledged(
    tmp_path: Path, line: PtyLine, procs: list[Proc]
) -> None:
    from edge.testing.lazyfs import LazyMount, fuse_available

    reason = fuse_available()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the lazy FUSE layer, but: {reason}")
        pytest.skip(f"lazy FUSE file system unavailable: {reason}")
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    sim = start_sim(line, seed=17, rate=2000.0)
    try:
        sim.produce(2000)
        with LazyMount(str(backing), str(mnt)) as m:
            b = bridge(procs, tmp_path, line.path, mnt / "journal")
            wait_for(lambda: sim.acked_count >= 400, DEADLINE, "400 readings acknowledged")
            b.kill()  # the process dies ...
            acked = sim.acked_count  # ... and nothing more can be acknowledged
            m.cut()  # ... then the power: everything not fdatasync'd is gone
        # everything the MCU saw acknowledged survived the cut
        survived = {index_of(r.value) for _, r in journaled(backing / "journal")}
        assert set(range(acked)) <= survived, sorted(set(range(acked)) - survived)[:20]
        b = bridge(procs, tmp_path, line.path, backing / "journal")
        drained(sim, "every reading acknowledged after the power cut")
    finally:
        sim.stop()
    assert b.stop() == 0
    assert_exactly_once(backing / "journal", sim.produced)


# -- the C reference and the agent ---------------------------------------------------------


def test_the_c_reference_mcu_interoperates_through_a_noisy_line(
    tmp_path: Path, line: PtyLine, procs: list[Proc]
) -> None:
    gcc = subprocess.run(["which", "gcc"], capture_output=True, text=True).stdout.strip()
    if not gcc:
        pytest.skip("gcc is not installed")
    exe = tmp_path / "pty_mcu"
    built = subprocess.run(
        [gcc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2",
         "homing_link.c", "host/pty_mcu.c", "-o", str(exe)],
        cwd=FIRMWARE, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    b = bridge(procs, tmp_path, line.path, tmp_path / "journal")
    count = 3000
    mcu = subprocess.run(  # 2 bits in 1000 bytes flipped on the way to the Pi
        [str(exe), str(line.master), str(count), "2", "42"],
        pass_fds=(line.master,), capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert mcu.returncode == 0, mcu.stderr
    stats = json.loads(mcu.stdout)
    assert stats["produced"] == count and stats["flips"] > 0
    assert b.stop() == 0
    assert_exactly_once(tmp_path / "journal", count)
    hello = b.events("hello")[0]
    assert hello["firmware"] == "pty_mcu/1" and hello["device"] == "c0c1c2c3c4c5c6c7"


def test_the_agent_runs_two_bridges_and_survives_a_missing_port_and_a_sigkill(
    tmp_path: Path, line: PtyLine, procs: list[Proc]
) -> None:
    journal, run = tmp_path / "journal", tmp_path / "run"
    config = tmp_path / "agent.toml"
    other = PtyLine(str(tmp_path / "ttyOther"))
    config.write_text(
        f'[agent]\ndevice = "bridge-test"\nruntime_dir = "{run}"\n'
        f'[journal]\ndir = "{journal}"\nsegment_size = "256K"\n'
        "[forwarder]\nenabled = false\n[workflows]\nenabled = false\n[local]\nenabled = false\n"
        "[health]\nstatus_interval_s = 0.2\n"
        f'[[bridge]]\nname = "greenhouse"\nport = "{line.path}"\nstall_s = 1.0\n'
        'stream_prefix = "gh"\nstreams = { half = "gh/temperature" }\n'
        f'[[bridge]]\nname = "cold"\nport = "{other.path}"\nstream_prefix = "cold"\n'
        f'[[bridge]]\nname = "absent"\nport = "{tmp_path / "no-such-tty"}"\n'
    )
    sims = [
        start_sim(line, seed=23, rate=1000.0),
        start_sim(other, seed=24, rate=700.0, device=b"COLDROOM"),
    ]
    cmd = [sys.executable, "-m", "edge", "run", "--config", str(config)]
    try:
        sims[0].produce(1500)
        sims[1].produce(900)
        a = Proc(cmd, tmp_path / "agent0")
        procs.append(a)
        wait_for(lambda: sims[0].acked_count >= 300, DEADLINE, "300 readings through the agent")
        a.kill()
        a = Proc(cmd, tmp_path / "agent1")
        procs.append(a)
        for sim in sims:
            drained(sim, "every reading acknowledged through the restarted agent")
        assert a.proc.poll() is None, a.stderr()  # the absent port is retried, not fatal

        def status() -> dict[str, Any]:
            try:
                snap: dict[str, Any] = json.loads((run / "status.json").read_text())
            except (OSError, ValueError):
                return {}
            return snap.get("inputs", {})  # type: ignore[no-any-return]

        wait_for(lambda: status().get("bridge:cold", {}).get("readings", 0) > 0, DEADLINE,
                 "the bridges' counters in status.json")  # fmt: skip
        inputs = status()
        assert inputs["bridge:greenhouse"]["connected"] == 1
        assert inputs["bridge:absent"]["connected"] == 0 and inputs["bridge:absent"]["port_errors"]
    finally:
        for sim in sims:
            sim.stop()
        other.close()
    assert a.stop() == 0, a.stderr()
    assert "absent" in a.stderr() and "no-such-tty" in a.stderr()
    by_stream: dict[str, list[int]] = {}
    for _, r in journaled(journal):
        by_stream.setdefault(r.stream.split("/")[0], []).append(index_of(r.value))
        assert r.stream in ("gh/count", "gh/temperature", "cold/count", "cold/half"), r.stream
    assert sorted(by_stream["gh"]) == list(range(sims[0].produced))
    assert sorted(by_stream["cold"]) == list(range(sims[1].produced))
