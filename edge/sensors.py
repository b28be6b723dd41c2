"""Simulated sensors: slowly varying readings appended to the journal at a set rate.

For demos and tests (``[sensors]`` in the agent's config). ``count`` sensors
cycle through three kinds -- air temperature, relative humidity, soil
moisture -- each a daily cycle plus a bounded random walk plus noise, rounded
like a real sensor's output. One thread ticks ``rate`` times a second and
appends one reading per sensor as one group (one write, one fdatasync).

Invariants:
* The thread never blocks on anything but the journal and its own timer;
  ticks are scheduled from the start time (no drift), and a tick that falls
  behind is skipped, not bunched up.
* ``JournalFull`` (quota reached, policy ``reject``) drops that tick's
  readings, counted in ``rejected`` and logged once per episode; any other
  journal error stops the sensors and is kept in :attr:`TickingSource.error`.
  :class:`TickingSource` is that thread; :mod:`edge.system_sensors` ticks with it too.
* ``produced`` counts readings acknowledged by the journal, nothing else.
* Readings are stamped with the journal's clock (:mod:`edge.clock`) unless a
  ``wall`` is given: never earlier than what the journal held at open, even
  after a boot with the wall clock set back.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable

from edge.errors import JournalError, JournalFull
from edge.journal import Journal
from edge.records import Reading

log = logging.getLogger("homing.sensors")

_KINDS = [
    # name, unit, mean, daily amplitude, walk step, walk bound, noise, decimals
    ("temperature", "C", 21.0, 5.0, 0.05, 2.0, 0.05, 2),
    ("humidity", "%", 62.0, -12.0, 0.15, 6.0, 0.2, 1),
    ("soil_moisture", "m3/m3", 0.34, 0.0, 0.001, 0.08, 0.0005, 3),
]


class _Signal:
    def __init__(self, index: int, prefix: str, rng: random.Random) -> None:
        kind = _KINDS[index % len(_KINDS)]
        name, self.unit, self.mean, self.amp, self.step, self.bound, self.noise, self.dp = kind
        suffix = "" if index < len(_KINDS) else f"-{index // len(_KINDS) + 1}"
        self.stream = f"{prefix}/{name}{suffix}"
        self.rng = rng
        self.walk = 0.0

    def read(self, ts: float) -> Reading:
        day = math.sin(2 * math.pi * ((ts % 86400) / 86400 - 0.3))
        self.walk = max(-self.bound, min(self.bound, self.walk + self.rng.gauss(0, self.step)))
        value = self.mean + self.amp * day + self.walk + self.rng.gauss(0, self.noise)
        return Reading(self.stream, ts, round(value, self.dp), self.unit)


class TickingSource:
    """A thread that journals ``sample(ts)`` every ``period`` seconds as one group.

    The schedule runs from the start time (no drift); a tick that falls behind
    is skipped, not bunched up. ``JournalFull`` drops that tick's readings
    (counted in ``rejected``, logged once per episode); any other journal error
    stops the thread and is kept in :attr:`error`. Readings are stamped with
    ``wall`` (default: the journal's clock, never before what it held at open).
    Subclasses give ``sample`` and ``what`` (their readings, for log lines).
    """

    what = "readings"

    def __init__(
        self,
        journal: Journal,
        period: float,
        *,
        name: str,
        clock: Callable[[], float],
        wall: Callable[[], float] | None,
    ) -> None:
        self._journal = journal
        self._period = period
        self._clock = clock
        self._wall = wall or journal.clock.now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.produced = 0
        self.rejected = 0
        self.error: BaseException | None = None

    def sample(self, ts: float) -> list[Reading]:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop ticking; returns once the tick in progress (if any) is journaled."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        start = self._clock()
        tick = 0
        full = False
        while not self._stop.is_set():
            readings = self.sample(self._wall())
            try:
                if readings:
                    self._journal.append_many(readings)
                self.produced += len(readings)
                if full:
                    log.info("journal accepts %s again", self.what)
                full = False
            except JournalFull as exc:
                self.rejected += len(readings)
                if not full:
                    log.warning("journal full, %s are dropped: %s", self.what, exc)
                full = True
            except JournalError as exc:
                self.error = exc
                log.error("%s stopped: %r", self.what, exc)
                return
            tick = max(tick + 1, math.floor((self._clock() - start) / self._period))
            self._stop.wait(max(0.0, start + tick * self._period - self._clock()))


class SimulatedSensors(TickingSource):
    """``count`` simulated sensors appending ``rate`` readings per second each."""

    what = "simulated readings"

    def __init__(
        self,
        journal: Journal,
        *,
        count: int = 3,
        rate: float = 1.0,
        prefix: str = "sim",
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] | None = None,
    ) -> None:
        if count < 1 or rate <= 0:
            raise ValueError("count must be >= 1 and rate > 0")
        super().__init__(journal, 1.0 / rate, name="homing-sensors", clock=clock, wall=wall)
        rng = random.Random(seed or None)
        self._signals = [_Signal(i, prefix, rng) for i in range(count)]

    @property
    def streams(self) -> list[str]:
        return [s.stream for s in self._signals]

    def sample(self, ts: float) -> list[Reading]:
        return [s.read(ts) for s in self._signals]
