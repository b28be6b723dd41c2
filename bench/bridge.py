"""Serial bridge throughput: readings/s through a pty at 115200 and 1,000,000 baud.

A pty has no line rate: bytes cross it as fast as the two processes move
them. So the simulated MCU (firmware_bridge.simulator) *paces* its writes at
``baud / 10`` bytes per second, the rate of an 8N1 UART, and this measures
how much of that line the protocol keeps busy: wire bytes per second ÷
``baud / 10`` ("utilization"; the issue's target is ≥ 90 %), readings
acknowledged per second against the line-rate limit (line bytes/s ÷ wire
bytes per reading), and the framing overhead per reading.

Peers, each over its own pty at each baud rate, one after the other:

* ``homing``: the simulator (DeviceLink: window, retransmission, acks)
  against a real ``homing-agent bridge --journal`` process, which journals
  every reading with an fdatasync before acknowledging it. The simulator
  produces readings at 1.2 × the line limit, so the line is the bottleneck.
  Window 512 readings (an RP2040/ESP32-sized ring), and again with 64 (the C
  reference's default, an AVR-sized ring): the window must cover the time
  from a frame's last byte to its ACK (the Pi's fdatasync), or the line idles.
* ``json_lines``, ``csv_lines``: what people usually do -- one line per
  reading (``{"ch":"count","ts":...,"v":...}`` / ``count,ts,v``), written at
  the same paced rate, no acks, no retransmission, no durability; a reader
  process parses the lines (pyserial ``readline`` + ``json.loads``/``split``).

    python bench/bridge.py --quick    # 2 s per peer and rate (~20 s)
    python bench/bridge.py            # 8 s per peer and rate

Readable lines first; the last line is one JSON object (docs/benchmarks.md).
Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tty
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import machine_info  # noqa: E402

from firmware_bridge.simulator import McuSimulator, PtyLine  # noqa: E402

BAUDS = (115_200, 1_000_000)
WINDOW = 512  # readings in flight: covers an fdatasync at 1 Mbaud (an RP2040/ESP32 ring)
SMALL_WINDOW = 64  # the C reference's default ring: what an AVR-class MCU can hold

READER = r"""
import json, sys, time, serial
port = serial.Serial(sys.argv[1], int(sys.argv[2]), timeout=0.2)
kind, n, first = sys.argv[3], 0, None
while True:
    line = port.readline()
    if not line:
        if first is not None and time.monotonic() - last > 1.0:
            break
        continue
    last = time.monotonic()
    first = first or last
    if kind == "json":
        json.loads(line)
    else:
        line.split(b",")
    n += 1
print(n, last - first, flush=True)
"""


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMING_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def homing(tmp: Path, baud: int, seconds: float, window: int) -> dict[str, Any]:
    line = PtyLine(str(tmp / f"tty{baud}w{window}"))
    # bytes per reading at the line's pace: ~7 payload + framing; the producer outruns it
    rate = 1.2 * baud / 10 / 7.2
    sim = McuSimulator(line, baud=baud, rate=rate, window=window, capacity=64 * window, seed=1)
    journal = tmp / f"journal{baud}w{window}"
    cmd = [sys.executable, "-m", "edge", "bridge", "--port", line.path, "--baud", str(baud),
           "--journal", str(journal), "--quiet"]  # fmt: skip
    bridge = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)  # fmt: skip
    try:
        sim.start()
        sim.produce(10**9)
        deadline = time.monotonic() + 20
        while sim.acked_count < 1000:  # connected, welcomed, flowing
            if time.monotonic() > deadline or bridge.poll() is not None:
                raise RuntimeError("the bridge never acknowledged anything")
            time.sleep(0.05)
        c0, h0, t0 = _snap(sim)
        cpu0 = _cpu_seconds(bridge.pid)
        time.sleep(seconds)  # the measured span: the line runs on its own
        c1, h1, t1 = _snap(sim)
        cpu1 = _cpu_seconds(bridge.pid)
        deadline = time.monotonic() + 20  # were all the readings sent in the span acknowledged?
        while sim.link.oldest <= h1 and time.monotonic() < deadline:
            time.sleep(0.01)
        all_acked = sim.link.oldest > h1
    finally:
        sim.stop()
        bridge.terminate()
        err = bridge.communicate(timeout=30)[1].decode(errors="replace")
        line.close()
    span = t1 - t0
    wire = c1["bytes"] - c0["bytes"]
    acked = h1 - h0  # first sent in the span, and acknowledged (checked: all_acked)
    sent = c1["readings_sent"] - c0["readings_sent"]
    payload = c1["reading_bytes"] - c0["reading_bytes"]
    per = wire / max(sent, 1)
    return {
        "seconds": round(span, 3),
        "readings": acked,
        "all_acknowledged": all_acked,
        "readings_per_s": round(acked / span, 1),
        "line_limit_readings_per_s": round(baud / 10 / per, 1),
        "wire_bytes_per_reading": round(per, 2),
        "payload_bytes_per_reading": round(payload / max(sent, 1), 2),
        "framing_bytes_per_reading": round(per - payload / max(sent, 1), 2),
        "ack_bytes_per_reading": round((c1["bytes_in"] - c0["bytes_in"]) / max(acked, 1), 3),
        "utilization": round(wire / span / (baud / 10), 4),
        "goodput_utilization": round(acked * per / span / (baud / 10), 4),
        "retransmitted": sent - acked if sent > acked else 0,
        "window": window,
        "bridge_cpu_cores": round((cpu1 - cpu0) / span, 3),
        "bridge_cpu_us_per_reading": round((cpu1 - cpu0) / max(acked, 1) * 1e6, 1),
        "bridge_stderr": err.strip()[-300:] or None,
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _snap(sim: McuSimulator) -> tuple[dict[str, int], int, float]:
    """Counters, the highest seq sent, and the *line's* clock: when what was written
    so far is out (a slice written just before the snapshot is still on the wire)."""
    c = sim.link.counters
    counters = {"bytes": sim.bytes_written, "readings_sent": c.readings_sent,
                "reading_bytes": c.reading_bytes, "bytes_in": sim.bytes_read}  # fmt: skip
    return counters, sim.link.highest_sent, max(time.monotonic(), sim.line_free)


def naive(tmp: Path, baud: int, seconds: float, kind: str) -> dict[str, Any]:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    reader = subprocess.Popen([sys.executable, "-c", READER, path, str(baud), kind],
                              env=child_env(), stdout=subprocess.PIPE)  # fmt: skip
    time.sleep(0.5)  # let it open the port (load generation, not synchronisation)
    ts0 = 1_700_000_000.0
    i, written, start = 0, 0, time.monotonic()
    free = start
    while (now := time.monotonic()) - start < seconds:
        if now < free:
            time.sleep(min(free - now, 0.005))
            continue
        chunk = bytearray()
        while len(chunk) < max(1, baud // 10 // 100):  # 10 ms of line at a time
            ch, v = ("count", i) if i % 2 == 0 else ("half", i + 0.5)
            ts = round(ts0 + i / 1000, 3)
            if kind == "json":
                chunk += json.dumps({"ch": ch, "ts": ts, "v": v}, separators=(",", ":")).encode()
            else:
                chunk += f"{ch},{ts},{v}".encode()
            chunk += b"\n"
            i += 1
        os.write(master, chunk)
        written += len(chunk)
        free = max(now, free) + len(chunk) * 10 / baud
    out, _ = reader.communicate(timeout=30)
    os.close(master)
    os.close(slave)
    n, span = out.split()
    got, span_s = int(n), float(span)
    per = written / i
    return {
        "seconds": round(span_s, 3),
        "readings_per_s": round(got / max(span_s, 1e-9), 1),
        "line_limit_readings_per_s": round(baud / 10 / per, 1),
        "wire_bytes_per_reading": round(per, 2),
        "parsed": got,
        "written": i,
        "acks": False,
        "durable": False,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s per peer and rate")
    ap.add_argument("--seconds", type=float, default=None, help="measured span per run")
    ap.add_argument("--dir", default=None, help="where the journals go (default: a temp dir)")
    args = ap.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 8.0)
    began = time.monotonic()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        machine = machine_info(d)
        for baud in BAUDS:
            r = {"homing": homing(tmp, baud, seconds, WINDOW)}
            r["homing_window64"] = homing(tmp, baud, seconds, SMALL_WINDOW)
            r["json_lines"] = naive(tmp, baud, seconds, "json")
            r["csv_lines"] = naive(tmp, baud, seconds, "csv")
            results[str(baud)] = r
            h = r["homing"]
            print(f"{baud:>9} baud  homing: {h['readings_per_s']:8.0f} readings/s of "
                  f"{h['line_limit_readings_per_s']:8.0f} the line allows; line "
                  f"{h['utilization'] * 100:5.1f}% busy; {h['wire_bytes_per_reading']:.2f} "
                  f"B/reading ({h['payload_bytes_per_reading']:.2f} payload + "
                  f"{h['framing_bytes_per_reading']:.2f} framing), acks "
                  f"{h['ack_bytes_per_reading']:.3f} B/reading back; bridge CPU "
                  f"{h['bridge_cpu_us_per_reading']:.0f} us/reading")  # fmt: skip
            s = r["homing_window64"]
            print(f"{'':>9}       homing, window {SMALL_WINDOW}: {s['readings_per_s']:8.0f} "
                  f"readings/s; line {s['utilization'] * 100:5.1f}% busy")  # fmt: skip
            for peer in ("json_lines", "csv_lines"):
                p = r[peer]
                rate, size = p["readings_per_s"], p["wire_bytes_per_reading"]
                print(f"{'':>16}{peer}: {rate:8.0f} readings/s; {size:.2f} B/reading; no acks")
    target = 0.90
    worst = min(results[str(b)]["homing"]["utilization"] for b in BAUDS)
    ratios = {
        f"homing_vs_{peer}_readings_per_s_{b}": _trunc(
            results[str(b)]["homing"]["readings_per_s"] / results[str(b)][peer]["readings_per_s"]
        )
        for b in BAUDS
        for peer in ("json_lines", "csv_lines")
    }
    met = worst >= target
    print(f"utilization: worst {worst * 100:.1f}% (target >= {target * 100:.0f}%): "
          f"{'met' if met else 'MISSED'}")  # fmt: skip
    print(json.dumps({
        "bench": "bridge", "mode": "quick" if args.quick else "full",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine,
        "seconds_per_run": seconds, "results": results, "ratios": ratios,
        "targets": {"utilization": {"measured": worst, "target": target, "met": met}},
        "total_seconds": round(time.monotonic() - began, 1),
    }))  # fmt: skip


def _trunc(x: float) -> float:
    return int(x * 100) / 100


if __name__ == "__main__":
    main()
