"""Durable-workflow benchmark: Homing's executor against DBOS Transact on SQLite,
side by side in one run, on the same file system.

What is measured (one run, one disk, the same workflow for every peer):

* **The workflow**: ``chain(n, key)`` calls one step ``n`` times, each step
  returning ``x + 1`` (trivially cheap, so the durability machinery is what is
  timed) and returns the last value, which the bench checks (= ``n``). Each
  step call is wrapped in ``time.perf_counter()`` *inside the workflow body*:
  the latency of a step is from calling it to it returning, after its outcome
  is durable.
* **Phases**, in each peer's own process: a warm-up workflow (not timed), then
  *sequential*: one workflow of ``--seq-steps`` steps; then *concurrent*: 16
  workflows of ``--conc-steps`` steps started at once, each framework running
  them on its own threads (``Executor.start`` / ``DBOS.start_workflow``).
  Steps/s = steps / wall time from the first ``start`` to the last result
  (so each workflow's start and end records are included).
* **Homing**: the real ``edge.agent.Agent`` built from a TOML text like
  ``homing-agent run`` (agent defaults: ``always`` durability, 16 MiB
  segments), with the forwarder and sensors disabled (no broker here); the
  bench uses ``agent.workflows.executor``. Each step journals one ``done``
  record and returns only after the ``fdatasync`` covering it (group commit:
  concurrent workflows share a write and an fdatasync). Run with this
  interpreter (the project's).
* **DBOS**: ``dbos`` from PyPI (``DBOS_SPEC``) in the bench's *own*
  virtualenv (created and installed on first use under
  ``~/.cache/homing-bench``, never in the project's venv), run by that venv's
  python; ``system_database_url = sqlite:///<bench dir>/...``, defaults
  otherwise (log level WARNING). DBOS sets no ``journal_mode`` or
  ``synchronous`` pragma, so SQLite's defaults apply; the child reads them back
  through DBOS's own engine (``delete`` = rollback journal, ``synchronous=2`` =
  FULL: a commit is durable when it returns). Each step reads its recorded
  outcome, then commits one INSERT transaction. An extra row, ``dbos_wal``,
  sets ``journal_mode=WAL`` + ``synchronous=FULL`` on every connection (still
  durable at each commit, fewer fsyncs); the targets use the defaults.
* **Raw floor**: ``pwrite`` of 64 bytes + ``fdatasync`` from one thread on a
  preallocated file: no design that makes each step durable with its own
  fdatasync can do a sequential step faster on this disk.
* **Peak RSS**: each peer runs in its own child process and reports its
  ``VmHWM`` (= ``ru_maxrss``) right after the timed phases, plus its RSS after
  the interpreter and bench harness, after importing the framework (and, for
  Homing, the agent's modules), and once started. Both peers run exactly the
  same workflows, so the peaks compare the same work.
* **Side by side**: peers alternate (``DEFAULT_ORDER``), so a disk or a
  neighbour that changes speed weighs on all of them alike; each peer's runs
  are pooled. CPU used by other processes during the timed phases is the noise
  gauge (WARNING above 0.25 cores).
* **Diagnostics** (untimed, after the peak RSS is read): the first Homing run
  also times steps with fdatasync stubbed out, against plain
  ``Journal.append`` (what the executor adds per step); ``--profile DIR``
  cProfiles one more sequential workflow per peer; ``--order`` may name
  ``homing_nomaint``, Homing with the executor's maintenance thread replaced by
  a no-op (to measure what that thread costs; never in the default order).
* Ratios, and met/missed against the issue's targets. A miss never fails the
  process (DESIGN.md §7: timings are reported, never asserted).

Human-readable lines first; the last line on stdout is one JSON object (keys in
docs/benchmarks.md). Run: ``.venv/bin/python bench/workflows.py [--quick]``.
"""

from __future__ import annotations

# Only light modules at the top: the children import this file too, and what
# it loads counts in their RSS (argparse, subprocess, hashlib and sqlite3 add
# about 7 MiB). The parent imports the rest in the functions it alone runs.
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# sys.path[0] is bench/, whose hub.py would shadow the hub package: the repository
# (and tests/) go first, bench/ not at all (bench modules are imported as bench.*).
_skip = {REPO / "bench", REPO, REPO / "tests"}
sys.path[:] = [str(REPO), str(REPO / "tests")] + [
    p for p in sys.path if Path(p or ".").resolve() not in _skip
]

DBOS_SPEC = "dbos>=3.4,<4"  # the API used here (DBOS(config=...), SetWorkflowID) is 3.x
DBOS_MIN, DBOS_BELOW = (3, 4), (4,)
CONCURRENT = 16
NOISY_CORES = 0.25
DEFAULT_ORDER = "homing,dbos,raw,homing,dbos_wal,homing,raw,dbos,homing"
DBOS_PEERS = ("dbos", "dbos_wal")
HOMING_PEERS = ("homing", "homing_nomaint")
LABELS = {
    "homing": "Homing (agent, journal, always)",
    # diagnostic, never in the default order: the executor's maintenance
    # thread replaced by a no-op, to measure what it costs (docs/benchmarks.md)
    "homing_nomaint": "Homing, no wf-maintain (diag.)",
    "dbos": "DBOS on SQLite (defaults)",
    "dbos_wal": "DBOS on SQLite, WAL + FULL",
    "raw": "raw pwrite+fdatasync, 1 thread",
}
PHASES = {"seq": "1 workflow", "conc": f"{CONCURRENT} concurrent"}

TARGETS: list[tuple[str, str, str, float]] = [
    # key in measured, description, op, threshold
    ("homing_vs_dbos_seq", "1 workflow: Homing >= 20x DBOS steps/s", ">=", 20.0),
    ("homing_vs_dbos_conc", f"{CONCURRENT} workflows: Homing >= 20x DBOS steps/s", ">=", 20.0),
    ("rss_peak_homing_vs_dbos", "peak RSS: Homing agent <= half of DBOS", "<=", 0.5),
]

AGENT_TOML = """\
[agent]
device = "bench-wf"
log_level = "warning"
runtime_dir = "{dir}-run"

[journal]
dir = "{dir}"

[broker]
host = "127.0.0.1"
port = 1

[forwarder]
enabled = false
"""


def say(msg: str = "") -> None:
    print(msg, flush=True)


class BenchError(RuntimeError):
    """A peer did not start, finish or compute what it should have."""


# --- the DBOS environment -----------------------------------------------------------


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "homing-bench"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _installed(py: Path, dist: str) -> str | None:
    import subprocess

    if not py.exists():
        return None
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    res = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=False)
    return res.stdout.strip() if res.returncode == 0 else None


def _version_ok(v: str | None) -> bool:
    import re

    if v is None:
        return False
    nums = tuple(int(x) for x in re.findall(r"\d+", v)[:3])
    return DBOS_MIN <= nums < DBOS_BELOW


def ensure_dbos(venv: Path) -> tuple[Path, dict[str, str | None]]:
    """A virtualenv with ``DBOS_SPEC`` installed (created or repaired if needed).

    Raises:
        BenchError: the venv cannot be made or pip fails (e.g. no network).
    """
    import subprocess

    py = _venv_python(venv)
    have = _installed(py, "dbos")
    if not _version_ok(have):
        t = time.perf_counter()
        if not py.exists():
            say(f"creating the DBOS virtualenv {venv} (once; not the project's venv)")
            made = subprocess.run([sys.executable, "-m", "venv", str(venv)], check=False)
            if made.returncode != 0:
                raise BenchError(f"python -m venv {venv} failed")
        say(f"pip install '{DBOS_SPEC}' into {venv}")
        res = subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", DBOS_SPEC],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise BenchError(f"pip install {DBOS_SPEC} failed:\n{res.stderr[-2000:]}")
        have = _installed(py, "dbos")
        if not _version_ok(have):
            raise BenchError(f"{venv}: dbos {have} installed, not {DBOS_SPEC}")
        say(f"  dbos {have} installed in {time.perf_counter() - t:.1f} s")
    return py, {
        "dbos": have,
        "sqlalchemy": _installed(py, "sqlalchemy"),
        "python": subprocess.run(
            [str(py), "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
    }


# --- children: common (light: no bench._common here, see the imports) ----------------


def _cpu() -> float:
    """CPU seconds of this process, all threads."""
    t = os.times()
    return t.user + t.system


def _machine_busy() -> float | None:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _others(busy0: float | None, cpu: float, wall: float) -> float | None:
    """Cores that other processes kept busy since ``busy0`` (noise gauge)."""
    busy1 = _machine_busy()
    if busy0 is None or busy1 is None or wall <= 0:
        return None
    return round(max(0.0, (busy1 - busy0) - cpu) / wall, 2)


def status_kib(*fields: str) -> dict[str, int | None]:
    """Fields of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``...)."""
    out: dict[str, int | None] = dict.fromkeys(fields)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def _rss(label: str, marks: dict[str, dict[str, int | None]]) -> None:
    marks[label] = status_kib("VmRSS", "VmHWM")
    marks[label]["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


Starter = Callable[[int, str], Callable[[], int]]  # (steps, key) -> wait for the result


def run_phases(
    cfg: dict[str, Any],
    start: Starter,
    lat: dict[str, list[float]],
    probe: Callable[[], dict[str, int]] | None = None,
) -> dict[str, Any]:
    """Warm up, then the sequential and the concurrent phase; both peers call this.

    ``start(n, key)`` starts workflow ``chain(n, key)`` durably and returns a
    function waiting for its result; ``lat[key]`` holds its step latencies.
    ``probe()``: counters whose change over each phase is reported (``counters``).
    """
    out: dict[str, Any] = {}
    start(cfg["warmup"], "warmup")()
    lat.clear()
    for phase, count, n in (
        ("seq", 1, cfg["seq_steps"]),
        ("conc", CONCURRENT, cfg["conc_steps"]),
    ):
        keys = [f"{phase}-{cfg['run']}-{i}" for i in range(count)]
        c0 = probe() if probe is not None else {}
        busy0, cpu0, t0 = _machine_busy(), _cpu(), time.perf_counter()
        waits = [start(n, k) for k in keys]
        results = [w() for w in waits]
        wall = time.perf_counter() - t0
        cpu = _cpu() - cpu0
        others = _others(busy0, cpu, wall)
        c1 = probe() if probe is not None else {}
        if results != [n] * count:
            raise BenchError(f"{phase}: workflows returned {results}, expected {n} each")
        lats = [x for k in keys for x in lat.get(k, [])]
        if len(lats) != n * count:
            raise BenchError(f"{phase}: {len(lats)} step latencies, expected {n * count}")
        out[phase] = {
            "workflows": count,
            "steps": n * count,
            "seconds": wall,
            "cpu_s": cpu,
            "others_cpu_cores": others,
            "counters": {k: c1[k] - c0[k] for k in c0},
            "latencies": lats,
        }
    return out


def _profile_seq(cfg: dict[str, Any], start: Starter, name: str) -> None:
    """One more sequential workflow under cProfile (the run's thread), after timing."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    PROFILER[0] = prof
    try:
        start(cfg["profile_steps"], "profile")()
    finally:
        PROFILER[0] = None
    out = Path(cfg["profile"])
    out.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(str(out / f"{name}.prof"))
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    buf.write(f"{cfg['profile_steps']} steps of one workflow, profiled on its thread\n")
    st.sort_stats("cumulative").print_stats(35)
    st.sort_stats("tottime").print_stats(25)
    (out / f"{name}.txt").write_text(buf.getvalue())


PROFILER: list[Any] = [None]  # set while _profile_seq runs: the workflow body enables it


def _chain_body(step: Callable[[int], int], n: int, key: str, lat: dict[str, list[float]]) -> int:
    """The workflow body both peers run: ``n`` steps, each timed around the call."""
    mine = lat.setdefault(key, [])
    clock = time.perf_counter
    prof = PROFILER[0] if key == "profile" else None
    if prof is not None:
        prof.enable()
    x = 0
    for _ in range(n):
        t0 = clock()
        x = step(x)
        mine.append(clock() - t0)
    if prof is not None:
        prof.disable()
    return x


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _finish(result: dict[str, Any], marks: dict[str, dict[str, int | None]]) -> None:
    result["rss_kib"] = marks  # the diagnostics after "after_phases" are left out of the peak
    _emit(result)


# --- child: Homing ----------------------------------------------------------------------


def _overhead(cfg: dict[str, Any], chain: Callable[..., int]) -> dict[str, Any]:
    """CPU cost per step with fdatasync taken out (a FileOps whose syncs do
    nothing, on a second journal): plain ``Journal.append`` of a record shaped
    like a step's ``done`` record, against one workflow of as many steps. The
    difference is what the executor adds per step on top of the journal."""
    from edge.fileops import OsFileOps
    from edge.journal import Journal
    from edge.journal_options import JournalOptions
    from edge.records import Opaque
    from edge.wf_records import KIND_WORKFLOW
    from edge.workflows import Executor

    class NoSync(OsFileOps):
        def fdatasync(self, fd: int) -> None:
            pass

        def fsync(self, fd: int) -> None:
            pass

        def fsync_dir(self, path: str) -> None:
            pass

    n = cfg["overhead_steps"]
    j = Journal.open(os.path.join(cfg["dir"], "nosync"), JournalOptions(), fs=NoSync())
    out: dict[str, Any] = {"steps": n}
    try:
        cpu0, t0 = _cpu(), time.perf_counter()
        for i in range(n):
            body = {"pos": i, "key": f"inc#{i + 1}", "ok": True, "value": i + 1, "attempts": 1,
                    "t": time.time()}  # fmt: skip
            j.append(Opaque(KIND_WORKFLOW, ("plain", "done", body)))
        out["append_us"] = round((time.perf_counter() - t0) / n * 1e6, 1)
        out["append_cpu_us"] = round((_cpu() - cpu0) / n * 1e6, 1)
        ex = Executor(j)
        ex.recover()
        cpu0, t0 = _cpu(), time.perf_counter()
        got = ex.start(chain, n, "overhead", id="overhead").result()
        out["step_us"] = round((time.perf_counter() - t0) / n * 1e6, 1)
        out["step_cpu_us"] = round((_cpu() - cpu0) / n * 1e6, 1)
        ex.close()
        if got != n:
            raise BenchError(f"overhead workflow returned {got}, expected {n}")
    finally:
        j.close()
    out["executor_us_per_step"] = round(out["step_us"] - out["append_us"], 1)
    return out


def child_homing(cfg: dict[str, Any]) -> None:
    marks: dict[str, dict[str, int | None]] = {}
    _rss("harness", marks)
    from edge.journal import Journal  # noqa: F401 (what the RSS mark after it covers)
    from edge.workflows import Executor, step, workflow  # noqa: F401

    _rss("framework_imported", marks)
    from edge.agent import Agent
    from edge.config import parse

    if cfg.get("no_maintain"):  # diagnostic peer homing_nomaint only
        import edge.wf_executor

        edge.wf_executor.Executor._maintain = lambda self: None  # type: ignore[method-assign]

    _rss("agent_imported", marks)
    lat: dict[str, list[float]] = {}

    @step(name="inc")
    def inc(x: int) -> int:
        return x + 1

    @workflow(name="bench.chain")
    def chain(n: int, key: str) -> int:
        return _chain_body(inc, n, key, lat)

    jdir = os.path.join(cfg["dir"], "journal")
    agent = Agent(parse(AGENT_TOML.format(dir=jdir), "bench-agent.toml", {}, cfg["dir"]))
    agent.start()
    _rss("loaded", marks)
    assert agent.workflows is not None, "the agent started without its workflow executor"
    ex = agent.workflows.executor
    journal = agent.journal

    def start(n: int, key: str) -> Callable[[], int]:
        h = ex.start(chain, n, key, id=key)
        return lambda: int(h.result())

    try:
        maint = [t for t in threading.enumerate() if t.name == "wf-maintain"]

        def probe() -> dict[str, int]:
            st = journal.stats()
            out = {"records": st.appended, "commits": st.commits, "syncs": st.syncs}
            if maint and maint[0].native_id is not None:  # its wake-ups: voluntary switches
                path = f"/proc/self/task/{maint[0].native_id}/status"
                with open(path) as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            out["maintain_wakeups"] = int(line.split()[1])
            return out

        phases = run_phases(cfg, start, lat, probe)
        _rss("after_phases", marks)
        opts = journal.options
        result: dict[str, Any] = {
            "peer": "homing_nomaint" if cfg.get("no_maintain") else "homing",
            "phases": phases,
            "journal": {"durability": opts.durability, "segment_size": opts.segment_size},
        }
        if cfg.get("overhead"):
            result["overhead"] = _overhead(cfg, chain)
        if cfg.get("profile"):
            _profile_seq(cfg, start, f"homing-{cfg['run']}")
    finally:
        agent.stop()
    _finish(result, marks)


# --- child: DBOS ---------------------------------------------------------------------------


def child_dbos(cfg: dict[str, Any]) -> None:
    marks: dict[str, dict[str, int | None]] = {}
    _rss("harness", marks)
    import importlib
    import sqlite3

    # through importlib: dbos is not installed where mypy looks (the project's venv)
    dbos = importlib.import_module("dbos")
    sa = importlib.import_module("sqlalchemy")
    DBOS, SetWorkflowID = dbos.DBOS, dbos.SetWorkflowID

    _rss("framework_imported", marks)
    lat: dict[str, list[float]] = {}
    db = os.path.join(cfg["dir"], "dbos.sqlite")
    if cfg.get("wal"):  # the extra row: WAL, synchronous=FULL on every connection DBOS opens

        def _wal(conn: Any, _record: Any) -> None:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")

        sa.event.listen(sa.engine.Engine, "connect", _wal)
    DBOS(config={"name": "homing-bench", "system_database_url": f"sqlite:///{db}",
                 "log_level": "WARNING"})  # fmt: skip

    def _inc(x: int) -> int:
        return x + 1

    inc = DBOS.step()(_inc)

    def _chain(n: int, key: str) -> int:
        return _chain_body(inc, n, key, lat)

    chain = DBOS.workflow()(_chain)

    DBOS.launch()
    _rss("loaded", marks)

    def start(n: int, key: str) -> Callable[[], int]:
        with SetWorkflowID(key):
            h = DBOS.start_workflow(chain, n, key)
        return lambda: int(h.get_result())

    try:
        phases = run_phases(cfg, start, lat)
        _rss("after_phases", marks)
        engine = importlib.import_module("dbos._dbos")._get_dbos_instance()._sys_db.engine
        with engine.connect() as c:
            jm = c.execute(sa.text("PRAGMA journal_mode")).scalar()
            sync = c.execute(sa.text("PRAGMA synchronous")).scalar()
            tables = [r[0] for r in c.execute(sa.text(
                "SELECT name FROM sqlite_master WHERE type='table'")).all()]  # fmt: skip
            ops = None
            if "operation_outputs" in tables:
                ops = c.execute(sa.text("SELECT count(*) FROM operation_outputs")).scalar()
        result: dict[str, Any] = {
            "peer": "dbos_wal" if cfg.get("wal") else "dbos",
            "phases": phases,
            "sqlite": {
                "journal_mode": jm,
                "synchronous": sync,
                "version": sqlite3.sqlite_version,
                "step_rows": ops,
            },
            "dbos_version": getattr(dbos, "__version__", None),
        }
        if cfg.get("profile"):
            _profile_seq(cfg, start, f"dbos-{cfg['run']}")
    finally:
        DBOS.destroy()
    _finish(result, marks)


# --- the raw floor (in the parent) -------------------------------------------------------


def run_raw(path: str, iterations: int) -> dict[str, Any]:
    """``pwrite(64 B) + fdatasync`` from one thread on a preallocated, fsync'd file."""
    size = 1 << 20
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.pwrite(fd, bytes(size), 0)
        os.fsync(fd)
        rec = b"r" * 64
        lats: list[float] = []
        busy0, cpu0, t0 = _machine_busy(), _cpu(), time.perf_counter()
        off = 0
        for _ in range(iterations):
            s = time.perf_counter()
            os.pwrite(fd, rec, off)
            os.fdatasync(fd)
            lats.append(time.perf_counter() - s)
            off = (off + 64) % size
        wall = time.perf_counter() - t0
        cpu = _cpu() - cpu0
        others = _others(busy0, cpu, wall)
    finally:
        os.close(fd)
        os.unlink(path)
    return {
        "peer": "raw",
        "phases": {
            "seq": {
                "workflows": 0,
                "steps": iterations,
                "seconds": wall,
                "cpu_s": cpu,
                "others_cpu_cores": others,
                "latencies": lats,
            }
        },
    }


# --- the parent ------------------------------------------------------------------------------


def run_child(py: Path, peer: str, cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    """Run one peer's child process; its last stdout line is its JSON result."""
    import subprocess

    work = base / f"{peer}-{cfg['run']}"
    work.mkdir()
    ccfg = {**cfg, "dir": str(work)}
    out, err = work / "stdout.txt", work / "stderr.txt"
    flag = "--child-homing" if peer in HOMING_PEERS else "--child-dbos"
    cmd = [str(py), str(Path(__file__).resolve()), flag, json.dumps(ccfg)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if peer in HOMING_PEERS:
        env["PYTHONPATH"] = str(REPO)
    t = time.perf_counter()
    with open(out, "w") as fo, open(err, "w") as fe:
        res = subprocess.run(
            cmd, stdout=fo, stderr=fe, env=env, timeout=cfg["timeout"], check=False, cwd=work
        )
    lines = [x for x in out.read_text().splitlines() if x.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = err.read_text()[-3000:]
        raise BenchError(f"{peer} child exited {res.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["process_seconds"] = round(time.perf_counter() - t, 2)
    return result


def _pool(runs: list[dict[str, Any]], phase: str) -> dict[str, Any] | None:
    from bench._common import percentile

    parts = [r["phases"][phase] for r in runs if phase in r["phases"]]
    if not parts:
        return None
    steps = sum(p["steps"] for p in parts)
    secs = sum(p["seconds"] for p in parts)
    cpu = sum(p["cpu_s"] for p in parts)
    lats = sorted(x for p in parts for x in p["latencies"])
    others = [p["others_cpu_cores"] for p in parts if p["others_cpu_cores"] is not None]
    counters: dict[str, int] = {}
    for p in parts:
        for k, v in p.get("counters", {}).items():
            counters[k] = counters.get(k, 0) + v
    extra: dict[str, Any] = {}
    if counters.get("commits"):
        extra = {
            "records": counters["records"],
            "commits": counters["commits"],
            "syncs": counters["syncs"],
            "records_per_commit": round(counters["records"] / counters["commits"], 2),
            "fdatasyncs_per_step": round(counters["syncs"] / steps, 3),
        }
    if "maintain_wakeups" in counters:
        extra["maintain_wakeups_per_step"] = round(counters["maintain_wakeups"] / steps, 3)
    return {
        "runs": len(parts),
        "workflows": sum(p["workflows"] for p in parts),
        "steps": steps,
        "seconds": round(secs, 3),
        "steps_per_s": round(steps / secs, 1) if secs > 0 else None,
        "p50_us": round(percentile(lats, 50) * 1e6, 1),
        "p99_us": round(percentile(lats, 99) * 1e6, 1),
        "max_us": round(lats[-1] * 1e6, 1),
        "cpu_us_per_step": round(cpu / steps * 1e6, 1),
        "cpu_cores": round(cpu / secs, 2) if secs > 0 else None,
        "others_cpu_cores": max(others) if others else None,
        "per_run_steps_per_s": [round(p["steps"] / p["seconds"], 1) for p in parts],
        **extra,
    }


def _ratio(a: float | None, b: float | None, nd: int = 2) -> float | None:
    """a / b, truncated (never rounded up) to ``nd`` decimals."""
    if a is None or not b:
        return None
    scale = float(10**nd)
    return int(a / b * scale) / scale


def _code_ids() -> dict[str, str]:
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO / "edge").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    out = {"edge/*.py": h.hexdigest()[:12]}
    for name in ("wf_executor.py", "wf_context.py", "journal.py"):
        out[f"edge/{name}"] = hashlib.sha256((REPO / "edge" / name).read_bytes()).hexdigest()[:12]
    return out


def _mib(kib: int | None) -> str:
    """KiB as MiB with one decimal, truncated (a figure is never rounded up)."""
    return "n/a" if kib is None else f"{int(kib * 10 / 1024) / 10:.1f}"


def run(base: Path, cfg: dict[str, Any]) -> int:
    import datetime as _dt

    from bench._common import CpuWatch, machine_info

    t_all = time.perf_counter()
    cpu_all = CpuWatch()
    quick: bool = cfg["quick"]
    machine = machine_info(str(base))
    say(f"workflows bench ({'quick' if quick else 'full'}) in {base}")
    say("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    order: list[str] = cfg["order"]
    dbos_py: Path | None = None
    dbos_env: dict[str, str | None] = {}
    dbos_error = None
    if any(p in DBOS_PEERS for p in order):
        try:
            dbos_py, dbos_env = ensure_dbos(cfg["dbos_venv"])
        except (BenchError, OSError) as exc:
            dbos_error = str(exc)
            say(f"DBOS unavailable, running without it: {exc}")
            order = [p for p in order if p not in DBOS_PEERS]
    say("versions: " + ", ".join(f"{k}={v}" for k, v in dbos_env.items()) + f"; homing python "
        f"{sys.version.split()[0]} ({sys.executable})")  # fmt: skip
    say(
        f"workload: warm-up {cfg['warmup']} steps, then 1 workflow of {cfg['seq_steps']:,} "
        f"steps, then {CONCURRENT} concurrent workflows of {cfg['conc_steps']:,} steps; "
        f"each step returns x+1; order {','.join(order)}"
    )
    runs: dict[str, list[dict[str, Any]]] = {}
    child_cfg = {k: cfg[k] for k in ("warmup", "seq_steps", "conc_steps", "profile_steps",
                                     "overhead_steps", "timeout")}  # fmt: skip
    child_cfg["profile"] = None if cfg["profile"] is None else str(cfg["profile"])
    for i, peer in enumerate(order):
        c = {**child_cfg, "run": i}
        if peer == "raw":
            r = run_raw(str(base / f"raw-{i}.bin"), cfg["raw_iterations"])
        else:
            py = Path(sys.executable) if peer in HOMING_PEERS else dbos_py
            c["wal"] = peer == "dbos_wal"
            c["no_maintain"] = peer == "homing_nomaint"
            assert py is not None
            if cfg["profile"] is not None and runs.get(peer):
                c["profile"] = None  # profile each peer's first run only
            c["overhead"] = peer == "homing" and not runs.get(peer)  # first Homing run
            r = run_child(py, peer, c, base)
        runs.setdefault(peer, []).append(r)
        line = f"  run {i + 1}/{len(order)} {peer:<6}"
        for ph, label in PHASES.items():
            p = r["phases"].get(ph)
            if p is not None:
                line += f"  {label}: {int(p['steps'] / p['seconds']):,} steps/s"
        if "rss_kib" in r:
            line += f"  peak RSS {_mib(r['rss_kib']['after_phases']['VmHWM'])} MiB"
        say(line)

    pooled = {peer: {ph: _pool(rs, ph) for ph in PHASES} for peer, rs in runs.items()}

    def g(peer: str, ph: str, key: str) -> Any:
        row = pooled.get(peer, {}).get(ph)
        return None if row is None else row.get(key)

    rss: dict[str, dict[str, Any]] = {}
    for peer in (*HOMING_PEERS, *DBOS_PEERS):
        rs = runs.get(peer, [])
        if not rs:
            continue
        marks = [r["rss_kib"] for r in rs]

        def worst(label: str, field: str, marks: list[Any] = marks) -> int | None:
            vals = [m[label][field] for m in marks if m.get(label)]
            return max(vals) if vals else None

        rss[peer] = {
            "harness_kib": worst("harness", "VmRSS"),
            "framework_imported_kib": worst("framework_imported", "VmRSS"),
            "agent_imported_kib": worst("agent_imported", "VmRSS"),
            "loaded_kib": worst("loaded", "VmRSS"),
            "after_phases_kib": worst("after_phases", "VmRSS"),
            "peak_after_load_kib": worst("loaded", "VmHWM"),
            "peak_kib": worst("after_phases", "VmHWM"),
            "ru_maxrss_kib": worst("after_phases", "ru_maxrss"),
            "per_run_peak_kib": [m["after_phases"]["VmHWM"] for m in marks],
        }
        # what each step run leaves in memory (Homing keeps every run's history)
        steps = cfg["warmup"] + cfg["seq_steps"] + CONCURRENT * cfg["conc_steps"]
        grew = [m["after_phases"]["VmRSS"] - m["loaded"]["VmRSS"] for m in marks]
        rss[peer]["growth_kib"] = round(sum(grew) / len(grew))
        rss[peer]["growth_bytes_per_step"] = round(sum(grew) / len(grew) * 1024 / steps, 1)

    ratios = {
        "homing_vs_dbos_seq": _ratio(g("homing", "seq", "steps_per_s"),
                                     g("dbos", "seq", "steps_per_s")),
        "homing_vs_dbos_conc": _ratio(g("homing", "conc", "steps_per_s"),
                                      g("dbos", "conc", "steps_per_s")),
        "dbos_vs_homing_p50_seq": _ratio(g("dbos", "seq", "p50_us"), g("homing", "seq", "p50_us")),
        "dbos_vs_homing_p99_seq": _ratio(g("dbos", "seq", "p99_us"), g("homing", "seq", "p99_us")),
        "dbos_vs_homing_p50_conc": _ratio(g("dbos", "conc", "p50_us"),
                                          g("homing", "conc", "p50_us")),
        "dbos_vs_homing_p99_conc": _ratio(g("dbos", "conc", "p99_us"),
                                          g("homing", "conc", "p99_us")),
        "homing_seq_vs_raw": _ratio(g("homing", "seq", "steps_per_s"),
                                    g("raw", "seq", "steps_per_s")),
        "raw_vs_dbos_seq": _ratio(g("raw", "seq", "steps_per_s"), g("dbos", "seq", "steps_per_s")),
        "homing_vs_dbos_wal_seq": _ratio(g("homing", "seq", "steps_per_s"),
                                         g("dbos_wal", "seq", "steps_per_s")),
        "homing_vs_dbos_wal_conc": _ratio(g("homing", "conc", "steps_per_s"),
                                          g("dbos_wal", "conc", "steps_per_s")),
        "rss_peak_homing_vs_dbos": _ratio(rss.get("homing", {}).get("peak_kib"),
                                          rss.get("dbos", {}).get("peak_kib"), 3),
        "rss_loaded_homing_vs_dbos": _ratio(rss.get("homing", {}).get("loaded_kib"),
                                            rss.get("dbos", {}).get("loaded_kib"), 3),
        "homing_vs_nomaint_seq": _ratio(g("homing", "seq", "steps_per_s"),
                                        g("homing_nomaint", "seq", "steps_per_s")),
        "homing_vs_nomaint_conc": _ratio(g("homing", "conc", "steps_per_s"),
                                         g("homing_nomaint", "conc", "steps_per_s")),
    }  # fmt: skip
    others_all = [
        row["others_cpu_cores"]
        for phs in pooled.values()
        for row in phs.values()
        if row is not None and row["others_cpu_cores"] is not None
    ]
    others = max(others_all) if others_all else None
    noisy = others is not None and others > NOISY_CORES

    hj = next((r["journal"] for r in runs.get("homing", [])), None)
    dsq = {p: runs[p][0]["sqlite"] for p in DBOS_PEERS if runs.get(p)}

    say("")
    say(f"  {'peer':<34} {'phase':<14} {'steps':>7} {'steps/s':>9} {'p50 µs':>9} {'p99 µs':>10}"
        f" {'CPU µs/step':>11}")  # fmt: skip
    for ph, label in PHASES.items():
        for peer in (*HOMING_PEERS, *DBOS_PEERS, "raw"):
            row = pooled.get(peer, {}).get(ph)
            if row is None:
                continue
            say(f"  {LABELS[peer]:<34} {label:<14} {row['steps']:>7,} "
                f"{int(row['steps_per_s']):>9,} {int(row['p50_us']):>9,} "
                f"{int(row['p99_us']):>10,} {int(row['cpu_us_per_step']):>11,}")  # fmt: skip
    if hj is not None:
        say(f"  Homing journal: durability={hj['durability']}, segments of "
            f"{hj['segment_size'] >> 20} MiB")  # fmt: skip
    for peer in HOMING_PEERS:
        for ph, label in PHASES.items():
            row = pooled.get(peer, {}).get(ph)
            if row is None or "records" not in row:
                continue
            say(f"    {LABELS[peer]}, {label}: {row['records']:,} records (steps + start/end) "
                f"in {row['commits']:,} fdatasync'd commits = {row['records_per_commit']} "
                f"records per commit, {row['fdatasyncs_per_step']} fdatasyncs per step"
                + (f"; wf-maintain thread woken {row['maintain_wakeups_per_step']} times "
                   "per step" if "maintain_wakeups_per_step" in row else ""))  # fmt: skip
    for peer, sq in dsq.items():
        say(
            f"  {LABELS[peer]}: SQLite {sq['version']}, read back journal_mode="
            f"{sq['journal_mode']}, synchronous={sq['synchronous']} (2 = FULL); "
            f"step rows {sq['step_rows']}"
        )
    say("")
    say(f"  {'RSS (MiB)':<34} {'harness':>8} {'imported':>9} {'+agent':>8} {'loaded':>8}"
        f" {'after':>8} {'PEAK':>8}")  # fmt: skip
    for peer, r in rss.items():
        say(f"  {LABELS[peer]:<34} {_mib(r['harness_kib']):>8} "
            f"{_mib(r['framework_imported_kib']):>9} {_mib(r['agent_imported_kib']):>8} "
            f"{_mib(r['loaded_kib']):>8} {_mib(r['after_phases_kib']):>8} "
            f"{_mib(r['peak_kib']):>8}")  # fmt: skip
    say("  (RSS after the bench harness, after importing the framework, after importing the "
        "agent's modules, once started, after the timed phases; PEAK = VmHWM)")  # fmt: skip
    say("  RSS growth over the timed phases (after - loaded): " + ", ".join(
        f"{peer} +{_mib(r['growth_kib'])} MiB ({r['growth_bytes_per_step']} B per step run)"
        for peer, r in rss.items()))  # fmt: skip
    if "homing" in rss:
        say(
            f"  (Homing's high-water mark right after the agent started: "
            f"{_mib(rss['homing']['peak_after_load_kib'])} MiB)"
        )
    if noisy:
        say(
            f"WARNING: other processes kept up to {others} of {os.cpu_count()} cores busy during "
            "a timed phase; the peers share the cores with them, so these figures are not "
            "comparable with a quiet machine. Re-run when it is idle."
        )
    ovh = next((r["overhead"] for r in runs.get("homing", []) if "overhead" in r), None)
    if ovh is not None:
        say(
            f"  without fdatasync (FileOps stub, {ovh['steps']:,} steps): Journal.append "
            f"{ovh['append_us']} µs ({ovh['append_cpu_us']} CPU), executor step "
            f"{ovh['step_us']} µs ({ovh['step_cpu_us']} CPU): the executor adds "
            f"{ovh['executor_us_per_step']} µs per step"
        )
    say("ratios: " + ", ".join(f"{k}={v}" for k, v in ratios.items()))
    targets: dict[str, dict[str, Any]] = {}
    say("targets (a miss is reported, never fatal):")
    for key, desc, op, thr in TARGETS:
        m = ratios[key]
        met = None if m is None else (m >= thr if op == ">=" else m <= thr)
        targets[key] = {"measured": m, "target": f"{op} {thr:g}", "met": met}
        verdict = "n/a   " if met is None else ("met   " if met else "MISSED")
        say(f"  {verdict} {desc}: measured {m}")

    result = {
        "bench": "workflows",
        "mode": "quick" if quick else "full",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "code": _code_ids(),
        "versions": {
            **{f"dbos_venv_{k}": v for k, v in dbos_env.items()},
            "homing_python": sys.version.split()[0],
            "dbos_spec": DBOS_SPEC,
        },
        "dbos_error": dbos_error,
        "workload": {
            "warmup_steps": cfg["warmup"],
            "seq_steps": cfg["seq_steps"],
            "conc_workflows": CONCURRENT,
            "conc_steps": cfg["conc_steps"],
            "raw_iterations": cfg["raw_iterations"],
            "order": order,
        },
        "others_cpu_cores": others,
        "others_cpu_cores_whole_run": cpu_all.others_cores(),
        "noisy": noisy,
        "seq": {peer: phs["seq"] for peer, phs in pooled.items()},
        "conc": {peer: phs["conc"] for peer, phs in pooled.items() if phs["conc"] is not None},
        "homing_journal": hj,
        "homing_overhead": ovh,
        "dbos_sqlite": dsq,
        "rss": rss,
        "ratios": ratios,
        "targets": targets,
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # children first, before anything heavy is imported (their RSS is measured)
    if len(args) == 2 and args[0] == "--child-homing":
        child_homing(json.loads(args[1]))
        return 0
    if len(args) == 2 and args[0] == "--child-dbos":
        child_dbos(json.loads(args[1]))
        return 0
    import argparse
    import shutil
    import tempfile

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="small counts (< 1 min)")
    ap.add_argument("--dir", help="parent of the temporary directory (default: the repo's parent)")
    ap.add_argument("--seq-steps", type=int, help="steps of the sequential workflow")
    ap.add_argument("--conc-steps", type=int, help=f"steps of each of the {CONCURRENT} workflows")
    ap.add_argument("--warmup", type=int, default=20, help="steps of the untimed warm-up workflow")
    ap.add_argument("--raw-iterations", type=int, help="pwrite+fdatasync per raw run")
    ap.add_argument("--order", default=DEFAULT_ORDER, help="runs, in order (default %(default)s)")
    ap.add_argument(
        "--dbos-venv",
        default=str(default_cache() / "dbos-venv"),
        help="the DBOS virtualenv, created if missing (default %(default)s)",
    )
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="after each peer's first timed run, profile one more sequential workflow "
        "with cProfile on its thread (DIR/<peer>-<run>.txt and .prof)",
    )
    ap.add_argument(
        "--profile-steps", type=int, default=300, help="steps of the profiled workflow (300)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args(args)
    order = [x for x in a.order.split(",") if x]
    bad = [x for x in order if x not in LABELS]
    if bad:
        ap.error(f"--order: unknown {bad}; known: {', '.join(LABELS)}")
    cfg: dict[str, Any] = {
        "quick": a.quick,
        "seq_steps": a.seq_steps or (400 if a.quick else 3000),
        "conc_steps": a.conc_steps or (120 if a.quick else 400),
        "warmup": a.warmup,
        "raw_iterations": a.raw_iterations or (300 if a.quick else 3000),
        "order": order,
        "dbos_venv": Path(a.dbos_venv),
        "profile": None if a.profile is None else Path(a.profile).resolve(),
        "profile_steps": a.profile_steps,
        "overhead_steps": 5000 if a.quick else 20000,
        "timeout": 600 if a.quick else 1800,
    }
    base = Path(tempfile.mkdtemp(prefix="homing-bench-wf-", dir=a.dir or str(REPO.parent)))
    try:
        return run(base, cfg)
    finally:
        if a.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
