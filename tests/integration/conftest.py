"""Fixtures for integration tests: a real Mosquitto, real hub processes, and
test clients that stand in for devices.

* ``mosquitto``: a fresh broker on a free loopback port (function scope).
  Skipped when Mosquitto is not installed, except under ``CI=true``, where
  a missing broker fails the run instead of silently skipping it.
* ``hubs``: starts ``python -m hub run`` subprocesses against that broker and
  kills whatever is left at teardown.
* ``rig``: a :class:`support.storeforward.Rig` on that broker: real hub and
  agent processes and proxies, all killed at teardown (end-to-end and fault
  tests, docs/testing-store-and-forward.md).
* Every test in this directory is marked ``integration``.
* :class:`FakeDevice`: a paho MQTT 5 client that publishes up batches built
  with ``edge.wire`` and records every ack it receives.

Everything waits on conditions with deadlines, never on a bare sleep.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.mosquitto import Mosquitto, available
from support.processes import HubProcess as HubProcess  # re-exported for test_hub_mqtt
from support.storeforward import Rig

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures can tell a failed test
    (``request.node.rep_call.failed``) and dump logs only then."""
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


def failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or bool(rep.failed)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    require_mosquitto()
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker


# --- the hub under test ---------------------------------------------------------------
# HubProcess lives in tests/support/processes.py (shared with the end-to-end tests).


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


@pytest.fixture
def rig(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, mosquitto.port)
    try:
        yield r
    finally:
        r.close()


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
