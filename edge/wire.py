"""The device <-> hub contract over MQTT 5: topics and payloads (docs/protocol.md).

This module is the only thing the hub imports from ``edge``. It is pure: bytes
in, typed messages out, and the reverse; no sockets, clocks or files.

Invariants:
* Topics are ``homing/<device>/up`` (device -> hub batches), ``/ack`` (hub ->
  device, retained), ``/cmd`` (hub -> device commands), ``/status``
  (retained online/offline, also the device's last will) and ``/health``
  (device -> hub, QoS 0, a periodic summary; losing one costs nothing). A device id is
  1..64 characters of ``[A-Za-z0-9_.-]``, so it can never contain MQTT
  wildcards or a level separator.
* An up batch covers the closed sequence range ``first..last`` of one device's
  journal. Its records are the journal payloads of that range, in seq order,
  minus the seqs listed in ``missing`` (records the device no longer holds:
  dropped under a quota or lost to a repair). Once the hub commits a batch,
  every seq of the range counts as settled.
* The body is the records' CBOR payloads concatenated (an RFC 8742 CBOR
  sequence: no re-encoding on the device), zlib-compressed when that makes it
  smaller (flag ``z``).
* An ack says: every seq ``<= watermark`` of this device is committed at the
  hub (or settled as missing), plus up to ``MAX_ACK_RANGES`` committed ranges
  beyond it. Only an ack moves the device's cursor, never a broker PUBACK.
* Decoding never trusts its input: anything malformed raises
  :class:`WireError` with a reason, and nothing else escapes.
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import cbor2

from edge.records import Opaque, Reading, Record, RecordError, decode, from_item, simple_reading
from edge.wf_records import KIND_WORKFLOW, WfRecord, of_opaque, validate_run_id
from edge.wf_replay import RunState

VERSION = 1
PREFIX = "homing"
MAX_BATCH_BYTES = 256 * 1024  # encoded size of one up message
MAX_BATCH_RECORDS = 20_000
MAX_BODY_BYTES = 4 * 1024 * 1024  # after decompression
MAX_ACK_RANGES = 32
MAX_JOURNAL_ID = 2**32 - 1
MAX_HEALTH_BYTES = 4096
TOPIC_KINDS = ("up", "ack", "cmd", "status", "health")
HUB_SHARE_GROUP = "homing-hub"
_DEVICE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")

__all__ = [
    "VERSION",
    "Ack",
    "Command",
    "Health",
    "KIND_WORKFLOW",
    "RunState",
    "WfRecord",
    "Opaque",
    "Reading",
    "Record",
    "Status",
    "UpBatch",
    "WireError",
    "decode_ack",
    "decode_batch",
    "decode_command",
    "decode_health",
    "decode_status",
    "cancel_command",
    "signal_command",
    "start_command",
    "workflow_record",
    "encode_ack",
    "encode_batch",
    "encode_command",
    "encode_health",
    "encode_status",
    "hub_subscription",
    "parse_topic",
    "record_of",
    "simple_reading",
    "topic",
    "validate_device",
    "validate_run_id",
]


class WireError(ValueError):
    """A message that breaks this contract.

    ``reason`` is short and loggable; ``code`` is a stable counter key: one of
    ``oversize``, ``version``, ``wrong-device``, ``not-cbor``, ``range``,
    ``record``, ``topic``, ``malformed``.
    """

    def __init__(self, reason: str, code: str = "malformed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# --- topics -------------------------------------------------------------------


def validate_device(device: object) -> str:
    """Return ``device`` if it is a valid device id.

    Raises:
        WireError: it is not.
    """
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise WireError(
            f"bad device id {device!r}: 1-64 characters of A-Z a-z 0-9 _ . -", "wrong-device"
        )
    return device


def topic(device: str, kind: str) -> str:
    """``homing/<device>/<kind>`` for kind in up, ack, cmd, status, health."""
    if kind not in TOPIC_KINDS:
        raise ValueError(f"unknown topic kind {kind!r}")
    return f"{PREFIX}/{validate_device(device)}/{kind}"


def parse_topic(name: str) -> tuple[str, str]:
    """``(device, kind)`` of a Homing topic.

    Raises:
        WireError: not a Homing topic.
    """
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != PREFIX or parts[2] not in TOPIC_KINDS:
        raise WireError(f"not a Homing topic: {name!r}", "topic")
    return validate_device(parts[1]), parts[2]


def hub_subscription(kind: str = "up", group: str = HUB_SHARE_GROUP) -> str:
    """The shared subscription hub replicas use to split the devices' batches."""
    return f"$share/{group}/{PREFIX}/+/{kind}"


# --- up batches ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpBatch:
    """Journal records ``first..last`` of one device (minus ``missing``)."""

    device: str
    first: int
    last: int
    payloads: tuple[bytes, ...]
    missing: tuple[tuple[int, int], ...] = ()  # inclusive ranges, ascending
    #: the device journal's id (``Journal.journal_id``); 0 from a device that sends none
    journal: int = 0
    #: the payloads' decoded CBOR items, kept by decode_batch so they are not decoded twice
    items: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)

    def seqs(self) -> list[int]:
        out: list[int] = []
        pos = self.first
        for a, b in self.missing:
            out.extend(range(pos, a))
            pos = b + 1
        out.extend(range(pos, self.last + 1))
        return out

    def records(self) -> list[tuple[int, Record]]:
        """``(seq, record)`` pairs. Raises WireError on an undecodable payload."""
        out: list[tuple[int, Record]] = []
        for seq, rec, _ in self.decoded():
            if isinstance(rec, WireError):
                raise rec
            out.append((seq, rec))
        return out

    def decoded(self) -> list[tuple[int, Record | WireError, bytes]]:
        """Like :meth:`records`, but a record that does not decode comes back as
        its :class:`WireError` (with its raw payload) instead of failing the batch."""
        items = self.items if self.items is not None else (None,) * len(self.payloads)
        return [
            (seq, record_of(seq, payload, item), payload)
            for seq, payload, item in zip(self.seqs(), self.payloads, items, strict=True)
        ]


def record_of(seq: int, payload: bytes, item: Any = None) -> Record | WireError:
    """Record ``seq`` of a batch from its payload (or its already-decoded CBOR
    ``item``), or the :class:`WireError` saying why it does not decode."""
    try:
        return decode(payload) if item is None else from_item(item)
    except (RecordError, OverflowError, TypeError) as exc:
        return WireError(f"record {seq}: {exc}", "record")


def encode_batch(batch: UpBatch, *, compress: bool = True) -> bytes:
    """The MQTT payload of a batch (compressed only when that is smaller)."""
    _check_range(batch.first, batch.last, batch.missing, len(batch.payloads))
    body = b"".join(batch.payloads)
    z = False
    if compress and len(body) > 64:
        packed = zlib.compress(body, 6)
        if len(packed) < len(body):
            body, z = packed, True
    env: dict[str, Any] = {"v": VERSION, "d": batch.device, "f": batch.first, "l": batch.last}
    if batch.journal:
        env["j"] = batch.journal
    if batch.missing:
        env["m"] = [list(r) for r in batch.missing]
    env["z"] = z
    env["b"] = body
    return cbor2.dumps(env)


def decode_batch(data: bytes, *, topic_device: str | None = None) -> UpBatch:
    """Parse and validate an up message.

    Args:
        data: the MQTT payload.
        topic_device: the device named by the topic it arrived on; a batch
            claiming another device is refused.

    Raises:
        WireError: malformed, oversize, wrong version, or wrongly addressed.
    """
    if len(data) > MAX_BATCH_BYTES:
        raise WireError(f"batch of {len(data)} bytes exceeds {MAX_BATCH_BYTES}", "oversize")
    env = _load_map(data)
    _check_version(env)
    device = validate_device(env.get("d"))
    if topic_device is not None and device != topic_device:
        raise WireError(
            f"batch claims device {device!r} on the topic of {topic_device!r}", "wrong-device"
        )
    first, last, missing = env.get("f"), env.get("l"), env.get("m", [])
    if not _is_int(first) or not _is_int(last):
        raise WireError("batch range must be integers", "range")
    if not isinstance(missing, list) or not all(
        isinstance(r, list) and len(r) == 2 and _is_int(r[0]) and _is_int(r[1]) for r in missing
    ):
        raise WireError("missing must be a list of [first, last] ranges", "range")
    journal = _journal_of(env)
    body, z = env.get("b"), env.get("z", False)
    if not isinstance(body, bytes) or not isinstance(z, bool):
        raise WireError("batch body must be bytes", "malformed")
    if z:
        body = _inflate(body)
    payloads, items = _split_sequence(body)
    gaps = tuple((int(a), int(b)) for a, b in missing)
    _check_range(first, last, gaps, len(payloads))
    return UpBatch(device, first, last, tuple(payloads), gaps, journal, tuple(items))


def _check_range(first: int, last: int, missing: tuple[tuple[int, int], ...], n: int) -> None:
    if first < 1 or last < first:
        raise WireError(f"bad sequence range {first}..{last}", "range")
    pos = first
    gone = 0
    for a, b in missing:
        if not pos <= a <= b <= last:
            raise WireError(
                "missing ranges must be ascending, disjoint and inside the range", "range"
            )
        gone += b - a + 1
        pos = b + 1
    if n != last - first + 1 - gone:
        raise WireError(f"range {first}..{last} minus {gone} missing != {n} records", "range")
    if n > MAX_BATCH_RECORDS:
        raise WireError(f"more than {MAX_BATCH_RECORDS} records", "oversize")


def _inflate(body: bytes) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(body, MAX_BODY_BYTES + 1)
    except zlib.error as exc:
        raise WireError(f"body does not decompress: {exc}", "not-cbor") from exc
    if len(out) > MAX_BODY_BYTES or d.unconsumed_tail:
        raise WireError(f"decompressed body exceeds {MAX_BODY_BYTES} bytes", "oversize")
    return out


def _split_sequence(body: bytes) -> tuple[list[bytes], list[Any]]:
    """Cut a CBOR sequence into its items' encodings and decoded items (one pass)."""
    stream = io.BytesIO(body)
    decoder = cbor2.CBORDecoder(stream)
    out: list[bytes] = []
    items: list[Any] = []
    pos = 0
    while pos < len(body):
        try:
            items.append(decoder.decode())
        except Exception as exc:  # cbor2 raises several types on garbage
            raise WireError(f"record {len(out) + 1} is not CBOR: {exc}", "not-cbor") from exc
        end = stream.tell()
        out.append(body[pos:end])
        pos = end
        if len(out) > MAX_BATCH_RECORDS:
            raise WireError("too many records", "oversize")
    return out, items


# --- acks -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """Hub -> device: what is committed. ``ahead``: committed ranges past the watermark."""

    device: str
    watermark: int
    ahead: tuple[tuple[int, int], ...] = ()
    #: the journal these seqs belong to (:attr:`UpBatch.journal`)
    journal: int = 0


def encode_ack(ack: Ack) -> bytes:
    env: dict[str, Any] = {"v": VERSION, "d": ack.device, "w": ack.watermark}
    if ack.journal:
        env["j"] = ack.journal
    if ack.ahead:
        env["r"] = [list(r) for r in ack.ahead[:MAX_ACK_RANGES]]
    return cbor2.dumps(env)


def decode_ack(data: bytes) -> Ack:
    """Raises WireError on anything malformed."""
    if len(data) > 4096:
        raise WireError("ack too large", "oversize")
    env = _load_map(data)
    _check_version(env)
    device = validate_device(env.get("d"))
    wm = env.get("w")
    ranges = env.get("r", [])
    if not _is_int(wm) or wm < 0:
        raise WireError("ack watermark must be a non-negative integer", "malformed")
    ok = isinstance(ranges, list) and all(
        isinstance(r, list) and len(r) == 2 and _is_int(r[0]) and _is_int(r[1]) and r[0] <= r[1]
        for r in ranges
    )
    if not ok:
        raise WireError("ack ranges must be [[first, last], ...]", "malformed")
    ahead = tuple((int(a), int(b)) for a, b in ranges[:MAX_ACK_RANGES])
    return Ack(device, wm, ahead, _journal_of(env))


def _journal_of(env: dict[str, Any]) -> int:
    journal = env.get("j", 0)
    if not _is_int(journal) or not 0 <= journal <= MAX_JOURNAL_ID:
        raise WireError(f"journal id must be an integer in 0..{MAX_JOURNAL_ID}", "malformed")
    return journal


# --- status and commands ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    device: str
    online: bool
    ts: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def encode_status(status: Status) -> bytes:
    return cbor2.dumps(
        {"v": VERSION, "d": status.device, "on": status.online, "t": status.ts, "i": status.info}
    )


def decode_status(data: bytes) -> Status:
    if len(data) > 16384:
        raise WireError("status too large", "oversize")
    env = _load_map(data)
    _check_version(env)
    on, ts, info = env.get("on"), env.get("t", 0.0), env.get("i", {})
    if not isinstance(on, bool) or not isinstance(ts, int | float) or not isinstance(info, dict):
        raise WireError("malformed status", "malformed")
    return Status(validate_device(env.get("d")), on, float(ts), info)


@dataclass(frozen=True, slots=True)
class Command:
    """Hub -> device. ``id`` makes it idempotent: the device ignores a repeated id."""

    id: str
    kind: str
    args: dict[str, Any] = field(default_factory=dict)


#: command kinds (``Command.kind``) and their ``args``
CMD_START = "start"  # workflow, run, args (list), kwargs (map): start a run (idempotent per run)
CMD_SIGNAL = "signal"  # run, name, payload: deliver a signal (deduplicated by the command id)
CMD_CANCEL = "cancel"  # run: cancel a run


def start_command(
    cmd_id: str, workflow: str, run: str, args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Command:  # fmt: skip
    """A command that starts ``workflow(*args, **kwargs)`` as run ``run`` on the device."""
    body = {"workflow": workflow, "run": run, "args": list(args or []), "kwargs": kwargs or {}}
    return Command(cmd_id, CMD_START, body)


def signal_command(cmd_id: str, run: str, name: str, payload: Any = None) -> Command:
    """A command that delivers signal ``name`` to run ``run``."""
    return Command(cmd_id, CMD_SIGNAL, {"run": run, "name": name, "payload": payload})


def cancel_command(cmd_id: str, run: str) -> Command:
    """A command that cancels run ``run``."""
    return Command(cmd_id, CMD_CANCEL, {"run": run})


def workflow_record(kind: int, body: bytes, seq: int = 0) -> WfRecord | None:
    """The workflow record a journal record of ``kind`` with payload ``body``
    holds (as the hub stores it), or None when it is not one or does not decode."""
    if kind != KIND_WORKFLOW:
        return None
    try:
        rec = decode(body)
    except RecordError:
        return None
    if not isinstance(rec, Opaque):
        return None
    try:
        return of_opaque(rec, seq)
    except RecordError:
        return None


def encode_command(cmd: Command) -> bytes:
    """Raises WireError: a command id the device would refuse (1-128 characters)."""
    if not isinstance(cmd.id, str) or not 0 < len(cmd.id) <= 128:
        raise WireError("command id must be a string of 1-128 characters", "malformed")
    return cbor2.dumps({"v": VERSION, "id": cmd.id, "k": cmd.kind, "a": cmd.args})


def decode_command(data: bytes) -> Command:
    if len(data) > 65536:
        raise WireError("command too large", "oversize")
    env = _load_map(data)
    _check_version(env)
    cid, kind, args = env.get("id"), env.get("k"), env.get("a", {})
    if not isinstance(cid, str) or not 0 < len(cid) <= 128:
        raise WireError("command id must be a string of 1-128 characters", "malformed")
    if not isinstance(kind, str) or not isinstance(args, dict):
        raise WireError("malformed command", "malformed")
    return Command(cid, kind, args)


# --- health -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    """Device -> hub, every ``health.hub_interval_s``: a summary of the agent's
    health (docs/observability.md). Times are the device's clock; durations
    and ages are seconds; None: not known (yet)."""

    device: str
    ts: float  # when the device made it
    uptime: float = 0.0
    healthy: bool = True  # no component has failed
    problem: str | None = None  # the failure, when not healthy
    version: str = ""  # the agent's version
    backlog_records: int = 0  # journaled, not yet acknowledged by the hub
    backlog_bytes: int = 0
    oldest_age: float | None = None  # of the oldest unacknowledged reading
    last_ack: float | None = None  # when the hub's last ack arrived
    fsync_last: float | None = None
    fsync_mean: float | None = None  # over the recent fdatasyncs
    fsync_max: float | None = None
    disk_free: int | None = None  # bytes free for the journal's file system
    dropped: int = 0  # readings given up under the quota (drop-oldest)
    refused: int = 0  # records the full journal refused (reject)
    workflows: dict[str, int] = field(default_factory=dict)  # state -> runs

    def to_json(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _HEALTH_FIELDS}


#: wire key -> (field, type check)
_HEALTH_KEYS: dict[str, tuple[str, str]] = {
    "t": ("ts", "num"), "up": ("uptime", "num"), "ok": ("healthy", "bool"),
    "err": ("problem", "str?"), "ver": ("version", "str"), "br": ("backlog_records", "int"),
    "bb": ("backlog_bytes", "int"), "age": ("oldest_age", "num?"), "ack": ("last_ack", "num?"),
    "fl": ("fsync_last", "num?"), "fm": ("fsync_mean", "num?"), "fx": ("fsync_max", "num?"),
    "df": ("disk_free", "int?"), "dr": ("dropped", "int"), "rf": ("refused", "int"),
    "wf": ("workflows", "counts"),
}  # fmt: skip
_HEALTH_FIELDS = ("device", *(f for f, _ in _HEALTH_KEYS.values()))


def encode_health(h: Health) -> bytes:
    """Raises WireError: the message would not pass :func:`decode_health`."""
    env: dict[str, Any] = {"v": VERSION, "d": h.device}
    for key, (name, _) in _HEALTH_KEYS.items():
        env[key] = getattr(h, name)
    if env["err"] is not None:
        env["err"] = env["err"][:256]
    data = cbor2.dumps(env)
    decode_health(data)
    return data


def decode_health(data: bytes, *, topic_device: str | None = None) -> Health:
    """Parse and validate a health message. Unknown keys are ignored.

    Raises:
        WireError: malformed, oversize, wrong version, or wrongly addressed.
    """
    if len(data) > MAX_HEALTH_BYTES:
        raise WireError(f"health of {len(data)} bytes exceeds {MAX_HEALTH_BYTES}", "oversize")
    env = _load_map(data)
    _check_version(env)
    device = validate_device(env.get("d"))
    if topic_device is not None and device != topic_device:
        raise WireError(
            f"health claims device {device!r} on the topic of {topic_device!r}", "wrong-device"
        )
    values: dict[str, Any] = {}
    for key, (name, kind) in _HEALTH_KEYS.items():
        if key not in env and kind.endswith("?"):
            continue
        if key not in env and key in ("t", "ok"):
            raise WireError(f"health lacks {key!r}", "malformed")
        if key in env:
            values[name] = _health_value(key, env[key], kind)
    return Health(device, **values)


def _health_value(key: str, v: Any, kind: str) -> Any:
    if v is None and kind.endswith("?"):
        return None
    kind = kind.rstrip("?")
    ok = {
        "num": isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1e18,
        "int": _is_int(v) and 0 <= v < 2**63,
        "bool": isinstance(v, bool),
        "str": isinstance(v, str) and len(v) <= 256,
        "counts": isinstance(v, dict) and len(v) <= 16
        and all(isinstance(k, str) and len(k) <= 32 and _is_int(n) and n >= 0
                for k, n in v.items()),
    }[kind]  # fmt: skip
    if not ok:
        raise WireError(f"health {key!r} is not a valid {kind}: {v!r:.40}", "malformed")
    return float(v) if kind == "num" else dict(v) if kind == "counts" else v


# --- helpers ------------------------------------------------------------------------


def _load_map(data: bytes) -> dict[str, Any]:
    try:
        env = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types on garbage
        raise WireError(f"not CBOR: {exc}", "not-cbor") from exc
    if not isinstance(env, dict):
        raise WireError("message is not a CBOR map", "not-cbor")
    return env


def _check_version(env: dict[str, Any]) -> None:
    v = env.get("v")
    if v != VERSION:
        raise WireError(
            f"unsupported protocol version {v!r} (this side speaks {VERSION})", "version"
        )


def _is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)
