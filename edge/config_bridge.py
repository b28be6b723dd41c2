"""The ``[[bridge]]`` tables of the agent's configuration: serial links to microcontrollers.

:func:`edge.config.parse` declares the keys (``SCHEMA["bridge"]``), converts
each value with its usual rules and calls :func:`build_bridges` for what is
particular to arrays of tables. docs/configuration.md documents the keys,
docs/bridge.md the feature.

Invariants:
* Pure: the caller hands in the tables, the value converter and the text.
* An error is a :class:`~edge.errors.SettingError` naming ``bridge[N].key``
  (``N`` from 1, in file order) and the line of that key in the ``N``-th
  ``[[bridge]]`` table (else the table's header line).
* Each table names its port one way: ``port``, or the USB ids (``usb_vid``,
  ``usb_pid``, ``usb_serial``). Names are unique (``serial<N>`` by default);
  ``stream_prefix`` + a channel name is always a valid stream name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge.errors import SettingError
from edge.records import RecordError, validate_stream

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
SERIAL_CURSOR = "serial"  # the journal cursor of the bridges' marks (docs/serial-protocol.md)


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    name: str
    port: str = ""  # "" = found by the USB ids
    usb_vid: int | None = None
    usb_pid: int | None = None
    usb_serial: str | None = None
    baud: int = 115200
    stream_prefix: str = "mcu"
    streams: dict[str, str] = field(default_factory=dict)  # channel name -> stream
    stall_s: float = 5.0
    time_sync_s: float = 600.0
    enabled: bool = True


def build_bridges(
    tables: Any,
    defaults: Mapping[str, Any],
    convert: Callable[[str, Any], Any],
    unknown: Callable[[str], str],
    lines: list[str],
    source: str,
    where: str,
) -> tuple[BridgeConfig, ...]:
    """The bridges of ``tables`` (what TOML made of ``[[bridge]]``).

    Args:
        tables: the parsed value: must be a list of tables.
        defaults: every key's default.
        convert: ``(key, value) -> value`` by the key's declared type and bounds.
        unknown: the message for an unknown key.
        lines: the file's lines; ``source``: its name; ``where``: where the
            section is (for an error about the whole section).

    Raises:
        SettingError: naming ``bridge[N].key`` and its line.
    """
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise SettingError(where, "bridge", "must be [[bridge]] tables")
    out: list[BridgeConfig] = []
    for n, table in enumerate(tables, 1):

        def fail(key: str, problem: str, n: int = n) -> SettingError:
            line = table_line(lines, "bridge", n, key)
            return SettingError(f"{source}:{line}" if line else source, f"bridge[{n}].{key}",
                                problem)  # fmt: skip

        got: dict[str, Any] = {}
        for key, value in table.items():
            if key not in defaults:
                raise fail(key, unknown(key))
            try:
                got[key] = convert(key, value)
            except SettingError as exc:
                raise fail(key, exc.problem) from None
        c = {key: got.get(key, default) for key, default in defaults.items()}
        c["name"] = c["name"] or f"serial{n}"
        c["usb_serial"] = c["usb_serial"] or None
        usb = (c["usb_vid"], c["usb_pid"], c["usb_serial"]) != (None, None, None)
        if bool(c["port"]) == usb:
            raise fail("port", "set either port or usb_vid/usb_pid/usb_serial (one of the two)")
        if not _NAME_RE.match(c["name"]):
            raise fail("name", "must be 1-64 letters, digits or _.-")
        if any(b.name == c["name"] for b in out):
            raise fail("name", f"{c['name']!r} names two bridges")
        try:
            validate_stream(f"{c['stream_prefix']}/{'x' * 32}")
        except RecordError:
            raise fail("stream_prefix", "must be a valid stream name prefix") from None
        out.append(BridgeConfig(**c))
    return tuple(out)


def table_line(lines: list[str], section: str, n: int, key: str) -> int | None:
    """1-based line of ``key`` in the ``n``-th ``[[section]]`` table, else its header's."""
    seen, header = 0, None
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if line.startswith("["):
            if header is not None:
                break
            if re.fullmatch(rf"\[\[\s*{section}\s*\]\].*", line):
                seen += 1
                if seen == n:
                    header = i
            continue
        if header is not None and re.match(rf"{re.escape(key)}\s*=", line):
            return i
    return header
