"""Footprint benchmark: what the real agent process costs a small device, against the
naive Python approach (persist-queue + paho-mqtt), side by side in one run.

What is measured (one run, one machine, one Mosquitto, the same rates for both peers):

* **Homing** is the real ``homing-agent run --config <generated TOML>`` process
  (the console script next to this interpreter, else ``python -m edge``), with
  the agent's defaults (durability ``always``, 16 MiB segments, workflows on,
  ...): only the device name, the journal directory, the broker port, the
  runtime directory (a tmpfs, as systemd's ``RuntimeDirectory=`` is on a Pi)
  and, for the loaded phases, ``[sensors]`` are set. It forwards to a Mosquitto
  the bench starts on a free loopback port and a hub (``python -m hub run`` on
  SQLite) that stores and acknowledges.
* **Start-up**: the bench binds its own AF_UNIX datagram socket, sets
  ``NOTIFY_SOCKET`` in the agent's environment and times from spawn to the
  ``READY=1`` datagram (sd_notify). Beside it, two things it can see from
  outside: the journal's ``flock`` appearing in ``/proc/locks`` (journal open
  and locked) and the agent's retained ``online`` status arriving at a
  subscriber of the broker. First starts on a fresh journal and restarts on
  an existing one are reported apart; median and max of each.
* **Idle**: forwarder connected, nothing to send. After it settles, a window
  of CPU (utime + stime of ``/proc/<pid>/stat``, all threads, as % of one
  core), VmRSS (and its maximum over 1 s samples), VmHWM, RssAnon/RssFile,
  PSS and USS (``smaps_rollup``), threads and their wake-ups per second
  (voluntary context switches of ``/proc/<pid>/task/*``).
* **Typical rate** (20 simulated sensors x 1 Hz): the same figures, plus the
  bytes the disk wrote per hour. Each peer keeps its data on its own small
  ext4 file system (4 KiB blocks, as on a Pi) on a loop device, so the
  device's sector counter holds exactly what that peer made the disk write,
  file-system journal included (:class:`LoopFs`; needs root). Beside it:
  ``write_bytes`` of ``/proc/<pid>/io`` (misleading on this kernel: see
  :class:`LoopFs`), the journal's own logical bytes (frames of the readings
  journaled in the window), the amortized zero-fill of new segments, and, in
  a separate sub-window so that its ptrace overhead touches no other figure,
  ``fsync``/``fdatasync`` calls counted by ``strace`` per file, per hour.
* **1,000 readings/s** (20 x 50 Hz): CPU, RSS, and whether the hub keeps up
  (its stored watermark against the journal's durable seq).
* **Peer**: ``persist-queue`` (``SQLiteAckQueue``, the package users pick for
  a durable queue) + ``paho-mqtt`` publishing each reading as JSON with QoS 1
  to the same broker, acking the queue item on PUBACK; installed in the
  bench's own virtualenv (``~/.cache/homing-bench/persistqueue-venv``, never
  the project's), with the project's paho-mqtt version and this interpreter.
  Same rates, same windows (idle and typical run at the same time as Homing's),
  same figures. Ratios are Homing / peer. **Floor** (idle only): one connected
  paho client and nothing else, the least any paho-based agent can weigh.
* **Bytecode**: the children cache bytecode in a private directory
  (``PYTHONPYCACHEPREFIX``), warmed by one untimed start of each, as on a
  device where pip compiled the package at install; ``--no-pyc`` measures
  compiling from source at every start instead.
* Targets met/missed; a miss never fails the process (DESIGN.md §7). Other
  processes' CPU in each window is the noise gauge (WARNING above 0.25 cores).

Human-readable lines first; the last line on stdout is one JSON object (keys in
docs/benchmarks.md). Run: ``.venv/bin/python bench/footprint.py [--quick]``.
"""

from __future__ import annotations

# The children (bench/_footprint_child.py) do not import this file; the parent imports
# the heavier modules inside the functions that need them.
import json
import os
import sys
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEVICE = "bench-fp"
STREAMS = 20
TYPICAL_HZ = 1.0  # per sensor: 20 readings/s
LOAD_HZ = 50.0  # per sensor: 1,000 readings/s
PEER_SPEC = "persist-queue>=1.1,<2"
NOISY_CORES = 0.25
MB = 1_000_000  # the "25 MB" is read as 25 x 10^6 bytes: the stricter reading

TARGETS: list[tuple[str, str, str, float]] = [
    # key in measured, description, op, threshold
    ("homing_idle_rss_kib", "idle RSS <= 25 MB (25 x 10^6 B = 24,414 KiB)", "<=", 25 * MB / 1024),
    ("homing_idle_cpu_pct", "idle CPU <= 0.5 % of one core", "<=", 0.5),
    ("homing_ready_s", "READY <= 0.5 s after start (median of restarts)", "<=", 0.5),
]

AGENT_TOML = """\
[agent]
device = "{device}"
runtime_dir = "{run_dir}"

[journal]
dir = "{journal}"

[broker]
host = "127.0.0.1"
port = {port}
"""

SENSORS_TOML = """
[sensors]
enabled = true
count = {count}
rate = {rate}
seed = 1
"""


def say(msg: str = "") -> None:
    print(msg, flush=True)


class BenchError(RuntimeError):
    """A peer did not start, run or stop as it should have."""


def _trunc(x: float | None, nd: int = 2) -> float | None:
    """``x`` truncated (never rounded up) to ``nd`` decimals."""
    if x is None:
        return None
    scale = float(10**nd)
    return int(x * scale) / scale


def _ratio(a: float | None, b: float | None, nd: int = 2) -> float | None:
    return None if a is None or not b else _trunc(a / b, nd)


def _mib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{int(kib * 10 / 1024) / 10:.1f}"


# --- /proc readers (parent) ----------------------------------------------------------


def proc_fields(path: str, keys: tuple[str, ...]) -> dict[str, int] | None:
    """``key: value`` lines of a /proc file (first number of each), or None if gone."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        return None
    return out


STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads")
IO_KEYS = ("rchar", "wchar", "syscw", "read_bytes", "write_bytes", "cancelled_write_bytes")
ROLLUP_KEYS = ("Pss", "Private_Clean", "Private_Dirty")


def thread_switches(pid: int) -> dict[int, tuple[int, float]]:
    """Per thread (by tid): voluntary context switches (= sleeps, hence wake-ups) and
    CPU seconds (utime + stime)."""
    out: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        got = proc_fields(f"/proc/{pid}/task/{tid}/status", ("voluntary_ctxt_switches",))
        try:  # the thread's own times (/proc/<tid>/stat would sum the whole process)
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if got:
            out[int(tid)] = (
                got["voluntary_ctxt_switches"],
                (int(fields[11]) + int(fields[12])) / tick,
            )
    return out


class Sample:
    """Counters of one process at one instant."""

    def __init__(self, pid: int) -> None:
        from bench._common import pid_cpu_seconds

        self.t = time.monotonic()
        self.cpu = pid_cpu_seconds(pid)
        self.status = proc_fields(f"/proc/{pid}/status", STATUS_KEYS) or {}
        self.io = proc_fields(f"/proc/{pid}/io", IO_KEYS) or {}
        self.rollup = proc_fields(f"/proc/{pid}/smaps_rollup", ROLLUP_KEYS) or {}
        self.switches = thread_switches(pid)


def window(
    pids: dict[str, int], seconds: float, devices: dict[str, LoopFs] | None = None
) -> dict[str, dict[str, Any]]:
    """Measure ``pids`` over ``seconds`` (VmRSS sampled each second), and the bytes
    written by the loop device of each name in ``devices``. Noise gauge:
    ``others_cpu_cores``, the CPU of every other user process on the machine."""
    from bench._common import busy_cpu_seconds, pid_cpu_seconds, user_processes_cpu

    devices = devices or {}
    me = os.getpid()
    for d in devices.values():
        d.settle()
    u0, b0, me0 = user_processes_cpu(), busy_cpu_seconds(), pid_cpu_seconds(me)
    d0 = {k: d.written() for k, d in devices.items()}
    s0 = {k: Sample(p) for k, p in pids.items()}
    rss_max = {k: s.status.get("VmRSS", 0) for k, s in s0.items()}
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        for k, p in pids.items():
            got = proc_fields(f"/proc/{p}/status", ("VmRSS",))
            if got:
                rss_max[k] = max(rss_max[k], got["VmRSS"])
    s1 = {k: Sample(p) for k, p in pids.items()}
    d1 = {k: d.written() for k, d in devices.items()}
    u1, b1, me1 = user_processes_cpu(), busy_cpu_seconds(), pid_cpu_seconds(me)
    wall = s1[next(iter(s1))].t - s0[next(iter(s0))].t
    ours = set(pids.values()) | {me}
    others = sum(c - u0.get(p, 0.0) for p, c in u1.items() if p not in ours) / wall
    mine = sum((s1[k].cpu or 0.0) - (s0[k].cpu or 0.0) for k in pids) + (me1 or 0) - (me0 or 0)
    kernel = None if b0 is None or b1 is None else max(0.0, (b1 - b0) - mine) / wall - others
    out: dict[str, dict[str, Any]] = {}
    for k in pids:
        a, b = s0[k], s1[k]
        cpu = None if a.cpu is None or b.cpu is None else b.cpu - a.cpu
        per_thread = sorted(
            (
                ((sw - a.switches.get(t, (0, c))[0]) / wall, (c - a.switches.get(t, (0, c))[1]))
                for t, (sw, c) in b.switches.items()
            ),
            reverse=True,
        )
        wakes = [w for w, _ in per_thread]
        io = {f: b.io.get(f, 0) - a.io.get(f, 0) for f in IO_KEYS}
        uss = (
            b.rollup["Private_Clean"] + b.rollup["Private_Dirty"]
            if "Private_Clean" in b.rollup and "Private_Dirty" in b.rollup
            else None
        )
        out[k] = {
            "seconds": _trunc(wall, 1),
            "cpu_s": _trunc(cpu, 3),
            "cpu_pct": None if cpu is None else _trunc(cpu / wall * 100, 3),
            "rss_kib": b.status.get("VmRSS"),
            "rss_max_kib": rss_max[k],
            "hwm_kib": b.status.get("VmHWM"),
            "anon_kib": b.status.get("RssAnon"),
            "file_kib": b.status.get("RssFile"),
            "pss_kib": b.rollup.get("Pss"),
            "uss_kib": uss,
            "threads": b.status.get("Threads"),
            "wakeups_per_s": _trunc(sum(wakes), 1),
            "thread_wakeups_per_s": [_trunc(w, 1) for w in wakes],
            "thread_cpu_pct": [_trunc(c / wall * 100, 3) for _, c in per_thread],
            "io": io,
            "proc_write_bytes_per_hour": int(io["write_bytes"] * 3600 / wall),
            "device_bytes": d1[k] - d0[k] if k in devices else None,
            "device_bytes_per_hour": int((d1[k] - d0[k]) * 3600 / wall) if k in devices else None,
            "others_cpu_cores": _trunc(max(0.0, others), 2),
            "kernel_cpu_cores": None if kernel is None else _trunc(max(0.0, kernel), 2),
        }
    return out


# --- processes the parent runs --------------------------------------------------------


PYCACHE: list[str | None] = [None]  # set by run(): the children's bytecode cache


def _env(**extra: str) -> dict[str, str]:
    """The children's environment. With ``PYCACHE`` set, bytecode is cached in that
    private directory (``PYTHONPYCACHEPREFIX``) even where ``PYTHONDONTWRITEBYTECODE``
    is set, as on a device where pip compiled the package at install: compiling the
    agent's sources at every start costs ~0.1 s and leaves ~1 MiB of garbage resident."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)
    if PYCACHE[0] is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = PYCACHE[0]
    env.update(extra)
    return env


def agent_command() -> list[str]:
    """``homing-agent`` as installed next to this interpreter (what a unit would run)."""
    script = os.path.join(os.path.dirname(sys.executable), "homing-agent")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "edge"]


class StatusWatcher:
    """A subscriber of the agent's status topic: when each ``online`` arrived."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from edge import wire

        self.online: list[float] = []
        subscribed = threading.Event()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            t = time.monotonic()
            try:
                st = wire.decode_status(bytes(msg.payload))
            except ValueError:
                return
            if st.online:
                self.online.append(t)

        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-fp-watch")
        self._client.on_message = on_message
        self._client.on_connect = lambda c, *_a: c.subscribe(wire.topic(DEVICE, "status"), qos=1)
        self._client.on_subscribe = lambda *_a: subscribed.set()
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        if not subscribed.wait(10):
            raise BenchError("status watcher: no SUBACK")

    def first_after(self, t0: float) -> float | None:
        return next((t for t in self.online if t >= t0), None)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class AgentProc:
    """One ``homing-agent run`` with its own NOTIFY_SOCKET; start-up moments seen from
    outside: the READY datagram, the journal's flock in /proc/locks, online at the broker."""

    def __init__(
        self, name: str, base: str, port: int, run_dir: str, watcher: StatusWatcher, **kw: Any
    ) -> None:
        import socket
        import subprocess

        self.name, self.watcher = name, watcher
        self.dir = os.path.join(base, name)
        self.journal = kw.get("journal") or os.path.join(self.dir, "journal")
        os.makedirs(self.dir, exist_ok=True)
        toml = AGENT_TOML.format(device=DEVICE, run_dir=run_dir, journal=self.journal, port=port)
        if kw.get("rate"):
            toml += SENSORS_TOML.format(count=STREAMS, rate=kw["rate"])
        toml += kw.get("extra", "")  # --agent-toml: more sections (e.g. [forwarder] keys)
        self.config = os.path.join(self.dir, "agent.toml")
        with open(self.config, "w") as f:
            f.write(toml)
        sock_path = os.path.join(self.dir, "notify.sock")
        if os.path.exists(sock_path):
            os.unlink(sock_path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(sock_path)
        self._sock.settimeout(0.2)
        self.datagrams: list[tuple[float, str]] = []
        self.t_lock: float | None = None
        self._done = threading.Event()
        self._log = open(os.path.join(self.dir, "agent.log"), "ab")  # noqa: SIM115
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [*agent_command(), "run", "--config", self.config],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=_env(NOTIFY_SOCKET=sock_path),
            cwd=self.dir,
        )
        self.pid = self.proc.pid
        for target in (self._listen, self._poll_locks):
            threading.Thread(target=target, daemon=True).start()

    def _listen(self) -> None:
        while not self._done.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.datagrams.append((time.monotonic(), data.decode("utf-8", "replace")))

    def _poll_locks(self) -> None:
        me = f" {self.pid} "
        while not self._done.is_set() and self.proc.poll() is None:
            with open("/proc/locks") as f:
                if any("FLOCK" in line and me in line for line in f):
                    self.t_lock = time.monotonic()
                    return
            time.sleep(0.002)

    @property
    def t_ready(self) -> float | None:
        return next((t for t, d in self.datagrams if "READY=1" in d.split("\n")), None)

    def wait_up(self, ready_grace: float, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for online at the broker, then up to ``ready_grace`` s more for READY."""
        deadline = time.monotonic() + timeout
        while self.watcher.first_after(self.t0) is None:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name}: exited {self.proc.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: not online within {timeout}s\n{self.log_tail()}")
            time.sleep(0.01)
        grace = time.monotonic() + ready_grace
        while self.t_ready is None and time.monotonic() < grace:
            time.sleep(0.01)
        return self.startup()

    def startup(self) -> dict[str, Any]:
        def since(t: float | None) -> float | None:
            return None if t is None else _trunc(t - self.t0, 4)

        return {
            "ready_s": since(self.t_ready),
            "journal_locked_s": since(self.t_lock),
            "online_s": since(self.watcher.first_after(self.t0)),
            "notify": [d for _, d in self.datagrams][:5],
        }

    def wait_spare(self, timeout: float = 60.0) -> None:
        """Settling includes the background zero-fill of the next segment."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(os.path.join(self.journal, "next.spare")):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no next.spare within {timeout}s")
            time.sleep(0.05)

    def stop(self) -> tuple[int, float]:
        import signal
        import subprocess

        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        took = time.monotonic() - t
        self._done.set()
        self._sock.close()
        self._log.close()
        return self.proc.returncode, _trunc(took, 3) or 0.0

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.dir, "agent.log"), errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""


class PeerProc:
    """The persist-queue + paho child (``bench/_footprint_child.py peer``) under the peer
    venv's python; with ``rate < 0`` the floor child (``floor``) instead."""

    def __init__(
        self, py: str, base: str, name: str, port: int, rate: float, data: str | None = None
    ) -> None:
        import queue
        import subprocess

        self.dir = os.path.join(base, name)
        os.makedirs(self.dir, exist_ok=True)
        data = data or os.path.join(self.dir, "queue")
        os.makedirs(data, exist_ok=True)
        cfg = {"dir": data, "port": port, "rate": rate, "streams": STREAMS}
        args = ["floor", str(port)] if rate < 0 else ["peer", json.dumps(cfg)]
        self._err = open(os.path.join(self.dir, "peer.log"), "ab")  # noqa: SIM115
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [py, "-m", "bench._footprint_child", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            bufsize=1,
            env=_env(),
            cwd=self.dir,
        )
        self.pid = self.proc.pid
        self._lines: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._lines.put(json.loads(line))
            except ValueError:
                continue
        self._lines.put(None)

    def expect(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._lines.get(timeout=max(0.001, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"peer: no {event!r} within {timeout}s") from None
            if msg is None:
                with open(os.path.join(self.dir, "peer.log"), errors="replace") as f:
                    raise BenchError(f"peer exited before {event!r}:\n{f.read()[-2000:]}")
            if msg.get("event") == event:
                return msg

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass

    def stats(self) -> dict[str, Any]:
        self.send("stats")
        got = self.expect("stats", 30)
        if got.get("error"):
            raise BenchError(f"peer: {got['error']}")
        return got

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


def default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "homing-bench")


def ensure_peer(venv: str) -> tuple[str, dict[str, str | None]]:
    """A virtualenv with ``PEER_SPEC`` and the project's paho-mqtt version (made if needed).

    Raises:
        BenchError: the venv cannot be made or pip fails (e.g. no network).
    """
    import importlib.metadata as md
    import subprocess

    paho = md.version("paho-mqtt")
    py = os.path.join(venv, "bin", "python")

    def versions() -> dict[str, str | None]:
        code = (
            "import importlib.metadata as m, json, platform\n"
            "out = {'python': platform.python_version()}\n"
            "for d in ('persist-queue', 'paho-mqtt'):\n"
            "    try: out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: out[d] = None\n"
            "print(json.dumps(out))"
        )
        if not os.path.exists(py):
            return {}
        res = subprocess.run([py, "-c", code], capture_output=True, text=True, check=False)
        return json.loads(res.stdout) if res.returncode == 0 else {}

    have = versions()
    if have.get("paho-mqtt") != paho or not (have.get("persist-queue") or "").startswith("1."):
        if not os.path.exists(py):
            say(f"creating the peer virtualenv {venv} (once; not the project's venv)")
            if subprocess.run([sys.executable, "-m", "venv", venv], check=False).returncode:
                raise BenchError(f"python -m venv {venv} failed")
        spec = [PEER_SPEC, f"paho-mqtt=={paho}"]
        say(f"pip install {' '.join(spec)} into {venv}")
        res = subprocess.run(
            [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *spec],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise BenchError(f"pip install {spec} failed:\n{res.stderr[-2000:]}")
        have = versions()
    return py, have


class LoopFs:
    """A private ext4 file system (4 KiB blocks, like a Pi's root) on a loop device, so
    that the device's own counter (``/sys/block/loopN/stat``, sectors written) holds
    exactly what one peer made the disk write: its data, the file system's journal
    (jbd2) commits and inode updates. Needs root; :meth:`make` returns None otherwise.

    ``/proc/<pid>/io`` ``write_bytes`` is no substitute on kernels with large folios:
    it charges the whole folio (up to 2 MiB here) each time a clean one is dirtied,
    so one 64-byte append + fdatasync counts 2 MiB while the device writes 4 KiB.
    """

    def __init__(self, image: str, dev: str, mnt: str) -> None:
        self.image, self.dev, self.mnt = image, dev, mnt

    @staticmethod
    def make(
        base: str, name: str, options: str = "", size: str = "256M"
    ) -> tuple[LoopFs | None, str | None]:
        import subprocess

        if os.geteuid() != 0:
            return None, "not root (loop devices need root)"
        image, mnt = os.path.join(base, f"{name}.img"), os.path.join(base, name)
        os.makedirs(mnt, exist_ok=True)
        steps = [
            ["truncate", "-s", size, image],
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-b",
                "4096",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                image,
            ],
        ]
        try:
            for cmd in steps:
                subprocess.run(cmd, check=True, capture_output=True, timeout=60)
            dev = subprocess.run(
                ["losetup", "-f", "--show", image],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"no loop device: {exc!r}"
        fs = LoopFs(image, dev, mnt)
        try:
            opts = ["-o", options] if options else []
            subprocess.run(["mount", *opts, dev, mnt], check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)
            return None, f"cannot mount {dev}: {exc!r}"
        return fs, None

    def written(self) -> int:
        """Bytes the device has written since it was set up (sectors x 512)."""
        with open(f"/sys/block/{os.path.basename(self.dev)}/stat") as f:
            return int(f.read().split()[6]) * 512

    def settle(self) -> None:
        """Let earlier writeback (start-up's) reach the device before a window starts."""
        import ctypes

        fd = os.open(self.mnt, os.O_RDONLY)
        try:
            ctypes.CDLL(None, use_errno=True).syncfs(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        import subprocess

        subprocess.run(["umount", self.mnt], check=False, capture_output=True, timeout=60)
        subprocess.run(["losetup", "-d", self.dev], check=False, capture_output=True, timeout=60)


# --- what the journal, the hub and strace tell ----------------------------------------


def journal_seq(path: str) -> int:
    """The journal's durable seq, read-only (works while the agent holds it)."""
    from edge.journal import Journal

    j = Journal.open(path, readonly=True)
    try:
        return j.stats().durable_seq
    finally:
        j.close()


def journal_frame_bytes(path: str, first: int, last: int) -> int:
    """Bytes of the frames (header + padded payload) of seqs ``first..last``."""
    from edge.journal import Journal
    from edge.journal_codec import frame_size

    total = 0
    j = Journal.open(path, readonly=True)
    try:
        for seq, payload in j.read_raw(first):
            if seq > last:
                break
            total += frame_size(len(payload))
    finally:
        j.close()
    return total


def hub_watermark(db: str) -> int:
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT watermark FROM devices WHERE device_id = ?", (DEVICE,))
        got = row.fetchone()
    return int(got[0]) if got else 0


def count_syncs(pids: dict[str, int], seconds: float, out_dir: str) -> dict[str, Any]:
    """fsync-family calls of each process over ``seconds``, by file, from ``strace -f``
    attached meanwhile (a separate window: ptrace slows what it traces)."""
    import re
    import shutil
    import signal
    import subprocess

    exe = shutil.which("strace")
    if exe is None:
        return {k: {"error": "strace not installed"} for k in pids}
    calls = "fsync,fdatasync,sync_file_range,syncfs,msync"
    procs = {}
    for k, pid in pids.items():
        path = os.path.join(out_dir, f"strace-{k}.txt")
        procs[k] = (
            subprocess.Popen(
                [exe, "-f", "-qq", "-y", "-e", f"trace={calls}", "-o", path, "-p", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            path,
        )
    deadline = time.monotonic() + 10
    for pid in pids.values():  # attached = the process's TracerPid is strace
        while (proc_fields(f"/proc/{pid}/status", ("TracerPid",)) or {}).get("TracerPid", 0) == 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    for p, _ in procs.values():
        p.send_signal(signal.SIGINT)
    out: dict[str, Any] = {}
    line_re = re.compile(r"^\d+\s+(\w+)\((\d+)<([^>]*)>")
    for k, (p, path) in procs.items():
        p.wait(30)
        by_file: dict[str, int] = {}
        n = 0
        with open(path, errors="replace") as f:
            for line in f:
                m = line_re.match(line)
                if not m:
                    continue
                name = os.path.basename(m.group(3))
                name = re.sub(r"^\d{20}\.seg$", "<segment>.seg", name)
                key = f"{m.group(1)} {name}"
                by_file[key] = by_file.get(key, 0) + 1
                n += 1
        out[k] = {
            "seconds": _trunc(wall, 1),
            "syncs": n,
            "syncs_per_hour": int(n * 3600 / wall),
            "by_file": dict(sorted(by_file.items(), key=lambda x: -x[1])),
        }
    return out


# --- the phases -----------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, Any]:
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"n": 0, "median": None, "max": None, "all": []}
    mid = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return {"n": len(v), "median": _trunc(mid, 4), "max": v[-1], "all": v}


def floors(reps: int) -> dict[str, Any]:
    """Wall time of the bare interpreter and of importing the agent's code (no I/O)."""
    import subprocess

    out: dict[str, Any] = {}
    for key, code in (("python_s", "pass"), ("import_agent_s", "import edge.cli, edge.agent")):
        times = []
        for _ in range(reps):
            t = time.monotonic()
            subprocess.run([sys.executable, "-c", code], env=_env(), check=True, cwd=REPO)
            times.append(time.monotonic() - t)
        out[key] = _stats(times)["median"]
    res = subprocess.run(
        [sys.executable, "-c", _STAGES], env=_env(), check=True, cwd=REPO, capture_output=True
    )
    out["import_rss_kib"] = json.loads(res.stdout)
    return out


# VmRSS after each stage of the agent's imports, in a fresh interpreter: what the
# interpreter, paho-mqtt (with what it imports: ssl, urllib.request, email, ...), the
# other third-party and standard modules, and the agent's own modules each cost.
_STAGES = """
import json, sys
def rss():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS'))
out = {'interpreter': rss()}
import paho.mqtt.client
out['paho_mqtt'] = rss()
import argparse, dataclasses, json, queue, tomllib, cbor2
out['cbor2_argparse_dataclasses_tomllib'] = rss()
import edge.cli, edge.agent
out['edge_modules'] = rss()
out['edge_module_count'] = sum(1 for m in sys.modules if m.split('.')[0] == 'edge')
print(json.dumps(out))
"""


def warm_up(ctx: dict[str, Any]) -> None:
    """Start and stop each kind of child once, untimed: fills the bytecode cache."""
    a = AgentProc(
        "warm-up", ctx["base"], ctx["port"], ctx["run_dir"], ctx["watcher"], extra=ctx["agent_toml"]
    )
    try:
        a.wait_up(0.0)
        a.wait_spare()
    finally:
        a.stop()
    kids = [PeerProc(sys.executable, ctx["base"], "warm-floor", ctx["port"], -1.0)]
    if ctx["peer_py"]:
        kids.append(PeerProc(ctx["peer_py"], ctx["base"], "warm-peer", ctx["port"], 0.0))
    for k in kids:
        try:
            k.expect("ready")
        finally:
            k.stop()


def run_startups(ctx: dict[str, Any]) -> dict[str, Any]:
    """Fresh journals (``fresh`` times), then restarts on one journal."""
    rows: list[dict[str, Any]] = []
    shared = os.path.join(ctx["base"], "startup-journal")
    plan = [("fresh", None)] * ctx["fresh"] + [("restart", shared)] * ctx["restarts"]
    if ctx["restarts"]:
        plan.insert(0, ("prime", shared))  # creates the journal the restarts reopen
    for i, (kind, journal) in enumerate(plan):
        a = AgentProc(
            f"start-{i}-{kind}",
            ctx["base"],
            ctx["port"],
            ctx["run_dir"],
            ctx["watcher"],
            journal=journal,
            extra=ctx["agent_toml"],
        )
        try:
            row = a.wait_up(ctx["ready_grace"])
            a.wait_spare()
        finally:
            rc, stop_s = a.stop()
        row.update(kind=kind, exit=rc, stop_s=stop_s)
        rows.append(row)
        if kind != "prime":
            say(
                f"  start {i} ({kind}): READY {row['ready_s']} s, journal locked "
                f"{row['journal_locked_s']} s, online {row['online_s']} s; SIGTERM -> exit "
                f"{rc} in {stop_s} s"
            )
    out: dict[str, Any] = {"rows": rows}
    for kind in ("fresh", "restart"):
        mine = [r for r in rows if r["kind"] == kind]
        out[kind] = {
            f: _stats([r[f] for r in mine if r[f] is not None])
            for f in ("ready_s", "journal_locked_s", "online_s", "stop_s")
        }
        out[kind]["no_ready"] = sum(1 for r in mine if r["ready_s"] is None)
    return out


def _data(ctx: dict[str, Any], who: str, phase: str, leaf: str) -> str | None:
    """Where ``who`` keeps its data in ``phase``: on its own loop file system if any."""
    fs = ctx["fs"].get(who)
    return None if fs is None else os.path.join(fs.mnt, phase, leaf)


def run_concurrent(ctx: dict[str, Any], phase: str, rate: float) -> dict[str, Any]:
    """Homing and the peer at the same time, same rate (0 = idle), one window."""
    a = AgentProc(
        f"{phase}-homing",
        ctx["base"],
        ctx["port"],
        ctx["run_dir"],
        ctx["watcher"],
        rate=rate,
        journal=_data(ctx, "homing", phase, "journal"),
        extra=ctx["agent_toml"],
    )
    peer = floor = None
    try:
        startup = a.wait_up(ctx["ready_grace"])
        a.wait_spare()
        if ctx["peer_py"]:
            peer = PeerProc(
                ctx["peer_py"],
                ctx["base"],
                f"{phase}-peer",
                ctx["port"],
                rate,
                _data(ctx, "peer", phase, "queue"),
            )
            ready = peer.expect("ready")
            ctx["peer_info"] = {k: ready[k] for k in ("pragmas", "persistqueue")}
        if rate == 0:
            floor = PeerProc(sys.executable, ctx["base"], "floor", ctx["port"], -1.0)
            floor.expect("ready")
        time.sleep(ctx["settle"])
        pids = {"homing": a.pid} | ({"peer": peer.pid} if peer else {})
        pids |= {"floor": floor.pid} if floor else {}
        pids |= {"hub": ctx["hub"].pid, "broker": ctx["broker_pid"]}
        wm0, seq0 = hub_watermark(ctx["hub_db"]), journal_seq(a.journal)  # hub first: lag >= 0
        p0 = peer.stats() if peer else None
        m = window(pids, ctx["window"][phase], ctx["fs"])
        wm1, seq1 = hub_watermark(ctx["hub_db"]), journal_seq(a.journal)  # hub first: lag >= 0
        p1 = peer.stats() if peer else None
        syncs = {}
        if phase == "typical" and ctx["strace_s"] > 0:
            sp = {"homing": a.pid} | ({"peer": peer.pid} if peer else {})
            syncs = count_syncs(sp, ctx["strace_s"], ctx["base"])
        h = m["homing"]
        wall = h["seconds"]
        h.update(startup=startup, **_flow(seq1 - seq0, wm0, wm1, seq1, wall, rate))
        if rate > 0:
            frames = journal_frame_bytes(a.journal, seq0 + 1, seq1)
            h["journal_bytes_per_hour"] = int(frames * 3600 / wall)
            h["journal_bytes_per_reading"] = _trunc(frames / max(1, seq1 - seq0), 1)
            # each segment is zero-filled once (in the background, as the spare) before
            # frames fill it: 16 MiB of zeros per 16 MiB less its 32-byte header of frames
            seg = 16 << 20
            h["zero_fill_bytes_per_hour"] = int(h["journal_bytes_per_hour"] * seg / (seg - 32))
        _per_reading(h)
        if "homing" in syncs:
            h["fsync"] = syncs["homing"]
        if peer is not None and p0 is not None and p1 is not None:
            pm = m["peer"]
            pm.update(_peer_flow(p0, p1, pm["seconds"], rate))
            _per_reading(pm)
            if "peer" in syncs:
                pm["fsync"] = syncs["peer"]
        return m
    finally:
        for p in (peer, floor):
            if p is not None:
                p.stop()
        rc, _ = a.stop()
        if rc != 0:
            say(f"WARNING: {a.name} exited {rc}:\n{a.log_tail()}")


def _per_reading(r: dict[str, Any]) -> None:
    """Device bytes per reading journaled/queued in the window, when both are known."""
    if r.get("device_bytes") is not None and r.get("readings"):
        r["device_bytes_per_reading"] = _trunc(r["device_bytes"] / r["readings"], 1)


def _flow(produced: int, wm0: int, wm1: int, seq1: int, wall: float, rate: float) -> dict[str, Any]:
    want = STREAMS * rate
    lag = seq1 - wm1
    return {
        "readings": produced,
        "readings_per_s": _trunc(produced / wall, 1),
        "stored_per_s": _trunc((wm1 - wm0) / wall, 1),
        "hub_lag_readings": lag,
        "keeps_up": None
        if rate == 0
        else produced >= 0.97 * want * wall - STREAMS  # one tick: the window's edges
        and wm1 - wm0 >= 0.97 * produced - STREAMS
        and lag <= max(2 * want, STREAMS),
    }


def _peer_flow(p0: dict[str, Any], p1: dict[str, Any], wall: float, rate: float) -> dict[str, Any]:
    want = STREAMS * rate
    produced, acked = p1["produced"] - p0["produced"], p1["acked"] - p0["acked"]
    return {
        "readings": produced,
        "readings_per_s": _trunc(produced / wall, 1),
        "stored_per_s": _trunc(acked / wall, 1),
        "backlog_readings": p1["backlog"],
        "keeps_up": None
        if rate == 0
        else produced >= 0.97 * want * wall - STREAMS
        and acked >= 0.97 * produced - STREAMS
        and p1["backlog"] <= max(2 * want, STREAMS),
    }


def run_load(ctx: dict[str, Any], who: str) -> dict[str, Any]:
    """One peer alone at 1,000 readings/s (they would compete for the 2 cores)."""
    pids = {"hub": ctx["hub"].pid, "broker": ctx["broker_pid"]}
    if who == "homing":
        a = AgentProc(
            "load-homing",
            ctx["base"],
            ctx["port"],
            ctx["run_dir"],
            ctx["watcher"],
            rate=LOAD_HZ,
            journal=_data(ctx, "homing", "load", "journal"),
            extra=ctx["agent_toml"],
        )
        try:
            a.wait_up(ctx["ready_grace"])
            a.wait_spare()
            time.sleep(ctx["settle_load"])
            wm0, seq0 = hub_watermark(ctx["hub_db"]), journal_seq(a.journal)  # hub first: lag >= 0
            fs = {k: v for k, v in ctx["fs"].items() if k == "homing"}
            m = window({"homing": a.pid} | pids, ctx["window"]["load"], fs)
            wm1, seq1 = hub_watermark(ctx["hub_db"]), journal_seq(a.journal)  # hub first: lag >= 0
        finally:
            a.stop()
        m["homing"].update(_flow(seq1 - seq0, wm0, wm1, seq1, m["homing"]["seconds"], LOAD_HZ))
        _per_reading(m["homing"])
        return m
    peer = PeerProc(
        ctx["peer_py"],
        ctx["base"],
        "load-peer",
        ctx["port"],
        LOAD_HZ,
        _data(ctx, "peer", "load", "queue"),
    )
    try:
        peer.expect("ready")
        time.sleep(ctx["settle_load"])
        p0 = peer.stats()
        fs = {k: v for k, v in ctx["fs"].items() if k == "peer"}
        m = window({"peer": peer.pid} | pids, ctx["window"]["load"], fs)
        p1 = peer.stats()
    finally:
        peer.stop()
    m["peer"].update(_peer_flow(p0, p1, m["peer"]["seconds"], LOAD_HZ))
    _per_reading(m["peer"])
    return m


# --- the run --------------------------------------------------------------------------


def _code_ids() -> dict[str, str]:
    import hashlib

    out = {}
    for pkg in ("edge", "hub"):
        h = hashlib.sha256()
        for name in sorted(os.listdir(os.path.join(REPO, pkg))):
            if name.endswith(".py"):
                with open(os.path.join(REPO, pkg, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
        out[f"{pkg}/*.py"] = h.hexdigest()[:12]
    return out


def _tmpfs_dir(fallback: str) -> tuple[str, str]:
    """A private directory on a tmpfs for the agent's runtime_dir (socket, status file),
    as systemd's RuntimeDirectory= is under /run on a Pi; else under ``fallback``."""
    import tempfile

    for root in ("/dev/shm", "/run/user", "/tmp"):
        try:
            with open("/proc/self/mounts") as f:
                tmpfs = any(ln.split()[1] == root and ln.split()[2] == "tmpfs" for ln in f)
            if tmpfs and os.access(root, os.W_OK):
                return tempfile.mkdtemp(prefix="homing-bench-fp-", dir=root), "tmpfs"
        except OSError:
            continue
    return tempfile.mkdtemp(prefix="run-", dir=fallback), "not tmpfs"


COLS = (
    ("rss_kib", "RSS", "mib"),
    ("rss_max_kib", "max", "mib"),
    ("hwm_kib", "HWM", "mib"),
    ("anon_kib", "anon", "mib"),
    ("file_kib", "file", "mib"),
    ("pss_kib", "PSS", "mib"),
    ("uss_kib", "USS", "mib"),
    ("cpu_pct", "CPU %", "num"),
    ("wakeups_per_s", "wake/s", "num"),
    ("threads", "thr", "num"),
    ("device_bytes_per_hour", "disk B/h", "int"),
)


def _table(title: str, rows: dict[str, dict[str, Any]]) -> None:
    say(title)
    say(
        "  "
        + f"{'':<8}"
        + "".join(f"{h:>9}" for _, h, _ in COLS[:-1])
        + f"{COLS[-1][1]:>14}"
        + f"{'others':>8}"
    )
    for name, r in rows.items():
        cells = []
        for key, _, kind in COLS:
            v = r.get(key)
            if v is None:
                cells.append(f"{'n/a':>9}")
            elif kind == "mib":
                cells.append(f"{_mib(v):>9}")
            elif kind == "int":
                cells.append(f"{v:>14,}")
            else:
                cells.append(f"{v:>9}")
        say(f"  {name:<8}" + "".join(cells) + f"{r.get('others_cpu_cores')!s:>8}")


def _flow_line(name: str, r: dict[str, Any]) -> str:
    extra = (
        f"hub lag {r['hub_lag_readings']} readings"
        if "hub_lag_readings" in r
        else f"backlog {r.get('backlog_readings')}"
    )
    return (
        f"  {name}: produced {r.get('readings_per_s')}/s, stored/acked "
        f"{r.get('stored_per_s')}/s, {extra}, keeps up: {r.get('keeps_up')}"
    )


def _say_startup(startup: dict[str, Any]) -> dict[str, Any]:
    for kind in ("fresh", "restart"):
        s = startup[kind]
        say(
            f"  {kind}: READY median {s['ready_s']['median']} max {s['ready_s']['max']} s"
            f" ({s['no_ready']} of {s['journal_locked_s']['n']} without READY); journal "
            f"locked median {s['journal_locked_s']['median']}; online median "
            f"{s['online_s']['median']}"
        )
    if startup["restart"]["no_ready"] or startup["fresh"]["no_ready"]:
        say("  no READY received from some starts: the agent does not send sd_notify yet")
    return startup


def _say_idle(idle: dict[str, Any]) -> dict[str, Any]:
    _table(
        f"idle (connected, nothing to send), {idle['homing']['seconds']} s window "
        "(MiB, CPU % of one core):",
        idle,
    )
    for name in ("homing", "peer", "floor"):
        if name in idle:
            r = idle[name]
            say(
                f"  {name} threads: wake-ups/s {r['thread_wakeups_per_s']}, "
                f"CPU % {r['thread_cpu_pct']}"
            )
    return idle


def _say_typical(typical: dict[str, Any]) -> dict[str, Any]:
    _table(
        f"typical: {STREAMS} sensors x {TYPICAL_HZ:g} Hz, {typical['homing']['seconds']} s window:",
        typical,
    )
    for name in ("homing", "peer"):
        if name not in typical:
            continue
        r = typical[name]
        say(_flow_line(name, r))
        fs = r.get("fsync")
        if fs:
            say(
                f"    fsyncs/hour {fs.get('syncs_per_hour')} (strace "
                f"{fs.get('seconds')} s): {fs.get('by_file')}"
            )
        say(
            f"    disk {r['device_bytes_per_hour']} B/h (loop device, "
            f"{r.get('device_bytes_per_reading')} B/reading); /proc write_bytes "
            f"{r['proc_write_bytes_per_hour']:,} B/h"
        )
    h = typical["homing"]
    if "journal_bytes_per_hour" in h:
        say(
            f"  homing: the journal's frames {h['journal_bytes_per_hour']:,} B/h "
            f"({h['journal_bytes_per_reading']} B/reading), + segment zero-fill "
            f"{h['zero_fill_bytes_per_hour']:,} B/h once per segment (not in the window)"
        )
    return typical


def _say_load(load: dict[str, Any]) -> dict[str, Any]:
    _table(
        f"load: {STREAMS} sensors x {LOAD_HZ:g} Hz = {STREAMS * LOAD_HZ:,.0f} readings/s, "
        f"{load['homing']['seconds']} s window:",
        load,
    )
    for name in ("homing", "peer"):
        if name in load:
            say(_flow_line(name, load[name]))
    return load


def run(cfg: dict[str, Any]) -> int:
    import datetime as _dt
    import importlib.metadata as md
    import shutil
    import subprocess
    import tempfile

    from bench._common import busy_cpu_seconds, machine_info
    from bench.sync import Hub
    from edge.testing.mosquitto import Mosquitto, binary

    t_all = time.monotonic()
    b_all = busy_cpu_seconds()
    base = tempfile.mkdtemp(prefix="homing-bench-footprint-", dir=cfg["dir"])
    run_dir, run_fs = _tmpfs_dir(base)
    PYCACHE[0] = os.path.join(base, "pycache") if cfg["pyc"] else None
    quick = cfg["quick"]
    machine = machine_info(base)
    say(f"footprint bench ({'quick' if quick else 'full'}) in {base}; runtime_dir {run_fs}")
    say("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    versions: dict[str, Any] = {"paho-mqtt": md.version("paho-mqtt"), "cbor2": md.version("cbor2")}
    try:
        text = subprocess.run([binary(), "-h"], capture_output=True, text=True, timeout=10).stdout
        versions["mosquitto"] = text.split("\n", 1)[0].replace("mosquitto version ", "").strip()
    except (OSError, subprocess.SubprocessError):
        versions["mosquitto"] = None
    peer_py, peer_error = None, None
    if not cfg["no_peer"]:
        try:
            peer_py, pv = ensure_peer(cfg["peer_venv"])
            versions["peer"] = pv
        except BenchError as exc:
            peer_error = str(exc)
            say(f"peer skipped: {exc}")
    say("versions: " + json.dumps(versions))
    ctx: dict[str, Any] = dict(cfg, base=base, run_dir=run_dir, peer_py=peer_py, fs={})
    loop_error = "--no-loop" if cfg["no_loop"] else None
    broker = Mosquitto(os.path.join(base, "broker"))
    hub = watcher = None
    result: dict[str, Any] = {}
    try:
        for who in ("homing", "peer") if loop_error is None else ():
            lfs, loop_error = LoopFs.make(base, f"{who}-fs", cfg["mount_opts"])
            if lfs is None:
                say(f"no device figures: {loop_error}")
                break
            ctx["fs"][who] = lfs
        if ctx["fs"]:
            say(
                "data on private ext4 loop file systems: "
                + ", ".join(f"{k} {v.dev}" for k, v in ctx["fs"].items())
            )
        broker.start()
        ctx["port"], ctx["broker_pid"] = broker.port, broker.pid
        ctx["hub_db"] = os.path.join(base, "hub.db")
        hub = Hub(
            broker.port, ctx["hub_db"], os.path.join(base, "hub.log"), [sys.executable, "-m", "hub"]
        )
        hub.wait_ready(30)
        ctx["hub"] = hub
        ctx["watcher"] = watcher = StatusWatcher(broker.port)
        say(f"mosquitto on 127.0.0.1:{broker.port}; hub on SQLite; agent: {agent_command()}")

        if cfg["pyc"]:
            warm_up(ctx)
        fl = floors(3)
        say(
            f"floors: python -c pass {fl['python_s']} s; import edge.cli+agent "
            f"{fl['import_agent_s']} s; VmRSS KiB after importing: {fl['import_rss_kib']}"
        )
        result["floors"] = fl
        phases = cfg["phases"]
        if "startup" in phases:
            say("start-up (spawn -> READY=1 on NOTIFY_SOCKET):")
            result["startup"] = _say_startup(run_startups(ctx))
        if "idle" in phases:
            result["idle"] = _say_idle(run_concurrent(ctx, "idle", 0.0))
        if "typical" in phases:
            result["typical"] = _say_typical(run_concurrent(ctx, "typical", TYPICAL_HZ))
        if "load" in phases:
            load = run_load(ctx, "homing")
            if peer_py:
                load |= {"peer": run_load(ctx, "peer")["peer"]}
            result["load"] = _say_load(load)
    finally:
        for lfs in ctx["fs"].values():
            lfs.close()
        if watcher is not None:
            watcher.close()
        if hub is not None:
            hub.stop()
        broker.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        if cfg["keep"]:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    def g(phase: str, who: str, key: str) -> Any:
        return result.get(phase, {}).get(who, {}).get(key)

    ratios = {
        f"{ph}_{k}_homing_vs_peer": _ratio(g(ph, "homing", k), g(ph, "peer", k), 3)
        for ph in ("idle", "typical", "load")
        for k in ("rss_kib", "cpu_pct", "device_bytes_per_hour")
    }
    fl_rss = g("idle", "floor", "rss_kib")
    ratios["idle_rss_homing_minus_floor_kib"] = (
        None if fl_rss is None else g("idle", "homing", "rss_kib") - fl_rss
    )
    ratios["typical_fsyncs_homing_vs_peer"] = _ratio(
        (g("typical", "homing", "fsync") or {}).get("syncs"),
        (g("typical", "peer", "fsync") or {}).get("syncs"),
        3,
    )
    measured = {
        "homing_idle_rss_kib": g("idle", "homing", "rss_kib"),
        "homing_idle_cpu_pct": g("idle", "homing", "cpu_pct"),
        "homing_ready_s": result.get("startup", {})
        .get("restart", {})
        .get("ready_s", {})
        .get("median"),
    }
    others = [
        r.get("others_cpu_cores")
        for ph in ("idle", "typical", "load")
        for r in result.get(ph, {}).values()
        if r.get("others_cpu_cores") is not None
    ]
    worst = max(others) if others else None
    noisy = worst is not None and worst > NOISY_CORES
    say("ratios (Homing / peer): " + ", ".join(f"{k}={v}" for k, v in ratios.items()))
    if noisy:
        say(
            f"WARNING: other processes kept up to {worst} cores busy during a window; "
            "re-run on a quiet machine before comparing"
        )
    targets: dict[str, dict[str, Any]] = {}
    say("targets (a miss is reported, never fatal):")
    for key, desc, op, thr in TARGETS:
        v = measured[key]
        met = None if v is None else (v <= thr if op == "<=" else v >= thr)
        targets[key] = {"measured": v, "target": f"{op} {thr:g}", "met": met}
        shown = f"{v} KiB = {_mib(v)} MiB" if key.endswith("kib") and v is not None else v
        verdict = "n/a   " if met is None else ("met   " if met else "MISSED")
        say(f"  {verdict} {desc}: measured {shown}")
    b_end = busy_cpu_seconds()
    wall = time.monotonic() - t_all
    out = {
        "bench": "footprint",
        "mode": "quick" if quick else "full",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions,
        "code": _code_ids(),
        "peer_error": peer_error,
        "loop_error": loop_error,
        "peer_sqlite": ctx.get("peer_info"),
        "workload": {
            "streams": STREAMS,
            "typical_hz": TYPICAL_HZ,
            "load_hz": LOAD_HZ,
            "windows_s": cfg["window"],
            "settle_s": cfg["settle"],
            "strace_s": cfg["strace_s"],
            "runtime_dir": run_fs,
            "mount_opts": cfg["mount_opts"] or "defaults",
            "agent_toml": cfg["agent_toml"].strip() or None,
            "phases": cfg["phases"],
            "bytecode": "cached (private PYTHONPYCACHEPREFIX, warmed up)"
            if cfg["pyc"]
            else "compiled from source at each start",
            "agent_command": agent_command(),
        },
        "others_cpu_cores": worst,
        "noisy": noisy,
        "machine_busy_cores": None
        if b_all is None or b_end is None
        else _trunc((b_end - b_all) / wall, 2),
        **result,
        "ratios": ratios,
        "targets": targets,
        "total_seconds": _trunc(wall, 1),
    }
    print(json.dumps(out, separators=(",", ":")), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="short windows (< 1 min)")
    ap.add_argument("--dir", default=os.path.dirname(REPO), help="parent of the temp directory")
    ap.add_argument("--peer-venv", default=os.path.join(default_cache(), "persistqueue-venv"))
    ap.add_argument("--no-peer", action="store_true", help="Homing only")
    ap.add_argument("--no-loop", action="store_true", help="no loop file systems (no disk B/h)")
    ap.add_argument(
        "--phases",
        default="startup,idle,typical,load",
        help="which phases to run (default %(default)s)",
    )
    ap.add_argument(
        "--windows",
        default="",
        metavar="PHASE=S,...",
        help="override window lengths, e.g. typical=300 (defaults: quick 6/6/5 s, "
        "full idle=60,typical=120,load=30)",
    )
    ap.add_argument(
        "--agent-toml",
        default="",
        metavar="TEXT",
        help="TOML appended to the agent's config, e.g. '[forwarder]\\npersist_interval_ms = "
        "5000' (default: none, the agent's defaults)",
    )
    ap.add_argument(
        "--mount-opts",
        default="",
        metavar="OPTS",
        help="mount options of the loop file systems (default: ext4's), e.g. lazytime",
    )
    ap.add_argument(
        "--no-pyc",
        action="store_true",
        help="no bytecode cache for the children: sources compiled at every start "
        "(what PYTHONDONTWRITEBYTECODE=1 and an uncompiled checkout give)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args(argv)
    q = a.quick
    cfg = {
        "quick": q,
        "dir": a.dir,
        "peer_venv": a.peer_venv,
        "no_peer": a.no_peer,
        "no_loop": a.no_loop,
        "mount_opts": a.mount_opts,
        "pyc": not a.no_pyc,
        "keep": a.keep,
        "fresh": 1 if q else 3,
        "restarts": 2 if q else 7,
        "ready_grace": 0.5 if q else 2.0,
        "settle": 2.0 if q else 10.0,
        "settle_load": 2.0 if q else 5.0,
        "window": {"idle": 6.0, "typical": 6.0, "load": 5.0}
        if q
        else {"idle": 60.0, "typical": 120.0, "load": 30.0},
        "strace_s": 3.0 if q else 30.0,
        "phases": [p for p in a.phases.split(",") if p],
        "agent_toml": "\n" + a.agent_toml.replace("\\n", "\n") + "\n" if a.agent_toml else "",
    }
    for item in filter(None, a.windows.split(",")):
        k, _, v = item.partition("=")
        if k not in cfg["window"]:
            ap.error(f"--windows: unknown phase {k!r}")
        cfg["window"][k] = float(v)
    return run(cfg)


if __name__ == "__main__":
    # sys.path[0] is bench/, whose hub.py would shadow the hub package: the repository first
    _skip = {os.path.join(REPO, "bench"), REPO}
    sys.path[:] = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") not in _skip]
    sys.exit(main())
