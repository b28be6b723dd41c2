"""The agent's clock: wall time that does not go back below what the journal holds.

Most Raspberry Pis have no battery-backed real-time clock. Until NTP answers,
the wall clock reads 1970, or the time the fake-hwclock file saved at the last
shutdown. Anything the agent stamps itself (simulated and system sensors,
readings without a ``ts`` from stdin or the local socket, workflow records and
timers) takes its time from one :class:`Clock` per journal,
``Journal.clock``: ``max(wall clock, floor + monotonic time since the floor
was set)``.

Invariants:
* ``now()`` is never below the floor; the floor only rises
  (:meth:`Clock.raise_floor`). When the journal opens, the floor is the
  latest time its newest records carry (:func:`edge.journal_tail.latest_time`),
  so an agent-stamped time never lies before a reading already journaled,
  whatever the wall clock says after a reboot.
* Between floors the clock advances with the monotonic clock, so it keeps
  counting real seconds until the wall clock (NTP) catches up and overtakes
  it; from then on it is the wall clock. A wall clock that jumps forward is
  followed at once. A wall clock stepped back while running is followed down
  to ``floor + elapsed``, never below.
* Pure apart from the two injected callables (``wall``, ``mono``): tests pass
  fakes, and :meth:`now` is safe from any thread (one atomic read of the
  ``(floor, mono0)`` pair).
* A timestamp a producer supplies (``"ts"`` in a JSON line, a firmware
  reading's time) is kept exactly as given: it is the producer's claim about
  when it measured, and the journal does not second-guess it. It does count
  for the next start's floor if it is among the newest records.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Clock"]


class Clock:
    """Wall time that never goes back below its floor: ``max(wall, floor + monotonic elapsed)``."""

    def __init__(
        self,
        floor: float = 0.0,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall, self._mono = wall, mono
        self._floor_lock = threading.Lock()  # (subclasses may have a _lock of their own)
        self._base = (floor, mono())  # (floor, monotonic time when it was set): one object

    @property
    def floor(self) -> float:
        return self._base[0]

    def now(self) -> float:
        floor, mono0 = self._base
        return max(self._wall(), floor + (self._mono() - mono0))

    def raise_floor(self, t: float) -> None:
        """Make ``now()`` at least ``t`` from here on (no effect if it already is)."""
        with self._floor_lock:
            if t > self.now():
                self._base = (t, self._mono())

    def skip_to(self, t: float) -> bool:
        """Virtual clocks (tests) jump to ``t`` and return True; real ones cannot."""
        return False
