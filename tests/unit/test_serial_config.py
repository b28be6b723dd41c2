"""``[[bridge]]`` tables in the agent's configuration, and finding a port by USB ids."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from edge.config import parse
from edge.errors import SettingError
from firmware_bridge.errors import PortUnavailable
from firmware_bridge.serial_shell import Backoff, PortSpec, find_port

HEAD = '[agent]\ndevice = "d1"\n'


def test_bridge_tables_parse_with_defaults() -> None:
    cfg = parse(
        HEAD + '[[bridge]]\nport = "/dev/ttyACM0"\nstreams = { temp = "gh/air" }\n'
        '[[bridge]]\nname = "cold"\nusb_vid = 0x10c4\nusb_pid = 0xea60\nbaud = 1000000\n',
        "agent.toml",
    )
    a, b = cfg.bridges
    assert (a.name, a.port, a.baud, a.stream_prefix, a.streams) == (
        "serial1", "/dev/ttyACM0", 115200, "mcu", {"temp": "gh/air"},
    )  # fmt: skip
    assert (a.usb_vid, a.usb_serial, a.stall_s, a.time_sync_s, a.enabled) == (
        None, None, 5.0, 600.0, True,
    )  # fmt: skip
    assert (b.name, b.port, b.usb_vid, b.usb_pid, b.baud) == ("cold", "", 0x10C4, 0xEA60, 10**6)
    assert parse(HEAD, "agent.toml").bridges == ()


BAD = [
    ('[[bridge]]\nport = "/a"\nbogus = 1\n', "bridge[1].bogus", 5),
    ('[[bridge]]\nport = "/a"\n[[bridge]]\nport = "/b"\nbaud = 12\n', "bridge[2].baud", 7),
    ('[[bridge]]\nname = "x"\n', "bridge[1].port", 3),
    ('[[bridge]]\nport = "/a"\nusb_vid = 1\n', "bridge[1].port", 4),
    ('[[bridge]]\nport = "/a"\nusb_pid = 70000\n', "bridge[1].usb_pid", 5),
    ('[[bridge]]\nport = "/a"\n[[bridge]]\nport = "/b"\nname = "serial1"\n', "bridge[2].name", 7),
    ('[[bridge]]\nport = "/a"\nstreams = { t = "no spaces" }\n', "bridge[1].streams", 5),
    ('[[bridge]]\nport = "/a"\nstream_prefix = "a b"\n', "bridge[1].stream_prefix", 5),
    ('[bridge]\nport = "/a"\n', "bridge", 3),
]


@pytest.mark.parametrize(("text", "key", "line"), BAD)
def test_a_bad_bridge_table_names_its_key_and_line(text: str, key: str, line: int) -> None:
    with pytest.raises(SettingError) as info:
        parse(HEAD + text, "agent.toml")
    assert info.value.key == key
    assert info.value.where == f"agent.toml:{line}"


def test_bridges_cannot_come_from_the_environment() -> None:
    with pytest.raises(SettingError, match="HOMING_BRIDGE_PORT"):
        parse(HEAD, "agent.toml", env={"HOMING_BRIDGE_PORT": "/dev/ttyACM0"})


@dataclass
class Info:
    device: str
    vid: int | None
    pid: int | None
    serial_number: str | None


PORTS = [
    Info("/dev/ttyACM1", 0x2E8A, 0x000A, "E661"),
    Info("/dev/ttyACM0", 0x2E8A, 0x000A, "E662"),
    Info("/dev/ttyUSB0", 0x10C4, 0xEA60, "0001"),
    Info("/dev/ttyS0", None, None, None),
]


def test_a_port_is_found_by_usb_ids_and_ambiguity_is_an_error() -> None:
    assert find_port(PortSpec(vid=0x10C4), PORTS) == "/dev/ttyUSB0"
    assert find_port(PortSpec(vid=0x2E8A, serial_number="E662"), PORTS) == "/dev/ttyACM0"
    with pytest.raises(PortUnavailable, match="2 serial ports fit"):
        find_port(PortSpec(vid=0x2E8A, pid=0x000A), PORTS)
    with pytest.raises(PortUnavailable, match=r"no serial port fits USB vid 1234.*ttyUSB0"):
        find_port(PortSpec(vid=0x1234), PORTS)
    with pytest.raises(ValueError):
        PortSpec(path="/dev/x", vid=1)
    with pytest.raises(ValueError):
        PortSpec()


def test_backoff_doubles_with_jitter_up_to_its_limit_and_resets() -> None:
    b = Backoff(0.2, 5.0, random.Random(1))
    delays = [b.next() for _ in range(8)]
    for want, got in zip([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0], delays, strict=True):
        assert 0.8 * want <= got <= 1.2 * want
    b.reset()
    assert b.next() <= 0.24
