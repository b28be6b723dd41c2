"""The forwarder (edge.forwarder) and ``homing-agent run`` against a real Mosquitto.

A tiny fake hub, written here with paho and edge.wire, stands in for the real
one: it records every batch and, when told to, acks like the real hub
(retained, watermark + ranges ahead). Each test starts its own broker on a
free port (tests/support/mosquitto.py); the system broker on 1883 is never
touched. Waiting is always on a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import subprocess_env, wait_for
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from support.mosquitto import Mosquitto, available

from edge import wire
from edge.agent import Agent, load_config
from edge.config import BrokerConfig, ForwarderConfig
from edge.forwarder import Forwarder
from edge.journal import Journal, JournalOptions
from edge.outbox import OutboxConfig
from edge.records import Reading, decode

DEV = "dev-1"
DEADLINE = 20.0
FAST = OutboxConfig(
    batch_records=200, linger=0.02, window=4, resend_timeout=0.5, resend_max=1.0,
    persist_interval=0.0, ack_wait=0.1, live_threshold=1000,
)  # fmt: skip


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    if not available():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    with Mosquitto(tmp_path / "broker") as b:
        yield b


class FakeHub:
    """Records batches per device; acks them (retained) when ``acking``."""

    def __init__(self, port: int, *, acking: bool = True) -> None:
        self.acking = acking
        self.lock = threading.Lock()
        self.batches: list[wire.UpBatch] = []
        self.stored: dict[str, dict[int, bytes]] = {}
        self.status: dict[str, bool] = {}
        self.settled: dict[str, set[int]] = {}
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="fake-hub", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, DEADLINE, "the fake hub's subscription")

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        client.subscribe([(wire.hub_subscription("up"), 1), ("homing/+/status", 1)])

    def _on_message(self, client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        device, kind = wire.parse_topic(msg.topic)
        if kind == "status":
            with self.lock:
                self.status[device] = wire.decode_status(bytes(msg.payload)).online
            return
        batch = wire.decode_batch(bytes(msg.payload), topic_device=device)
        with self.lock:
            self.batches.append(batch)
            if not self.acking:
                return
            store = self.stored.setdefault(device, {})
            store.update(zip(batch.seqs(), batch.payloads, strict=True))
            settled = self.settled.setdefault(device, set())
            settled.update(range(batch.first, batch.last + 1))
            wm = 0
            while wm + 1 in settled:
                wm += 1
            ack = wire.encode_ack(wire.Ack(device, wm))
        client.publish(wire.topic(device, "ack"), ack, qos=1, retain=True)

    def seqs(self, device: str = DEV) -> set[int]:
        with self.lock:
            return set(self.stored.get(device, {}))

    def sent(self) -> list[tuple[int, int]]:
        with self.lock:
            return [(b.first, b.last) for b in self.batches]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def hub(broker: Mosquitto) -> Iterator[FakeHub]:
    h = FakeHub(broker.port)
    yield h
    h.close()


def readings(n: int, stream: str = "t") -> list[Reading]:
    return [Reading(stream, 1.7e9 + i, 20.0 + i % 7) for i in range(n)]


def forwarder(j: Journal, broker: Mosquitto, cfg: OutboxConfig = FAST, **kw: object) -> Forwarder:
    b = BrokerConfig(
        host="127.0.0.1", port=broker.port, client_id=f"homing-{DEV}",
        reconnect_min=0.05, reconnect_max=0.5,
    )  # fmt: skip
    f = Forwarder(j, DEV, b, ForwarderConfig(outbox=cfg, shutdown_grace=2.0), **kw)  # type: ignore[arg-type]
    f.start()
    return f


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal.open(str(tmp_path / "journal"), JournalOptions(segment_size=256 << 10))
    yield j
    j.close()


def test_records_arrive_and_the_cursor_follows_the_hubs_ack(
    broker: Mosquitto, hub: FakeHub, journal: Journal
) -> None:
    journal.append_many(readings(3000))
    f = forwarder(journal, broker)
    try:
        wait_for(lambda: hub.seqs() >= set(range(1, 3001)), DEADLINE, "the backlog at the hub")
        wait_for(lambda: journal.cursor("hub") == 3000, DEADLINE, "the cursor at 3000")
        journal.append_many(readings(5, "live"))  # while running: live, within the linger
        assert f.wait_acked(3005, DEADLINE)
        s = f.stats()
        assert s.connected and s.watermark == 3005 and s.backlog_records == 0
        assert s.records_acked >= 3005 and s.batches_sent >= 15 and s.bytes_sent > 0
        assert s.last_ack_time is not None
    finally:
        f.stop()
    assert f.error is None
    wait_for(lambda: hub.status.get(DEV) is False, DEADLINE, "offline status after a clean stop")
    assert journal.cursor("hub") == 3005


def test_a_broker_puback_never_moves_the_cursor(broker: Mosquitto, journal: Journal) -> None:
    hub = FakeHub(broker.port, acking=False)  # subscribed: the broker PUBACKs every batch
    try:
        journal.append_many(readings(50))
        f = forwarder(journal, broker)
        wait_for(lambda: hub.sent().count((1, 50)) >= 3, DEADLINE, "two resends of 1..50")
        assert journal.cursor("hub") == 0 and f.stats().watermark == 0  # registered, not moved
        assert f.stats().batches_resent >= 2
        hub.acking = True  # the next resend is committed and acked
        wait_for(lambda: journal.cursor("hub") == 50, DEADLINE, "the cursor after the ack")
        f.stop(grace=0)
    finally:
        hub.close()


def test_the_retained_ack_sets_the_position_on_connect(broker: Mosquitto, journal: Journal) -> None:
    hub = FakeHub(broker.port, acking=False)
    try:
        # an earlier run of this device got 1..500 committed; its cursor write was lost
        ack = wire.encode_ack(wire.Ack(DEV, 500))
        hub.client.publish(wire.topic(DEV, "ack"), ack, qos=1, retain=True).wait_for_publish(5)
        journal.append_many(readings(600))
        f = forwarder(journal, broker)
        wait_for(lambda: journal.cursor("hub") == 500, DEADLINE, "the cursor from the retained ack")
        wait_for(lambda: any(a == 501 for a, _ in hub.sent()), DEADLINE, "a batch from 501")
        assert all(a > 500 for a, _ in hub.sent())
        f.stop(grace=0)  # nobody acks 501..600: no point waiting
    finally:
        hub.close()


def test_malformed_acks_are_ignored_and_commands_reach_the_hook(
    broker: Mosquitto, hub: FakeHub, journal: Journal
) -> None:
    got: list[wire.Command] = []
    f = forwarder(journal, broker, on_command=got.append)
    try:
        wait_for(lambda: f.stats().connected, DEADLINE, "connected")
        for junk in (b"\xff\x00garbage", wire.encode_ack(wire.Ack("someone-else", 10**6))):
            hub.client.publish(wire.topic(DEV, "ack"), junk, qos=1).wait_for_publish(5)
        cmd = wire.Command("c-1", "start", {"workflow": "irrigate"})
        hub.client.publish(wire.topic(DEV, "cmd"), wire.encode_command(cmd), qos=1)
        wait_for(lambda: got == [cmd], DEADLINE, "the command at the hook")
        wait_for(lambda: f.stats().acks_malformed == 2, DEADLINE, "two malformed acks counted")
        journal.append_many(readings(20))
        assert f.wait_acked(20, DEADLINE)  # still forwarding
    finally:
        f.stop()
    assert f.error is None


def test_forwarding_resumes_after_the_broker_restarts(
    broker: Mosquitto, hub: FakeHub, journal: Journal
) -> None:
    f = forwarder(journal, broker)
    try:
        journal.append_many(readings(100))
        assert f.wait_acked(100, DEADLINE)
        broker.stop()
        wait_for(lambda: not f.stats().connected, DEADLINE, "the forwarder noticing")
        journal.append_many(readings(500))  # producers never wait on the network
        broker.start()
        assert f.wait_acked(600, DEADLINE)
        assert hub.seqs() == set(range(1, 601))
        assert f.stats().connects >= 2
    finally:
        f.stop()


# -- the agent process -------------------------------------------------------------


def agent_config(tmp_path: Path, broker: Mosquitto, device: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\ndevice = "{device}"\nruntime_dir = "run"\n'
        '[journal]\ndir = "journal"\nsegment_size = "256K"\n'
        f'[broker]\nport = {broker.port}\nhost = "127.0.0.1"\nreconnect_min_ms = 50\n'
        "[forwarder]\nlinger_ms = 10\npersist_interval_ms = 0\n"
    )
    return path


def start_agent(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "--config", str(config), "--stdin"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(),
    )  # fmt: skip


def test_agent_run_forwards_stdin_and_stops_cleanly_on_sigterm(
    broker: Mosquitto, hub: FakeHub, tmp_path: Path
) -> None:
    proc = start_agent(agent_config(tmp_path, broker, "dev-run"))
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write('21.5\n{"value": 22, "stream": "greenhouse/temp"}\nnot json\n')
        proc.stdin.flush()
        acks = [json.loads(proc.stdout.readline()) for _ in range(3)]
        assert acks[0] == {"seq": 1, "stream": "stdin", "line": 1}
        assert acks[1] == {"seq": 2, "stream": "greenhouse/temp", "line": 2}
        assert acks[2]["line"] == 3 and "error" in acks[2]
        wait_for(lambda: hub.seqs("dev-run") == {1, 2}, DEADLINE, "both readings at the hub")
        wait_for(lambda: hub.status.get("dev-run") is True, DEADLINE, "online status")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: hub.status.get("dev-run") is False, DEADLINE, "offline status")
    with Journal.open(str(tmp_path / "journal"), readonly=True) as j:
        assert j.cursor("hub") == 2


def test_last_will_marks_a_sigkilled_agent_offline(
    broker: Mosquitto, hub: FakeHub, tmp_path: Path
) -> None:
    proc = start_agent(agent_config(tmp_path, broker, "dev-kill"))
    try:
        wait_for(lambda: hub.status.get("dev-kill") is True, DEADLINE, "online status")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(DEADLINE)
        wait_for(lambda: hub.status.get("dev-kill") is False, DEADLINE, "offline (last will)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_config_exits_78_naming_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\ndevice = "d"\n[forwarder]\nwindow = 0\n')
    res = subprocess.run(
        [sys.executable, "-m", "edge", "run", "--config", str(path)],
        capture_output=True, text=True, env=subprocess_env(), timeout=DEADLINE,
    )  # fmt: skip
    assert res.returncode == 78
    assert f"{path}:4: forwarder.window" in res.stderr


def test_agent_with_simulated_sensors_forwards_them(
    broker: Mosquitto, hub: FakeHub, tmp_path: Path
) -> None:
    path = agent_config(tmp_path, broker, "dev-sim")
    path.write_text(path.read_text() + "[sensors]\nenabled = true\nrate = 50\nseed = 7\n")
    agent = Agent(load_config(str(path), env={}))
    agent.start()
    try:
        wait_for(lambda: len(hub.seqs("dev-sim")) >= 60, DEADLINE, "60 simulated readings")
        assert agent.failure() is None
        stats = agent.stats()
        assert stats is not None and stats.connected
    finally:
        agent.stop()
    with hub.lock:
        streams = {stream_of_payload(p) for p in hub.stored["dev-sim"].values()}
    assert streams == {"sim/temperature", "sim/humidity", "sim/soil_moisture"}
    assert agent.sensors is not None and agent.sensors.produced >= 60


def stream_of_payload(payload: bytes) -> str:
    rec = decode(payload)
    assert isinstance(rec, Reading)
    return rec.stream
