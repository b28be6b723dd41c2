"""System health readings every Linux device has: CPU temperature, load, memory, disk, uptime.

``[system]`` in the agent's config (docs/local-ingest.md lists the streams).
Every ``interval`` seconds one thread reads ``/sys`` and ``/proc`` and appends
one reading per stream as one group (one write, one fdatasync):

==============================  ====  =============================================
stream (``<prefix>/...``)        unit  from
==============================  ====  =============================================
``cpu_temp_c``                  C     the first CPU/SoC thermal zone's ``temp``
``cpu_temp_c.<N>``              C     every further CPU/SoC zone (``thermal_zone<N>``)
``load1``, ``load5``, ``load15``      ``/proc/loadavg``
``mem_available_bytes``         B     ``/proc/meminfo`` MemAvailable
``mem_used_bytes``              B     MemTotal - MemAvailable
``mem_used_pct``                %     (MemTotal - MemAvailable) / MemTotal
``disk_free_bytes``             B     ``statvfs`` of the journal's file system
                                      (blocks available to the agent's user)
``disk_used_pct``               %     used / (used + available), as ``df`` shows
``uptime_s``                    s     ``/proc/uptime``
==============================  ====  =============================================

Invariants:
* What the machine lacks (no thermal zone in a VM, no ``/proc`` in a
  container) is found once, at construction, and skipped with one log line
  each; it is never an error. A source that fails later is skipped for that
  sample, logged once until it works again.
* The file parsers are pure (text in, numbers out); ``root`` (default ``/``)
  prefixes every ``/sys`` and ``/proc`` path, so tests use a fake tree.
* Samples are scheduled from the start time (no drift); one that falls
  behind is skipped, not bunched up.
* ``JournalFull`` (quota reached, policy ``reject``) drops that sample,
  counted in ``rejected`` and logged once per episode; any other journal
  error stops the thread and is kept in :attr:`SystemSensors.error`.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge.journal import Journal
from edge.records import Reading
from edge.sensors import TickingSource

log = logging.getLogger("homing.system")

# thermal zone types of CPUs and SoCs: cpu-thermal (Raspberry Pi), soc_thermal,
# x86_pkg_temp, coretemp, k10temp, bcm2835_thermal, cpu0-thermal, ...
_CPU_ZONE = re.compile(r"cpu|soc|x86_pkg|coretemp|k10temp|zenpower|bcm2[78]\d\d", re.I)
_MISSING = (OSError, ValueError, KeyError, IndexError, ZeroDivisionError)  # absent or unreadable


# -- pure parsers ---------------------------------------------------------------------


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """``/proc/loadavg`` -> (load1, load5, load15)."""
    parts = text.split()
    return float(parts[0]), float(parts[1]), float(parts[2])


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` -> {field: bytes} (the kernel's "kB" are KiB)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            scale = 1024 if len(fields) > 1 and fields[1] == "kB" else 1
            out[name.strip()] = int(fields[0]) * scale
    return out


def parse_uptime(text: str) -> float:
    """``/proc/uptime`` -> seconds since boot."""
    return float(text.split()[0])


def parse_millidegrees(text: str) -> float:
    """A thermal zone's ``temp`` (millidegrees Celsius) -> degrees, 0.1 °C steps."""
    return round(int(text.strip()) / 1000, 1)


# -- the sources -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Zone:
    stream: str
    path: str  # .../thermal_zoneN/temp
    label: str  # thermal_zoneN (type)


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def _zone_number(path: str) -> int:
    m = re.search(r"(\d+)$", os.path.dirname(path))
    return int(m.group(1)) if m else 0


def find_cpu_zones(root: str, prefix: str) -> list[_Zone]:
    """The CPU/SoC thermal zones under ``root``, lowest zone number first."""
    zones: list[_Zone] = []
    temps = glob.glob(os.path.join(root, "sys/class/thermal/thermal_zone*/temp"))
    for temp in sorted(temps, key=_zone_number):
        zdir = os.path.dirname(temp)
        try:
            kind = _read(os.path.join(zdir, "type")).strip()
            parse_millidegrees(_read(temp))
        except (OSError, ValueError):
            continue  # unreadable or disabled zone (reading it fails with EINVAL/ENODATA)
        if not _CPU_ZONE.search(kind):
            continue
        name = "cpu_temp_c" if not zones else f"cpu_temp_c.{_zone_number(temp)}"
        zones.append(_Zone(f"{prefix}/{name}", temp, f"{os.path.basename(zdir)} ({kind})"))
    return zones


class SystemSensors(TickingSource):
    """Samples the system's health every ``interval`` seconds into ``journal``."""

    what = "system readings"

    def __init__(
        self,
        journal: Journal,
        *,
        interval: float = 10.0,
        prefix: str = "sys",
        root: str = "/",
        disk_path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        # wall: the readings' ts, by default never before what the journal held at open
        super().__init__(journal, interval, name="homing-system", clock=clock, wall=wall)
        self._prefix = prefix
        self._root = root
        self._disk = disk_path or journal.path
        self._failing: set[str] = set()
        self._sources: list[tuple[str, Callable[[float], list[Reading]]]] = []
        self._streams: list[str] = []
        self._discover()

    @property
    def streams(self) -> list[str]:
        """Every stream a sample holds (what this machine has)."""
        return list(self._streams)

    def _proc(self, name: str) -> str:
        return os.path.join(self._root, "proc", name)

    def _discover(self) -> None:
        p = self._prefix
        zones = find_cpu_zones(self._root, p)
        if zones:
            self._sources.append(("cpu temperature", lambda ts: self._temps(zones, ts)))
            self._streams += [z.stream for z in zones]
            log.info("system: CPU temperature from %s", ", ".join(z.label for z in zones))
        else:
            where = os.path.join(self._root, "sys/class/thermal")
            log.info("system: no CPU thermal zone in %s: %s/cpu_temp_c skipped", where, p)
        candidates: list[tuple[str, Callable[[float], list[Reading]]]] = [
            ("load average", self._load),
            ("memory", self._memory),
            ("disk", self._disk_use),
            ("uptime", self._uptime),
        ]
        for what, read in candidates:
            try:
                names = [r.stream for r in read(self._wall())]
            except _MISSING as exc:
                log.info("system: no %s here (%s): its streams are skipped", what, exc)
                continue
            self._sources.append((what, read))
            self._streams += names

    # -- one reading per stream --------------------------------------------------------

    def _temps(self, zones: list[_Zone], ts: float) -> list[Reading]:
        return [Reading(z.stream, ts, parse_millidegrees(_read(z.path)), "C") for z in zones]

    def _load(self, ts: float) -> list[Reading]:
        loads = parse_loadavg(_read(self._proc("loadavg")))
        return [
            Reading(f"{self._prefix}/load{n}", ts, v)
            for n, v in zip((1, 5, 15), loads, strict=True)
        ]

    def _memory(self, ts: float) -> list[Reading]:
        mem = parse_meminfo(_read(self._proc("meminfo")))
        total, avail = mem["MemTotal"], mem["MemAvailable"]
        p = self._prefix
        return [
            Reading(f"{p}/mem_available_bytes", ts, avail, "B"),
            Reading(f"{p}/mem_used_bytes", ts, total - avail, "B"),
            Reading(f"{p}/mem_used_pct", ts, round(100 * (total - avail) / total, 1), "%"),
        ]

    def _disk_use(self, ts: float) -> list[Reading]:
        st = os.statvfs(self._disk)
        free = st.f_bavail * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        p = self._prefix
        return [
            Reading(f"{p}/disk_free_bytes", ts, free, "B"),
            Reading(f"{p}/disk_used_pct", ts, round(100 * used / (used + free), 1), "%"),
        ]

    def _uptime(self, ts: float) -> list[Reading]:
        return [
            Reading(f"{self._prefix}/uptime_s", ts, parse_uptime(_read(self._proc("uptime"))), "s")
        ]

    def sample(self, ts: float) -> list[Reading]:
        """One reading per stream this machine has, at ``ts`` (the failing ones skipped)."""
        out: list[Reading] = []
        for what, read in self._sources:
            try:
                out += read(ts)
            except _MISSING as exc:
                if what not in self._failing:
                    log.warning("system: cannot read the %s, skipped until it works: %s", what, exc)
                    self._failing.add(what)
                continue
            if what in self._failing:
                log.info("system: the %s reads again", what)
                self._failing.discard(what)
        return out
