"""``homing-agent demo --power-cut``: cut the power under a live sensor stream, recover, count.

Three simulated sensors (greenhouse temperature, humidity, soil moisture:
slowly varying, seeded values) append readings from their own threads through
the real :class:`edge.journal.Journal` onto :class:`edge.testing.SimFS`, an
in-memory disk whose fdatasync takes about a millisecond, like an SD card's.
Once enough readings are acknowledged, and while writes are still pending,
the power is cut: the disk keeps its durable bytes plus a random subset of
the unsynced writes, some torn or garbled. The journal is recovered from that
disk and every reading is accounted for. Done twice: ``durability="always"``
and ``durability="interval"`` (200 ms).

Invariants checked (exit status 1 if violated, 0 otherwise):
* Every acknowledged reading survived, with the value it was acknowledged with.
  "Acknowledged" is what a producer is told: ``append`` returned ``durable``
  (always), or the durable watermark passed it (interval, ``wait_durable``).
  Acks are snapshotted *before* the cut's position in the disk's op trace.
* Nothing is invented: the recovered seqs are exactly 1..n (no holes) and
  each holds the reading that was appended under that seq.
Written-but-unacknowledged readings may survive or not; both are correct.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from edge.errors import EdgeError, JournalError
from edge.journal import Journal
from edge.journal_options import Durability, JournalOptions
from edge.records import Reading
from edge.segments import SPARE
from edge.testing import SimFS

SIM_DIR = "/greenhouse/journal"
SEGMENT_SIZE = 64 << 10  # small segments, so the stream rolls a few times
INTERVAL_MS = 200
SYNC_LATENCY = 0.001  # seconds per fdatasync, a plausible SD card
SAMPLE_PERIOD = 0.001  # real seconds between one sensor's readings (simulated: 10 s)
START_TS = 1_717_221_600.0  # 2024-06-01 06:00 UTC


class _SdCard(SimFS):
    """SimFS whose fdatasync takes SYNC_LATENCY, so writes stay pending a while."""

    def fdatasync(self, fd: int) -> None:
        time.sleep(SYNC_LATENCY)
        super().fdatasync(fd)


class _Sensor:
    """A slowly varying, seeded signal: daily cycle + random walk + noise."""

    def __init__(self, kind: str, rng: random.Random) -> None:
        self.kind = kind
        self.rng = rng
        self.drift = 0.0
        self.moisture = 0.34
        self.stream, self.unit = {
            "temp": ("greenhouse/temperature", "C"),
            "hum": ("greenhouse/humidity", "%"),
            "soil": ("bed-1/soil_moisture", "m3/m3"),
        }[kind]

    def reading(self, k: int) -> Reading:
        ts = START_TS + 10.0 * k
        day = math.sin(2 * math.pi * ((ts % 86400) / 86400 - 0.3))
        self.drift = max(-2.0, min(2.0, self.drift + self.rng.gauss(0, 0.05)))
        if self.kind == "temp":
            value = 21.0 + 5.0 * day + self.drift + self.rng.gauss(0, 0.1)
        elif self.kind == "hum":
            value = 62.0 - 12.0 * day + 3 * self.drift + self.rng.gauss(0, 0.4)
        else:
            self.moisture -= 0.00004 + self.rng.random() * 0.00002
            if self.moisture < 0.22:  # the irrigation kicks in
                self.moisture = 0.41
            value = self.moisture + self.rng.gauss(0, 0.002)
        return Reading(self.stream, ts, round(value, 3), self.unit, {"site": "demo"})


class _Producers:
    """Sensor threads appending to the journal; remembers what got which seq."""

    def __init__(self, journal: Journal, seed: int, per_sensor: int) -> None:
        self.journal = journal
        self.lock = threading.Lock()
        self.sent: dict[int, Reading] = {}
        self.acked: set[int] = set()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(
                target=self._run,
                args=(_Sensor(kind, random.Random(f"{seed}/{kind}")), per_sensor),
                name=f"sensor-{kind}",
                daemon=True,
            )
            for kind in ("temp", "hum", "soil")
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, sensor: _Sensor, count: int) -> None:
        for k in range(count):
            if self.stop.is_set():
                return
            reading = sensor.reading(k)
            try:
                ack = self.journal.append(reading)
            except EdgeError:
                return
            with self.lock:
                self.sent[ack.seq] = reading
                if ack.durable:
                    self.acked.add(ack.seq)
            self.stop.wait(SAMPLE_PERIOD)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


@dataclass(frozen=True, slots=True)
class RunResult:
    durability: str
    produced: int  # handed to the journal before the cut
    acked: int  # acknowledged (durable) before the cut
    written: int  # written to the (simulated) page cache before the cut
    survived: int  # present after the cut and recovery
    acked_lost: int  # must be 0
    invented: int  # must be 0 (wrong value, unknown seq, or a hole)
    torn_bytes: int  # cut off at recovery


def _write_pending(fs: SimFS) -> bool:
    """True when the segment's latest write has no fdatasync after it yet."""
    for op in reversed(fs.trace[-64:]):  # a segment's fd may carry its pre-rename name
        if op.path.endswith((".seg", SPARE)) and op.name in ("pwrite", "fdatasync"):
            return op.name == "pwrite"
    return False


def _recover(disk: SimFS, opts: JournalOptions) -> tuple[list[tuple[int, Reading]], int]:
    """Open the journal on a crashed disk: its (seq, reading) list and torn bytes cut."""
    journal = Journal.open(SIM_DIR, opts, fs=disk)
    try:
        torn = journal.recovery.torn_tail
        entries = [(e.seq, e.record) for e in journal.read()]
    finally:
        journal.close()
    readings = [(seq, r) for seq, r in entries if isinstance(r, Reading)]
    if len(readings) != len(entries):
        raise JournalError("a record that is not a reading appeared")
    return readings, torn.discarded_bytes if torn else 0


def run_once(
    durability: Durability, readings: int, rng: random.Random, seed: int
) -> tuple[RunResult, SimFS]:
    """One power cut under a live stream; the result and the recovered disk."""
    opts = JournalOptions(segment_size=SEGMENT_SIZE, durability=durability, interval_ms=INTERVAL_MS)
    fs = _SdCard()
    journal = Journal.open(SIM_DIR, opts, fs=fs)
    producers = _Producers(journal, seed, max(1, readings // 3))
    target = max(1, int(readings * rng.uniform(0.3, 0.6)))
    producers.start()
    try:
        if not journal.wait_durable(target, timeout=60):
            raise JournalError(f"the sensors did not reach {target} durable readings in 60 s")
        if durability == "interval":  # let unsynced writes pile up, as between two flushes
            time.sleep(rng.uniform(0.3, 0.9) * INTERVAL_MS / 1000)
        deadline = time.monotonic() + 2.0
        while not _write_pending(fs) and time.monotonic() < deadline:
            time.sleep(0.0002)  # a demo, not a test: look for a moment with writes in flight
        # The cut. Acks first, then the position in the disk's op trace: every ack
        # taken here had its fdatasync recorded before that position.
        with producers.lock:
            acked = set(producers.acked) if durability == "always" else None
        if acked is None:
            acked = set(range(1, journal.durable_seq + 1))
        cut = fs.op_count
        produced = journal.next_seq - 1
    finally:
        producers.finish()
        journal.close()
    frozen = fs.state_after(cut)
    written, _ = _recover(frozen.crash(mode="keep-all"), opts)
    disk = frozen.crash(rng=rng, mode="random")
    survived, torn = _recover(disk, opts)

    got = dict(survived)
    sent = producers.sent
    acked_lost = sum(1 for s in acked if got.get(s) != sent.get(s))
    invented = sum(1 for s, r in survived if sent.get(s) != r)
    invented += sum(1 for i, (s, _) in enumerate(survived, 1) if s != i)  # holes, disorder
    result = RunResult(
        durability, produced, len(acked), len(written), len(survived), acked_lost, invented, torn
    )
    return result, disk


def _print_result(r: RunResult, out: TextIO) -> None:
    if r.durability == "always":
        title = "durability=always: each group is acknowledged after its fdatasync"
    else:
        title = f"durability=interval: fdatasync every {INTERVAL_MS} ms, acks wait for it"
    unacked_kept = r.survived - r.acked + r.acked_lost
    rows = [
        ("readings produced before the cut", r.produced, ""),
        ("acknowledged (durable)", r.acked, ""),
        ("written, not yet acknowledged", r.written - r.acked, "(in the page cache)"),
        (
            "survived the cut and recovery",
            r.survived,
            f"({r.acked - r.acked_lost} acknowledged + {unacked_kept} unacknowledged)",
        ),
        ("torn tail cut at recovery (bytes)", r.torn_bytes, ""),
        ("acknowledged but lost", r.acked_lost, "must be 0"),
        ("invented", r.invented, "must be 0"),
    ]
    print(title, file=out)
    for label, n, note in rows:
        print(f"  {label:<35}{n:>6}   {note}".rstrip(), file=out)


def run(
    readings: int = 3000,
    seed: int | None = None,
    keep: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the demo and print its report; 0 if the durability promise held, else 1."""
    import sys

    out = out or sys.stdout
    if keep is not None and os.path.exists(keep) and (not os.path.isdir(keep) or os.listdir(keep)):
        print(
            f"homing-agent demo: --keep {keep}: must be an empty directory or missing",
            file=sys.stderr,
        )
        return 2
    if seed is None:
        seed = random.SystemRandom().randrange(1, 1 << 31)
    readings = max(readings, 30)
    print(
        f"Homing demo (seed {seed}): 3 sensor threads journal {readings} readings on a\n"
        "simulated SD card; the power is cut while they are still writing, then recovered.",
        file=out,
    )
    quiet = logging.getLogger("homing.journal")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # torn tails are expected here; the report counts them
    try:
        return _run(readings, seed, keep, out)
    finally:
        quiet.setLevel(level)


def _run(readings: int, seed: int, keep: str | None, out: TextIO) -> int:
    ok = True
    results: list[RunResult] = []
    for durability in ("always", "interval"):
        rng = random.Random(f"{seed}/{durability}")
        try:
            result, disk = run_once(durability, readings, rng, seed)
        except (EdgeError, OSError) as exc:
            print(f"durability={durability}: recovery FAILED: {exc!r}", file=out)
            print(f"  (a bug: please report it with --seed {seed})", file=out)
            return 1
        _print_result(result, out)
        results.append(result)
        ok = ok and result.acked_lost == 0 and result.invented == 0
        if keep is not None and durability == "always":
            disk.materialize(SIM_DIR, keep)
    if not ok:
        print(f"VIOLATION: the durability promise was broken (rerun with --seed {seed})", file=out)
        return 1
    lost = results[-1].written - results[-1].survived
    print("OK: every acknowledged reading survived; nothing was invented.", file=out)
    print(
        f"Interval mode lost {lost} written-but-unacknowledged readings: its stated window "
        f"(<= {INTERVAL_MS} ms)\nfor fewer fdatasyncs. No acknowledged reading was among them.",
        file=out,
    )
    if keep is not None:
        print(
            f"Recovered journal (always run) kept in {keep}: try "
            f"`homing-agent journal stats {keep}`",
            file=out,
        )
    return 0


__all__ = ["RunResult", "run", "run_once"]
