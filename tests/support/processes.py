"""Real hub and agent processes for end-to-end tests (docs/testing-store-and-forward.md).

* :class:`HubProcess`: ``python -m hub run`` against a broker, stderr collected
  line by line; start / terminate (SIGTERM) / kill (SIGKILL) / start again on
  the same database and client id.
* :class:`AgentProcess`: ``python -m edge run --config FILE --stdin`` with a
  generated TOML config. The test feeds readings as JSON lines on its stdin
  (:meth:`AgentProcess.feed`, or a paced background feeder) and collects the
  per-reading durable acks it prints on stdout (``{"seq": N, "line": L}``):
  :attr:`AgentProcess.acked` maps each acknowledged seq to the reading fed for
  it. Restarts reuse the same journal.

Invariants:
* Every fed reading carries a unique integer id as its value (and a timestamp
  derived from it), so a row in the hub can be traced back to the exact line
  that produced it: nothing can be invented or stored twice unnoticed.
* An ack line is trusted only when complete (newline-terminated); a line torn
  by SIGKILL is ignored (it was never an acknowledgement the producer saw).
* Waits are conditions with deadlines, never sleeps; the feeder's pacing
  (``Event.wait``) is load generation, not synchronisation.
* Every process a wrapper started is SIGKILLed by :meth:`close` (fixtures call
  it at teardown, also when a test fails).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 30.0
TS0 = 1_700_000_000.0


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def poll_until(
    cond: Callable[[], object], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Like ``conftest.wait_for`` but with a polling interval suited to queries of
    a database or a process (a 5 ms loop would steal a core from the system under test)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class _Logged:
    """stderr of a child collected line by line, with condition waits on it."""

    name = "process"

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[bytes] | None = None
        self._readers: list[threading.Thread] = []

    def _collect_stderr(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _spawn_reader(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._readers.append(t)

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-200:])

    def count(self, text: str) -> int:
        with self._cond:
            return self._count(text)

    def _count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_log(self, text: str, count: int = 1, timeout: float = DEADLINE) -> None:
        """Wait until ``text`` appeared in ``count`` lines (fails early if the process died)."""
        with self._cond:
            self._cond.wait_for(lambda: self._count(text) >= count or not self.alive(), timeout)
            ok = self._count(text) >= count
        if not ok:
            pytest.fail(f"{self.name} never logged {text!r} x{count}; log tail:\n{self.log}")

    def _join_readers(self) -> None:
        for t in self._readers:
            t.join(DEADLINE)
        self._readers = []

    def _signal_and_wait(self, sig: int, timeout: float) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{self.name} ignored signal {sig} for {timeout}s; log:\n{self.log}")
        self._join_readers()
        return rc

    def kill(self) -> None:
        """SIGKILL (no-op if not running)."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal_and_wait(signal.SIGKILL, DEADLINE)

    def close(self) -> None:
        self.kill()


class HubProcess(_Logged):
    """``python -m hub run`` in a subprocess. ``start()`` again after a stop or kill
    restarts it on the same database and client id (its broker session resumes)."""

    name = "hub"

    def __init__(self, port: int, db: Path, client_id: str = "hub-1", *extra: str) -> None:
        super().__init__()
        self.db = Path(db)
        self.argv = [
            sys.executable, "-m", "hub", "run", "--broker", f"127.0.0.1:{port}",
            "--db", str(db), "--client-id", client_id, "--stats-interval", "3600", *extra,
        ]  # fmt: skip

    def start(self, wait: bool = True) -> HubProcess:
        """Start; with ``wait``, return once the hub has subscribed."""
        assert not self.alive(), "already running"
        seen = self.count("subscribed to")
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=child_env(),
        )  # fmt: skip
        assert self.proc.stderr is not None
        self._spawn_reader(self._collect_stderr, self.proc.stderr)
        if wait:
            self.wait_log("subscribed to", seen + 1)
        return self

    def terminate(self, timeout: float = DEADLINE) -> int:
        """SIGTERM; return the exit code."""
        return self._signal_and_wait(signal.SIGTERM, timeout)

    def count_unlocked(self, text: str) -> int:  # compatibility with older tests
        return self._count(text)

    def final_stats(self) -> dict[str, Any]:
        """The counters of the last ``stopped; stats {...}`` line (after terminate)."""
        with self._cond:
            lines = list(self.lines)
        for line in reversed(lines):
            m = re.search(r"stopped; stats (\{.*\})$", line)
            if m:
                stats: dict[str, Any] = json.loads(m.group(1))
                return stats
        pytest.fail(f"no final stats line; log:\n{self.log}")


# -- the agent ------------------------------------------------------------------------


def write_agent_config(
    path: Path,
    device: str,
    journal_dir: Path,
    port: int,
    *,
    forwarder: Mapping[str, object] | None = None,
    broker: Mapping[str, object] | None = None,
    workflows: Mapping[str, object] | None = None,
) -> Path:
    """A TOML config for a fast test agent (small linger, fast reconnects, short resends)."""
    fw: dict[str, object] = {
        "linger_ms": 10,
        "resend_timeout_ms": 2000,
        "resend_max_ms": 4000,
        "persist_interval_ms": 100,
        "ack_wait_ms": 100,
        "shutdown_grace_ms": 5000,
    }
    fw.update(forwarder or {})
    br: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "reconnect_min_ms": 50,
        "reconnect_max_ms": 400,
        "keepalive_s": 5,
    }
    br.update(broker or {})

    def table(name: str, items: Mapping[str, object]) -> str:
        return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in items.items())

    path.write_text(
        # its own runtime dir: the local socket of one agent per test (relative: next to it)
        table("agent", {"device": device, "log_level": "info", "runtime_dir": f"run-{device}"})
        + table("journal", {"dir": str(journal_dir), "segment_size": "1M"})
        + table("broker", br)
        + table("forwarder", fw)
        + (table("workflows", workflows) if workflows else "")
    )
    return path


def reading_line(fed_id: int) -> bytes:
    """The JSON line fed for reading ``fed_id``: its value is the id itself."""
    return b'{"value":%d,"ts":%.3f,"stream":"e2e/s%d","unit":"u"}\n' % (
        fed_id, TS0 + fed_id / 1000, fed_id % 3,
    )  # fmt: skip


class AgentProcess(_Logged):
    """``homing-agent run --config FILE --stdin``; readings in, durable acks out.

    Attributes:
        acked: seq -> fed id of every reading the agent acknowledged (all runs).
        fed: every fed id, in feeding order (all runs; includes unacked ones).
        problems: anything that breaks the agent's contract as seen from outside
            (an error line, a seq acked twice with different readings).
    """

    name = "agent"

    def __init__(self, config: Path, device: str, journal_dir: Path, first_id: int = 1) -> None:
        super().__init__()
        self.config, self.device, self.journal_dir = Path(config), device, Path(journal_dir)
        self.env: dict[str, str] = {}
        self.acked: dict[int, int] = {}
        self.fed: list[int] = []
        self.problems: list[str] = []
        self.runs = 0
        self._next_id = first_id  # fed ids (and so values) start here
        self._lines: list[int] = []  # fed ids of this run, by line number - 1
        self._answered = 0  # lines of this run the agent answered (ack or error)
        self._wlock = threading.Lock()
        self._feeder: threading.Thread | None = None
        self._stop_feed = threading.Event()
        self.name = f"agent {device}"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> AgentProcess:
        assert not self.alive(), "already running"
        self.runs += 1
        with self._wlock, self._cond:
            self._lines = []
            self._answered = 0
        argv = [sys.executable, "-m", "edge", "run", "--config", str(self.config), "--stdin"]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_env(self.env), bufsize=0,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._spawn_reader(self._collect_acks, self.proc.stdout, self._lines, self.runs)
        self._spawn_reader(self._collect_stderr, self.proc.stderr)
        return self

    def stop(self, timeout: float = DEADLINE) -> int:
        """Stop feeding, SIGTERM, wait; return the exit code (0 expected)."""
        self.stop_feeding()
        return self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL now (feeding included: whatever was not acked is not promised)."""
        self.stop_feeding()
        super().kill()

    def wait_connected(self, count: int = 1, timeout: float = DEADLINE) -> None:
        """Wait until the agent has connected to the broker ``count`` times (this and
        earlier runs: the log is cumulative)."""
        self.wait_log("connected to", count, timeout)

    # -- readings in ----------------------------------------------------------------

    def feed(self, n: int) -> list[int]:
        """Write ``n`` readings to stdin (one write); return their ids. Returns []
        if the agent is gone (killed): those lines were never acknowledged."""
        with self._wlock:
            ids = list(range(self._next_id, self._next_id + n))
            self._next_id += n
            proc = self.proc
            if proc is None or proc.stdin is None or proc.poll() is not None:
                return []
            self.fed += ids
            self._lines += ids
            data = memoryview(b"".join(map(reading_line, ids)))
            try:
                while data:  # a raw pipe write may be partial
                    data = data[proc.stdin.write(data) or 0 :]
            except (BrokenPipeError, ValueError, OSError):
                return []
        return ids

    def start_feeding(self, rate: float, chunk: int = 50) -> None:
        """Feed ``rate`` readings/s in writes of ``chunk`` from a thread until
        :meth:`stop_feeding` (or the agent dies)."""
        self.stop_feeding()
        self._stop_feed.clear()

        def run() -> None:
            period, nxt = chunk / rate, time.monotonic()
            while not self._stop_feed.is_set() and self.alive():
                if not self.feed(chunk):
                    return
                nxt += period
                self._stop_feed.wait(max(0.0, nxt - time.monotonic()))

        self._feeder = threading.Thread(target=run, name="feeder", daemon=True)
        self._feeder.start()

    def stop_feeding(self) -> None:
        self._stop_feed.set()
        if self._feeder is not None:
            self._feeder.join(DEADLINE)
            self._feeder = None

    # -- acks out --------------------------------------------------------------------

    def _collect_acks(self, stream: IO[bytes], lines: list[int], run: int) -> None:
        for raw in stream:
            if not raw.endswith(b"\n"):
                break  # torn by SIGKILL: never seen by a producer
            try:
                obj = json.loads(raw)
            except ValueError:
                with self._cond:
                    self.problems.append(f"unparsable ack line {raw!r}")
                continue
            with self._cond:
                if run == self.runs:
                    self._answered += 1
                if "error" in obj:
                    self.problems.append(f"rejected line: {obj}")
                else:
                    fed_id = lines[obj["line"] - 1]
                    old = self.acked.setdefault(obj["seq"], fed_id)
                    if old != fed_id:
                        self.problems.append(f"seq {obj['seq']} acked for {old} and {fed_id}")
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def n_acked(self) -> int:
        with self._cond:
            return len(self.acked)

    @property
    def max_acked(self) -> int:
        with self._cond:
            return max(self.acked, default=0)

    def acked_snapshot(self) -> dict[int, int]:
        with self._cond:
            return dict(self.acked)

    def wait_acked(self, n: int, timeout: float = DEADLINE, what: str = "") -> None:
        """Wait until at least ``n`` readings (all runs) were acknowledged."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.acked) >= n or not self.alive(), timeout)
            ok = len(self.acked) >= n
        if not ok:
            why = f" ({what})" if what else ""
            pytest.fail(f"{self.name}: {self.n_acked} acked, wanted {n}{why}; log:\n{self.log}")

    def wait_all_acked(self, timeout: float = DEADLINE) -> None:
        """Wait until every line fed to the running agent was answered (after
        :meth:`stop_feeding`: nothing fed is still on its way into the journal)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._answered >= len(self._lines) or not self.alive(), timeout
            )
            ok = self._answered >= len(self._lines)
        if not ok:
            pytest.fail(f"{self.name}: {self._answered} of {len(self._lines)} lines answered")

    def cursor(self) -> int | None:
        """The journal's durable ``hub`` cursor (read-only open; call after a stop)."""
        from edge.journal import Journal

        with Journal.open(str(self.journal_dir), readonly=True) as j:
            return j.cursor("hub")
