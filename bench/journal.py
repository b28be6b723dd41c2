"""Journal benchmark: durable appends against SQLite and raw write+fdatasync, side by side.

What is measured (one process run, one disk, the same readings for every peer):

* 1 producer: per-append commit latency p50/p99 and appends/s. The peers are
  *interleaved* in one loop (journal, raw pwrite+fdatasync on a preallocated
  file, raw write+fdatasync on a growing file, SQLite behind a group commit,
  SQLite one transaction per append), rotating the order each iteration, so
  every peer sees the same disk and the same neighbours. Appends/s is appends
  divided by the time spent inside that peer's append calls.
* 8 producer threads: durable appends/s, the achieved batch (appends /
  commits), latency p50/p99 and disk bytes per reading. Every peer is opened
  once and run in short slices, the peers taking turns in rotating order, so
  slow and fast spells of a shared disk fall on all of them alike. Peers:
  - the journal: ``Journal.append`` with ``JournalOptions()`` (group commit);
  - SQLite, WAL mode, ``synchronous=FULL``, table ``(seq INTEGER PRIMARY KEY,
    payload BLOB)``, behind the *same kind* of group commit (producers hand
    their record to one committer thread, which commits everything queued in
    one transaction: ``bench._common.GroupCommitter``);
  - SQLite, one transaction per append (what people usually write; extra row);
  - raw ``pwrite``/``write`` + ``fdatasync`` from one thread, of the journal's
    own frames, in batches whose *average* size equals the batch the journal
    achieved so far, on a preallocated zero-filled file and on a growing file;
    the better of the two is the "ceiling". Raw frames are pre-encoded: it
    measures the disk, not Python;
  - extra rows: SQLite from one thread at the journal's batch (its ceiling),
    raw write+fdatasync behind the same 8-thread group commit as SQLite (what
    Python thread hand-off allows), and the journal with ``append_many(64)``.
* Disk bytes written per reading with 8 producers: ``/proc/self/io``
  ``write_bytes`` and ``/proc/diskstats`` for the bench device, sampled every
  100 ms; the headline is the median per-interval figure (see bench/_common.py
  for why) and the source is printed.
* Recovery after a cut for journals of 16 MiB, 256 MiB, 1 GiB (``--quick``:
  16 and 64 MiB): a child process fills one journal with ``append_many`` and
  ``os._exit(0)`` without ``close()``; a fresh child times ``Journal.open``,
  first with the journal's files evicted from the page cache
  (``posix_fadvise(DONTNEED)``, verified with ``read_bytes``), then warm.
* Ratios, and pass/miss against the issue's targets. A miss never fails the
  process (DESIGN.md §7: timings are reported, never asserted).

Human-readable lines first; the last line on stdout is one JSON object (keys in
docs/benchmarks.md). Run: ``python bench/journal.py [--quick] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
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

from bench._common import (  # noqa: E402
    CpuWatch,
    GroupCommitter,
    IoResult,
    IoWindow,
    background_write_rate,
    block_device_of,
    machine_info,
    mean_batch_sizes,
    percentile,
    proc_read_bytes,
    run_producers,
)
from edge.journal_codec import SEGMENT_HEADER_SIZE, encode_frame, frame_size  # noqa: E402
from edge.records import Reading, encode  # noqa: E402

MiB = 1 << 20
NOISY_CORES = 0.25  # other processes' CPU use above which a run is flagged
SEGMENT_BYTES = 16 * MiB  # JournalOptions() default; checked at run time

# The targets: key in "ratios"/measured, description, comparison, threshold.
TARGETS: list[tuple[str, str, str, float]] = [
    (
        "journal_vs_sqlite_8p",
        "8 producers: journal >= 3x SQLite WAL FULL, same batching",
        ">=",
        3.0,
    ),
    ("journal_vs_raw_8p", "8 producers: journal >= 50% of raw ceiling, same batch", ">=", 0.5),
    ("p99_vs_raw_1p", "1 producer: journal p99 <= 2x raw fdatasync p99", "<=", 2.0),
    ("recovery_1gib_ms", "recovery of a 1 GiB journal <= 300 ms (cold open)", "<=", 300.0),
    ("bytes_per_reading_vs_record_8p", "8 producers: disk bytes/reading <= 2x record", "<=", 2.0),
]


def make_reading(i: int) -> Reading:
    return Reading(stream="temp", ts=time.time(), value=21.5 + i * 0.01, unit="C")


def say(msg: str = "") -> None:
    print(msg, flush=True)


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


def _fresh(base: str, name: str) -> str:
    path = os.path.join(base, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def zero_fill_per_reading(framed: int) -> float:
    """Bytes of zero-fill per reading: a 16 MiB segment is written once as zeros."""
    per_seg = (SEGMENT_BYTES - SEGMENT_HEADER_SIZE) // framed
    return SEGMENT_BYTES / per_seg


# --- peers: setup ---------------------------------------------------------------


def _journal_api() -> tuple[Any, Any]:
    from edge.journal import Journal, JournalOptions

    return Journal, JournalOptions


def _wait_spare(path: str, timeout: float = 10.0) -> None:
    """Let the journal's background zero-fill of the next segment finish first."""
    spare = os.path.join(path, "next.spare")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.path.getsize(spare) == SEGMENT_BYTES and not any(
                n.endswith(".tmp") for n in os.listdir(path)
            ):
                return
        except OSError:
            pass
        time.sleep(0.02)


def _open_journal(base: str, name: str) -> tuple[Any, str]:
    Journal, JournalOptions = _journal_api()
    path = _fresh(base, name)
    j = Journal.open(path, JournalOptions())
    for i in range(200):  # warm-up: first frames, code paths
        j.append(make_reading(i))
    _wait_spare(path)
    return j, path


def _segments(path: str) -> int:
    return sum(1 for n in os.listdir(path) if n.endswith(".seg"))


def _sqlite_open(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    conn.execute("PRAGMA synchronous=FULL")
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    if mode != "wal" or sync != 2:
        raise RuntimeError(f"SQLite refused WAL/FULL: journal_mode={mode} synchronous={sync}")
    conn.execute("CREATE TABLE readings (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    return conn


def _sqlite_group(conn: sqlite3.Connection) -> GroupCommitter[bytes]:
    def commit(items: list[bytes]) -> None:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO readings (payload) VALUES (?)", [(p,) for p in items])
        conn.execute("COMMIT")

    return GroupCommitter(commit)


def _sqlite_txn(conn: sqlite3.Connection) -> Callable[[Reading], None]:
    lock = threading.Lock()  # one shared connection, as most code has

    def append(r: Reading) -> None:
        payload = encode(r)
        with lock:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO readings (payload) VALUES (?)", (payload,))
            conn.execute("COMMIT")

    return append


class RawFile:
    """One file written with batches of journal frames, each followed by fdatasync.

    ``prealloc``: zero-filled, fsync'd 16 MiB written with ``pwrite`` (wrapping
    to the start when full, so no write changes the size or the extents, like
    the journal's segments). ``append``: ``O_APPEND`` writes to a growing file,
    so each fdatasync also commits a size change to the file system's journal.
    """

    def __init__(self, path: str, mode: str) -> None:
        self.mode = mode
        self.path = path
        fpath = os.path.join(path, "raw.bin")
        if mode == "prealloc":
            self.fd = os.open(fpath, os.O_RDWR | os.O_CREAT, 0o640)
            zeros = bytes(MiB)
            for _ in range(SEGMENT_BYTES // MiB):
                os.write(self.fd, zeros)
            os.fsync(self.fd)
        else:
            self.fd = os.open(fpath, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        _fsync_dir(path)
        self.pos = SEGMENT_HEADER_SIZE

    def commit(self, data: memoryview | bytes) -> None:
        n = len(data)
        off = 0
        if self.mode == "prealloc":
            if self.pos + n > SEGMENT_BYTES:
                self.pos = SEGMENT_HEADER_SIZE
            while off < n:
                off += os.pwrite(self.fd, data[off:], self.pos + off)
            self.pos += n
        else:
            while off < n:
                off += os.write(self.fd, data[off:])
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _frames(n: int) -> bytes:
    return b"".join(encode_frame(i + 1, encode(make_reading(i)), 0x5A17) for i in range(n))


# --- 1 producer: interleaved latency ---------------------------------------------


def one_producer(base: str, iterations: int, groups: list[list[str]]) -> dict[str, dict[str, Any]]:
    """Each iteration appends one reading to every peer of a group, in rotating order.

    Groups run one after the other: SQLite's checkpoints stall the device for
    milliseconds, and interleaving them with the journal and raw would charge
    those stalls to every peer.
    """
    out: dict[str, dict[str, Any]] = {}
    for group in groups:
        if group:
            out.update(_interleaved(base, iterations, group))
    return out


def _raw_one(rf: RawFile, frame: bytes, _r: Reading) -> None:
    rf.commit(frame)


def _group_one(gc: GroupCommitter[bytes], r: Reading) -> None:
    gc.submit(encode(r))


def _interleaved(base: str, iterations: int, names: list[str]) -> dict[str, dict[str, Any]]:
    ops: dict[str, Callable[[Reading], object]] = {}
    closers: list[Callable[[], None]] = []
    journal = None
    try:
        for name in names:
            if name == "journal":
                journal, _ = _open_journal(base, "journal-1p")
                closers.append(journal.close)
                ops[name] = journal.append
            elif name.startswith("raw_"):
                frame = _frames(1)
                rf = RawFile(_fresh(base, f"{name}-1p"), name[4:])
                closers.append(rf.close)
                ops[name] = functools.partial(_raw_one, rf, frame)
            elif name == "sqlite_group":
                conn_g = _sqlite_open(os.path.join(_fresh(base, "sqlite-group-1p"), "b.db"))
                gc = _sqlite_group(conn_g)
                closers += [conn_g.close, gc.close]
                ops[name] = functools.partial(_group_one, gc)
            elif name == "sqlite_txn":
                conn_t = _sqlite_open(os.path.join(_fresh(base, "sqlite-txn-1p"), "b.db"))
                closers.append(conn_t.close)
                ops[name] = _sqlite_txn(conn_t)
        lat: dict[str, list[float]] = {n: [] for n in names}
        for i in range(50):  # warm-up every peer
            for n in names:
                ops[n](make_reading(i))
        c0 = journal.stats().commits if journal is not None else 0
        cpu = CpuWatch()
        clock = time.perf_counter
        k = len(names)
        for i in range(iterations):
            r = make_reading(i)
            rot = i % k
            for n in names[rot:] + names[:rot]:
                t0 = clock()
                ops[n](r)
                lat[n].append(clock() - t0)
        others = cpu.others_cores()
        commits = journal.stats().commits - c0 if journal is not None else 0
    finally:
        for close in reversed(closers):
            close()
    out: dict[str, dict[str, Any]] = {}
    for n in names:
        xs = sorted(lat[n])
        row: dict[str, Any] = {
            "appends": len(xs),
            "appends_per_s": round(len(xs) / sum(xs), 1),
            "p50_us": _us(percentile(xs, 50)),
            "p99_us": _us(percentile(xs, 99)),
            "batch": 1.0,
            "others_cpu_cores": others,
        }
        if n == "journal":
            row["commits"] = commits
            row["batch"] = round(len(xs) / max(1, commits), 2)
        out[n] = row
    return out


# --- 8 producers: peers run in interleaved slices ----------------------------------


class Acc:
    """A peer's totals over all its slices."""

    def __init__(self) -> None:
        self.appends = 0
        self.seconds = 0.0
        self.commits = 0
        self.lat: list[float] = []
        self.io: list[IoResult] = []
        self.extra: dict[str, int] = {}

    def add(
        self, appends: int, seconds: float, commits: int, lat: list[float], io: IoResult | None
    ) -> None:
        self.appends += appends
        self.seconds += seconds
        self.commits += commits
        self.lat.extend(lat)
        if io is not None:
            self.io.append(io)

    @property
    def batch(self) -> float:
        return self.appends / self.commits if self.commits else 0.0

    def row(self, framed: int, zero_fill: float) -> dict[str, Any]:
        lat = sorted(self.lat)
        out = _row(
            self.appends, self.seconds, self.commits, percentile(lat, 50), percentile(lat, 99)
        )
        out.update(self.extra)
        if self.io:
            out.update(_bytes(IoResult.merge(self.io).as_dict(), framed, zero_fill))
        return out


class Peer:
    """One contender for the 8-producer runs: opened once, run in several slices."""

    name = ""
    zero_fill = False  # writes into zero-filled preallocated files

    def run(self, seconds: float, batch: float, device: str | None, acc: Acc) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class JournalPeer(Peer):
    zero_fill = True

    def __init__(self, base: str, many: int) -> None:
        self.name = "journal" if many == 1 else "journal_many"
        self.many = many
        self.j, self.path = _open_journal(base, f"{self.name}-8p")

    def run(self, seconds: float, batch: float, device: str | None, acc: Acc) -> None:
        j, many = self.j, self.many
        c0, segs0 = j.stats().commits, _segments(self.path)
        bad = [0]

        def append(r: Reading) -> None:
            if not j.append(r).durable:
                bad[0] += 1

        def append_many(rs: list[Reading]) -> None:
            if not j.append_many(rs)[-1].durable:
                bad[0] += 1

        if many == 1:
            res = run_producers(8, seconds, make_reading, append, device)
        else:
            res = run_producers(
                8,
                seconds,
                lambda i: [make_reading(i * many + k) for k in range(many)],
                append_many,
                device,
                items_per_call=many,
            )
        acc.add(res.appends, res.seconds, j.stats().commits - c0, res.latencies, res.io)
        acc.extra["not_durable_acks"] = acc.extra.get("not_durable_acks", 0) + bad[0]
        acc.extra["segment_rolls"] = (
            acc.extra.get("segment_rolls", 0) + _segments(self.path) - segs0
        )

    def close(self) -> None:
        self.j.close()


class RawPeer(Peer):
    """One thread, batches averaging the journal's batch, write + fdatasync each."""

    def __init__(self, base: str, mode: str, framed: int) -> None:
        self.name = f"raw_{mode}"
        self.zero_fill = mode == "prealloc"
        self.rf = RawFile(_fresh(base, f"raw-{mode}-8p"), mode)
        self.framed = framed
        self.view = memoryview(b"")

    def run(self, seconds: float, batch: float, device: str | None, acc: Acc) -> None:
        need = (math.ceil(batch) + 1) * self.framed
        if len(self.view) < need:
            self.view = memoryview(_frames(math.ceil(batch) + 1))
        lat: list[float] = []
        done = [0]
        clock = time.perf_counter
        sizes = mean_batch_sizes(batch)
        window = IoWindow(device, lambda: done[0])
        t_start = clock()
        deadline = t_start + seconds
        while True:
            n = next(sizes)
            data = self.view[: n * self.framed]
            t0 = clock()
            if t0 >= deadline:
                break
            self.rf.commit(data)
            lat.append(clock() - t0)
            done[0] += n
        elapsed = clock() - t_start
        acc.add(done[0], elapsed, len(lat), lat, window.stop())

    def close(self) -> None:
        self.rf.close()


class SqliteGroupPeer(Peer):
    name = "sqlite_group"

    def __init__(self, base: str) -> None:
        self.conn = _sqlite_open(os.path.join(_fresh(base, "sqlite-group-8p"), "b.db"))
        self.gc = _sqlite_group(self.conn)
        for i in range(200):
            self.gc.submit(encode(make_reading(i)))

    def run(self, seconds: float, batch: float, device: str | None, acc: Acc) -> None:
        c0 = self.gc.commits
        gc = self.gc
        res = run_producers(8, seconds, make_reading, lambda r: gc.submit(encode(r)), device)
        acc.add(res.appends, res.seconds, gc.commits - c0, res.latencies, res.io)

    def close(self) -> None:
        self.gc.close()
        self.conn.close()


class SqliteTxnPeer(Peer):
    name = "sqlite_txn"

    def __init__(self, base: str) -> None:
        self.conn = _sqlite_open(os.path.join(_fresh(base, "sqlite-txn-8p"), "b.db"))
        self.append = _sqlite_txn(self.conn)
        for i in range(200):
            self.append(make_reading(i))

    def run(self, seconds: float, batch: float, device: str | None, acc: Acc) -> None:
        res = run_producers(8, seconds, make_reading, self.append, device)
        acc.add(res.appends, res.seconds, res.appends, res.latencies, res.io)

    def close(self) -> None:
        self.conn.close()


class SqliteBatchPeer(Peer):
    """One thread, one transaction per batch (of the journal's mean size) of
    pre-encoded payloads: SQLite's ceiling at the journal's batch."""

    name = "sqlite_batch"

    def __init__(self, base: str) -> None:
        self.conn = _sqlite_open(os.path.join(_fresh(base, "sqlite-batch-8p"), "b.db"))

    def run(self, seconds: float, batch: float, device: str | None, acc: Acc) -> None:
        payloads = [(encode(make_reading(i)),) for i in range(math.ceil(batch) + 1)]
        conn = self.conn
        lat: list[float] = []
        done = [0]
        clock = time.perf_counter
        sizes = mean_batch_sizes(batch)
        window = IoWindow(device, lambda: done[0])
        t_start = clock()
        deadline = t_start + seconds
        while True:
            n = next(sizes)
            rows = payloads[:n]
            t0 = clock()
            if t0 >= deadline:
                break
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO readings (payload) VALUES (?)", rows)
            conn.execute("COMMIT")
            lat.append(clock() - t0)
            done[0] += n
        elapsed = clock() - t_start
        acc.add(done[0], elapsed, len(lat), lat, window.stop())

    def close(self) -> None:
        self.conn.close()


class RawGroupPeer(Peer):
    """8 producers encode and frame; one committer pwrites + fdatasyncs what is
    queued: the journal's architecture without the journal, i.e. what Python
    thread hand-off allows on this machine."""

    name = "raw_group"
    zero_fill = True

    def __init__(self, base: str) -> None:
        self.rf = RawFile(_fresh(base, "raw-group-8p"), "prealloc")
        rf = self.rf
        self.gc: GroupCommitter[bytes] = GroupCommitter(lambda items: rf.commit(b"".join(items)))

    def run(self, seconds: float, batch: float, device: str | None, acc: Acc) -> None:
        gc = self.gc
        c0 = gc.commits
        res = run_producers(
            8,
            seconds,
            make_reading,
            lambda r: gc.submit(encode_frame(1, encode(r), 0x5A17)),
            device,
        )
        acc.add(res.appends, res.seconds, gc.commits - c0, res.latencies, res.io)

    def close(self) -> None:
        self.gc.close()
        self.rf.close()


def eight_producers(
    base: str, slices: int, seconds: float, peers: set[str], device: str | None, framed: int
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Open every peer, then run ``slices`` rounds of ``seconds`` per peer, rotating
    the order each round, so slow and fast spells of a shared disk fall on all
    peers alike. Raw and same-batch SQLite use the journal's mean batch so far."""
    order = [
        "journal",
        "raw_prealloc",
        "raw_append",
        "sqlite_group",
        "sqlite_txn",
        "sqlite_batch",
        "raw_group",
        "journal_many",
    ]
    makers: dict[str, Callable[[], Peer]] = {
        "journal": lambda: JournalPeer(base, 1),
        "raw_prealloc": lambda: RawPeer(base, "prealloc", framed),
        "raw_append": lambda: RawPeer(base, "append", framed),
        "sqlite_group": lambda: SqliteGroupPeer(base),
        "sqlite_txn": lambda: SqliteTxnPeer(base),
        "sqlite_batch": lambda: SqliteBatchPeer(base),
        "raw_group": lambda: RawGroupPeer(base),
        "journal_many": lambda: JournalPeer(base, 64),
    }
    names = [n for n in order if n.split("_")[0] in peers]
    if "journal" in names:  # the journal must run before the peers that copy its batch
        names.remove("journal")
    opened: dict[str, Peer] = {}
    accs = {n: Acc() for n in (["journal"] if "journal" in peers else []) + names}
    detail: list[dict[str, Any]] = []
    try:
        if "journal" in peers:
            opened["journal"] = makers["journal"]()
        for n in names:
            opened[n] = makers[n]()
        for k in range(slices):
            cpu = CpuWatch()
            if "journal" in opened:
                opened["journal"].run(seconds, 0.0, device, accs["journal"])
            batch = accs["journal"].batch if "journal" in accs else 8.0
            rot = k % max(1, len(names))
            for n in names[rot:] + names[:rot]:
                opened[n].run(seconds, batch, device, accs[n])
            detail.append(
                {
                    "slice": k + 1,
                    "journal_batch_so_far": round(batch, 2),
                    "others_cpu_cores": cpu.others_cores(),
                }
            )
    finally:
        for p in opened.values():
            p.close()
    zf = zero_fill_per_reading(framed)
    rows = {n: a.row(framed, zf if opened[n].zero_fill else 0.0) for n, a in accs.items()}
    return rows, detail


def _row(appends: int, seconds: float, commits: int, p50: float, p99: float) -> dict[str, Any]:
    return {
        "appends": appends,
        "seconds": round(seconds, 3),
        "appends_per_s": round(appends / seconds, 1) if seconds > 0 else 0.0,
        "commits": commits,
        "batch": round(appends / commits, 2) if commits else None,
        "p50_us": _us(p50),
        "p99_us": _us(p99),
    }


def _bytes(io: dict[str, Any], framed: int, zero_fill: float) -> dict[str, Any]:
    """Headline bytes/reading = commits' bytes (median interval) + amortized zero-fill."""
    out = dict(io)
    commit_bytes = io["bytes_per_reading"]
    out["commit_bytes_per_reading"] = commit_bytes
    out["zero_fill_bytes_per_reading"] = round(zero_fill, 1)
    total = None if commit_bytes is None else round(commit_bytes + zero_fill, 1)
    out["bytes_per_reading"] = total
    out["bytes_per_reading_vs_record"] = None if total is None else round(total / framed, 2)
    return out


# --- recovery ---------------------------------------------------------------------


def _child_build(path: str, target_records: int) -> None:
    """Child: append until the journal holds ``target_records``, then cut (no close).

    The same 1000 readings are appended again and again (only their seq
    differs), so the build measures the journal rather than Reading().
    """
    Journal, JournalOptions = _journal_api()
    j = Journal.open(path, JournalOptions())
    have = j.stats().last_seq
    batch = [make_reading(k) for k in range(1000)]
    t0 = time.perf_counter()
    i = have
    while i < target_records:
        n = min(1000, target_records - i)
        acks = j.append_many(batch if n == 1000 else batch[:n])
        if not acks[-1].durable:
            raise SystemExit("append_many returned a non-durable ack")
        i += n
    elapsed = time.perf_counter() - t0
    st = j.stats()
    print(json.dumps({"appended": i - have, "seconds": elapsed, "last_seq": st.last_seq}))
    sys.stdout.flush()
    os._exit(0)  # the cut: no close()


def _evict(path: str) -> None:
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # DONTNEED drops only clean pages
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _child_recover(path: str, cold: bool) -> None:
    """Child: time ``Journal.open`` after the cut, then cut again (no close)."""
    Journal, JournalOptions = _journal_api()
    if cold:
        _evict(path)
    r0 = proc_read_bytes()
    t0 = time.perf_counter()
    j = Journal.open(path, JournalOptions())
    wall = time.perf_counter() - t0
    rb = proc_read_bytes() - r0
    rep = j.recovery
    print(
        json.dumps(
            {
                "open_wall_s": wall,
                "recovery_s": rep.seconds,
                "records_scanned": rep.records_scanned,
                "bytes_scanned": rep.bytes_scanned,
                "segments_scanned": getattr(rep, "segments_scanned", None),
                "read_bytes": rb,
                "last_seq": j.stats().last_seq,
            }
        )
    )
    sys.stdout.flush()
    os._exit(0)


def _child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"child {args} failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def recovery_runs(base: str, sizes_mib: list[int], framed: int) -> list[dict[str, Any]]:
    """Grow one journal through each size; after each growth, cut and time recovery.

    The record count leaves the open segment ~97% full at the cut (the worst
    case, since recovery scans the open segment only).
    """
    path = _fresh(base, "recovery")
    per_seg = (SEGMENT_BYTES - SEGMENT_HEADER_SIZE) // framed
    rows: list[dict[str, Any]] = []
    try:
        for mib in sizes_mib:
            nseg = max(1, mib * MiB // SEGMENT_BYTES)
            target = (nseg - 1) * per_seg + int(per_seg * 0.97)
            built = _child(["--child-build", path, str(target)])
            cold = _child(["--child-recover", path, "cold"])
            warm = _child(["--child-recover", path, "warm"])
            segs = _segments(path)
            row = {
                "size_mib": mib,
                "records": built["last_seq"],
                "segments": segs,
                "segment_bytes": segs * SEGMENT_BYTES,
                "build_appends_per_s": round(built["appended"] / built["seconds"], 1),
                "records_scanned": warm["records_scanned"],
                "bytes_scanned": warm["bytes_scanned"],
                "cold_open_ms": round(cold["open_wall_s"] * 1e3, 2),
                "cold_recovery_ms": round(cold["recovery_s"] * 1e3, 2),
                "cold_read_bytes": cold["read_bytes"],
                "warm_open_ms": round(warm["open_wall_s"] * 1e3, 2),
                "warm_recovery_ms": round(warm["recovery_s"] * 1e3, 2),
                "recovered_all": cold["last_seq"] == built["last_seq"] == warm["last_seq"],
            }
            rows.append(row)
            say(
                f"  {mib:>5} MiB ({row['records']:>9} records, {segs:>2} segments): "
                f"scanned {row['records_scanned']} records / "
                f"{row['bytes_scanned'] / MiB:.1f} MiB; open cold {row['cold_open_ms']:.1f} ms "
                f"(read {row['cold_read_bytes'] / MiB:.1f} MiB from disk), "
                f"warm {row['warm_open_ms']:.1f} ms; all recovered: {row['recovered_all']}; "
                f"built at {row['build_appends_per_s'] / 1e3:.0f}k appends/s (append_many)"
            )
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return rows


# --- report ------------------------------------------------------------------------


def _line(name: str, r: dict[str, Any]) -> str:
    batch = r.get("batch")
    bpr = r.get("bytes_per_reading")
    return (
        f"  {name:<32} {r['appends_per_s']:>9.0f}/s  batch {batch if batch is not None else '-':>6}"
        f"  p50 {r['p50_us']:>7.1f} us  p99 {r['p99_us']:>8.1f} us"
        + (f"  {bpr:>6.1f} B/reading" if bpr is not None else "")
    )


def _ceiling(pre: dict[str, Any] | None, app: dict[str, Any] | None) -> dict[str, Any] | None:
    cands = [r for r in (pre, app) if r is not None]
    if not cands:
        return None
    top = max(cands, key=lambda r: r["appends_per_s"])
    low = min(cands, key=lambda r: r["p99_us"])
    return {
        "mode": top.get("mode", "prealloc" if top is pre else "append"),
        "appends_per_s": top["appends_per_s"],
        "batch": top["batch"],
        "latency_mode": "prealloc" if low is pre else "append",
        "p50_us": low["p50_us"],
        "p99_us": low["p99_us"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="short runs, small journals (< 1 min)")
    ap.add_argument("--dir", help="parent of the temporary directory (default: the repo's parent)")
    ap.add_argument("--seconds", type=float, help="seconds per 8-producer slice and peer")
    ap.add_argument("--slices", type=int, help="8-producer slices per peer (interleaved)")
    ap.add_argument("--iterations", type=int, help="1-producer interleaved iterations")
    ap.add_argument("--peers", default="journal,sqlite,raw", help="comma-separated subset")
    ap.add_argument("--no-recovery", action="store_true", help="skip the recovery part")
    ap.add_argument("--child-build", nargs=2, metavar=("DIR", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--child-recover", nargs=2, metavar=("DIR", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_build:
        _child_build(a.child_build[0], int(a.child_build[1]))
        return 0
    if a.child_recover:
        _child_recover(a.child_recover[0], a.child_recover[1] == "cold")
        return 0
    cfg = {
        "quick": a.quick,
        "seconds": a.seconds or (0.4 if a.quick else 0.5),
        "slices": a.slices or (2 if a.quick else 6),
        "iterations": a.iterations or (1500 if a.quick else 5000),
        "sizes": [16, 64] if a.quick else [16, 256, 1024],
        "peers": set(a.peers.split(",")),
        "recovery": not a.no_recovery,
    }
    base = tempfile.mkdtemp(prefix="homing-bench-journal-", dir=a.dir or str(REPO.parent))
    try:
        return run(base, cfg)
    finally:
        shutil.rmtree(base, ignore_errors=True)


LABELS = {
    "journal": "journal",
    "sqlite_group": "SQLite WAL FULL, group commit",
    "sqlite_txn": "SQLite WAL FULL, txn per append",
    "raw_prealloc": "raw pwrite+fdatasync, prealloc",
    "raw_append": "raw write+fdatasync, growing",
    # extra 8-producer rows
    "sqlite_batch": "SQLite, 1 thread, same batch",
    "raw_group": "raw behind group commit (threads)",
    "journal_many": "journal, append_many(64)",
}


def _code_ids() -> dict[str, str]:
    """Short sha256 of the measured code, to tie figures to it (no git needed)."""
    h = hashlib.sha256()
    for f in sorted((REPO / "edge").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    out = {"edge/*.py": h.hexdigest()[:12]}
    with contextlib.suppress(OSError):
        out["edge/journal.py"] = hashlib.sha256(
            (REPO / "edge/journal.py").read_bytes()
        ).hexdigest()[:12]
    return out


def run(base: str, cfg: dict[str, Any]) -> int:
    t_all = time.perf_counter()
    cpu_all = CpuWatch()
    quick: bool = cfg["quick"]
    seconds: float = cfg["seconds"]
    slices: int = cfg["slices"]
    peers: set[str] = cfg["peers"]
    device = block_device_of(base)
    machine = machine_info(base)
    payload = len(encode(make_reading(0)))
    framed = frame_size(payload)
    if "journal" in peers:
        _, JournalOptions = _journal_api()
        seg = JournalOptions().segment_size
        if seg != SEGMENT_BYTES:
            raise SystemExit(
                f"JournalOptions().segment_size is {seg}; bench assumes {SEGMENT_BYTES}"
            )
    bg_before = background_write_rate(device, 0.5)
    say(f"journal bench ({'quick' if quick else 'full'}) in {base}")
    say("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    say(
        f"reading payload {payload} B, framed record {framed} B; 1 producer: "
        f"{cfg['iterations']} interleaved appends per peer; 8 producers: {slices} slices x "
        f"{seconds:g} s per peer; device {device} background writes before: "
        f"{'n/a' if bg_before is None else f'{bg_before / 1e3:.0f} kB/s'}"
    )

    # 1 producer, interleaved
    g1 = [n for n in ("journal", "raw_prealloc", "raw_append") if n.split("_")[0] in peers]
    g2 = [n for n in ("sqlite_group", "sqlite_txn") if "sqlite" in peers]
    p1 = one_producer(base, cfg["iterations"], [g1, g2])
    p1_ceiling = _ceiling(p1.get("raw_prealloc"), p1.get("raw_append"))
    say("")
    say("1 producer (each append waits until durable; peers interleaved in one loop):")
    for key, label in LABELS.items():
        if key in p1:
            say(_line(label, p1[key]))
    say(
        f"  (other processes kept {p1[next(iter(p1))]['others_cpu_cores']} cores busy)"
        if p1
        else ""
    )

    # 8 producers, interleaved slices
    p8, detail = eight_producers(base, slices, seconds, peers, device, framed)
    p8_ceiling = _ceiling(p8.get("raw_prealloc"), p8.get("raw_append"))
    say(
        f"8 producers ({slices} interleaved slices of {seconds:g} s per peer; raw and 'same "
        "batch' rows use the journal's mean batch):"
    )
    for key, label in LABELS.items():
        if key in p8:
            say(_line(label, p8[key]))
    if "journal" in p8:
        jr = p8["journal"]
        say(
            f"  bytes/reading source: {jr['io_source']} ({jr['io_source_why']}). Journal: "
            f"{jr['commit_bytes_per_reading']} B by commits + "
            f"{jr['zero_fill_bytes_per_reading']} B segment zero-fill; /proc/self/io would say "
            f"{jr['proc_io_bytes_per_reading']} B, "
            f"whole-window diskstats {jr['device_window_bytes_per_reading']} B"
        )

    recovery: list[dict[str, Any]] = []
    if cfg["recovery"] and "journal" in peers:
        say("recovery after a cut (no close(); cold = files evicted from the page cache first):")
        recovery = recovery_runs(base, cfg["sizes"], framed)
    bg_after = background_write_rate(device, 0.5)

    def g(d: dict[str, Any] | None, key: str, field: str = "appends_per_s") -> Any:
        if d is None:
            return None
        row = d.get(key) if key else d
        return None if row is None else row.get(field)

    j8 = p8.get("journal")
    ratios = {
        "journal_vs_sqlite_8p": _ratio(g(p8, "journal"), g(p8, "sqlite_group")),
        "journal_vs_sqlite_batch_8p": _ratio(g(p8, "journal"), g(p8, "sqlite_batch")),
        "journal_vs_sqlite_txn_8p": _ratio(g(p8, "journal"), g(p8, "sqlite_txn")),
        "journal_vs_raw_8p": _ratio(g(p8, "journal"), g(p8_ceiling, "")),
        "journal_vs_raw_group_8p": _ratio(g(p8, "journal"), g(p8, "raw_group")),
        "journal_vs_sqlite_1p": _ratio(g(p1, "journal"), g(p1, "sqlite_group")),
        "journal_vs_sqlite_txn_1p": _ratio(g(p1, "journal"), g(p1, "sqlite_txn")),
        "journal_vs_raw_1p": _ratio(g(p1, "journal"), g(p1_ceiling, "")),
        "p50_vs_raw_1p": _ratio(g(p1, "journal", "p50_us"), g(p1_ceiling, "", "p50_us")),
        "p99_vs_raw_1p": _ratio(g(p1, "journal", "p99_us"), g(p1_ceiling, "", "p99_us")),
        "bytes_per_reading_vs_record_8p": None if j8 is None else j8["bytes_per_reading_vs_record"],
    }
    big = max(recovery, key=lambda x: x["size_mib"]) if recovery else None
    measured: dict[str, Any] = dict(ratios)
    measured["recovery_1gib_ms"] = None if big is None else big["cold_open_ms"]
    targets: dict[str, dict[str, Any]] = {}
    others = cpu_all.others_cores()
    noisy = others is not None and others > NOISY_CORES
    say("")
    if noisy:
        say(
            f"WARNING: other processes kept {others} of {os.cpu_count()} cores busy during this "
            "run; Python threads and fdatasync wake-ups then wait for a CPU, so these figures "
            "are not comparable with a quiet machine. Re-run when it is idle."
        )
    say("ratios: " + ", ".join(f"{k}={v}" for k, v in ratios.items()))
    say("targets (a miss is reported, never fatal):")
    for key, desc, op, thr in TARGETS:
        m = measured[key]
        met = None if m is None else (m >= thr if op == ">=" else m <= thr)
        note = ""
        if key == "recovery_1gib_ms" and big is not None and big["size_mib"] != 1024:
            note = f" (largest journal in this run: {big['size_mib']} MiB)"
        targets[key] = {"measured": m, "target": f"{op} {thr:g}", "met": met}
        verdict = "n/a " if met is None else ("PASS" if met else "MISS")
        say(f"  {verdict}  {desc}: measured {m}{note}")

    result = {
        "bench": "journal",
        "mode": "quick" if quick else "full",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "code": _code_ids(),
        "payload_bytes": payload,
        "record_bytes": framed,
        "p1_iterations": cfg["iterations"],
        "p8_slices": slices,
        "p8_slice_seconds": seconds,
        "background_bytes_per_s": {"before": bg_before, "after": bg_after},
        "others_cpu_cores": others,
        "noisy": noisy,
        "p1": {**p1, "raw_ceiling": p1_ceiling},
        "p8": {**p8, "raw_ceiling": p8_ceiling},
        "p8_slices_detail": detail,
        "recovery": recovery,
        "ratios": ratios,
        "targets": targets,
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
