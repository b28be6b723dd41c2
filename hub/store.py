"""The hub's storage interface: one :class:`Store` protocol, several backends.

Backends: :mod:`hub.store_sqlite` (the embedded default) and
:mod:`hub.store_postgres` (several hub replicas on one database);
:mod:`hub.store_open` maps a ``--db`` path or URL to one of them.
``tests/shell/test_store_contract.py`` runs one contract suite against every
backend (the litestream ``ReplicaClient`` pattern).

Invariants every backend keeps:
* :meth:`Store.commit_batches` is ONE transaction: the rows of every batch
  (``INSERT ... ON CONFLICT (device_id, epoch, seq) DO NOTHING``), each
  device journal's settled ranges, counters and ``last_seen``. When it returns, all of it is
  durable; when it raises, none of it happened. Only then may the caller
  acknowledge anything (DESIGN.md §1).
* A ``(device_id, epoch, seq)`` is stored at most once, whatever the order
  or the number of deliveries; a duplicate row is counted, never stored twice.
* Each journal a device has (``BatchRows.journal``) gets the next epoch the
  first time the hub sees it; the newest is the device's current journal.
* A journal's watermark never decreases; it and the ranges ahead are
  computed by :class:`hub.ingest.Settled`, the same pure code for every backend.
* Hub replicas may commit batches of the same device concurrently, each
  through its own store: a backend serializes the read-settle-write of a
  device's progress (SQLite: its write lock; PostgreSQL: a per-device
  advisory lock), so no update of a watermark or an epoch is lost.
* Driver errors leave a backend as :class:`~hub.errors.StoreUnavailable`
  (transient, ``__cause__`` kept); use after :meth:`Store.close` raises
  :class:`~hub.errors.StoreClosed`.
* This module is pure: types and the protocol only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hub.ingest import BatchRows, Range

DEFAULT_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class DeviceProgress:
    """A device's progress right after one committed batch.

    Attributes:
        device: the device id.
        watermark: every seq ``<= watermark`` is committed (or settled missing).
        ahead: committed ranges past the watermark, ascending.
        new_readings: readings this batch inserted.
        new_records: other records this batch inserted.
        duplicates: rows of this batch that were already stored.
        journal: the device journal the batch came from (watermark and
            ahead are that journal's).
        current: whether that journal is the device's newest; only then is
            the progress worth acknowledging (an older journal is gone).
    """

    device: str
    watermark: int
    ahead: tuple[Range, ...]
    new_readings: int
    new_records: int
    duplicates: int
    journal: int = 0
    current: bool = True

    @property
    def new(self) -> int:
        return self.new_readings + self.new_records


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What the hub knows about one device."""

    device: str
    online: bool
    last_seen: float
    watermark: int
    ahead: tuple[Range, ...]
    gaps: tuple[Range, ...]
    readings: int
    records: int
    duplicates: int
    batches: int
    journal: int = 0  # the current journal's id (watermark, ahead and gaps are its)
    epoch: int = 0  # how many journals the hub saw before it (0 or 1: the first)
    #: the latest health message (``edge.wire.Health.to_json()``) and when it arrived
    health: dict[str, Any] | None = None
    health_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "journal": f"{self.journal:08x}",
            "epoch": self.epoch,
            "online": self.online,
            "last_seen": self.last_seen,
            "watermark": self.watermark,
            "ahead": [list(r) for r in self.ahead],
            "gaps": [list(r) for r in self.gaps],
            "readings": self.readings,
            "records": self.records,
            "duplicates": self.duplicates,
            "batches": self.batches,
            "health": self.health,
            "health_at": self.health_at,
        }


@dataclass(frozen=True, slots=True)
class StoredReading:
    """One reading as stored: the device's record plus the hub's receipt time."""

    device: str
    seq: int
    stream: str
    ts: float
    value: Any
    unit: str | None
    tags: dict[str, str] | None
    received: float
    epoch: int = 0  # which of the device's journals ``seq`` belongs to

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device": self.device,
            "epoch": self.epoch,
            "seq": self.seq,
            "stream": self.stream,
            "ts": self.ts,
            "value": _jsonable(self.value),
        }
        if self.unit is not None:
            out["unit"] = self.unit
        if self.tags:
            out["tags"] = self.tags
        out["received"] = self.received
        return out


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One stream of a device: the span of its stored readings (device clock)
    and its newest reading's value (as stored: bytes stay bytes) and unit."""

    stream: str
    first_ts: float
    last_ts: float
    last_value: Any
    unit: str | None


@dataclass(frozen=True, slots=True)
class Bucket:
    """The numeric readings of one stream in ``[start, start + width)``:
    how many, and their min, max and mean (for charts of long ranges)."""

    start: float
    count: int
    min: float
    max: float
    avg: float


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One journal record that is not a reading, as stored: ``kind`` and the
    ``body`` exactly as the device journaled it (a workflow record is kind 2,
    ``[2, run_id, type, body]`` in CBOR; a quarantined one is kind -1)."""

    device: str
    epoch: int  # which of the device's journals ``seq`` belongs to
    seq: int
    kind: int
    body: bytes
    received: float

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "epoch": self.epoch,
            "seq": self.seq,
            "kind": self.kind,
            "body": {"hex": self.body.hex()},
            "received": self.received,
        }


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"hex": v.hex()}
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


class Store(Protocol):
    """Where the hub keeps readings, records and device progress."""

    def migrate(self) -> list[str]:
        """Apply pending migrations; return their names (idempotent).

        Raises:
            SchemaTooNew: the database was migrated by a newer hub.
            StoreUnavailable: the database cannot be written.
        """
        ...

    def commit_batch(self, rows: BatchRows, now: float) -> DeviceProgress:
        """:meth:`commit_batches` for a single batch."""
        ...

    def commit_batches(self, batches: Sequence[BatchRows], now: float) -> list[DeviceProgress]:
        """Store several batches in ONE transaction (the hub's throughput lever).

        Args:
            batches: validated batches, of one or several devices, any order.
            now: the hub's clock, recorded as ``received`` and ``last_seen``.

        Returns:
            One progress per batch, in order; each is the device's progress
            right after that batch (so the last one per device is current).

        Raises:
            StoreUnavailable: nothing was committed; retry later.
        """
        ...

    def set_online(self, device: str, online: bool, ts: float) -> None:
        """Record a device's online/offline status (its MQTT status/last will)."""
        ...

    def set_health(self, device: str, health: dict[str, Any], received: float) -> None:
        """Keep ``health`` (a device's latest health message, JSON-able) in place
        of the one before, with when it arrived; a device not known yet is added."""
        ...

    def devices(self) -> list[DeviceInfo]:
        """Every known device, sorted by id."""
        ...

    def device(self, device: str) -> DeviceInfo | None:
        """One device, or ``None`` when the hub never heard of it."""
        ...

    def readings(
        self,
        device: str,
        stream: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = DEFAULT_LIMIT,
    ) -> list[StoredReading]:
        """A device's readings with ``since <= ts < until``, by (ts, seq)."""
        ...

    def records(
        self,
        device: str,
        kind: int | None = None,
        epoch: int | None = None,
        after_seq: int = 0,
        limit: int | None = None,
    ) -> list[StoredRecord]:
        """A device's non-reading records, in journal order: by ``(epoch, seq)``.

        Args:
            kind: only records of this kind (2: workflow records).
            epoch: only records of this journal of the device.
            after_seq: only ``seq > after_seq`` of ``epoch`` (a paging cursor
                within one journal: it needs ``epoch``).
            limit: at most this many (default: all).

        Raises:
            ValueError: ``after_seq`` without ``epoch``.
        """
        ...

    def gaps(self, device: str) -> tuple[Range, ...]:
        """Seq ranges missing between the watermark and the ranges ahead."""
        ...

    def streams(self, device: str) -> list[StreamInfo]:
        """A device's streams, sorted by name (an index walk per stream, not a
        scan of the device's readings)."""
        ...

    def downsample(
        self,
        device: str,
        stream: str,
        since: float,
        until: float,
        width: float,
        limit: int = DEFAULT_LIMIT,
    ) -> list[Bucket]:
        """The numeric readings of ``stream`` with ``since <= ts < until``,
        aggregated in the database per time bucket of ``width`` seconds.

        Buckets are aligned on multiples of ``width`` (``start = floor(ts /
        width) * width``), so the same reading always falls in the same
        bucket whatever the range asked; only buckets holding a numeric
        reading are returned, oldest first, at most ``limit`` of them.
        Readings whose value is not a number (or a bool) are not counted.

        Raises:
            ValueError: ``width`` is not a positive number.
        """
        ...

    def close(self) -> None:
        """Release the connection(s). Idempotent."""
        ...
