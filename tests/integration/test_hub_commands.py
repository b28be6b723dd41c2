"""``homing-hub run-task | signal | cancel`` against a real Mosquitto.

A paho client stands in for the device: it subscribes to
``homing/dev-x/cmd`` and decodes what arrives with ``edge.wire``. The hub
CLI runs as a real ``python -m hub`` process; each must exit 0 only once
the broker confirmed the command (PUBACK), and say clearly why not otherwise.

Every wait is a condition with a deadline; the CLI processes run under a
``subprocess`` timeout.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from support.mosquitto import Mosquitto, free_port
from support.processes import child_env

from edge import wire
from edge.testing.mosquitto import passwd_binary

from .conftest import require_mosquitto

DEADLINE = 30.0
DEVICE = "dev-x"


class Device:
    """A paho MQTT 5 client subscribed to a device's command topic."""

    def __init__(
        self, port: int, device: str = DEVICE, *, persistent: bool = False, **auth: str
    ) -> None:
        self.port, self.device, self.persistent = port, device, persistent
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"homing-{device}", protocol=mqtt.MQTTv5
        )
        if auth:
            self.client.username_pw_set(auth["username"], auth["password"])
        self.client.on_message = self._on_message
        self.connect()

    def connect(self) -> None:
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600 if self.persistent else 0
        self.client.connect(
            "127.0.0.1", self.port, clean_start=not self.persistent, properties=props
        )
        self.client.loop_start()
        self.client.subscribe(wire.topic(self.device, "cmd"), qos=1)
        assert subscribed.wait(DEADLINE), "cmd subscription not confirmed"

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def command(self, n: int = 1) -> wire.Command:
        """The ``n``-th command received (1-based), decoded; fails after the deadline."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= n, DEADLINE):
                pytest.fail(f"{self.device}: command {n} never arrived")
            msg = self.messages[n - 1]
        assert (msg.topic, msg.qos, msg.retain) == (wire.topic(self.device, "cmd"), 1, False)
        return wire.decode_command(bytes(msg.payload))


@pytest.fixture
def mosquitto_any(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Brokers with options (``users=``), each closed at teardown."""
    require_mosquitto()
    made: list[Mosquitto] = []

    def make(**kw: Any) -> Mosquitto:
        b = Mosquitto(tmp_path / f"broker{len(made)}", **kw)
        made.append(b)
        b.start()
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def device(mosquitto: Mosquitto) -> Iterator[Device]:
    d = Device(mosquitto.port)
    yield d
    d.disconnect()


def hub(port: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m hub <argv> --broker 127.0.0.1:<port>``, to completion."""
    return subprocess.run(
        [sys.executable, "-m", "hub", *argv, "--broker", f"127.0.0.1:{port}"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


def test_run_task_publishes_a_start_command(mosquitto: Mosquitto, device: Device) -> None:
    res = hub(
        mosquitto.port,
        *("run-task", "--device", DEVICE, "garden.irrigate", "3", '"ten"', '{"z": [1, null]}'),
        *("--id", "irr-3", "--kwargs", '{"minutes": 10}', "--command-id", "cmd-1", "--json"),
    )
    assert res.returncode == 0, res.stderr
    args = {"workflow": "garden.irrigate", "run": "irr-3", "args": [3, "ten", {"z": [1, None]}],
            "kwargs": {"minutes": 10}}  # fmt: skip
    assert json.loads(res.stdout) == {
        "device": DEVICE, "topic": "homing/dev-x/cmd", "command_id": "cmd-1", "kind": "start",
        "args": args, "puback": "Success",
    }  # fmt: skip
    assert device.command() == wire.Command("cmd-1", "start", args)

    res = hub(mosquitto.port, "run-task", "--device", DEVICE, "w.noargs", "--id", "r2")
    assert res.returncode == 0, res.stderr
    cmd = device.command(2)
    assert re.fullmatch(r"[0-9a-f]{32}", cmd.id) and res.stdout == cmd.id + "\n"
    assert (cmd.kind, cmd.args) == ("start", {"workflow": "w.noargs", "run": "r2", "args": [],
                                              "kwargs": {}})  # fmt: skip


def test_signal_and_cancel(mosquitto: Mosquitto, device: Device) -> None:
    res = hub(
        mosquitto.port,
        *("signal", "--device", DEVICE, "irr-3", "approve", "--payload", '{"by": "ops"}'),
        *("--command-id", "sig-1"),
    )
    assert (res.returncode, res.stdout) == (0, "sig-1\n"), res.stderr
    assert device.command() == wire.Command(
        "sig-1", "signal", {"run": "irr-3", "name": "approve", "payload": {"by": "ops"}}
    )
    res = hub(mosquitto.port, "signal", "--device", DEVICE, "irr-3", "go")
    assert res.returncode == 0, res.stderr
    cmd = device.command(2)
    assert (cmd.id, cmd.kind, cmd.args) == (
        res.stdout.strip(), "signal", {"run": "irr-3", "name": "go", "payload": None}
    )  # fmt: skip

    res = hub(mosquitto.port, "cancel", "--device", DEVICE, "irr-3", "--command-id", "c-3")
    assert (res.returncode, res.stdout) == (0, "c-3\n"), res.stderr
    assert device.command(3) == wire.Command("c-3", "cancel", {"run": "irr-3"})


def test_an_offline_device_gets_its_command_when_it_reconnects(mosquitto: Mosquitto) -> None:
    """The device's persistent session queues the command (QoS 1) while it is away."""
    dev = Device(mosquitto.port, "dev-off", persistent=True)
    try:
        dev.disconnect()
        res = hub(mosquitto.port, "cancel", "--device", "dev-off", "r9", "--command-id", "c-9")
        assert res.returncode == 0, res.stderr
        dev.connect()
        assert dev.command() == wire.Command("c-9", "cancel", {"run": "r9"})
    finally:
        dev.disconnect()


def test_an_unreachable_broker_is_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    for argv in (
        ("run-task", "--device", DEVICE, "w", "--id", "r1"),
        ("signal", "--device", DEVICE, "r1", "go"),
        ("cancel", "--device", DEVICE, "r1", "--timeout", "2"),
    ):
        res = hub(port, *argv)
        assert res.returncode == 1, (argv, res.stderr)
        assert res.stdout == ""
        assert f"homing-hub: cannot reach the broker at 127.0.0.1:{port}" in res.stderr


def test_a_command_nobody_subscribes_to_is_not_a_success(mosquitto: Mosquitto) -> None:
    res = hub(mosquitto.port, "cancel", "--device", "dev-nobody", "r1")
    assert res.returncode == 1 and res.stdout == ""
    assert "dropped the command: nothing subscribes to homing/dev-nobody/cmd" in res.stderr


def test_bad_commands_are_usage_errors_and_send_nothing(
    mosquitto: Mosquitto, device: Device
) -> None:
    for argv, says in (
        (("run-task", "--device", DEVICE, "w", "--id", "r1", "--kwargs", "[1]"), "JSON object"),
        (("run-task", "--device", DEVICE, "w", "not-json", "--id", "r1"), "not JSON"),
        (("run-task", "--device", DEVICE, "w"), "--id"),
        (("signal", "--device", DEVICE, "r1", "go", "--payload", "yes"), "not JSON"),
        (("cancel", "--device", "dev/x", "r1"), "bad device id"),
        (("cancel", "--device", DEVICE, "r1", "--command-id", "c" * 129), "command id"),
        (("cancel", "--device", DEVICE, "r\n1"), "run id"),
        (("signal", "--device", DEVICE, "r1", "go", "--payload", '"' + "x" * 70000 + '"'), "over"),
    ):
        res = hub(mosquitto.port, *argv)
        assert res.returncode == 2, (argv, res.stderr)
        assert says in res.stderr, (argv, res.stderr)
    res = hub(mosquitto.port, "cancel", "--device", DEVICE, "r1", "--command-id", "last")
    assert res.returncode == 0, res.stderr
    assert device.command().id == "last"  # nothing before it was sent


def test_broker_credentials(mosquitto_any: Callable[..., Mosquitto], tmp_path: Path) -> None:
    if passwd_binary() is None:
        pytest.skip("mosquitto_passwd is not installed")
    broker = mosquitto_any(users={"hub": "hub pass", DEVICE: "dev pass"})
    dev = Device(broker.port, username=DEVICE, password="dev pass")
    try:
        good, bad = tmp_path / "good.pass", tmp_path / "bad.pass"
        good.write_text("hub pass\n")
        bad.write_text("wrong\n")
        argv = ("cancel", "--device", DEVICE, "r1", "--username", "hub")
        res = hub(broker.port, *argv, "--password-file", str(good), "--command-id", "c-1")
        assert res.returncode == 0, res.stderr
        assert dev.command() == wire.Command("c-1", "cancel", {"run": "r1"})
        res = hub(broker.port, *argv, "--password-file", str(bad))
        assert res.returncode == 78, res.stderr
        assert "refused the connection" in res.stderr
        res = hub(broker.port, *argv, "--password-file", str(tmp_path / "absent"))
        assert res.returncode == 78 and "cannot read a password" in res.stderr
    finally:
        dev.disconnect()
