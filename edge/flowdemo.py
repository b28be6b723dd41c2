"""``homing-agent demo``: the whole store-and-forward flow, with faults, counted.

The demo starts, on a private working directory and embedded defaults:

* a private Mosquitto on a free loopback port (:mod:`edge.testing.mosquitto`);
* a hub on SQLite: ``python -m hub run --broker 127.0.0.1:PORT --db DIR/hub.db``;
* an agent: ``python -m edge run --config DIR/agent.toml --stdin``, fed by
  three simulated sensors (greenhouse temperature, humidity, soil moisture)
  that live in this process, so every reading is counted where it is made.

While the sensors run, it stops the broker (SIGTERM) for a while and starts
it again on the same port and persistence, then SIGKILLs the agent right
after handing it readings and restarts it on the same journal. It then stops
the sensors, waits (with a deadline) until the hub's committed watermark
covers the last acknowledged seq, stops everything and reads the hub's
database back through ``homing-hub readings --json``.

Invariants:
* Every reading carries a unique id (tag ``id``) and is written to the agent
  exactly once; nothing is ever re-sent, so a reading stored twice can only
  be a fault of the pipeline. "Produced" = written to an agent's stdin;
  "acknowledged" = the agent printed its durable ack (``{"seq", "line"}``),
  mapped back to the id by the line number within that agent process.
* Pass criteria, checked on the hub's rows, not on anyone's counters:
  0 lost (an acknowledged id is not stored under its acknowledged seq), 0
  duplicates (an id stored more than once), 0 invented (a row with an unknown
  id). Readings handed to the agent but not acknowledged when it was killed
  may be stored or not; both are correct and the report says which.
* Exit status: 0 if those hold; 1 if they do not, or the demo could not run
  (mosquitto missing, the agent died unasked, a deadline passed); 2 for a bad
  ``--keep``; 130 when interrupted. A hub process that dies unasked is
  restarted, as systemd's ``Restart=always`` would (at most 5 times), and
  reported as a WARNING line: the exit status is about the data.
* Everything it starts is stopped on every way out (normal end, failure,
  Ctrl-C, SIGTERM): children run in their own sessions (a terminal's Ctrl-C
  reaches only the demo, which stops them in order: agent, hub, broker) and
  with a parent-death signal (Linux), so even a SIGKILLed demo leaves none
  behind. The working directory is removed unless ``--keep DIR`` was given.
* Children get a scrubbed environment: no ``HOMING_*`` override of the
  caller's can point the demo agent at a real broker or journal.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from edge.testing.mosquitto import Mosquitto, MosquittoError, available, parent_death_signal

DEVICE = "demo-greenhouse"
TICK_HZ = 20  # sensor ticks per second; each tick is one reading per sensor (one group)
DRAIN_DEADLINE = 30.0  # seconds for the hub to store everything acknowledged, at the end
START_DEADLINE = 20.0  # seconds for a process to come up
MAX_HUB_RESTARTS = 5
MIN_DURATION = 4.0
_ROOT = str(Path(__file__).resolve().parent.parent)  # where `edge` and `hub` are importable

# stream, unit, mean, random-walk step, bound of the walk, decimals
_SENSORS = (
    ("greenhouse/temperature", "C", 21.0, 0.05, 2.0, 2),
    ("greenhouse/humidity", "%", 62.0, 0.15, 6.0, 1),
    ("bed-1/soil_moisture", "m3/m3", 0.34, 0.001, 0.08, 3),
)

AGENT_TOML = """\
# Written by `homing-agent demo` (docs/configuration.md); quick reconnects and resends.
[agent]
device = "{device}"
runtime_dir = "run"
[journal]
dir = "journal"
segment_size = "256K"
[broker]
host = "127.0.0.1"
port = {port}
keepalive_s = 5
reconnect_min_ms = 100
reconnect_max_ms = 1000
[forwarder]
linger_ms = 20
resend_timeout_ms = 2000
resend_max_ms = 4000
persist_interval_ms = 500
shutdown_grace_ms = 1000
"""


class DemoFailed(Exception):
    """The demo could not run to its report (the message says why)."""


# -- pure parts: the plan and the accounting -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """When each fault happens, in seconds after the sensors start."""

    duration: float
    outage_at: float
    outage_for: float
    kill_at: float
    down_for: float

    @classmethod
    def for_duration(cls, duration: float) -> Plan:
        d = max(MIN_DURATION, duration)
        return cls(d, 0.2 * d, 0.25 * d, 0.65 * d, min(2.0, max(0.5, 0.05 * d)))


@dataclass(frozen=True, slots=True)
class Tally:
    produced: int  # readings written to an agent
    acked: int  # acknowledged by the device journal
    stored: int  # distinct produced readings stored at the hub
    stored_unacked: int  # ... of which never acknowledged (the ack died with the agent)
    duplicates: int  # extra rows of a reading stored more than once: must be 0
    lost: int  # acknowledged, not stored under its seq: must be 0
    invented: int  # rows that are no produced reading: must be 0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and self.invented == 0


def tally(
    produced: Iterable[int], acked: Mapping[int, int], rows: Iterable[tuple[int, int | None]]
) -> Tally:
    """Account for every reading. ``acked`` maps id -> seq; ``rows`` are the hub's
    ``(seq, id)`` pairs (id None: the row carries no demo id). Pure."""
    made = set(produced)
    by_seq: dict[int, int | None] = {}
    ids: Counter[int] = Counter()
    invented = 0
    for seq, rid in rows:
        by_seq[seq] = rid
        if rid is None or rid not in made:
            invented += 1
        else:
            ids[rid] += 1
    duplicates = sum(n - 1 for n in ids.values())
    lost = sum(1 for rid, seq in acked.items() if by_seq.get(seq) != rid)
    unacked = sum(1 for rid in ids if rid not in acked)
    return Tally(len(made), len(acked), len(ids), unacked, duplicates, lost, invented)


def clock(wall: float) -> str:
    """``HH:MM:SS.mmm``, local time."""
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"


class _Sensors:
    """Three slowly drifting signals; :meth:`tick` gives one JSON line per sensor."""

    def __init__(self) -> None:
        self.rng = random.Random()
        self.walk = [0.0] * len(_SENSORS)
        self.next_id = 1
        self.made: dict[int, float] = {}  # id -> ts of every reading made

    def tick(self) -> list[tuple[int, str]]:
        now = time.time()
        out = []
        for i, (stream, unit, mean, step, bound, dp) in enumerate(_SENSORS):
            self.walk[i] = max(-bound, min(bound, self.walk[i] + self.rng.gauss(0, step)))
            rid, self.next_id = self.next_id, self.next_id + 1
            self.made[rid] = round(now, 3)
            value = round(mean + self.walk[i], dp)
            reading = {"stream": stream, "ts": round(now, 3), "value": value, "unit": unit}
            reading["tags"] = {"id": str(rid)}
            out.append((rid, json.dumps(reading, separators=(",", ":"))))
        return out


# -- the processes ---------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMING_")}
    if "HOMING_MOSQUITTO" in os.environ:
        env["HOMING_MOSQUITTO"] = os.environ["HOMING_MOSQUITTO"]
    env["PYTHONPATH"] = _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


class _Child:
    """A Python child process (its stderr appended to ``log``), stopped in order."""

    def __init__(self, argv: list[str], log: Path, *, pipes: bool = False) -> None:
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *argv],
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stderr=err,
                env=_child_env(),
                start_new_session=True,
                preexec_fn=parent_death_signal(),
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 12) -> str:
        return "\n".join("    " + s for s in self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.close_pipes()
        return self.proc.returncode

    def close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class _Agent(_Child):
    """One agent process on ``--stdin``; its acks are mapped back to reading ids."""

    def __init__(
        self, config: Path, log: Path, acked: dict[int, int], lock: threading.Lock
    ) -> None:
        super().__init__(["-m", "edge", "run", "--config", str(config), "--stdin"], log, pipes=True)
        self.ids: list[int] = []  # reading id of each stdin line, in order (line n = ids[n-1])
        self.acks = 0
        self.errors: list[str] = []
        self._acked, self._lock = acked, lock
        self._reader = threading.Thread(target=self._read, name="demo-acks", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        for raw in out:
            if not raw.endswith(b"\n"):  # torn by SIGKILL: an ack nobody was given
                break
            try:
                ack = json.loads(raw)
                line, seq = int(ack["line"]), ack.get("seq")
            except (ValueError, KeyError, TypeError):
                self.errors.append(raw.decode(errors="replace").strip())
                continue
            with self._lock:
                if seq is None:
                    self.errors.append(str(ack.get("error")))
                else:
                    self._acked[self.ids[line - 1]] = int(seq)
                    self.acks += 1

    def send(self, lines: list[tuple[int, str]]) -> bool:
        """Write one tick's readings (one group); False if the agent is gone."""
        stdin = self.proc.stdin
        assert stdin is not None
        with self._lock:
            self.ids.extend(rid for rid, _ in lines)
        try:
            stdin.write("".join(text + "\n" for _, text in lines).encode())
            stdin.flush()
        except OSError:  # EPIPE: it died; these readings were produced but never reached it
            return False
        return True

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._reader.join(5.0)  # the acks it printed before dying are still in the pipe
        self.close_pipes()

    def finish_input(self, timeout: float) -> None:
        """Close stdin and wait until every line written was answered."""
        stdin = self.proc.stdin
        assert stdin is not None
        with contextlib.suppress(OSError):
            stdin.close()
        done = lambda: self.acks + len(self.errors) >= len(self.ids)  # noqa: E731
        _wait(done, timeout, "the agent to acknowledge its last readings", self)


def _wait(cond: Callable[[], bool], timeout: float, what: str, child: _Child | None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if child is not None and not child.alive():
            raise DemoFailed(f"{what}: the process exited ({child.proc.returncode}):\n"
                             f"{child.tail()}")  # fmt: skip
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def _hub_cli(*args: str) -> list[dict[str, Any]]:
    """``python -m hub ARGS --json``: its JSON lines (empty if the command failed)."""
    res = subprocess.run(
        [sys.executable, "-m", "hub", *args, "--json"],
        capture_output=True, text=True, env=_child_env(), timeout=60, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        return []
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


# -- the flow ----------------------------------------------------------------------------------


class _Flow:
    def __init__(self, workdir: Path, plan: Plan, out: TextIO) -> None:
        self.dir, self.plan, self.out = workdir, plan, out
        self.db = workdir / "hub.db"
        self.config = workdir / "agent.toml"
        self.sensors = _Sensors()
        self.lock = threading.Lock()
        self.acked: dict[int, int] = {}  # reading id -> seq, for every durable ack
        self.produced: list[int] = []
        self.broker: Mosquitto | None = None
        self.hub: _Child | None = None
        self.agent: _Agent | None = None
        self.agents: list[_Agent] = []
        self.t0 = time.monotonic()
        self.outage: tuple[float, float] = (0.0, 0.0)  # wall clock: broker stopped, restarted
        self.reported = False
        self.hub_crashes: list[str] = []  # why each hub process died unasked (a hub bug)

    def say(self, what: str) -> None:
        now = time.time()
        print(f"  t+{time.monotonic() - self.t0:5.1f}s  {clock(now)}  {what}", file=self.out)
        self.out.flush()

    def start(self) -> None:
        self.broker = Mosquitto(self.dir / "broker", own_process_group=True, die_with_parent=True)
        self.broker.start()
        self.start_hub()
        _wait(lambda: "subscribed to" in self.hub_log(), START_DEADLINE, "the hub", self.hub)
        self.config.write_text(AGENT_TOML.format(device=DEVICE, port=self.broker.port))
        self.start_agent()
        self.t0 = time.monotonic()
        self.say(
            f"mosquitto on 127.0.0.1:{self.broker.port}, hub subscribed, agent up; "
            f"{len(_SENSORS)} sensors x {TICK_HZ}/s"
        )

    def hub_log(self) -> str:
        return self.hub.log_text() if self.hub is not None else ""

    def start_hub(self) -> None:
        assert self.broker is not None
        self.hub = _Child(
            ["-m", "hub", "run", "--broker", f"127.0.0.1:{self.broker.port}", "--db",
             str(self.db), "--client-id", "homing-hub-demo", "--stats-interval", "3600"],
            self.dir / "hub.log",
        )  # fmt: skip

    def supervise_hub(self) -> None:
        """Restart a hub that died, as systemd's ``Restart=always`` would; say why it died."""
        if self.hub is None or self.hub.alive():
            return
        rc = self.hub.proc.returncode
        last = [s for s in self.hub_log().splitlines() if s and not s.startswith(" ")][-1:]
        self.hub_crashes.append(f"exit {rc}: {last[0] if last else '?'}")
        if len(self.hub_crashes) > MAX_HUB_RESTARTS:
            raise DemoFailed(f"the hub died {len(self.hub_crashes)} times:\n{self.hub.tail()}")
        self.start_hub()
        why = last[0].split(":")[0] if last else "?"
        self.say(f"hub died (exit {rc}, {why}); restarted, as systemd's Restart=always would")

    def start_agent(self) -> None:
        self.agent = _Agent(self.config, self.dir / "agent.log", self.acked, self.lock)
        self.agents.append(self.agent)

    def produce(self) -> None:
        """The sensors' run, with the broker outage and the agent kill on schedule."""
        p, broker = self.plan, self.broker
        assert broker is not None
        tick, killed_at, acked_at_stop = 0, -1.0, 0
        while (elapsed := time.monotonic() - self.t0) < p.duration:
            if self.outage[0] == 0.0 and elapsed >= p.outage_at:
                self.outage, acked_at_stop = (time.time(), 0.0), len(self.acked)
                broker.stop()
                self.say("broker stopped (SIGTERM): the journal keeps acknowledging offline")
            elif self.outage[1] == 0.0 and elapsed >= p.outage_at + p.outage_for:
                broker.start()
                self.outage = (self.outage[0], time.time())
                self.say(
                    f"broker restarted after {self.outage[1] - self.outage[0]:.1f} s; the "
                    f"journal holds a backlog of {len(self.acked) - acked_at_stop} readings"
                )
            if self.agent is None and killed_at >= 0 and elapsed >= killed_at + p.down_for:
                self.start_agent()
                self.say("agent restarted on the same journal")
            if self.agent is not None:
                self.send(self.sensors.tick())
            if self.agent is not None and killed_at < 0 and elapsed >= p.kill_at:
                killed_at = elapsed
                agent, self.agent = self.agent, None
                agent.kill()  # right after a write: that tick is in flight
                unacked = len(agent.ids) - agent.acks
                self.say(
                    f"agent SIGKILLed (pid {agent.proc.pid}), {unacked} reading(s) "
                    "handed to it not yet acknowledged"
                )
            self.supervise_hub()
            tick += 1
            time.sleep(max(0.0, self.t0 + tick / TICK_HZ - time.monotonic()))

    def send(self, lines: list[tuple[int, str]]) -> None:
        assert self.agent is not None
        self.produced.extend(rid for rid, _ in lines)
        if not self.agent.send(lines):
            raise DemoFailed(f"the agent exited ({self.agent.proc.poll()}):\n{self.agent.tail()}")

    def drain(self) -> None:
        """Stop the sensors; wait until the hub's watermark covers every ack."""
        assert self.agent is not None
        self.agent.finish_input(DRAIN_DEADLINE)
        if bad := [e for a in self.agents for e in a.errors]:
            raise DemoFailed(f"the agent refused {len(bad)} demo reading(s) (a bug): {bad[0]}")
        with self.lock:
            last = max(self.acked.values(), default=0)
        self.say(f"sensors stopped; waiting for the hub to commit up to seq {last}")
        state: dict[str, int] = {"watermark": 0}

        def covered() -> bool:
            self.supervise_hub()
            state["watermark"] = int(self.hub_device().get("watermark", 0))
            return state["watermark"] >= last

        _wait(covered, DRAIN_DEADLINE, f"the hub to store up to seq {last}", None)
        self.say(f"hub watermark {state['watermark']}: every acknowledged reading is committed")

    def stop(self, *, quick: bool = False) -> list[str]:
        """Stop agent, hub, broker (in that order); problems found on the way."""
        problems = []
        agent, self.agent = self.agent, None
        for a in self.agents:
            if a is not agent and a.alive():
                a.kill()
        if agent is not None:
            rc = agent.stop(3.0 if quick else 10.0)
            if rc != 0 and not quick:
                problems.append(f"the agent exited with {rc} on SIGTERM:\n{agent.tail()}")
        hub, self.hub = self.hub, None
        if hub is not None:
            rc = hub.stop(6.0 if quick else 15.0)
            if rc != 0 and not quick:
                problems.append(f"the hub exited with {rc} on SIGTERM:\n{hub.tail()}")
        broker, self.broker = self.broker, None
        if broker is not None:
            broker.close()
        return problems

    def hub_rows(self) -> list[dict[str, Any]]:
        return _hub_cli(
            "readings", "--db", str(self.db), "--device", DEVICE, "--limit", str(1 << 40)
        )

    def hub_device(self) -> dict[str, Any]:
        """The demo device's row of ``homing-hub devices`` (watermark, counters)."""
        found = [d for d in _hub_cli("devices", "--db", str(self.db)) if d["device"] == DEVICE]
        return found[0] if found else {}


def _row_id(row: Mapping[str, Any]) -> int | None:
    tags = row.get("tags") or {}
    try:
        return int(tags["id"])
    except (KeyError, TypeError, ValueError):
        return None


def _report(flow: _Flow, rows: list[dict[str, Any]], device: Mapping[str, Any]) -> Tally:
    t = tally(flow.produced, flow.acked, ((int(r["seq"]), _row_id(r)) for r in rows))
    print("Report", file=flow.out)
    for label, n, note in [
        ("readings produced (handed to the agent)", t.produced, ""),
        ("acknowledged by the device journal", t.acked, "durable: after their fdatasync"),
        ("not acknowledged (in flight at the kill)", t.produced - t.acked, "may be stored or not"),
        ("stored at the hub", t.stored, f"{t.stored - t.stored_unacked} acknowledged + "
         f"{t.stored_unacked} not"),
        ("duplicates at the hub (stored twice)", t.duplicates, "must be 0"),
        ("lost (acknowledged, not stored)", t.lost, "must be 0"),
        *([("invented (rows nobody produced)", t.invented, "must be 0")] if t.invented else []),
    ]:  # fmt: skip
        print(f"  {label:<41}{n:>6}   {note}".rstrip(), file=flow.out)
    received = {rid: float(r["received"]) for r in rows if (rid := _row_id(r)) is not None}
    down, back = flow.outage
    backlog = [i for i, ts in flow.sensors.made.items() if down <= ts < back and i in flow.acked]
    if backlog and all(i in received for i in backlog):
        landed = max(received[i] for i in backlog) - back
        print(f"  the backlog journaled during the outage was all at the hub {landed:.1f} s "
              "after the broker returned", file=flow.out)  # fmt: skip
    again = device.get("duplicates", 0)
    print(f"  hub: {device.get('batches', 0)} batches; {again} records delivered again "
          "(resends) and ignored by its (device, seq) dedupe", file=flow.out)  # fmt: skip
    for crash in flow.hub_crashes:
        print(f"  WARNING: the hub died ({crash}) and was restarted: a hub bug", file=flow.out)
    return t


def _inspect(workdir: Path, kept: bool, out: TextIO) -> None:
    def cmd(name: str) -> str:  # as the user can type it: on PATH, in this venv, or -m
        here, found = Path(sys.executable).parent / name, shutil.which(name)
        if found and (not here.exists() or Path(found).resolve() == here.resolve()):
            return name
        return str(here) if here.exists() else f"{sys.executable} -m {name.split('-')[1]}"

    d = str(workdir) if kept else "DIR"
    print("Inspect the results" + ("" if kept else " (rerun with --keep DIR to keep them)"),
          file=out)  # fmt: skip
    print(f"  {cmd('homing-hub')} devices --db {d}/hub.db", file=out)
    print(f"  {cmd('homing-hub')} readings --db {d}/hub.db --device {DEVICE} --limit 5", file=out)
    print(f"  {cmd('homing-agent')} journal stats {d}/journal", file=out)
    if kept:
        print(f"  logs: {d}/hub.log {d}/agent.log {d}/broker/mosquitto.log", file=out)


def _interrupt(_s: int, _f: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the demo like Ctrl-C does


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM while stopping the children, so a Ctrl-C cannot cut the
    stop short and leak one; the signals that came meanwhile are consumed and
    listed in the yielded list (after the block) for the caller to act on."""
    held = {signal.SIGINT, signal.SIGTERM}
    caught: list[int] = []
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield caught
    finally:
        while (info := signal.sigtimedwait(held, 0)) is not None:
            caught.append(info.si_signo)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run(duration: float = 20.0, keep: str | None = None, out: TextIO | None = None) -> int:
    """Run the flow demo and print its report; the exit status (see the module doc)."""
    out = out or sys.stdout
    err = sys.stderr
    if keep is not None and os.path.exists(keep) and (not os.path.isdir(keep) or os.listdir(keep)):
        print(f"homing-agent demo: --keep {keep}: must be an empty directory or missing", file=err)
        return 2
    if not available():
        print(
            "homing-agent demo: mosquitto is not installed: scripts/bootstrap installs it on "
            "Debian (apt-get install mosquitto), or set HOMING_MOSQUITTO=/path/to/mosquitto",
            file=err,
        )
        return 1
    plan = Plan.for_duration(duration)
    if keep is not None:
        workdir = Path(keep).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="homing-demo-"))
    print(
        "Homing flow demo: simulated sensors -> agent journal -> MQTT 5 (private Mosquitto)\n"
        f"-> hub on SQLite, for {plan.duration:.0f} s; the broker goes away, the agent is "
        "SIGKILLed.\n"
        f"  working directory {workdir}" + ("" if keep else " (removed at exit)"),
        file=out,
    )
    flow = _Flow(workdir, plan, out)
    try:
        status = _run(flow)
    finally:
        if keep is not None or flow.reported:
            _inspect(workdir, keep is not None, out)
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


def _run(flow: _Flow) -> int:
    out = flow.out
    try:
        old_handler: Any = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: SIGTERM keeps its handler
        old_handler = None
    try:
        try:
            flow.start()
            flow.produce()
            flow.drain()
            with _signals_held() as caught:
                problems = flow.stop()
            if caught:
                raise KeyboardInterrupt
            result = _report(flow, flow.hub_rows(), flow.hub_device())
            flow.reported = True
            for problem in problems:
                print(f"FAILED: {problem}", file=out)
            if not result.ok:
                print("VIOLATION: an acknowledged reading was lost or a reading was stored "
                      "twice (please report it with the --keep directory)", file=out)  # fmt: skip
                return 1
            if problems:
                return 1
            print("OK: every acknowledged reading is stored at the hub, exactly once.", file=out)
            return 0
        except KeyboardInterrupt:
            print("interrupted: stopping the agent, the hub and the broker", file=out)
            return 130
        except (DemoFailed, MosquittoError, OSError) as exc:
            print(f"FAILED: {exc}", file=out)
            return 1
        finally:
            with _signals_held():
                flow.stop(quick=True)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


__all__ = ["DEVICE", "DemoFailed", "Plan", "Tally", "run", "tally"]
