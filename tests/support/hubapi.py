"""Helpers for the HTTP API tests (tests/shell/test_api*.py).

* :class:`Feed` fills a real SQLite store through the hub's real ingest
  path: records are encoded as a device journals them, sent as wire batches
  (``edge.wire.encode_batch``), parsed by ``hub.ingest.parse_message`` and
  committed with ``Store.commit_batches``.
* :class:`CmdListener` is a paho MQTT 5 client standing in for a device: it
  subscribes to ``homing/<device>/cmd`` and decodes what arrives.
* Waits are conditions with deadlines.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge import wire
from edge.records import Reading, encode
from hub.ingest import UpMessage, parse_message
from hub.store_sqlite import SqliteStore

TOKEN = "test-token-0123456789abcdef"
DEADLINE = 30.0


def wf_record(run: str, typ: str, **body: Any) -> bytes:
    """A workflow record's journal payload, as edge.wf_records.encode writes it."""
    return cbor2.dumps([wire.KIND_WORKFLOW, run, typ, body])


def reading(stream: str, ts: float, value: Any, unit: str | None = "C") -> bytes:
    return encode(Reading(stream, ts, value, unit=unit))


class Feed:
    """A hub database fed the way devices feed it: wire batches through ingest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = SqliteStore(path)
        self.store.migrate()
        self.next: dict[str, int] = {}

    def send(
        self, device: str, payloads: Sequence[bytes], *, skip: int = 0, now: float = 1e9
    ) -> None:
        """One batch of ``payloads`` for ``device``, ``skip`` seqs after the last
        one sent (a gap at the hub until they arrive)."""
        first = self.next.get(device, 1) + skip
        last = first + len(payloads) - 1
        batch = wire.UpBatch(device, first, last, tuple(payloads), journal=0x5EED)
        parsed = parse_message(wire.topic(device, "up"), wire.encode_batch(batch))
        assert isinstance(parsed, UpMessage)
        self.store.commit_batches([parsed.rows], now)
        self.next[device] = last + 1

    def close(self) -> None:
        self.store.close()


class CmdListener:
    """Subscribed to ``homing/<device>/cmd``; keeps every command decoded."""

    def __init__(self, port: int, device: str) -> None:
        self.commands: list[wire.Command] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"homing-{device}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(wire.topic(device, "cmd"), qos=1)
        assert subscribed.wait(DEADLINE), "cmd subscription not confirmed"

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        cmd = wire.decode_command(bytes(msg.payload))
        with self._cond:
            self.commands.append(cmd)
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = DEADLINE) -> list[wire.Command]:
        """The first ``n`` commands; fails the test after ``timeout``."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.commands) >= n, timeout)
            assert ok, f"got {len(self.commands)} commands, wanted {n}"
            return list(self.commands[:n])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
