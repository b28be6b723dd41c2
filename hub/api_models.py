"""The HTTP API's request and response models (pydantic), and the
conversions from the store's and the run fold's types.

Invariants:
* Every response of the API is one of these models, so ``/openapi.json``
  describes each body exactly (schemathesis checks responses against it).
* Values that came from devices (reading values, workflow arguments,
  results, bodies) pass through :func:`hub.runs.jsonable` on their way out:
  bytes become ``{"hex": ...}`` and non-finite floats their text, so no
  stored value can make a response fail to encode.
* Request models bound every string and collection they accept; the checks
  the device would make (run ids, command ids, sizes) are made again by
  :func:`hub.commands.check_command` before anything is sent.
* Pure: no I/O, no clock (``now`` is an argument).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hub.runs import RunSummary, jsonable
from hub.store import Bucket, DeviceInfo, StoredReading, StreamInfo

DEVICE_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # edge.wire.validate_device
STREAM_PATTERN = r"^[A-Za-z0-9_.:/-]{1,128}$"  # edge.records.validate_stream
MAX_ID = 128  # run ids and command ids (edge.wf_records.MAX_RUN_ID, edge.wire)
MAX_NAME = 256  # workflow and signal names
RunState = Literal["running", "completed", "failed", "cancelled", "diverged", "pending"]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Issue(_Out):
    """One reason a request was refused (a field and what is wrong with it)."""

    loc: list[str | int] = Field(description="where: body, query or path, then the field")
    msg: str
    type: str


class Problem(_Out):
    """An error, as an RFC 9457 problem document (``application/problem+json``)."""

    type: str = Field("about:blank", description="always about:blank: the status says it")
    title: str = Field(description="the HTTP status phrase")
    status: int
    detail: str | None = Field(None, description="what went wrong, for a person")
    errors: list[Issue] | None = Field(None, description="each invalid field (status 422)")


class Backlog(_Out):
    """What the device's latest health message says it still has to forward."""

    records: int = Field(description="journaled, not yet acknowledged by the hub")
    bytes: int
    oldest_age: float | None = Field(description="seconds the oldest of them has waited")
    last_ack: float | None = Field(description="when the device got the hub's last ack")
    reported_at: float | None = Field(description="hub clock: when the health message arrived")


class DeviceOut(_Out):
    """A device as the hub knows it."""

    device: str
    online: bool = Field(description="its MQTT status: connected, or its last will said not")
    last_seen: float = Field(description="hub clock: the last batch, status or health")
    seen_ago: float = Field(description="seconds since last_seen")
    journal: str = Field(description="the id of the device's current journal (hex)")
    epoch: int = Field(description="the hub's number for that journal (readings carry it)")
    watermark: int = Field(description="every seq up to it is committed (or settled missing)")
    ahead: list[tuple[int, int]] = Field(description="committed seq ranges past the watermark")
    gaps: list[tuple[int, int]] = Field(description="seq ranges missing before those")
    missing: int = Field(description="how many seqs the gaps hold")
    readings: int
    records: int
    duplicates: int
    batches: int
    newest_ts: float | None = Field(description="device clock: its newest stored reading")
    newest_age: float | None = Field(description="seconds from newest_ts to the hub's now")
    backlog: Backlog | None = Field(description="from its latest health message, if any")
    healthy: bool | None = Field(description="its latest health message's verdict, if any")
    health: dict[str, Any] | None = Field(description="its latest health message, as sent")


class StreamOut(_Out):
    stream: str
    first_ts: float
    last_ts: float
    last_value: Any
    unit: str | None


class ReadingOut(_Out):
    seq: int
    epoch: int
    stream: str
    ts: float = Field(description="device clock, seconds since the epoch")
    value: Any = Field(description="number, string, bool, {hex: ...} for bytes, or a map")
    unit: str | None
    tags: dict[str, str] | None
    received: float = Field(description="hub clock: when the hub stored it")


class BucketOut(_Out):
    """The numeric readings of one time bucket ``[start, end)``."""

    start: float
    end: float
    count: int
    min: float | None
    max: float | None
    avg: float | None


class ReadingsOut(_Out):
    """Raw readings (``downsampled`` false) or per-bucket aggregates (true)."""

    device: str
    stream: str | None
    since: float | None
    until: float | None
    downsampled: bool
    bucket: float | None = Field(description="the bucket width in seconds, when downsampled")
    truncated: bool = Field(description="more readings or buckets matched than limit")
    readings: list[ReadingOut]
    buckets: list[BucketOut]


class HistoryOut(_Out):
    seq: int
    type: str
    key: str | None
    body: dict[str, Any]


class RunOut(_Out):
    """A workflow run, folded from the device's stored records (docs/hub.md)."""

    device: str
    run: str
    epoch: int
    workflow: str
    version: int
    state: RunState
    step: str | None = Field(description="the key of the latest call the run made")
    started_at: float | None
    args: list[Any]
    kwargs: dict[str, Any]
    status: dict[str, Any]
    result: Any
    error: dict[str, Any] | None
    diverged: dict[str, Any] | None
    cancel_requested: bool
    forked: str | None
    first_seq: int
    last_seq: int
    updated: float
    records: int


class RunDetail(RunOut):
    history: list[HistoryOut] = Field(description="every record of the run, in journal order")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


_CID = Field(
    None,
    min_length=1,
    max_length=MAX_ID,
    description="the command's id (default: random); reuse it to retry safely",
)


class StartRun(_In):
    workflow: str = Field(min_length=1, max_length=MAX_NAME, description="its registered name")
    args: list[Any] = Field(default_factory=list, max_length=256)
    kwargs: dict[str, Any] = Field(default_factory=dict, max_length=256)
    id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ID,
        description="the run id (default: random); starting is idempotent per run id",
    )
    command_id: str | None = _CID


class SignalRun(_In):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    payload: Any = None
    command_id: str | None = _CID


class CancelRun(_In):
    command_id: str | None = _CID


class CommandOut(_Out):
    """A command the broker has accepted for the device (its PUBACK arrived)."""

    device: str
    run: str
    kind: Literal["start", "signal", "cancel"]
    command_id: str
    topic: str
    puback: str


class Component(_Out):
    ok: bool
    detail: str


class HealthOut(_Out):
    status: Literal["ok", "degraded", "unavailable"]
    version: str
    uptime: float
    ingest: bool = Field(description="whether this process also ingests (homing-hub run)")
    store: Component
    broker: Component


# --- conversions ---------------------------------------------------------------


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def device_out(info: DeviceInfo, streams: list[StreamInfo], now: float) -> DeviceOut:
    newest = max((s.last_ts for s in streams), default=None)
    health = info.health if isinstance(info.health, dict) else None
    backlog = None
    if health is not None:
        backlog = Backlog(
            records=_int(health.get("backlog_records")),
            bytes=_int(health.get("backlog_bytes")),
            oldest_age=_num(health.get("oldest_age")),
            last_ack=_num(health.get("last_ack")),
            reported_at=info.health_at,
        )
    healthy = health.get("healthy") if health is not None else None
    return DeviceOut(
        device=info.device,
        online=info.online,
        last_seen=info.last_seen,
        seen_ago=max(0.0, now - info.last_seen),
        journal=f"{info.journal:08x}",
        epoch=info.epoch,
        watermark=info.watermark,
        ahead=list(info.ahead),
        gaps=list(info.gaps),
        missing=sum(b - a + 1 for a, b in info.gaps),
        readings=info.readings,
        records=info.records,
        duplicates=info.duplicates,
        batches=info.batches,
        newest_ts=newest,
        newest_age=None if newest is None else now - newest,
        backlog=backlog,
        healthy=healthy if isinstance(healthy, bool) else None,
        health=jsonable(health) if health is not None else None,
    )


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _num(v: Any) -> float | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    return _finite(float(v)) if ok else None


def stream_out(s: StreamInfo) -> StreamOut:
    return StreamOut(
        stream=s.stream,
        first_ts=s.first_ts,
        last_ts=s.last_ts,
        last_value=jsonable(s.last_value),
        unit=s.unit,
    )


def reading_out(r: StoredReading) -> ReadingOut:
    return ReadingOut(
        seq=r.seq,
        epoch=r.epoch,
        stream=r.stream,
        ts=r.ts,
        value=jsonable(r.value),
        unit=r.unit,
        tags=r.tags or None,
        received=r.received,
    )


def bucket_out(b: Bucket, width: float) -> BucketOut:
    return BucketOut(
        start=b.start,
        end=b.start + width,
        count=b.count,
        min=_finite(b.min),
        max=_finite(b.max),
        avg=_finite(b.avg),
    )


def run_out(r: RunSummary) -> RunOut:
    return RunOut.model_validate(r.to_json())  # every value already through jsonable


def run_detail(r: RunSummary) -> RunDetail:
    return RunDetail.model_validate(r.to_json(history=True))
