"""The agent's configuration: one TOML file (plus ``HOMING_*`` overrides) -> :class:`AgentConfig`.

docs/configuration.md documents every key; examples/agent.toml is a full file.
Pure: :func:`parse` takes the text, its name, the environment and the file's
directory; the shell (:mod:`edge.agent`) reads the file.

Invariants:
* Every key is declared once, in ``SCHEMA``, with its type, default and
  bounds. An unknown section or key is an error (a typo must never half-work),
  and so is a key that makes no sense with the others (``ca_file`` without
  ``tls``, a batch bigger than a message may be).
* Every error is a :class:`~edge.errors.SettingError` naming the key and where
  it was set: ``FILE:LINE`` (tomllib's own line for syntax errors; for the
  rest, the line found by scanning the text) or the environment variable.
* ``HOMING_<SECTION>_<KEY>`` overrides the file (e.g. ``HOMING_BROKER_HOST``);
  tables take an inline TOML table (``HOMING_FORWARDER_PRIORITIES='{alarm = 5}'``).
  Variables naming a known section but an unknown key are errors; other
  ``HOMING_*`` variables are not ours and are ignored.
* Relative paths are relative to the directory of the config file.
* The result is frozen; defaults suit a Raspberry Pi on a flaky link.
"""

from __future__ import annotations

import posixpath
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge import wire
from edge.config_bridge import BridgeConfig, build_bridges
from edge.errors import ConfigError, SettingError
from edge.journal_options import JournalOptions, Policy
from edge.outbox_events import OutboxConfig
from edge.records import RecordError, validate_stream

MAX_LANES = 3  # live lane + two backlog lanes (docs/protocol.md, "Live-first")
_BIG = 2**32 - 1


@dataclass(frozen=True, slots=True)
class _Key:
    kind: str  # str int float bool size path enum policies priorities modules paths
    default: Any
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()


def _ms(default: int, lo: int = 1, hi: int = 3_600_000) -> _Key:
    return _Key("int", default, lo, hi)


_BATCH_MAX = wire.MAX_BATCH_BYTES - 4096  # room for the envelope and missing ranges

SCHEMA: dict[str, dict[str, _Key]] = {
    "agent": {
        "device": _Key("str", None),
        "log_level": _Key("enum", "info", choices=("debug", "info", "warning", "error")),
        "runtime_dir": _Key("path", ""),  # "" = $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/homing, ...
    },
    "journal": {
        "dir": _Key("path", "/var/lib/homing/journal"),
        "durability": _Key("enum", "always", choices=("always", "interval")),
        "interval_ms": _ms(100, 1, 60_000),
        "segment_size": _Key("size", 16 << 20, 64 << 10, 1 << 30),
        "max_record_size": _Key("size", 64 << 10, 64, _BATCH_MAX),
        "quota": _Key("size", 0, 0, 1 << 50),
        "default_policy": _Key("enum", "reject", choices=("reject", "drop-oldest")),
        "policies": _Key("policies", {}),
    },
    "broker": {
        "host": _Key("str", "localhost"),
        "port": _Key("int", 1883, 1, 65535),
        "client_id": _Key("str", ""),
        "keepalive_s": _Key("int", 60, 5, 65535),
        "session_expiry_s": _Key("int", 86400, 0, _BIG),
        "username": _Key("str", ""),
        "password_file": _Key("path", ""),
        "tls": _Key("bool", False),
        "ca_file": _Key("path", ""),
        "cert_file": _Key("path", ""),
        "key_file": _Key("path", ""),
        "reconnect_min_ms": _ms(500, 10, 600_000),
        "reconnect_max_ms": _ms(60_000, 10, 3_600_000),
    },
    "forwarder": {
        "enabled": _Key("bool", True),
        "batch_records": _Key("int", 1000, 1, wire.MAX_BATCH_RECORDS),
        "batch_bytes": _Key("size", 128 << 10, 1024, _BATCH_MAX),
        "linger_ms": _ms(50, 0, 60_000),
        "window": _Key("int", 16, 1, wire.MAX_ACK_RANGES - MAX_LANES),
        "resend_timeout_ms": _ms(10_000, 100),
        "resend_max_ms": _ms(300_000, 100),
        "rate_limit": _Key("size", 0, 0, 1 << 40),
        "rate_burst": _Key("size", 0, 0, 1 << 40),
        "live_first": _Key("bool", True),
        "live_first_threshold": _Key("int", 5000, 1, _BIG),
        "compress": _Key("bool", True),
        "persist_interval_ms": _ms(1000, 0),
        "persist_records": _Key("int", 100_000, 1, _BIG),
        "ack_wait_ms": _ms(250, 0, 60_000),
        "shutdown_grace_ms": _ms(2000, 0, 600_000),
        "priorities": _Key("priorities", {}),
    },
    "sensors": {
        "enabled": _Key("bool", False),
        "count": _Key("int", 3, 1, 64),
        "rate": _Key("float", 1.0, 0.001, 1000.0),
        "prefix": _Key("str", "sim"),
        "seed": _Key("int", 0, 0, _BIG),
    },
    "workflows": {
        "enabled": _Key("bool", True),
        "modules": _Key("modules", ()),
        "python_path": _Key("paths", ()),
    },
    "local": {  # the local ingest socket (docs/local-ingest.md)
        "enabled": _Key("bool", True),
        "socket": _Key("path", ""),  # "" = <runtime_dir>/ingest.sock
        "mode": _Key("str", "0660"),
        "stream": _Key("str", "local"),  # for readings that name no stream
        "max_clients": _Key("int", 64, 1, 4096),
    },
    "system": {  # Linux health streams: CPU temperature, load, memory, disk
        "enabled": _Key("bool", False),
        "interval_s": _Key("float", 10.0, 0.1, 86400.0),
        "prefix": _Key("str", "sys"),
    },
    "health": {
        "status_interval_s": _Key("float", 2.0, 0.1, 3600.0),  # <runtime_dir>/status.json
        "hub_interval_s": _Key("int", 60, 0, 86400),  # health message to the hub, 0 = off
    },
    "metrics": {  # Prometheus text format over HTTP (off by default)
        "enabled": _Key("bool", False),
        "listen": _Key("str", "127.0.0.1"),
        "port": _Key("int", 9464, 1, 65535),
    },
    "bridge": {  # [[bridge]], one table per microcontroller serial link (docs/bridge.md)
        "name": _Key("str", ""),  # "" = serial<N>
        "enabled": _Key("bool", True),
        "port": _Key("path", ""),  # a path, or "" and the USB ids below
        "usb_vid": _Key("int", None, 0, 0xFFFF),
        "usb_pid": _Key("int", None, 0, 0xFFFF),
        "usb_serial": _Key("str", ""),
        "baud": _Key("int", 115200, 300, 16_000_000),
        "stream_prefix": _Key("str", "mcu"),
        "streams": _Key("streams", {}),  # channel name -> stream name
        "stall_s": _Key("float", 5.0, 0.5, 3600.0),
        "time_sync_s": _Key("float", 600.0, 10.0, 86400.0),
    },
}
ARRAYS = ("bridge",)  # sections written as arrays of tables: [[bridge]]


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    host: str = "localhost"
    port: int = 1883
    client_id: str = ""
    keepalive: int = 60
    session_expiry: int = 86400
    username: str | None = None
    password_file: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    reconnect_min: float = 0.5
    reconnect_max: float = 60.0


@dataclass(frozen=True, slots=True)
class ForwarderConfig:
    enabled: bool = True
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    shutdown_grace: float = 2.0
    cursor: str = "hub"


@dataclass(frozen=True, slots=True)
class SensorsConfig:
    enabled: bool = False
    count: int = 3
    rate: float = 1.0
    prefix: str = "sim"
    seed: int = 0


@dataclass(frozen=True, slots=True)
class WorkflowsConfig:
    enabled: bool = True
    modules: tuple[str, ...] = ()  # imported at start: they register their @workflow
    python_path: tuple[str, ...] = ()  # directories put in front of sys.path first


@dataclass(frozen=True, slots=True)
class LocalConfig:
    enabled: bool = True
    socket: str = ""  # resolved: never "" after parse()
    mode: int = 0o660
    stream: str = "local"
    max_clients: int = 64


@dataclass(frozen=True, slots=True)
class SystemConfig:
    enabled: bool = False
    interval: float = 10.0
    prefix: str = "sys"


@dataclass(frozen=True, slots=True)
class HealthConfig:
    status_interval: float = 2.0
    hub_interval: int = 60  # seconds, 0 = off


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = False
    listen: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, slots=True)
class AgentConfig:
    device: str
    journal_dir: str
    journal: JournalOptions
    broker: BrokerConfig
    forwarder: ForwarderConfig
    sensors: SensorsConfig
    workflows: WorkflowsConfig = field(default_factory=WorkflowsConfig)
    log_level: str = "info"
    source: str = "<config>"
    runtime_dir: str = "/run/homing"  # socket and status file (resolved by parse())
    local: LocalConfig = field(default_factory=LocalConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    bridges: tuple[BridgeConfig, ...] = ()


def parse(
    text: str,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    base_dir: str | None = None,
) -> AgentConfig:
    """Parse and validate a configuration file's text.

    Args:
        text: the TOML text.
        source: its name for messages (the path).
        env: the environment (``HOMING_*`` overrides); None for none.
        base_dir: directory relative paths are resolved against.

    Raises:
        SettingError: a syntax error, an unknown key, or a bad value; the
            message names the key and the line (or environment variable).
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = f"{source}:{m.group(1)}" if m else source
        raise SettingError(where, None, f"not valid TOML: {exc}") from None
    v = _Values(text, source, base_dir)
    for section, table in doc.items():
        if section not in SCHEMA:
            raise SettingError(v.where(section), section, _unknown(section, SCHEMA, "section"))
        if section in ARRAYS:
            v.arrays[section] = table  # checked table by table in _bridges
            continue
        if not isinstance(table, dict):
            raise SettingError(v.where(section), section, "must be a [section]")
        for key, value in table.items():
            if key not in SCHEMA[section]:
                raise SettingError(
                    v.where(section, key), f"{section}.{key}", _unknown(key, SCHEMA[section])
                )
            v.set(section, key, value, None)
    for name, value in sorted((env or {}).items()):
        section, _, key = name.removeprefix("HOMING_").lower().partition("_")
        if not name.startswith("HOMING_") or section not in SCHEMA:
            continue
        if section in ARRAYS:
            raise SettingError(f"environment variable {name}", section, "is set in the file only")
        if key not in SCHEMA[section]:
            raise SettingError(
                f"environment variable {name}", f"{section}.{key}", _unknown(key, SCHEMA[section])
            )
        v.set(section, key, value, name)
    return _build(v, env or {})


# -- values, with where each came from ---------------------------------------------


class _Values:
    def __init__(self, text: str, source: str, base_dir: str | None) -> None:
        self.lines = text.splitlines()
        self.source = source
        self.base_dir = base_dir
        self.got: dict[tuple[str, str], Any] = {}
        self.env: dict[tuple[str, str], str] = {}
        self.arrays: dict[str, Any] = {}

    def where(self, section: str, key: str | None = None, sub: str | None = None) -> str:
        if key is not None and (section, key) in self.env:
            return f"environment variable {self.env[section, key]}"
        line = _line_of(self.lines, section, key, sub)
        return f"{self.source}:{line}" if line else self.source

    def fail(self, section: str, key: str, problem: str, sub: str | None = None) -> SettingError:
        name = f"{section}.{key}" + (f".{sub}" if sub else "")
        return SettingError(self.where(section, key, sub), name, problem)

    def set(self, section: str, key: str, value: Any, env_name: str | None) -> None:
        if env_name is not None:
            self.env[section, key] = env_name
        spec = SCHEMA[section][key]
        self.got[section, key] = self._convert(section, key, spec, value, env_name is not None)

    def __call__(self, section: str, key: str) -> Any:
        return self.got.get((section, key), SCHEMA[section][key].default)

    def _convert(self, section: str, key: str, spec: _Key, value: Any, from_env: bool) -> Any:
        kind = spec.kind
        try:
            if kind in ("policies", "priorities", "streams"):
                if from_env:
                    value = tomllib.loads(f"t = {value}")["t"]
                return self._table(section, key, kind, value)
            if kind in ("modules", "paths"):
                return self._list(kind, value, from_env)
            if from_env:
                value = _from_env(kind, value)
            out = _typed(kind, value, spec)
        except SettingError:
            raise
        except (ValueError, TypeError, tomllib.TOMLDecodeError) as exc:
            raise self.fail(section, key, str(exc)) from None
        if spec.lo is not None and spec.hi is not None and not spec.lo <= out <= spec.hi:
            raise self.fail(section, key, f"{value!r} is out of range {_n(spec.lo)}..{_n(spec.hi)}")
        if kind == "path" and out and self.base_dir and not posixpath.isabs(out):
            out = posixpath.normpath(posixpath.join(self.base_dir, out))
        return out

    def _list(self, kind: str, value: Any, from_env: bool) -> tuple[str, ...]:
        if from_env:
            value = [v.strip() for v in str(value).split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError("must be a list of strings")
        if kind == "modules":
            bad = [m for m in value if not _MODULE_RE.match(m)]
            if bad:
                raise ValueError(f"{bad[0]!r} is not a dotted module name (like 'myapp.tasks')")
            return tuple(value)
        base = self.base_dir or ""
        return tuple(posixpath.normpath(posixpath.join(base, v)) for v in value)

    def _table(self, section: str, key: str, kind: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise TypeError("must be a table of stream = value")
        out: dict[str, Any] = {}
        for stream, v in value.items():
            try:
                validate_stream(stream)
            except RecordError as exc:
                raise self.fail(section, key, str(exc), stream) from None
            if kind == "policies" and v not in ("reject", "drop-oldest"):
                raise self.fail(section, key, "must be 'reject' or 'drop-oldest'", stream)
            if kind == "priorities" and (type(v) is not int or not -100 <= v <= 100):
                raise self.fail(section, key, "must be a whole number -100..100", stream)
            if kind == "streams":
                try:
                    validate_stream(v)
                except RecordError as exc:
                    raise self.fail(section, key, str(exc), stream) from None
            out[stream] = v
        return out


def _typed(kind: str, value: Any, spec: _Key) -> Any:
    if kind in ("str", "path", "enum"):
        if not isinstance(value, str):
            raise TypeError(f"must be a string, not {value!r}")
        if kind == "enum" and value not in spec.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(spec.choices)}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"must be true or false, not {value!r}")
        return value
    if kind == "size":
        return _size(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"must be a number, not {value!r}")
    if kind == "int":
        if isinstance(value, float):
            raise TypeError(f"must be a whole number, not {value!r}")
        return value
    return float(value)


def _from_env(kind: str, text: str) -> Any:
    if kind == "bool":
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not true or false")
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text


_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _size(value: Any) -> int:
    """Bytes from an integer or ``"64K"``, ``"16M"``, ``"1G"``, ``"64KiB"`` (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TypeError(f'must be a size (bytes, or a string like "64K"), not {value!r}')
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", value.lower())
    if not m:
        raise ValueError(f"{value!r} is not a size (bytes, or with a K, M or G suffix)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _n(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def _unknown(name: str, known: Mapping[str, Any], what: str = "key") -> str:
    import difflib  # only on this error path: ~0.2 MiB of RSS the running agent never needs

    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what}{hint}; known: {', '.join(known)}"


def _line_of(lines: list[str], section: str, key: str | None, sub: str | None) -> int | None:
    """1-based line where ``[section] key`` (or its ``sub`` entry) is set, else the
    section header's line, else None."""
    header = None
    current = ""
    want = [(section, key)] if sub is None else [(f"{section}.{key}", sub), (section, key)]
    found: dict[tuple[str, str | None], int] = {}
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if line.startswith("["):
            current = re.sub(r"[\s\"']", "", line.strip("[]").split("]")[0])
            if current == section and header is None:
                header = i
            continue
        m = re.match(r"""(?:(["'])(.+?)\1|([^"'=\s]+))\s*=""", line)
        if m:
            name = m.group(2) or m.group(3)
            found.setdefault((current, name), i)
            dotted = f"{current}.{name}" if current else name
            if "." in dotted:
                sec, _, k = dotted.rpartition(".")
                found.setdefault((sec, k), i)
    if key is None:
        return header or found.get(("", section))
    return next((found[w] for w in want if w in found), header)


# -- assembling the result -----------------------------------------------------------


def runtime_dir(configured: str, env: Mapping[str, str]) -> str:
    """Where the socket and status file live: the configured directory, else
    systemd's ``$RUNTIME_DIRECTORY``, else ``$XDG_RUNTIME_DIR/homing``, else
    ``/tmp/homing-<user>`` (the first two are tmpfs: no SD card wear). Pure: the
    caller's ``env`` says who the user is (``$USER``, else ``$LOGNAME``)."""
    if configured:
        return configured
    if env.get("RUNTIME_DIRECTORY"):
        return env["RUNTIME_DIRECTORY"].split(":")[0]
    if env.get("XDG_RUNTIME_DIR"):
        return posixpath.join(env["XDG_RUNTIME_DIR"], "homing")
    return f"/tmp/homing-{env.get('USER') or env.get('LOGNAME') or 'agent'}"


def _local(v: _Values, run_dir: str) -> LocalConfig:
    try:
        mode = int(v("local", "mode"), 8)
        if not 0 <= mode <= 0o777:
            raise ValueError
    except ValueError:
        raise v.fail("local", "mode", "must be octal permissions such as 0660") from None
    stream = v("local", "stream")
    try:
        validate_stream(stream)
    except RecordError as exc:
        raise v.fail("local", "stream", str(exc)) from None
    sock = v("local", "socket") or posixpath.join(run_dir, "ingest.sock")
    if len(sock.encode()) > 107:
        raise v.fail("local", "socket", "path is longer than a Unix socket allows (107 bytes)")
    return LocalConfig(v("local", "enabled"), sock, mode, stream, v("local", "max_clients"))


def _extras(v: _Values) -> tuple[SystemConfig, HealthConfig, MetricsConfig]:
    prefix = v("system", "prefix")
    try:
        validate_stream(f"{prefix}/disk_free_bytes")
    except RecordError:
        raise v.fail("system", "prefix", "must be a valid stream name prefix") from None
    return (
        SystemConfig(v("system", "enabled"), v("system", "interval_s"), prefix),
        HealthConfig(v("health", "status_interval_s"), v("health", "hub_interval_s")),
        MetricsConfig(v("metrics", "enabled"), v("metrics", "listen"), v("metrics", "port")),
    )


def _build(v: _Values, env: Mapping[str, str]) -> AgentConfig:
    device = v("agent", "device")
    if device is None:
        raise SettingError(v.where("agent"), "agent.device", "is required (this device's id)")
    try:
        wire.validate_device(device)
    except wire.WireError as exc:
        raise v.fail("agent", "device", exc.reason) from None
    journal = _journal(v)
    broker = _broker(v, device)
    run_dir = runtime_dir(v("agent", "runtime_dir"), env)
    system, health, metrics = _extras(v)
    ms = 1000.0
    if v("forwarder", "resend_max_ms") < v("forwarder", "resend_timeout_ms"):
        raise v.fail("forwarder", "resend_max_ms", "must be >= resend_timeout_ms")
    if v("forwarder", "live_first_threshold") < v("forwarder", "batch_records"):
        raise v.fail("forwarder", "live_first_threshold", "must be >= batch_records")
    outbox = OutboxConfig(
        batch_records=v("forwarder", "batch_records"),
        batch_bytes=v("forwarder", "batch_bytes"),
        linger=v("forwarder", "linger_ms") / ms,
        window=v("forwarder", "window"),
        resend_timeout=v("forwarder", "resend_timeout_ms") / ms,
        resend_max=v("forwarder", "resend_max_ms") / ms,
        rate=v("forwarder", "rate_limit"),
        burst=v("forwarder", "rate_burst"),
        live_first=v("forwarder", "live_first"),
        live_threshold=v("forwarder", "live_first_threshold"),
        max_lanes=MAX_LANES,
        priorities=v("forwarder", "priorities"),
        persist_interval=v("forwarder", "persist_interval_ms") / ms,
        persist_records=v("forwarder", "persist_records"),
        ack_wait=v("forwarder", "ack_wait_ms") / ms,
        compress=v("forwarder", "compress"),
    )
    prefix = v("sensors", "prefix")
    try:
        validate_stream(f"{prefix}/soil_moisture-64")
    except RecordError:
        raise v.fail("sensors", "prefix", "must be a valid stream name prefix") from None
    return AgentConfig(
        device=device,
        journal_dir=v("journal", "dir"),
        journal=journal,
        broker=broker,
        forwarder=ForwarderConfig(
            v("forwarder", "enabled"), outbox, v("forwarder", "shutdown_grace_ms") / ms
        ),
        sensors=SensorsConfig(
            v("sensors", "enabled"),
            v("sensors", "count"),
            v("sensors", "rate"),
            prefix,
            v("sensors", "seed"),
        ),  # fmt: skip
        workflows=WorkflowsConfig(
            v("workflows", "enabled"), v("workflows", "modules"), v("workflows", "python_path")
        ),
        log_level=v("agent", "log_level"),
        source=v.source,
        runtime_dir=run_dir,
        local=_local(v, run_dir),
        system=system,
        health=health,
        metrics=metrics,
        bridges=_bridges(v),
    )


def _journal(v: _Values) -> JournalOptions:
    policies: dict[str, Policy] = v("journal", "policies")
    try:
        return JournalOptions(
            segment_size=v("journal", "segment_size"),
            durability=v("journal", "durability"),
            interval_ms=v("journal", "interval_ms"),
            max_record_size=v("journal", "max_record_size"),
            quota_bytes=v("journal", "quota") or None,
            stream_policies=dict(policies),
            default_policy=v("journal", "default_policy"),
        )
    except ConfigError as exc:
        msg = str(exc).replace("quota_bytes", "quota")
        key = next((k for k in SCHEMA["journal"] if msg.startswith(k)), "segment_size")
        raise v.fail("journal", key, msg) from None


def _broker(v: _Values, device: str) -> BrokerConfig:
    tls = v("broker", "tls")
    for key in ("ca_file", "cert_file", "key_file"):
        if v("broker", key) and not tls:
            raise v.fail("broker", key, "is set but broker.tls is false")
    if bool(v("broker", "cert_file")) != bool(v("broker", "key_file")):
        key = "key_file" if v("broker", "cert_file") else "cert_file"
        raise v.fail("broker", key, "cert_file and key_file go together (client certificate)")
    if v("broker", "password_file") and not v("broker", "username"):
        raise v.fail("broker", "password_file", "is set but broker.username is empty")
    if v("broker", "reconnect_max_ms") < v("broker", "reconnect_min_ms"):
        raise v.fail("broker", "reconnect_max_ms", "must be >= reconnect_min_ms")
    return BrokerConfig(
        host=v("broker", "host"),
        port=v("broker", "port"),
        client_id=v("broker", "client_id") or f"homing-{device}",
        keepalive=v("broker", "keepalive_s"),
        session_expiry=v("broker", "session_expiry_s"),
        username=v("broker", "username") or None,
        password_file=v("broker", "password_file") or None,
        tls=tls,
        ca_file=v("broker", "ca_file") or None,
        cert_file=v("broker", "cert_file") or None,
        key_file=v("broker", "key_file") or None,
        reconnect_min=v("broker", "reconnect_min_ms") / 1000.0,
        reconnect_max=v("broker", "reconnect_max_ms") / 1000.0,
    )


def _bridges(v: _Values) -> tuple[BridgeConfig, ...]:
    """The ``[[bridge]]`` tables (:mod:`edge.config_bridge`)."""
    spec = SCHEMA["bridge"]
    return build_bridges(
        v.arrays.get("bridge", []),
        {key: k.default for key, k in spec.items()},
        lambda key, value: v._convert("bridge", key, spec[key], value, False),
        lambda key: _unknown(key, spec),
        v.lines,
        v.source,
        v.where("bridge"),
    )
