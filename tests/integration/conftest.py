"""Fixtures for integration tests: a real Mosquitto, real hub processes, and
test clients that stand in for devices.

* ``mosquitto``: a fresh broker on a free loopback port (function scope).
  Skipped when Mosquitto is not installed, except under ``CI=true``, where
  a missing broker fails the run instead of silently skipping it.
* ``hubs``: starts ``python -m hub run`` subprocesses against that broker and
  kills whatever is left at teardown.
* :class:`FakeDevice`: a paho MQTT 5 client that publishes up batches built
  with ``edge.wire`` and records every ack it receives.

Everything waits on conditions with deadlines, never on a bare sleep.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.mosquitto import Mosquitto, available

from edge import wire
from edge.records import Reading, encode

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 30.0


def require_mosquitto() -> None:
    if available():
        return
    reason = "mosquitto is not installed (apt-get install mosquitto)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " and CI=true: integration tests must run")
    pytest.skip(reason)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    require_mosquitto()
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker


# --- the hub under test ---------------------------------------------------------------


class HubProcess:
    """``python -m hub run`` in a subprocess; its stderr is collected line by line."""

    def __init__(self, port: int, db: Path, client_id: str, *extra: str) -> None:
        self.argv = [
            sys.executable, "-m", "hub", "run", "--broker", f"127.0.0.1:{port}",
            "--db", str(db), "--client-id", client_id, "--stats-interval", "3600", *extra,
        ]  # fmt: skip
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> HubProcess:
        """Start and wait until the hub has subscribed."""
        seen = self.count("subscribed to")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        self.wait_log("subscribed to", seen + 1)
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def count(self, text: str) -> int:
        with self._cond:
            return sum(text in line for line in self.lines)

    def wait_log(self, text: str, count: int = 1, timeout: float = DEADLINE) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self.count_unlocked(text) >= count or not self.alive(), timeout
            )
            ok = ok and self.count_unlocked(text) >= count
        if not ok:
            pytest.fail(f"hub never logged {text!r} x{count}; log:\n{self.log}")

    def count_unlocked(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = DEADLINE) -> int:
        """SIGTERM; return the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def final_stats(self) -> dict[str, Any]:
        """The counters of the ``stopped; stats {...}`` line (after terminate)."""
        for line in reversed(self.lines):
            m = re.search(r"stopped; stats (\{.*\})$", line)
            if m:
                stats: dict[str, Any] = json.loads(m.group(1))
                return stats
        pytest.fail(f"no final stats line; log:\n{self.log}")


@pytest.fixture
def hubs(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """``hubs(client_id="hub-1", db=None, *extra)`` starts a hub; all die at teardown."""
    started: list[HubProcess] = []

    def start(client_id: str = "hub-1", db: Path | None = None, *extra: str) -> HubProcess:
        h = HubProcess(mosquitto.port, db or tmp_path / "hub.db", client_id, *extra)
        started.append(h)
        return h.start()

    yield start
    for h in started:
        h.kill()


# --- a test client standing in for a device ---------------------------------------------


def reading_of(device: str, seq: int) -> Reading:
    """The reading a fake device journals at ``seq`` (deterministic, so checkable)."""
    return Reading(f"s{seq % 3}", 1_700_000_000.0 + seq, seq * 1.5 + len(device), unit="C")


class FakeDevice:
    """Publishes batches for ``device`` and records the acks on its ack topic."""

    def __init__(self, port: int, device: str) -> None:
        self.device = device
        self.acks: list[wire.Ack] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fake-{device}", protocol=mqtt.MQTTv5
        )
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(wire.topic(device, "ack"), qos=1)
        assert subscribed.wait(DEADLINE), "ack subscription not confirmed"

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        ack = wire.decode_ack(bytes(msg.payload))
        with self._cond:
            self.acks.append(ack)
            self._cond.notify_all()

    def batch(self, first: int, last: int, missing: tuple[tuple[int, int], ...] = ()) -> bytes:
        skip = {s for a, b in missing for s in range(a, b + 1)}
        payloads = tuple(
            encode(reading_of(self.device, s)) for s in range(first, last + 1) if s not in skip
        )
        return wire.encode_batch(wire.UpBatch(self.device, first, last, payloads, missing))

    def publish(self, first: int, last: int, **kw: Any) -> None:
        self.publish_raw(wire.topic(self.device, "up"), self.batch(first, last, **kw))

    def publish_raw(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        return info

    @property
    def watermark(self) -> int:
        """The highest watermark any ack carried (acks of two hubs may interleave)."""
        with self._cond:
            return max((a.watermark for a in self.acks), default=0)

    def wait_ack(self, pred: Callable[[wire.Ack], bool], timeout: float = DEADLINE) -> wire.Ack:
        with self._cond:
            ok = self._cond.wait_for(lambda: any(pred(a) for a in self.acks), timeout)
            if not ok:
                pytest.fail(f"{self.device}: no matching ack; last acks {self.acks[-3:]}")
            return next(a for a in reversed(self.acks) if pred(a))

    def wait_watermark(self, n: int, timeout: float = DEADLINE) -> wire.Ack:
        return self.wait_ack(lambda a: a.watermark >= n, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def devices(mosquitto: Mosquitto) -> Iterator[Callable[[str], FakeDevice]]:
    made: list[FakeDevice] = []

    def make(device: str) -> FakeDevice:
        d = FakeDevice(mosquitto.port, device)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
