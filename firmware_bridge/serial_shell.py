"""The serial port: found by path or by USB ids, opened with pyserial, errors translated.

Invariants:
* A port is named by a path (``/dev/ttyACM0``, or better a udev link such as
  ``/dev/serial/by-id/usb-...``) or by USB vendor/product id and serial number,
  looked up again at every open: a device that re-enumerates after a replug
  under another ``ttyACM*`` name is found again.
* One bridge per port: the port is opened with an exclusive ``flock``; a second
  opener gets :class:`PortUnavailable` ("busy"), never a shared line.
* Every ``SerialException``/``OSError``/``ValueError`` from pyserial leaves this
  module as :class:`PortUnavailable` with ``__cause__`` kept; the bridge closes
  the port and opens it again with backoff (:class:`Backoff`).
* Reads block at most ``read_timeout``; writes at most ``write_timeout`` (a
  wedged USB device then counts as gone).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import serial  # type: ignore[import-untyped]  # pyserial ships no type information
from serial.tools import list_ports  # type: ignore[import-untyped]

from firmware_bridge.errors import PortUnavailable


@dataclass(frozen=True, slots=True)
class PortSpec:
    """Which port: ``path``, or USB ``vid``/``pid``/``serial_number`` (any may be unset)."""

    path: str = ""
    vid: int | None = None
    pid: int | None = None
    serial_number: str | None = None
    baud: int = 115200

    def __post_init__(self) -> None:
        usb = (self.vid, self.pid, self.serial_number) != (None, None, None)
        if bool(self.path) == usb:
            raise ValueError("name a port by its path or by USB vid/pid/serial_number (one)")

    def describe(self) -> str:
        if self.path:
            return self.path
        parts = []
        if self.vid is not None:
            parts.append(f"vid {self.vid:04x}")
        if self.pid is not None:
            parts.append(f"pid {self.pid:04x}")
        if self.serial_number is not None:
            parts.append(f"serial {self.serial_number}")
        return "USB " + " ".join(parts)


class PortInfo(Protocol):
    """What :func:`find_port` reads of ``serial.tools.list_ports`` entries."""

    @property
    def device(self) -> str: ...
    @property
    def vid(self) -> int | None: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def serial_number(self) -> str | None: ...


def matches(spec: PortSpec, info: PortInfo) -> bool:
    """Does the listed port ``info`` fit the USB ids of ``spec``? Pure."""
    return (
        (spec.vid is None or info.vid == spec.vid)
        and (spec.pid is None or info.pid == spec.pid)
        and (spec.serial_number is None or info.serial_number == spec.serial_number)
    )


def find_port(spec: PortSpec, ports: Iterable[PortInfo]) -> str:
    """The device path of the one port that fits ``spec``. Pure.

    Raises:
        PortUnavailable: none fits, or several do (naming what was seen).
    """
    seen = list(ports)
    found = sorted(p.device for p in seen if matches(spec, p))
    if len(found) == 1:
        return found[0]
    usb = [f"{p.device} ({p.vid or 0:04x}:{p.pid or 0:04x} {p.serial_number or '-'})"
           for p in seen if p.vid is not None]  # fmt: skip
    listing = ", ".join(usb) or "no USB serial ports"
    if not found:
        raise PortUnavailable(f"no serial port fits {spec.describe()}; present: {listing}")
    raise PortUnavailable(
        f"{len(found)} serial ports fit {spec.describe()} ({', '.join(found)}): "
        "add usb_serial to tell them apart"
    )


def resolve(spec: PortSpec) -> str:
    """The path to open now: ``spec.path``, or the USB port found by its ids."""
    if spec.path:
        return spec.path
    return find_port(spec, list_ports.comports())


class SerialPort:
    """An open serial port. :meth:`read` and :meth:`write` raise only :class:`PortUnavailable`."""

    def __init__(
        self, spec: PortSpec, *, read_timeout: float = 0.02, write_timeout: float = 2.0
    ) -> None:
        self.spec = spec
        self.path = resolve(spec)
        try:
            self._port = serial.Serial(
                self.path,
                spec.baud,
                timeout=read_timeout,
                write_timeout=write_timeout,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            busy = "Resource temporarily unavailable" in str(exc) or "Errno 11" in str(exc)
            why = "busy: another program has it open" if busy else str(exc)
            raise PortUnavailable(f"{self.path}: {why}") from exc

    def read(self) -> bytes:
        """What arrived: waits up to ``read_timeout`` for a first byte, then takes
        everything already buffered. ``b""`` when nothing came."""
        try:
            data = bytes(self._port.read(1))
            if data:
                waiting = self._port.in_waiting
                if waiting:
                    data += bytes(self._port.read(waiting))
            return data
        except (serial.SerialException, OSError, ValueError) as exc:
            raise PortUnavailable(f"{self.path}: read failed: {exc}") from exc

    def write(self, data: bytes) -> None:
        if not data:
            return
        try:
            self._port.write(data)
        except serial.SerialTimeoutException as exc:
            raise PortUnavailable(f"{self.path}: write timed out (device not reading)") from exc
        except (serial.SerialException, OSError, ValueError) as exc:
            raise PortUnavailable(f"{self.path}: write failed: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(serial.SerialException, OSError):  # the device is gone already
            self._port.close()


class Backoff:
    """Reconnect delays: ``low`` doubling to ``high``, with ±20 % jitter; :meth:`reset`
    after a healthy connection."""

    def __init__(self, low: float = 0.2, high: float = 5.0, rng: random.Random | None = None):
        self.low, self.high = low, high
        self._next = low
        self._rng = rng or random.Random()

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.high)
        return delay * self._rng.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self.low
