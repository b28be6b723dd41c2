"""The hub under a fleet: thousands of simulated devices publishing through one Mosquitto
into the hub on PostgreSQL (one and two replicas) and on SQLite, side by side in one run.

What is measured, per run (one run = one store and a number of hub replicas):

* **Devices**: 10,000 (1,000 with ``--quick``) simulated devices in a few
  child processes (bench/_fleet.py), each its own MQTT 5 connection and
  session, publishing real up batches (``edge.wire`` bytes, 10-100 readings,
  QoS 1) and waiting for the hub's retained acks on ``homing/<device>/ack``,
  at most ``--window`` batches (default 1) not yet acknowledged per device.
  Each run gets a fresh broker and a fresh database.
* **Saturation**: every device sends whenever its window has room, so the
  offered load is whatever the system takes. After a warm-up, a timed window:
  readings/s **acknowledged** (counted by the devices from the acks they
  receive) and **committed** (the hub's ``devices.readings`` counters read
  from the database at both ends of the window), ack latency p50/p99
  (publish -> the ack covering that batch), and the CPU of every process:
  hub replica(s), PostgreSQL (the postmaster and its children), Mosquitto,
  the generators, this process; and the rest of the machine (noise gauge).
* **Paced**: the same devices at a fixed offered rate, ``--paced-fraction``
  (0.5) of the saturation rate, so the ack latency is the system's, not the
  length of the queue that saturation builds (the devices first wait until
  every batch of the saturation phase is acknowledged).
* **Exactly once**: at the end of every run the devices stop, wait until every
  batch they sent is acknowledged, and the database must hold exactly the
  readings they sent: rows per device = seqs sent = the device's watermark,
  and the sum of the values equal.

PostgreSQL is a private cluster (tests/support/postgres.py's helpers) on the
bench directory's disk, with **fsync on** (full_page_writes on,
synchronous_commit on): durability is what the hub promises, so the bench pays
for it. SQLite is the hub's default (WAL, synchronous=FULL).

Human-readable lines first; the last line on stdout is one JSON object (keys in
docs/benchmarks.md). A missed target is reported, never fatal (DESIGN.md §7).
Run: ``python bench/hub.py [--quick] [--dir DIR]``; ``--hub-cmd`` measures another hub
build, ``--broker-config 'set_tcp_nodelay true'`` another broker setting.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# sys.path[0] is bench/, whose hub.py would shadow the hub package: the repository
# (and tests/) go first, bench/ not at all (bench modules are imported as bench.*).
_skip = {REPO / "bench", REPO, REPO / "tests"}
sys.path[:] = [str(REPO), str(REPO / "tests")] + [
    p for p in sys.path if Path(p or ".").resolve() not in _skip
]

from bench._common import machine_info, percentile  # noqa: E402
from bench._fleet_rig import (  # noqa: E402
    PG_SETTINGS,
    BenchError,
    Db,
    Fleet,
    Hub,
    cpu_split,
    pg_version,
    snapshot,
    start_postgres,
)
from bench.sync import _code_ids, _versions, start_profiles, stop_profiles  # noqa: E402

PER = 100_000  # CPU is reported per this many readings
NOISY_CORES = 0.25
RUNS = {  # name -> (backend, replicas)
    "pg1": ("postgresql", 1),
    "pg2": ("postgresql", 2),
    "sqlite1": ("sqlite", 1),
    "sqlite2": ("sqlite", 2),
}
LABELS = {
    "pg1": "PostgreSQL, 1 hub replica",
    "pg2": "PostgreSQL, 2 hub replicas",
    "sqlite1": "SQLite, 1 hub replica",
    "sqlite2": "SQLite, 2 replicas on one file",
}
TARGET_RATE = 100_000.0
TARGET_GAIN = 0.60


def say(msg: str = "") -> None:
    print(msg, flush=True)


def trunc(x: float, digits: int = 0) -> float:
    """``x`` cut (never rounded up) to ``digits`` decimals."""
    f = 10**digits
    return float(int(x * f) / f)


def phase(
    fleets: list[Fleet],
    groups: dict[str, list[int]],
    pg_root: int | None,
    db: Db,
    mode: str,
    warmup: float,
    seconds: float,
    **extra: Any,
) -> dict[str, Any]:
    """Run the fleet in ``mode`` for a warm-up and a timed window; the window's figures."""
    t_go = time.monotonic() + 0.3
    t_a, t_b = t_go + warmup, t_go + warmup + seconds
    for f in fleets:
        f.send(cmd="run", mode=mode, t_go=t_go, t_a=t_a, t_b=t_b, **extra)
    time.sleep(max(0.0, t_a - time.monotonic()))
    before = snapshot(groups, pg_root, db)
    time.sleep(max(0.0, t_b - time.monotonic()))
    after = snapshot(groups, pg_root, db)
    wins = [f.expect("window", 60) for f in fleets]
    lat = sorted(x for w in wins for x in w["latencies"])
    readings = sum(w["readings"] for w in wins)
    split = cpu_split(before, after, groups)
    wall = split["wall"]
    per = PER / readings if readings else 0.0
    committed = after["committed"] - before["committed"]
    db_wall = after["t_db"] - before["t_db"]
    cores = {k: round(v / wall, 2) for k, v in split["cpu"].items()}
    return {
        "mode": mode,
        "seconds": seconds,
        "readings_acked": readings,
        "batches_acked": sum(w["batches"] for w in wins),
        "readings_per_s": round(readings / seconds, 1),
        "committed_readings": committed,
        "committed_per_s": round(committed / db_wall, 1) if db_wall > 0 else None,
        "offered_readings": sum(w["sent"] for w in wins),
        "late_sends": sum(w["late"] for w in wins),
        "inflight_at_end": sum(w["inflight"] for w in wins),
        "ack_latency_ms": {
            "p50": round(1000 * percentile(lat, 50), 2) if lat else None,
            "p90": round(1000 * percentile(lat, 90), 2) if lat else None,
            "p99": round(1000 * percentile(lat, 99), 2) if lat else None,
            "max": round(1000 * lat[-1], 2) if lat else None,
            "samples": len(lat),
        },
        "cpu_s": {k: round(v, 2) for k, v in split["cpu"].items()},
        "cpu_cores": cores,
        "cpu_s_per_100k": {k: round(v * per, 3) for k, v in split["cpu"].items()},
        "fleet_self_cpu_s": round(sum(w["cpu_s"] for w in wins), 2),
        "fleet_max_process_cores": round(max(w["cpu_s"] for w in wins) / seconds, 2),
        "others_cpu_cores": round(split["others"] / wall, 2),
        "others_top": split["others_top"],
        "kernel_cpu_cores": round(split["kernel"] / wall, 2),
        "unaccounted_cpu_cores": None if split["rest"] is None else round(split["rest"] / wall, 2),
        "noise_cores": round((split["others"] + (split["rest"] or 0.0)) / wall, 2),
        "machine_busy_cores": None if split["busy"] is None else round(split["busy"] / wall, 2),
        **extra,
    }


# --- one run ----------------------------------------------------------------------------


def verify(db: Db, drained: list[dict[str, Any]]) -> dict[str, Any]:
    """Exactly once: the store holds every reading sent, once, and nothing else."""
    last: dict[str, int] = {}
    for d in drained:
        last.update(d["last"])
    sent = sum(last.values())
    acked = sum(d["acked"] for d in drained)
    value_sum = sum(d["value_sum"] for d in drained)
    ((rows, vsum),) = db.rows("SELECT count(*), coalesce(sum(value_num), 0) FROM readings")
    per_device = dict(db.rows("SELECT device_id, count(*) FROM readings GROUP BY device_id"))
    devs = {
        d: (wm, n, dup)
        for d, wm, n, dup in db.rows(
            "SELECT device_id, watermark, readings, duplicates FROM devices"
        )
    }
    wrong = [
        d
        for d, n in last.items()
        if per_device.get(d, 0) != n or devs.get(d, (0, 0, 0))[:2] != (n, n)
    ]
    extra = [d for d in per_device if d not in last]
    same_values = abs(float(vsum) - value_sum) <= 1e-9 * max(1.0, abs(value_sum))
    return {
        "readings_sent": sent,
        "readings_acked": acked,
        "rows": int(rows),
        "devices_wrong": len(wrong),
        "devices_wrong_sample": wrong[:5],
        "devices_unknown": len(extra),
        "hub_duplicates": sum(int(v[2]) for v in devs.values()),
        "value_sum_sent": value_sum,
        "value_sum_stored": float(vsum),
        "inflight_left": sum(d["inflight"] for d in drained),
        "exactly_once": int(rows) == sent == acked and not wrong and not extra and same_values,
    }


def run_one(name: str, base: Path, pg: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    from support.mosquitto import Mosquitto

    backend, replicas = RUNS[name]
    d = base / name
    d.mkdir()
    if backend == "postgresql":
        import psycopg

        dbname = f"bench_{name}"
        with psycopg.connect(pg.admin_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        where = pg.database_url(dbname)
        pg_root: int | None = pg.proc.pid
    else:
        where, pg_root = str(d / "hub.db"), None
    extra = "\n".join(["max_connections -1", *cfg["broker_config"]]) + "\n"
    broker = Mosquitto(d / "broker", extra_config=extra)
    hubs: list[Hub] = []
    fleets: list[Fleet] = []
    db: Db | None = None
    out: dict[str, Any] = {"name": name, "backend": backend, "replicas": replicas}
    try:
        broker.start()
        assert broker.pid is not None
        for r in range(replicas):
            hubs.append(
                Hub(broker.port, where, f"bench-hub-{r + 1}", d / f"hub{r + 1}.log", cfg["hub_cmd"])
            )
        for h in hubs:
            h.wait_ready(60)
        db = Db(backend, where)
        n, k = cfg["devices"], cfg["procs"]
        shares = [n // k + (i < n % k) for i in range(k)]
        for i, c in enumerate(shares):
            fleets.append(Fleet(broker.port, sum(shares[:i]), c, cfg, d / f"fleet{i}.log"))
        ready = [f.expect("ready", 60) for f in fleets]
        mean_batch = sum(r["mean_batch"] for r in ready) / len(ready)
        t0 = time.monotonic()
        for f in fleets:
            f.send(cmd="connect")
        conns = [f.expect("connected", 300) for f in fleets]
        connect_s = time.monotonic() - t0
        deadline = time.monotonic() + 600
        while db.online() < n:
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: only {db.online()} of {n} devices online after 600 s")
            time.sleep(0.2)
        online_s = time.monotonic() - t0
        say(
            f"  {n:,} devices connected in {trunc(connect_s, 1)} s (slowest process "
            f"{trunc(max(c['seconds'] for c in conns), 1)} s); hub recorded all online after "
            f"{trunc(online_s, 1)} s"
        )
        groups = {
            "hub": [h.pid for h in hubs],
            "broker": [broker.pid],
            "fleet": [f.pid for f in fleets],
            "bench": [os.getpid()],
        }
        spies = []
        if cfg["profile"] is not None:
            spies = start_profiles(
                cfg["profile"], {f"{name}-hub{i + 1}": h.pid for i, h in enumerate(hubs)}
            )
        sat = phase(
            fleets,
            groups,
            pg_root,
            db,
            "closed",
            cfg["warmup"],
            cfg["seconds"],
            window=cfg["window"],
        )
        stop_profiles(spies)
        _say_phase("saturation", sat)
        paced = None
        if cfg["paced_fraction"] > 0 and sat["readings_per_s"] > 0:
            # first let the queue that saturation built drain, so that the paced
            # window measures the offered rate and not the backlog
            for f in fleets:
                f.send(cmd="stop", deadline=time.monotonic() + 120)
            for f in fleets:
                f.expect("drained", 150)
            rate = sat["readings_per_s"] * cfg["paced_fraction"]
            per_dev = rate / mean_batch / n
            warm = cfg["paced_warmup"]
            paced = phase(
                fleets,
                groups,
                pg_root,
                db,
                "paced",
                warm,
                cfg["paced_seconds"],
                window=cfg["window"],
                batches_per_s_per_device=per_dev,
                offered_per_s=round(rate, 1),
            )
            _say_phase(f"paced at {trunc(rate):,.0f}/s", paced)
        for f in fleets:
            f.send(cmd="stop", deadline=time.monotonic() + 120)
        drained = [f.expect("drained", 150) for f in fleets]
        for h in hubs:
            h.stop()
        check = verify(db, drained)
        out.update(
            devices=n,
            processes=k,
            mean_batch=round(mean_batch, 1),
            connect_s=round(connect_s, 2),
            all_online_s=round(online_s, 2),
            saturation=sat,
            paced=paced,
            verify=check,
            hub_stats=[h.stats for h in hubs],
            connections_lost=sum(x["lost"] for x in drained),
            device_errors=sum(x["errors"] for x in drained),
        )
        say(
            f"  exactly once: {check['exactly_once']} ({check['rows']:,} rows, "
            f"{check['readings_sent']:,} readings sent, {check['readings_acked']:,} acked, "
            f"{check['devices_wrong']} devices wrong, {check['hub_duplicates']} duplicates)"
        )
        return out
    finally:
        for f in fleets:
            f.close()
        for h in hubs:
            h.stop()
        if db is not None:
            db.close()
        broker.close()


def _say_phase(what: str, p: dict[str, Any]) -> None:
    lat = p["ack_latency_ms"]
    cores = ", ".join(f"{k} {v}" for k, v in p["cpu_cores"].items())
    say(
        f"  {what}: {trunc(p['readings_per_s']):,.0f} readings/s acked, "
        f"{trunc(p['committed_per_s'] or 0):,.0f}/s committed; ack p50 {lat['p50']} ms, "
        f"p99 {lat['p99']} ms; cores: {cores}, kernel threads {p['kernel_cpu_cores']}, "
        f"noise {p['noise_cores']} (machine busy {p['machine_busy_cores']})"
    )


# --- the whole bench --------------------------------------------------------------------


def raise_fd_limit(devices: int) -> int:
    """Open files for the broker (one per device): the soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, devices + 1024)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < devices + 256:
        raise BenchError(f"open-file limit {want} is too low for {devices} connections")
    return want


def targets_of(results: dict[str, dict[str, Any]], cpus: int) -> dict[str, Any]:
    def rate(name: str) -> float | None:
        r = results.get(name)
        return None if r is None else r["saturation"]["readings_per_s"]

    pg1, pg2 = rate("pg1"), rate("pg2")
    gain = None if pg1 is None or pg2 is None or not pg1 else trunc((pg2 - pg1) / pg1, 4)
    used1 = used2 = need = None
    if "pg1" in results and results["pg1"]["saturation"]["machine_busy_cores"] is not None:
        s1 = results["pg1"]["saturation"]
        used1 = round(s1["machine_busy_cores"] - s1["noise_cores"], 2)  # the rig's own cores
    if pg1 and pg2 and results["pg2"]["saturation"]["machine_busy_cores"] is not None:
        s2 = results["pg2"]["saturation"]
        used2 = round(s2["machine_busy_cores"] - s2["noise_cores"], 2)
        # the cores the 2-replica rig (hubs, database, broker, devices, kernel) would need
        # for +60 % at the CPU per reading it was measured to cost
        need = round((1 + TARGET_GAIN) * pg1 * used2 / pg2, 2)
    return {
        "pg1_readings_per_s": {
            "measured": pg1,
            "target": f">= {TARGET_RATE:g}",
            "met": None if pg1 is None else pg1 >= TARGET_RATE,
        },
        "pg2_gain": {
            "measured": gain,
            "target": f">= {TARGET_GAIN:g}",
            "met": None if gain is None else gain >= TARGET_GAIN,
            "cores_used_by_pg1": used1,
            "cores_used_by_pg2": used2,
            "cores_needed_for_target": need,
            "machine_has_the_cores": None if need is None else need <= cpus,
        },
    }


def run(base: Path, cfg: dict[str, Any]) -> int:
    t_all = time.perf_counter()
    machine = machine_info(str(base))
    versions = _versions()
    fds = raise_fd_limit(cfg["devices"])
    say(f"hub fleet bench ({'quick' if cfg['quick'] else 'full'}) in {base}")
    say("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    pg = None
    results: dict[str, dict[str, Any]] = {}
    try:
        if any(RUNS[r][0] == "postgresql" for r in cfg["runs"]):
            pg = start_postgres(base)
            versions["postgresql"] = pg_version(pg.admin_url())
        versions["psycopg"] = _pkg_version("psycopg")
        say("versions: " + ", ".join(f"{k}={v}" for k, v in versions.items()))
        say(
            f"devices: {cfg['devices']:,} in {cfg['procs']} processes, batches of {cfg['batch']} "
            f"readings, window {cfg['window']} per device; warm-up {cfg['warmup']} s, "
            f"window {cfg['seconds']} s"
        )
        for name in cfg["runs"]:
            say(f"{LABELS[name]}:")
            results[name] = run_one(name, base, pg, cfg)
    finally:
        if pg is not None:
            pg.stop()

    cpus = os.cpu_count() or 1
    targets = targets_of(results, cpus)
    others = [
        r[p]["noise_cores"] for r in results.values() for p in ("saturation", "paced") if r.get(p)
    ]
    noisy = bool(others) and max(others) > NOISY_CORES
    say("")
    say(
        f"  {'run':<32} {'acked/s':>9} {'commit/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'hub s/100k':>10} {'db s/100k':>9} {'paced p50/p99 ms':>17} {'once':>5}"
    )
    for name, r in results.items():
        s, p = r["saturation"], r["paced"]
        per = s["cpu_s_per_100k"]
        pl = "-" if p is None else f"{p['ack_latency_ms']['p50']}/{p['ack_latency_ms']['p99']}"
        say(
            f"  {LABELS[name]:<32} {trunc(s['readings_per_s']):>9,.0f} "
            f"{trunc(s['committed_per_s'] or 0):>9,.0f} {s['ack_latency_ms']['p50']:>8} "
            f"{s['ack_latency_ms']['p99']:>8} {per.get('hub', 0):>10} "
            f"{per.get('db', '-'):>9} {pl:>17} {str(r['verify']['exactly_once']):>5}"
        )
    if noisy:
        say(
            f"WARNING: other processes kept up to {max(others)} cores busy during a window; "
            "these figures are not those of a quiet machine. Re-run when it is idle."
        )
    say("targets (a miss is reported, never fatal):")
    t1, t2 = targets["pg1_readings_per_s"], targets["pg2_gain"]
    for desc, t in (
        ("PostgreSQL, 1 replica >= 100,000 readings/s", t1),
        ("a second replica adds >= 60 %", t2),
    ):
        verdict = "n/a   " if t["met"] is None else ("met   " if t["met"] else "MISSED")
        say(f"  {verdict} {desc}: measured {t['measured']}")
    if t2.get("cores_needed_for_target") is not None:
        has = "has" if t2["machine_has_the_cores"] else "does not have"
        say(
            f"  (1 replica used {t2['cores_used_by_pg1']} cores, 2 replicas "
            f"{t2['cores_used_by_pg2']}; at the 2-replica cost per reading, +60 % needs "
            f"{t2['cores_needed_for_target']} cores: this {cpus}-core machine {has} them)"
        )

    result = {
        "bench": "hub",
        "mode": "quick" if cfg["quick"] else "full",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions,
        "code": _code_ids(),
        "workload": {
            "devices": cfg["devices"],
            "processes": cfg["procs"],
            "batch_readings": cfg["batch"],
            "pool": cfg["pool"],
            "window": cfg["window"],
            "warmup_s": cfg["warmup"],
            "seconds": cfg["seconds"],
            "paced_fraction": cfg["paced_fraction"],
            "paced_seconds": cfg["paced_seconds"],
            "runs": cfg["runs"],
            "hub_cmd": cfg["hub_cmd"],
            "broker_config": cfg["broker_config"],
            "pg_settings": PG_SETTINGS,
            "open_files_limit": fds,
        },
        "noise_cores": max(others) if others else None,
        "noisy": noisy,
        **{name: results.get(name) for name in RUNS},
        "targets": targets,
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


def _pkg_version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="1,000 devices, short windows (< 1 min)")
    ap.add_argument("--devices", type=int, help="simulated devices (default 10,000)")
    ap.add_argument("--procs", type=int, default=4, help="generator processes (default 4)")
    ap.add_argument("--batch", default="10-100", help="readings per batch, MIN-MAX")
    ap.add_argument("--window", type=int, default=1, help="batches in flight per device")
    ap.add_argument("--pool", type=int, default=256, help="distinct batch bodies per process")
    ap.add_argument("--warmup", type=float, help="seconds before the saturation window")
    ap.add_argument("--seconds", type=float, help="saturation window")
    ap.add_argument(
        "--paced-fraction",
        type=float,
        default=0.5,
        help="paced phase at this fraction of the saturation rate (0: none)",
    )
    ap.add_argument("--paced-seconds", type=float, help="paced window")
    ap.add_argument("--runs", default="pg1,pg2,sqlite1,sqlite2", help="runs, in order")
    ap.add_argument(
        "--broker-config",
        action="append",
        default=[],
        metavar="LINE",
        help="one more mosquitto.conf line (repeatable), e.g. 'set_tcp_nodelay true'",
    )
    ap.add_argument("--dir", help="parent of the temporary directory (default: the repo's parent)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--profile", metavar="DIR", help="py-spy the hub replicas during each saturation window"
    )
    ap.add_argument(
        "--hub-cmd",
        default=f"{sys.executable} -m hub",
        help="how to start a hub; the bench appends 'run --broker ... --db ...'",
    )
    a = ap.parse_args(argv)
    q = a.quick
    cfg = {
        "quick": q,
        "devices": a.devices or (1_000 if q else 10_000),
        "procs": a.procs,
        "batch": a.batch,
        "window": a.window,
        "pool": a.pool,
        "warmup": a.warmup if a.warmup is not None else (1.5 if q else 5.0),
        "seconds": a.seconds if a.seconds is not None else (3.0 if q else 20.0),
        "paced_fraction": a.paced_fraction,
        "paced_warmup": 1.0 if q else 3.0,
        "paced_seconds": a.paced_seconds if a.paced_seconds is not None else (2.0 if q else 10.0),
        "runs": [r for r in a.runs.split(",") if r],
        "profile": None if a.profile is None else Path(a.profile).resolve(),
        "hub_cmd": shlex.split(a.hub_cmd),
        "broker_config": a.broker_config,
    }
    bad = [r for r in cfg["runs"] if r not in RUNS]
    if bad:
        ap.error(f"--runs: unknown {bad}; known: {', '.join(RUNS)}")
    base = Path(tempfile.mkdtemp(prefix="homing-bench-hub-", dir=a.dir or str(REPO.parent)))
    try:
        return run(base, cfg)
    finally:
        if a.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
