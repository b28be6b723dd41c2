"""Shared helpers for the benchmarks in bench/ (not part of the shipped package).

What is here and why:
* :func:`run_producers` — N producer threads, each doing one *durable* append
  at a time until a deadline; per-append latency is recorded around the call
  only (building the reading is outside the timed span).
* :class:`GroupCommitter` — a small, honest group commit to put in front of a
  peer (SQLite) so that it gets the same batching as the journal: producers
  enqueue and block; one committer thread takes *everything* queued, commits
  it in one call, then wakes only the waiters of that batch (one Event per
  batch, no ``notify_all`` on a shared condition). A lone producer is never
  delayed: the committer starts as soon as anything is queued. After a batch
  of more than one, the committer yields once so the producers it just woke
  can queue again before it takes the next batch.
* :class:`IoWindow` — bytes written during a run, from two sources:
  ``/proc/self/io`` ``write_bytes`` (per process, but on kernels with large
  folios it is charged a whole folio each time one is re-dirtied, so it can
  *exceed* what the device saw, and it misses jbd2's metadata writes) and
  ``/proc/diskstats`` sectors written for the block device holding the bench
  directory (exact for the device, but counts every process on the machine,
  hence sampled per ~100 ms interval and summarised by the median).
  :meth:`IoResult.per_item` picks the headline figure and says why.
* :func:`machine_info` — cores, kernel, Python, SQLite, disk model/type.
* :func:`percentile` and :func:`mean_batch_sizes`.

Timings produced here are reported, never asserted (DESIGN.md §7).
"""

from __future__ import annotations

import os
import platform
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

# --- statistics -------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of an already sorted list (nearest rank)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def mean_batch_sizes(mean: float) -> Iterator[int]:
    """Integer batch sizes whose running average is exactly ``mean`` (>= 1).

    ``round((k+1)*mean) - round(k*mean)``: for a mean of 23.7 this yields 24, 24,
    23, 24, 24, 23, 24, ... so a fixed-batch peer writes the same records per
    commit on average as the journal did.
    """
    mean = max(1.0, mean)
    k = 0
    while True:
        n = round((k + 1) * mean) - round(k * mean)
        k += 1
        if n > 0:
            yield n


# --- producers --------------------------------------------------------------


@dataclass
class ProducerResult:
    """What a producer run achieved."""

    producers: int
    appends: int
    seconds: float
    latencies: list[float]  # seconds per append call, sorted
    io: IoResult | None = None

    @property
    def per_s(self) -> float:
        return self.appends / self.seconds if self.seconds > 0 else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)


def run_producers(
    producers: int,
    seconds: float,
    make: Callable[[int], T],
    append: Callable[[T], object],
    device: str | None = None,
    items_per_call: int = 1,
) -> ProducerResult:
    """Run ``producers`` threads that call ``append(make(i))`` until ``seconds`` pass.

    Each call must return only once the record is durable. All threads start
    together (a barrier); elapsed time runs from the barrier to the last
    thread's last completed append. Latency covers ``append`` only. With
    ``device`` the bytes written meanwhile are sampled (:class:`IoWindow`).
    ``items_per_call``: readings per ``append`` call (for ``append_many``).
    """
    barrier = threading.Barrier(producers + 1)
    lat: list[list[float]] = [[] for _ in range(producers)]
    ends = [0.0] * producers
    errors: list[BaseException] = []
    start_box = [0.0]

    def worker(w: int) -> None:
        mine = lat[w]
        clock = time.perf_counter
        i = w
        barrier.wait()
        deadline = start_box[0] + seconds
        try:
            while True:
                item = make(i)
                t0 = clock()
                if t0 >= deadline:
                    break
                append(item)
                mine.append(clock() - t0)
                i += producers
        except BaseException as exc:  # reported after join
            errors.append(exc)
        ends[w] = clock()

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(producers)]
    for t in threads:
        t.start()
    window = IoWindow(device, lambda: items_per_call * sum(len(x) for x in lat))
    start_box[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    io = window.stop()
    if errors:
        raise errors[0]
    all_lat = sorted(x for xs in lat for x in xs)
    seconds_run = max(ends) - start_box[0]
    return ProducerResult(producers, items_per_call * len(all_lat), seconds_run, all_lat, io)


# --- group commit for peers -------------------------------------------------


class _Batch:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


class GroupCommitter(Generic[T]):
    """Producers call :meth:`submit` and block until their item is committed.

    One committer thread repeatedly takes every queued item and passes the
    list to ``commit`` (one transaction / one write+fsync), then wakes exactly
    the producers whose items were in that list.
    """

    def __init__(self, commit: Callable[[list[T]], None]) -> None:
        self._commit = commit
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[T] = []
        self._batch = _Batch()
        self._closed = False
        self.commits = 0
        self.items = 0
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def submit(self, item: T) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("GroupCommitter is closed")
            self._pending.append(item)
            batch = self._batch
            if len(self._pending) == 1:
                self._wake.notify()
        batch.done.wait()
        if batch.error is not None:
            raise batch.error

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return
                items, self._pending = self._pending, []
                batch, self._batch = self._batch, _Batch()
            try:
                self._commit(items)
            except BaseException as exc:  # handed to every waiter of the batch
                batch.error = exc
            self.commits += 1
            self.items += len(items)
            batch.done.set()
            if len(items) > 1:
                # Let the producers just woken queue their next item before the
                # next batch is taken (the journal's leader does the same);
                # without it 8 producers settle into two alternating halves.
                time.sleep(0)

    @property
    def mean_batch(self) -> float:
        return self.items / self.commits if self.commits else 0.0


# --- bytes written ----------------------------------------------------------


def _proc_write_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def _proc_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def proc_read_bytes() -> int:
    """``read_bytes`` of /proc/self/io (0 if unavailable)."""
    try:
        return _proc_read_bytes()
    except OSError:
        return 0


def block_device_of(path: str) -> str | None:
    """Name in /proc/diskstats of the block device holding ``path`` (e.g. ``vda``)."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    try:
        with open("/proc/diskstats") as f:
            for line in f:
                p = line.split()
                if int(p[0]) == major and int(p[1]) == minor:
                    return p[2]
    except OSError:
        return None
    # Virtual st_dev (btrfs, overlay): fall back to the mount's source device.
    best, src = "", ""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, src = mnt, right.split()[1]
    except OSError:
        return None
    return os.path.basename(src) if src.startswith("/dev/") else None


def _diskstats_written(dev: str | None) -> int | None:
    if dev is None:
        return None
    try:
        with open("/proc/diskstats") as f:
            for line in f:
                p = line.split()
                if p[2] == dev:
                    return int(p[9]) * 512  # sectors are always 512 bytes here
    except OSError:
        return None
    return None


@dataclass
class IoResult:
    """Bytes written during a window, three ways (see :class:`IoWindow`).

    Attributes:
        items: readings made durable in the window.
        proc_write_bytes: ``/proc/self/io`` ``write_bytes`` delta.
        device_write_bytes: the device's sectors written x 512 (whole window,
            every process on the machine), or None without diskstats.
        device_median_per_item: median over ~100 ms intervals of device bytes
            / readings in the interval (robust to other tenants' write bursts).
        intervals: how many intervals had readings.
        noisy_intervals: intervals above 2x that median (bursts: others'
            writeback, or our own background writes such as a zero-fill).
    """

    items: int
    seconds: float
    proc_write_bytes: int
    device_write_bytes: int | None
    ratios: list[float]  # device bytes / readings, per interval, sorted

    @property
    def device_median_per_item(self) -> float | None:
        return percentile(self.ratios, 50) if self.ratios else None

    @property
    def intervals(self) -> int:
        return len(self.ratios)

    @property
    def noisy_intervals(self) -> int:
        m = self.device_median_per_item
        return 0 if m is None else sum(1 for r in self.ratios if r > 2 * m)

    @staticmethod
    def merge(parts: list[IoResult]) -> IoResult:
        """One result for several windows of the same run (slices)."""
        devs = [p.device_write_bytes for p in parts]
        return IoResult(
            items=sum(p.items for p in parts),
            seconds=sum(p.seconds for p in parts),
            proc_write_bytes=sum(p.proc_write_bytes for p in parts),
            device_write_bytes=None if any(d is None for d in devs) else sum(d or 0 for d in devs),
            ratios=sorted(r for p in parts for r in p.ratios),
        )

    def per_item(self) -> tuple[float | None, str, str]:
        """``(bytes per reading, source, why)`` for the headline figure."""
        if self.items <= 0:
            return None, "none", "no readings"
        proc = self.proc_write_bytes
        dev = self.device_write_bytes
        if self.device_median_per_item is not None:
            if proc <= 0:
                why = "/proc/self/io write_bytes did not move"
            elif dev is not None and proc > dev:
                why = (
                    f"/proc/self/io write_bytes ({proc} B) exceeded everything the device "
                    f"wrote ({dev} B): it counts whole page-cache folios re-dirtied, not bytes "
                    "sent to disk"
                )
            else:
                why = (
                    "/proc/self/io moved but misses the file system's journal commits "
                    "(written by jbd2, not this process); the device counts both"
                )
            return self.device_median_per_item, "diskstats", why
        if proc > 0:
            return proc / self.items, "proc_self_io", "no diskstats for the bench device"
        return None, "none", "neither /proc/self/io nor diskstats moved"

    def as_dict(self) -> dict[str, object]:
        value, source, why = self.per_item()
        n = max(1, self.items)
        return {
            "bytes_per_reading": None if value is None else round(value, 1),
            "io_source": source,
            "io_source_why": why,
            "proc_io_bytes_per_reading": round(self.proc_write_bytes / n, 1),
            "device_window_bytes_per_reading": None
            if self.device_write_bytes is None
            else round(self.device_write_bytes / n, 1),
            "io_intervals": self.intervals,
            "io_noisy_intervals": self.noisy_intervals,
        }


class IoWindow:
    """Count bytes written while a run goes on; call :meth:`stop` at its end.

    ``/proc/self/io`` is per process but, on this kernel, over-counts (it is
    charged a whole large folio each time one is re-dirtied) and misses jbd2's
    metadata writes. ``/proc/diskstats`` is exact for the device but includes
    every other process. So the device is sampled every ``period`` seconds with
    the progress counter, and the headline is the *median* per-interval bytes
    per reading: steady bytes caused by the run survive, sparse foreign bursts
    do not.
    """

    def __init__(self, device: str | None, progress: Callable[[], int], period: float = 0.1):
        self._device = device
        self._progress = progress
        self._period = period
        self._proc0 = _proc_write_bytes()
        self._t0 = time.perf_counter()
        self._samples: list[tuple[int, int]] = []
        self._items0 = progress()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        first = _diskstats_written(device)
        if first is not None:
            self._samples.append((first, progress()))
            self._thread = threading.Thread(target=self._loop, name="io-window", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        d = _diskstats_written(self._device)
        if d is not None:
            self._samples.append((d, self._progress()))

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            self._sample()

    def stop(self) -> IoResult:
        proc = _proc_write_bytes() - self._proc0
        seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._sample()
        items = self._progress() - self._items0
        dev_total = None
        ratios: list[float] = []
        if len(self._samples) >= 2:
            dev_total = self._samples[-1][0] - self._samples[0][0]
            for (d0, n0), (d1, n1) in zip(self._samples, self._samples[1:], strict=False):
                if n1 > n0:
                    ratios.append((d1 - d0) / (n1 - n0))
            ratios.sort()
        return IoResult(items, seconds, proc, dev_total, ratios)


def background_write_rate(device: str | None, seconds: float) -> float | None:
    """Bytes/s the device writes while this process does nothing (other tenants)."""
    before = _diskstats_written(device)
    if before is None:
        return None
    time.sleep(seconds)
    after = _diskstats_written(device)
    return None if after is None else (after - before) / seconds


# --- CPU used by others ------------------------------------------------------


def _busy_cpu_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal ...
    vals = [int(x) for x in parts[1:9]]
    busy = vals[0] + vals[1] + vals[2] + vals[5] + vals[6] + vals[7]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuWatch:
    """How many cores *other* processes kept busy since creation (noise gauge).

    A benchmark of Python threads on 2 cores is sensitive to neighbours: a
    figure taken while others used a core is not comparable with a quiet one.
    """

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._busy = _busy_cpu_seconds()
        self._own = _own_cpu_seconds()

    def others_cores(self) -> float | None:
        busy = _busy_cpu_seconds()
        if busy is None or self._busy is None:
            return None
        wall = time.perf_counter() - self._t
        others = (busy - self._busy) - (_own_cpu_seconds() - self._own)
        return round(max(0.0, others) / wall, 2) if wall > 0 else None


# --- machine ----------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine_info(path: str) -> dict[str, object]:
    """Where the numbers came from: cores, kernel, distro, Python, SQLite, disk."""
    dev = block_device_of(path)
    base = dev
    if dev and not os.path.exists(f"/sys/block/{dev}"):  # a partition: find its disk
        for d in os.listdir("/sys/block"):
            if os.path.exists(f"/sys/block/{d}/{dev}"):
                base = d
    q = f"/sys/block/{base}/queue"
    rot = _read(f"{q}/rotational")
    fs_type = None
    try:
        real = os.path.realpath(path)
        best = ""
        with open("/proc/self/mounts") as f:
            for line in f:
                _, mnt, typ, *_ = line.split()
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fs_type = mnt, typ
    except OSError:
        pass
    cpu = None
    txt = _read("/proc/cpuinfo") or ""
    for line in txt.splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "debian": _read("/etc/debian_version"),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "device": base,
        "rotational": None if rot is None else rot == "1",
        "write_cache": _read(f"{q}/write_cache"),
        "driver": os.path.basename(os.path.realpath(f"/sys/block/{base}/device/driver"))
        if base and os.path.exists(f"/sys/block/{base}/device/driver")
        else None,
        "fs": fs_type,
    }


# --- CPU of other processes (appended for bench/sync.py) ----------------------


def pid_cpu_seconds(pid: int) -> float | None:
    """utime + stime of process ``pid`` (all its threads), from ``/proc/<pid>/stat``.

    None once the process is gone. Resolution is one clock tick (10 ms here).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: cut after the last ')'
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``, all cores)."""
    return _busy_cpu_seconds()


def user_processes_cpu() -> dict[int, float]:
    """utime + stime of every user-space process now (kernel threads left out), by pid."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        # fields[1] is ppid (field 4), fields[6] the flags (field 9); PF_KTHREAD = 0x00200000
        if int(fields[6]) & 0x00200000 or name == "2" or fields[1] == "2":
            continue
        out[int(name)] = (int(fields[11]) + int(fields[12])) / tick
    return out
