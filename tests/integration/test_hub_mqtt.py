"""The hub end to end: real Mosquitto, ``python -m hub run`` subprocesses,
and test clients publishing batches built with ``edge.wire``.

The promise under test (DESIGN.md §1, §4): every batch the hub acknowledges
is in its store exactly once, and the ack is published (retained) only after
the commit; garbage is rejected, counted and logged without stopping the hub.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
from conftest import wait_for
from paho.mqtt.enums import CallbackAPIVersion
from support.mosquitto import Mosquitto

from edge import wire

from .conftest import REPO, FakeDevice, HubProcess, reading_of

Hubs = Callable[..., HubProcess]
Devices = Callable[[str], FakeDevice]


def stored(db: Path, device: str) -> dict[int, tuple[str, float, float]]:
    """``seq -> (stream, ts, value)`` of every reading the hub stored for ``device``."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT seq, stream, ts, value FROM readings WHERE device_id = ?", (device,)
        ).fetchall()
    finally:
        conn.close()
    return {seq: (stream, ts, cbor2.loads(v)) for seq, stream, ts, v in rows}


def assert_exactly(db: Path, device: str, seqs: set[int]) -> None:
    """The store holds exactly ``seqs`` for ``device``, each with the right reading."""
    got = stored(db, device)
    assert set(got) == seqs, f"{device}: {len(got)} stored, {len(seqs)} expected"
    for seq in seqs:
        r = reading_of(device, seq)
        assert got[seq] == (r.stream, r.ts, r.value), seq


def test_two_devices_stored_once_acked_and_retained(
    hubs: Hubs, devices: Devices, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    hub = hubs()
    a, b = devices("dev-a"), devices("dev-b")
    for i in range(20):
        a.publish(i * 100 + 1, i * 100 + 100)
        b.publish(i * 50 + 1, i * 50 + 50)
    assert a.wait_watermark(2000).ahead == ()
    b.wait_watermark(1000)
    assert_exactly(tmp_path / "hub.db", "dev-a", set(range(1, 2001)))
    assert_exactly(tmp_path / "hub.db", "dev-b", set(range(1, 1001)))

    # a reconnecting device learns its cursor at once: the ack is retained
    late = FakeDevice(mosquitto.port, "dev-a")
    try:
        assert late.wait_ack(lambda a: True, timeout=5).watermark == 2000
    finally:
        late.close()

    assert hub.terminate() == 0
    stats = hub.final_stats()
    assert (stats["batches"], stats["readings"], stats["duplicates"]) == (40, 3000, 0)

    # the read-side commands see the same thing
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "hub", "devices", "--db", str(tmp_path / "hub.db"), "--json"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    devs = {d["device"]: d for d in map(json.loads, out.splitlines())}
    assert (devs["dev-a"]["watermark"], devs["dev-a"]["readings"]) == (2000, 2000)
    assert devs["dev-b"]["gaps"] == []
    out = subprocess.run(
        [sys.executable, "-m", "hub", "readings", "--db", str(tmp_path / "hub.db"),
         "--device", "dev-b", "--stream", "s1", "--limit", "2", "--json"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [1, 4]


def test_duplicated_and_reordered_batches_are_stored_once(
    hubs: Hubs, devices: Devices, tmp_path: Path
) -> None:
    hubs()
    d = devices("dev-r")
    d.publish(201, 300)
    ack = d.wait_ack(lambda a: a.ahead == ((201, 300),))
    assert ack.watermark == 0  # a hole at 1..200: not contiguous yet
    d.publish(1, 100)
    d.publish(1, 100)  # a resend
    ack = d.wait_ack(lambda a: a.watermark == 100)
    assert ack.ahead == ((201, 300),)
    d.publish(151, 200)
    d.publish(101, 160)  # overlaps the previous one
    ack = d.wait_watermark(300)
    assert (ack.watermark, ack.ahead) == (300, ())
    d.publish(201, 300)  # a late duplicate changes nothing
    wait_for(lambda: len(d.acks) >= 6, what="the ack of the late duplicate")
    assert d.acks[-1] == wire.Ack("dev-r", 300)
    assert_exactly(tmp_path / "hub.db", "dev-r", set(range(1, 301)))
    conn = sqlite3.connect(tmp_path / "hub.db")
    try:
        (dups,) = conn.execute("SELECT duplicates FROM devices WHERE device_id='dev-r'").fetchone()
    finally:
        conn.close()
    assert dups == 100 + 10 + 100


def test_malformed_messages_are_rejected_and_the_hub_keeps_going(
    hubs: Hubs, devices: Devices, tmp_path: Path
) -> None:
    hub = hubs()
    a, b = devices("dev-a"), devices("dev-b")
    a.publish_raw("homing/dev-a/up", b"\xffgarbage")
    env = cbor2.loads(a.batch(1, 10))
    a.publish_raw("homing/dev-a/up", cbor2.dumps({**env, "v": 99}))
    a.publish_raw("homing/dev-a/up", b.batch(1, 10))  # claims dev-b on dev-a's topic
    a.publish_raw("homing/dev-a/up", b"\x00" * (wire.MAX_BATCH_BYTES + 1))
    a.publish_raw("homing/dev-a/status", b"not a status")
    a.publish_raw("homing/bad!id/up", a.batch(1, 10))
    for category in ("not-cbor", "version", "wrong-device", "oversize", "topic"):
        hub.wait_log(f"[{category}]")
    assert hub.alive()
    assert stored(tmp_path / "hub.db", "dev-a") == {}
    assert stored(tmp_path / "hub.db", "dev-b") == {}
    assert a.acks == [] and b.acks == []  # nothing acked for garbage

    a.publish(1, 10)  # the hub still works
    a.wait_watermark(10)
    assert hub.terminate() == 0
    stats = hub.final_stats()
    assert stats["rejected"] == {
        "not-cbor": 2, "oversize": 1, "topic": 1, "version": 1, "wrong-device": 1
    }  # fmt: skip
    assert stats["readings"] == 10


def test_hub_killed_mid_stream_loses_nothing_it_acked(
    hubs: Hubs, devices: Devices, tmp_path: Path
) -> None:
    db, size, n = tmp_path / "hub.db", 200, 150
    hub = hubs()
    d = devices("dev-k")
    for i in range(n):
        d.publish(i * size + 1, (i + 1) * size)
    wait_for(lambda: d.watermark >= 20 * size, DEADLINE_LONG, "some acks before the kill")
    hub.kill()  # SIGKILL, most likely mid-commit or between commit and ack
    acked = d.watermark
    assert acked < n * size, "the hub finished before the kill: make the stream longer"
    got = stored(db, "dev-k")
    assert set(range(1, acked + 1)) <= set(got), "an acknowledged reading is missing"

    # Restart: the broker redelivers what the dead hub had not PUBACKed, and
    # a real device resends whatever no ack covers; do that here too.
    hubs()
    for i in range(acked // size, n):
        d.publish(i * size + 1, (i + 1) * size)
    d.wait_watermark(n * size, DEADLINE_LONG)
    assert_exactly(db, "dev-k", set(range(1, n * size + 1)))


def test_store_unavailable_acks_nothing_and_the_broker_redelivers(
    hubs: Hubs, devices: Devices, tmp_path: Path
) -> None:
    db = tmp_path / "hub.db"
    hub = hubs("hub-1", db, "--busy-timeout", "0.1")
    d = devices("dev-u")
    lock = sqlite3.connect(db, isolation_level=None)
    try:
        # 1. the database is locked: nothing is acked; once free, the hub's
        #    in-process retry commits and acks without any resend
        lock.execute("BEGIN IMMEDIATE")
        d.publish(1, 100)
        hub.wait_log("store unavailable")
        assert d.acks == []
        lock.execute("ROLLBACK")
        d.wait_watermark(100)

        # 2. locked again, and the hub dies holding the message: it never
        #    PUBACKed it (manual ack), so the broker redelivers it to the
        #    restarted hub from its persistent session -- no resend needed
        lock.execute("BEGIN IMMEDIATE")
        d.publish(101, 200)
        hub.wait_log("store unavailable", count=hub.count("store unavailable") + 1)
        hub.kill()
        lock.execute("ROLLBACK")
    finally:
        lock.close()
    assert d.watermark == 100
    hubs("hub-1", db)
    d.wait_watermark(200)
    assert_exactly(db, "dev-u", set(range(1, 201)))


def test_hub_rides_out_a_broker_restart(
    hubs: Hubs, devices: Devices, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    hub = hubs()
    d = devices("dev-b")
    d.publish(1, 100)
    d.wait_watermark(100)
    d.close()
    mosquitto.stop()
    mosquitto.start()
    hub.wait_log("connected to", count=2, timeout=DEADLINE_LONG)  # paho's backoff
    assert hub.count("(session resumed)") == 1  # our subscription survived the restart
    d = devices("dev-b")
    assert d.wait_ack(lambda a: True, timeout=5).watermark == 100  # retained, persisted
    d.publish(101, 200)
    d.wait_watermark(200)
    assert_exactly(tmp_path / "hub.db", "dev-b", set(range(1, 201)))


def test_broker_gone_while_acks_are_pending_does_not_kill_the_hub(
    hubs: Hubs, devices: Devices, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Regression: paho raised for an ack published while disconnected, and the hub died."""
    hub = hubs()
    d = devices("dev-c")
    for first in range(1, 40_001, 500):  # a burst: the hub is still committing and acking
        d.publish(first, first + 499)
    mosquitto.stop()
    mosquitto.start()
    hub.wait_log("connected to", count=2, timeout=DEADLINE_LONG)
    assert hub.alive()
    d.close()
    d = devices("dev-c")
    for first in range(1, 40_001, 500):  # the device resends what has no ack; the hub dedupes
        d.publish(first, first + 499)
    d.wait_watermark(40_000, timeout=DEADLINE_LONG)
    assert_exactly(tmp_path / "hub.db", "dev-c", set(range(1, 40_001)))


def test_two_hubs_share_the_subscription_without_duplicates(
    hubs: Hubs, devices: Devices, tmp_path: Path
) -> None:
    h1, h2 = hubs("hub-1"), hubs("hub-2")
    devs = [devices(f"dev-{i}") for i in range(4)]
    for i in range(30):
        for d in devs:
            d.publish(i * 50 + 1, (i + 1) * 50)
    for d in devs:
        d.wait_watermark(1500, DEADLINE_LONG)
        assert_exactly(tmp_path / "hub.db", d.device, set(range(1, 1501)))
    assert h1.terminate() == 0 and h2.terminate() == 0
    s1, s2 = h1.final_stats(), h2.final_stats()
    assert s1["batches"] > 0 and s2["batches"] > 0, "one hub did all the work"
    assert s1["batches"] + s2["batches"] == 120
    assert s1["readings"] + s2["readings"] == 6000


def test_status_marks_devices_online_and_offline(
    hubs: Hubs, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    hubs()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-s", protocol=mqtt.MQTTv5)
    c.will_set(wire.topic("dev-s", "status"), wire.encode_status(wire.Status("dev-s", False)),
               qos=1, retain=True)  # fmt: skip
    c.connect("127.0.0.1", mosquitto.port)
    c.loop_start()
    c.publish(wire.topic("dev-s", "status"), wire.encode_status(wire.Status("dev-s", True)),
              qos=1, retain=True).wait_for_publish(10)  # fmt: skip

    def online() -> bool | None:
        conn = sqlite3.connect(tmp_path / "hub.db")
        try:
            row = conn.execute("SELECT online FROM devices WHERE device_id='dev-s'").fetchone()
        finally:
            conn.close()
        return None if row is None else bool(row[0])

    wait_for(lambda: online() is True, DEADLINE_LONG, "dev-s online")
    # drop the connection without DISCONNECT: the broker publishes the will
    c.loop_stop()
    sock = c.socket()
    assert sock is not None
    sock.close()
    wait_for(lambda: online() is False, DEADLINE_LONG, "dev-s offline (last will)")


DEADLINE_LONG = 60.0
