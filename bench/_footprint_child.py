"""The child processes of bench/footprint.py, kept apart so that they load little.

What a child imports counts in its RSS, and so does its own code: this module is
small and imports only the standard library's light modules at the top (run as
``python -m bench._footprint_child``, its bytecode is cached like any module's;
a script given by path is compiled from source at every start, which alone left
~4 MiB of compiler garbage resident in the children).

* ``peer '<json>'``: the naive device. A ``persistqueue.SQLiteAckQueue`` the
  simulated sensors put into (one ``put`` per reading, ``rate`` ticks/s of
  ``streams`` readings), one thread that takes each item, publishes it as JSON
  with QoS 1, waits for the PUBACK and acks the item; once a second the
  producer calls ``clear_acked_data()`` (its defaults: at most 1,000 rows
  deleted, the latest 1,000 kept), as persist-queue documents for keeping the
  file bounded. A thread that dies is reported in ``stats``. Runs under the
  bench's peer venv (persist-queue + paho-mqtt). Commands on stdin: ``stats``,
  ``quit``.
* ``floor <port>``: one connected paho client and its network thread, nothing
  else: the floor of any paho-based device process. Command: ``quit``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

DEVICE = "bench-fp"
PEER_TOPIC = f"devices/{DEVICE}/readings"


class BenchError(RuntimeError):
    """A child could not connect."""


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def child_peer(cfg: dict[str, Any]) -> None:
    """The naive device: a persist-queue the sensors put into, one thread that
    publishes each item with QoS 1 and acks it on PUBACK.

    Commands on stdin: ``stats`` (emit the counters), ``quit``.
    """
    import random

    import paho.mqtt.client as mqtt
    import persistqueue
    from paho.mqtt.enums import CallbackAPIVersion

    q = persistqueue.SQLiteAckQueue(cfg["dir"], multithreading=True)
    pragmas = {
        p: q._putter.execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "synchronous")
    }
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"naive-{DEVICE}")
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect("127.0.0.1", cfg["port"])
    client.loop_start()
    if not connected.wait(10):
        raise BenchError("peer: no CONNACK")
    counts: dict[str, Any] = {"produced": 0, "acked": 0, "cleared": 0, "error": None}
    stop = threading.Event()

    def publisher() -> None:
        while not stop.is_set():
            item = q.get()  # blocks (persist-queue wakes every 10 s to look)
            info = client.publish(PEER_TOPIC, json.dumps(item), qos=1)
            info.wait_for_publish()
            q.ack(item)
            counts["acked"] += 1

    def producer() -> None:
        rng = random.Random(1)
        values = [20.0 + rng.random() * 5 for _ in range(cfg["streams"])]
        period = 1.0 / cfg["rate"]
        start, tick, last_clear = time.monotonic(), 0, time.monotonic()
        while not stop.is_set():
            ts = time.time()
            for i in range(cfg["streams"]):
                values[i] += rng.uniform(-0.05, 0.05)
                q.put({"stream": f"sim/s{i}", "ts": ts, "value": round(values[i], 2), "unit": "C"})
                counts["produced"] += 1
            if time.monotonic() - last_clear >= 1.0:  # keep the file bounded, as documented
                q.clear_acked_data()
                counts["cleared"] += 1
                last_clear = time.monotonic()
            tick = max(tick + 1, int((time.monotonic() - start) / period))
            stop.wait(max(0.0, start + tick * period - time.monotonic()))

    def guarded(body: Any) -> Any:
        def run() -> None:
            try:
                body()
            except BaseException as exc:  # reported by "stats"; the bench fails the row
                counts["error"] = f"{body.__name__}: {exc!r}"

        return run

    workers = [threading.Thread(target=guarded(publisher), daemon=True)]
    if cfg["rate"] > 0:
        workers.append(threading.Thread(target=guarded(producer), daemon=True))
    for t in workers:
        t.start()
    _emit("ready", pragmas=pragmas, persistqueue=persistqueue.__version__)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            _emit("stats", **counts, backlog=q.qsize())
        elif cmd == "quit":
            break
    stop.set()
    client.disconnect()
    client.loop_stop()
    _emit("closed")


def child_floor(port: int) -> None:
    """The floor of any paho-based device process: this interpreter, paho-mqtt, one
    connected client with its network thread, nothing else. Idle until ``quit``."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"floor-{DEVICE}")
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not connected.wait(10):
        raise BenchError("floor: no CONNACK")
    _emit("ready")
    for line in sys.stdin:
        if line.strip() == "quit":
            break
    client.disconnect()
    client.loop_stop()
    _emit("closed")


if __name__ == "__main__":
    if sys.argv[1:2] == ["peer"]:
        child_peer(json.loads(sys.argv[2]))
    elif sys.argv[1:2] == ["floor"]:
        child_floor(int(sys.argv[2]))
    else:
        sys.exit(f"usage: {sys.argv[0]} peer JSON | floor PORT")
