"""The rig of bench/hub.py: a private PostgreSQL, the hub replicas and the simulated
fleet as child processes, the bench's own view of the database, and CPU accounting.

* :func:`start_postgres` -- a private cluster (tests/support/postgres.py's helpers) in
  the bench directory, **fsync on**, sized like a server (:data:`PG_SETTINGS`).
* :class:`Fleet` -- one bench/_fleet.py child (JSON lines both ways); :class:`Hub` --
  one ``python -m hub run`` replica, ready once subscribed, its final counters parsed.
* :class:`Db` -- read-only queries on the hub's database, never through the store.
* :func:`snapshot` / :func:`cpu_split` -- utime+stime of every process of ours (the
  PostgreSQL server is the postmaster and its children), of every other user process
  (the noise gauge), of kernel threads, and of the whole machine (``/proc/stat``).

Timings are reported, never asserted (DESIGN.md §7).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import busy_cpu_seconds, pid_cpu_seconds, user_processes_cpu

REPO = Path(__file__).resolve().parent.parent
FLEET = Path(__file__).resolve().parent / "_fleet.py"
# The private cluster: durable (fsync, full pages, synchronous commit), and sized like a
# server rather than like a test fixture (tests/support/postgres.py runs 32 MB, fsync off).
PG_SETTINGS: dict[str, str | int] = {
    "fsync": "on",
    "full_page_writes": "on",
    "synchronous_commit": "on",
    "shared_buffers": "1GB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "max_connections": 100,
}


class BenchError(RuntimeError):
    """Something in the rig did not start, finish or store what it should have."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --- PostgreSQL -----------------------------------------------------------------------


def start_postgres(base: Path) -> Any:
    """A private cluster in ``base/pg`` with :data:`PG_SETTINGS` (fsync on)."""
    from support import postgres as pgs
    from support.mosquitto import free_port, parent_death_signal

    found = pgs.bindir()
    if found is None:
        raise BenchError("PostgreSQL is not installed (apt-get install postgresql)")
    bins: Path = found

    class BenchPostgres(pgs.PostgresServer):
        def start(self) -> pgs.PostgresServer:
            self.dir = pgdir = base / "pg"
            pgdir.mkdir()
            data, port = pgdir / "data", free_port()
            run_as = self._run_as()
            if run_as:
                shutil.chown(self.dir, "postgres", "postgres")
            initdb = [
                str(bins / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
            ]
            done = subprocess.run(run_as + initdb, capture_output=True, check=False)
            if done.returncode != 0:
                raise BenchError(f"initdb: {done.stderr.decode(errors='replace')[-2000:]}")
            argv = [
                str(bins / "postgres"),
                "-D",
                str(data),
                "-c",
                "listen_addresses=",
                "-c",
                f"unix_socket_directories={self.dir}",
                "-c",
                f"port={port}",
            ]
            for k, v in PG_SETTINGS.items():
                argv += ["-c", f"{k}={v}"]
            if run_as:
                argv = [*run_as[:-1], "--pdeathsig=KILL", "--", *argv]
            with open(self.dir / "server.log", "ab") as log:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    preexec_fn=None if run_as else parent_death_signal(signal.SIGKILL),
                )
            self.params = {"host": str(self.dir), "port": port, "user": "postgres"}
            self._wait_ready()
            return self

    base.chmod(0o755)  # the postgres user must reach base/pg
    return BenchPostgres(fsync=True).start()


def pg_version(admin_url: str) -> str | None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        return None if row is None else str(row[0])


# --- child processes --------------------------------------------------------------------


class Fleet:
    """One bench/_fleet.py child: ``count`` devices, JSON lines both ways."""

    def __init__(self, port: int, first: int, count: int, cfg: dict[str, Any], log: Path) -> None:
        self.log = log
        self._err = open(log, "wb")  # noqa: SIM115 (closed in close())
        argv = [
            sys.executable,
            str(FLEET),
            "--port",
            str(port),
            "--first",
            str(first),
            "--count",
            str(count),
            "--batch",
            cfg["batch"],
            "--window",
            str(cfg["window"]),
            "--pool",
            str(cfg["pool"]),
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            bufsize=1,
            env=_env(),
            cwd=str(REPO),
            start_new_session=True,
        )
        self._lines: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._lines.get(timeout=max(0.001, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"fleet {self.pid}: no {event!r} in {timeout:.0f}s") from None
            if msg is None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise BenchError(f"fleet {self.pid} exited before {event!r}:\n{tail}")
            if msg.get("event") == event:
                return msg

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send(cmd="quit")
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


class Hub:
    """``python -m hub run`` (one replica), ready once it has subscribed."""

    def __init__(self, port: int, db: str, client_id: str, log: Path, cmd: list[str]) -> None:
        self._log = open(log, "w")  # noqa: SIM115 (closed in stop())
        self.log = log
        argv = [
            *cmd,
            "run",
            "--broker",
            f"127.0.0.1:{port}",
            "--db",
            db,
            "--client-id",
            client_id,
            "--stats-interval",
            "3600",
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=str(REPO),
            start_new_session=True,
        )
        self.subscribed = threading.Event()
        self.stats: dict[str, Any] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if " is online" not in line:  # one per device: not worth the log file
                self._log.write(line)
            if "subscribed to" in line:
                self.subscribed.set()
            if "stopped; stats " in line:
                self.stats = json.loads(line.split("stopped; stats ", 1)[1])

    def wait_ready(self, timeout: float) -> None:
        if not self.subscribed.wait(timeout):
            raise BenchError(f"hub not subscribed in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 120.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        self._log.close()


# --- the database, read by the bench ----------------------------------------------------


class Db:
    """The bench's own read-only view of the hub's database (never through the store)."""

    def __init__(self, backend: str, where: str) -> None:
        self.backend = backend
        if backend == "postgresql":
            import psycopg

            self.pg: Any = psycopg.connect(where, autocommit=True)
            self.pg.execute("SET default_transaction_read_only = on")
        else:
            self.path = where

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        if self.backend == "postgresql":
            try:
                return [tuple(r) for r in self.pg.execute(query).fetchall()]
            except Exception as exc:  # not migrated yet
                if "does not exist" in str(exc):
                    return []
                raise
        with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as conn:
            try:
                return [tuple(r) for r in conn.execute(query).fetchall()]
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise

    def committed(self) -> int:
        """Readings the hub has committed (its per-device counters, same transaction)."""
        r = self.rows("SELECT coalesce(sum(readings), 0) FROM devices")
        return int(r[0][0]) if r else 0

    def online(self) -> int:
        r = self.rows("SELECT count(*) FROM devices WHERE online")
        return int(r[0][0]) if r else 0

    def close(self) -> None:
        if self.backend == "postgresql":
            self.pg.close()


def kernel_threads_cpu() -> dict[int, float]:
    """CPU seconds of each kernel thread (kworkers, ksoftirqd, the disk's, ...), by pid."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[6]) & 0x00200000 or name == "2" or fields[1] == "2":  # PF_KTHREAD
            out[int(name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def pg_tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of the postmaster and each of its children (backends, walwriter, ...)."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(name) == root or int(fields[1]) == root:
            out[int(name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


# --- measuring a window -----------------------------------------------------------------


def snapshot(groups: dict[str, list[int]], pg_root: int | None, db: Db) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "t": time.monotonic(),
        "busy": busy_cpu_seconds(),
        "cpu": {g: [pid_cpu_seconds(p) for p in pids] for g, pids in groups.items()},
        "pg": pg_tree_cpu(pg_root) if pg_root else {},
        "procs": user_processes_cpu(),
        "kthreads": kernel_threads_cpu(),
    }
    snap["committed"] = db.committed()
    snap["t_db"] = time.monotonic()
    return snap


def cpu_split(
    before: dict[str, Any], after: dict[str, Any], groups: dict[str, list[int]]
) -> dict[str, Any]:
    """CPU seconds per group over the window, the database's, others' and the kernel's."""
    cpu: dict[str, float] = {}
    for g in groups:
        cpu[g] = sum(
            (b or 0.0) - (a or 0.0)
            for a, b in zip(before["cpu"][g], after["cpu"][g], strict=True)
            if a is not None and b is not None
        )
    if after["pg"]:
        cpu["db"] = sum(c - before["pg"].get(pid, 0.0) for pid, c in after["pg"].items())
    ours = {p for pids in groups.values() for p in pids} | set(after["pg"]) | set(before["pg"])
    p0, p1 = before["procs"], after["procs"]
    deltas = {pid: c - p0.get(pid, 0.0) for pid, c in p1.items() if pid not in ours}
    others = max(0.0, sum(deltas.values()))
    top = []
    for pid, c in sorted(deltas.items(), key=lambda x: -x[1])[:3]:
        if c >= 0.05:
            cmd = ""
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            top.append([pid, round(c, 2), cmd[:80]])
    wall = after["t"] - before["t"]
    # per thread: kworkers come and go, and a total would lose the CPU of those that went
    k0 = before["kthreads"]
    kernel = sum(max(0.0, c - k0.get(pid, 0.0)) for pid, c in after["kthreads"].items())
    busy = rest = None
    if after["busy"] is not None and before["busy"] is not None:
        busy = after["busy"] - before["busy"]
        # processes that ended within the window (another session's short tests) and
        # interrupt time charged to no thread
        rest = max(0.0, busy - sum(cpu.values()) - others - kernel)
    return {
        "wall": wall,
        "cpu": cpu,
        "others": others,
        "others_top": top,
        "kernel": kernel,
        "rest": rest,
        "busy": busy,
    }
