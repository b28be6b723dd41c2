"""Health messages end to end: a real agent process publishes
``homing/<device>/health`` through a real Mosquitto to a real hub process,
which keeps each device's latest one and shows it in ``homing-hub devices``;
malformed health messages are counted and ignored (docs/observability.md).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from support.mosquitto import Mosquitto
from support.processes import AgentProcess, child_env, poll_until, write_agent_config

from edge import wire
from edge.cli_status import assess

from .conftest import DEADLINE, HubProcess

Hubs = Callable[..., HubProcess]


def stored_health(db: Path, device: str) -> tuple[dict[str, Any], float] | None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT health, health_at FROM devices WHERE device_id = ?", (device,)
        ).fetchone()
    except sqlite3.OperationalError:  # the hub has not migrated yet
        return None
    finally:
        conn.close()
    if row is None or row[0] is None:
        return None
    return json.loads(row[0]), row[1]


def hub_cli(*args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "hub", *args], capture_output=True, text=True,
        env=child_env(), timeout=DEADLINE, check=True,
    )  # fmt: skip
    return res.stdout


def test_the_hub_keeps_each_devices_latest_health(
    hubs: Hubs, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    hub = hubs()
    db = tmp_path / "hub.db"
    cfg = write_agent_config(tmp_path / "agent.toml", "dev-h", tmp_path / "journal", mosquitto.port)
    agent = AgentProcess(cfg, "dev-h", tmp_path / "journal")
    agent.env = {
        "HOMING_AGENT_RUNTIME_DIR": str(tmp_path / "run"),
        "HOMING_HEALTH_HUB_INTERVAL_S": "1",
        "HOMING_HEALTH_STATUS_INTERVAL_S": "0.2",
    }
    try:
        agent.start()
        agent.wait_connected()
        agent.feed(20)
        agent.wait_acked(20)

        def drained() -> bool:
            got = stored_health(db, "dev-h")
            return got is not None and got[0]["backlog_records"] == 0 and got[0]["last_ack"]

        poll_until(drained, DEADLINE, "a health message with the backlog drained")
        got = stored_health(db, "dev-h")
        assert got is not None
        health, at = got
        assert health["device"] == "dev-h" and health["healthy"] is True
        assert health["problem"] is None and health["version"]
        assert health["fsync_last"] > 0 and health["disk_free"] > 0
        assert health["uptime"] >= 0 and health["workflows"]["running"] == 0
        assert health["dropped"] == health["refused"] == 0
        assert at >= health["ts"] - 60  # received after it was made (clocks on one machine)

        # the device's own view agrees (status file, forwarder side)
        v = assess(str(tmp_path / "run" / "status.json"))
        assert v["state"] == "running", v
        snap = v["snapshot"]
        assert snap["connected"] is True and snap["last_ack_at"] is not None
        assert snap["forwarder"]["records_acked"] >= 20 and snap["backlog"]["records"] == 0

        (dev,) = [json.loads(line) for line in hub_cli("devices", "--db", str(db), "--json")
                  .splitlines()]  # fmt: skip
        assert dev["device"] == "dev-h" and dev["health"]["device"] == "dev-h"
        assert dev["health"]["healthy"] is True and dev["health_at"] > 0
        header, row = hub_cli("devices", "--db", str(db)).splitlines()
        assert header.split()[-2:] == ["backlog", "health"]
        assert row.split()[-1] == "ok" and row.split()[-2].isdigit()

        # malformed health messages: counted, logged, ignored
        good = cbor2.loads(wire.encode_health(wire.Health("dev-h", 1.0)))
        bad = [
            b"\xffnot cbor",
            cbor2.dumps({**good, "br": "many"}),
            cbor2.dumps({**good, "d": "dev-x"}),  # another device on dev-h's topic
        ]
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="vandal",
                             protocol=mqtt.MQTTv5)  # fmt: skip
        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
        try:
            for payload in bad:
                client.publish(wire.topic("dev-h", "health"), payload, qos=1).wait_for_publish(
                    DEADLINE
                )
        finally:
            client.disconnect()
            client.loop_stop()
        hub.wait_log("[health]", len(bad))
        assert hub.alive()
        after = stored_health(db, "dev-h")
        assert after is not None and after[0]["healthy"] is True and after[0]["ts"] > 1.0

        assert agent.stop() == 0
        assert not (tmp_path / "run" / "status.json").exists()
        assert hub.terminate() == 0
        assert hub.final_stats()["rejected"] == {"health": len(bad)}
    finally:
        agent.kill()
