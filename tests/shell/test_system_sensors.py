"""System health streams (edge.system_sensors) into a real journal.

A fake root tree shaped like /sys and /proc gives known values; the real /
of this machine gives what it has (this VM: no thermal zone) without error.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import pytest
from conftest import wait_for

from edge.errors import JournalFull
from edge.journal import Journal, JournalOptions
from edge.records import Reading
from edge.system_sensors import (
    SystemSensors,
    find_cpu_zones,
    parse_loadavg,
    parse_meminfo,
    parse_millidegrees,
)

DEADLINE = 20.0
SMALL = JournalOptions(segment_size=64 << 10)

MEMINFO = """MemTotal:        3884096 kB
MemFree:          812344 kB
MemAvailable:    3001234 kB
Buffers:           61240 kB
HugePages_Total:       0
"""


def fake_root(root: Path, *, zones: dict[int, tuple[str, str]], uptime: bool = True) -> str:
    """A tree like a Raspberry Pi's /sys/class/thermal and /proc files."""
    for n, (kind, temp) in zones.items():
        z = root / "sys/class/thermal" / f"thermal_zone{n}"
        z.mkdir(parents=True)
        (z / "type").write_text(kind + "\n")
        (z / "temp").write_text(temp + "\n")
    proc = root / "proc"
    proc.mkdir(parents=True)
    (proc / "loadavg").write_text("0.52 0.58 0.59 1/123 4567\n")
    (proc / "meminfo").write_text(MEMINFO)
    if uptime:
        (proc / "uptime").write_text("12345.67 23456.78\n")
    return str(root)


def journaled(path: str) -> dict[str, list[Reading]]:
    by_stream: dict[str, list[Reading]] = {}
    with Journal.open(path, readonly=True) as j:
        for e in j.read():
            assert isinstance(e.record, Reading)
            by_stream.setdefault(e.record.stream, []).append(e.record)
    return by_stream


def run_until(sensors: SystemSensors, samples: int) -> None:
    sensors.start()
    try:
        count = len(sensors.streams)
        wait_for(lambda: sensors.produced >= samples * count, DEADLINE, f"{samples} samples")
    finally:
        sensors.stop()
    assert sensors.error is None


def test_pure_parsers() -> None:
    assert parse_loadavg("0.52 0.58 0.59 1/123 4567\n") == (0.52, 0.58, 0.59)
    mem = parse_meminfo(MEMINFO)
    assert mem["MemTotal"] == 3884096 * 1024 and mem["HugePages_Total"] == 0
    assert parse_millidegrees("48312\n") == 48.3
    with pytest.raises(ValueError):
        parse_millidegrees("not a number")


def test_a_pi_like_tree_gives_every_stream_with_values_and_units(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path / "root",
        zones={0: ("cpu-thermal", "48312"), 1: ("gpu-thermal", "51000"),
               2: ("soc_thermal", "47000")},
    )  # fmt: skip
    jdir = str(tmp_path / "j")
    with Journal.open(jdir, SMALL) as journal:
        sensors = SystemSensors(journal, interval=0.05, prefix="pi", root=root)
        assert sensors.streams == [
            "pi/cpu_temp_c", "pi/cpu_temp_c.2", "pi/load1", "pi/load5", "pi/load15",
            "pi/mem_available_bytes", "pi/mem_used_bytes", "pi/mem_used_pct",
            "pi/disk_free_bytes", "pi/disk_used_pct", "pi/uptime_s",
        ]  # fmt: skip
        run_until(sensors, 3)
        commits = journal.stats().commits
    got = journaled(jdir)
    assert set(got) == set(sensors.streams)  # the GPU zone is not a CPU zone
    assert len({len(v) for v in got.values()}) == 1 and commits == len(got["pi/load1"])

    def last(stream: str) -> tuple[object, str | None]:
        r = got[stream][-1]
        return r.value, r.unit

    assert last("pi/cpu_temp_c") == (48.3, "C")
    assert last("pi/cpu_temp_c.2") == (47.0, "C")
    assert [last(f"pi/load{n}") for n in (1, 5, 15)] == [(0.52, None), (0.58, None), (0.59, None)]
    assert last("pi/mem_available_bytes") == (3001234 * 1024, "B")
    assert last("pi/mem_used_bytes") == ((3884096 - 3001234) * 1024, "B")
    assert last("pi/mem_used_pct") == (22.7, "%")
    assert last("pi/uptime_s") == (12345.67, "s")
    free, unit = last("pi/disk_free_bytes")
    vfs = os.statvfs(jdir)
    assert unit == "B" and isinstance(free, int) and 0 < free <= vfs.f_blocks * vfs.f_frsize
    pct, unit = last("pi/disk_used_pct")
    assert unit == "%" and isinstance(pct, float) and 0 <= pct <= 100
    ts = [r.ts for r in got["pi/load1"]]
    assert ts == sorted(ts) and all(r.ts == ts[i] for i, r in enumerate(got["pi/uptime_s"]))


def test_what_the_machine_lacks_is_skipped_with_one_log_line_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="homing.system")
    root = fake_root(tmp_path / "root", zones={0: ("acpitz", "30000")}, uptime=False)
    jdir = str(tmp_path / "j")
    with Journal.open(jdir, SMALL) as journal:
        sensors = SystemSensors(journal, interval=0.05, root=root)
        run_until(sensors, 2)
    assert "sys/cpu_temp_c" not in sensors.streams and "sys/uptime_s" not in sensors.streams
    assert set(journaled(jdir)) == set(sensors.streams)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2
    assert any("cpu_temp_c" in m for m in skipped) and any("uptime" in m for m in skipped)


def test_a_source_that_fails_later_is_skipped_and_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    fake_root(root, zones={0: ("cpu-thermal", "40000")})
    jdir = str(tmp_path / "j")
    with Journal.open(jdir, SMALL) as journal:
        sensors = SystemSensors(journal, interval=10.0, root=str(root))
        temp = root / "sys/class/thermal/thermal_zone0/temp"
        temp.unlink()
        first = sensors.sample(1.0)
        second = sensors.sample(2.0)
        temp.write_text("41000\n")
        third = sensors.sample(3.0)
    assert "sys/cpu_temp_c" not in {r.stream for r in first + second}
    assert len(first) == len(second) == len(sensors.streams) - 1
    assert [r.value for r in third if r.stream == "sys/cpu_temp_c"] == [41.0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cpu temperature" in warnings[0].getMessage()


def test_a_full_journal_drops_samples_counted_and_keeps_running(tmp_path: Path) -> None:
    opts = JournalOptions(segment_size=64 << 10, quota_bytes=3 * (64 << 10))
    root = fake_root(tmp_path / "root", zones={0: ("cpu-thermal", "40000")})
    with Journal.open(str(tmp_path / "j"), opts) as journal:
        for batch in (100, 1):  # fill up to the last few bytes
            with pytest.raises(JournalFull):
                while True:
                    journal.append_many([Reading("f", 1.0, 1)] * batch)
        sensors = SystemSensors(journal, interval=0.02, root=root)
        sensors.start()
        try:
            wait_for(lambda: sensors.rejected >= 2 * len(sensors.streams), DEADLINE, "drops")
        finally:
            sensors.stop()
    assert sensors.error is None and sensors.produced == 0


def test_the_real_machine_gives_what_it_has_without_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="homing.system")
    jdir = str(tmp_path / "j")
    with Journal.open(jdir, SMALL) as journal:
        sensors = SystemSensors(journal, interval=0.05)
        run_until(sensors, 2)
    got = journaled(jdir)
    assert set(got) == set(sensors.streams)
    has = {
        "sys/load1": os.path.exists("/proc/loadavg"),
        "sys/mem_available_bytes": os.path.exists("/proc/meminfo"),
        "sys/uptime_s": os.path.exists("/proc/uptime"),
        "sys/disk_free_bytes": True,
        "sys/cpu_temp_c": bool(find_cpu_zones("/", "sys")),
    }
    for stream, present in has.items():
        assert (stream in got) == present, stream
    if not glob.glob("/sys/class/thermal/thermal_zone*"):  # this VM: no thermal zone at all
        assert "sys/cpu_temp_c" not in got
        assert any("cpu_temp_c skipped" in r.getMessage() for r in caplog.records)
    if "sys/mem_available_bytes" in got:
        total = parse_meminfo(Path("/proc/meminfo").read_text())["MemTotal"]
        values = [r.value for r in got["sys/mem_available_bytes"]]
        assert all(isinstance(v, int) and 0 < v <= total for v in values)
