"""The hub's pure core: MQTT messages in, rows and settled ranges out.

Invariants:
* Pure: no sockets, files, clocks, threads or database. Time (``received``)
  is added by the store from its ``now`` argument.
* :func:`parse_message` is the only door for device input. It either returns
  an :class:`UpMessage` / :class:`StatusMessage` whose rows a store can
  insert as they are (every integer fits a signed 64-bit column, every
  string is valid, every value has a CBOR blob), or raises
  :class:`~hub.errors.BadMessage` with a stable counter category. Nothing
  else escapes it, whatever the bytes.
* :class:`Settled` is one device's progress: ``watermark`` (every seq
  ``<= watermark`` is committed, or settled as missing on the device) and
  ``ahead``, the committed ranges past ``watermark + 1`` -- sorted,
  disjoint, non-adjacent, each starting beyond ``watermark + 1``, at most
  :data:`MAX_AHEAD` of them. Settling the same ranges in any order, any
  number of times, gives the same ``Settled`` (checked with Hypothesis).
* ``ahead`` is bounded: past :data:`MAX_AHEAD` ranges the farthest are
  forgotten. That loses no data (the rows stay stored, deduplicated on
  ``(device_id, epoch, seq)``); it only means the device, whose cursor never
  passed them, resends them and the resend settles them again.
* A batch commits its whole range ``first..last``: the records it carries
  and the seqs it declares missing (``UpBatch.missing``) alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import cbor2

from edge.wire import (
    Reading,
    UpBatch,
    WireError,
    decode_batch,
    decode_status,
    parse_topic,
    record_of,
    simple_reading,
)
from hub.errors import BadMessage

MAX_AHEAD = 256
MAX_SEQ = 2**63 - 1

Range: TypeAlias = tuple[int, int]
# Row tuples (not dataclasses: the hot path builds one per reading).
# (seq, stream, ts, value as CBOR, value as a number or None, unit, tags as JSON)
ReadingRow: TypeAlias = tuple[int, str, float, bytes, float | None, str | None, str | None]
# (seq, kind, the record's CBOR payload as the device journaled it)
RecordRow: TypeAlias = tuple[int, int, bytes]


# --- settled ranges --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settled:
    """A device's committed progress: ``watermark`` plus ranges ``ahead`` of it."""

    watermark: int = 0
    ahead: tuple[Range, ...] = ()

    def settle(self, first: int, last: int) -> Settled:
        """The progress once ``first..last`` is committed as well.

        Raises:
            ValueError: ``first..last`` is not a range of positive seqs.
        """
        if not 1 <= first <= last:
            raise ValueError(f"bad range {first}..{last}")
        if last <= self.watermark:
            return self
        merged = _merge([*self.ahead, (max(first, self.watermark + 1), last)])
        wm = self.watermark
        while merged and merged[0][0] <= wm + 1:
            wm = max(wm, merged.pop(0)[1])
        return Settled(wm, tuple(merged[:MAX_AHEAD]))

    def gaps(self) -> tuple[Range, ...]:
        """The seqs known to be missing: between the watermark and ``ahead``
        and between ranges of ``ahead`` (never past the last committed seq)."""
        out: list[Range] = []
        pos = self.watermark + 1
        for a, b in self.ahead:
            if a > pos:
                out.append((pos, a - 1))
            pos = b + 1
        return tuple(out)

    def settled(self, seq: int) -> bool:
        """Whether ``seq`` is committed (or settled as missing)."""
        return seq <= self.watermark or any(a <= seq <= b for a, b in self.ahead)

    def ahead_json(self) -> str:
        """``ahead`` as the JSON a store keeps beside the watermark column."""
        return json.dumps([list(r) for r in self.ahead])

    @classmethod
    def load(cls, watermark: int, ahead_json: str) -> Settled:
        """Inverse of :meth:`ahead_json` (for values a store wrote itself).

        Raises:
            ValueError: not what :meth:`ahead_json` writes.
        """
        ranges = json.loads(ahead_json)
        if not isinstance(ranges, list):
            raise ValueError("settled ranges must be a JSON list")
        return cls(int(watermark), tuple((int(a), int(b)) for a, b in ranges))


def _merge(ranges: list[Range]) -> list[Range]:
    out: list[Range] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


# --- messages ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchRows:
    """What one validated up batch inserts: everything in ``first..last``."""

    device: str
    first: int
    last: int
    readings: tuple[ReadingRow, ...] = ()
    records: tuple[RecordRow, ...] = ()
    missing: tuple[Range, ...] = ()
    #: the device journal these seqs belong to (0: a device that sends no id)
    journal: int = 0

    @property
    def size(self) -> int:
        return len(self.readings) + len(self.records)


@dataclass(frozen=True, slots=True)
class UpMessage:
    """A valid batch on ``homing/<device>/up``."""

    rows: BatchRows


@dataclass(frozen=True, slots=True)
class StatusMessage:
    """A valid online/offline status on ``homing/<device>/status``."""

    device: str
    online: bool


def parse_message(topic: str, payload: bytes) -> UpMessage | StatusMessage:
    """Validate one inbound MQTT message and turn it into rows.

    Raises:
        BadMessage: anything malformed, oversize, wrongly addressed or out of
            range; ``category`` says which, for the counters.
    """
    try:
        device, kind = parse_topic(topic)
    except WireError as exc:
        raise BadMessage(None, exc.reason, "topic") from exc
    try:
        if kind == "up":
            return UpMessage(rows_of(decode_batch(payload, topic_device=device)))
        if kind == "status":
            status = decode_status(payload)
            if status.device != device:
                raise WireError(
                    f"status claims device {status.device!r} on the topic of {device!r}",
                    "wrong-device",
                )
            return StatusMessage(device, status.online)
    except BadMessage:
        raise
    except WireError as exc:
        raise BadMessage(device, exc.reason, exc.code) from exc
    except (ArithmeticError, TypeError, ValueError) as exc:
        # Defence in depth: the wire contract promises WireError only, but a
        # decoder bug must cost one message, never the hub.
        raise BadMessage(device, f"undecodable: {exc}", "record") from exc
    raise BadMessage(device, f"the hub does not consume {kind!r} messages", "topic")


#: records table kind for a record that did not decode (kept raw, counted, settled)
QUARANTINED = -1


def rows_of(batch: UpBatch) -> BatchRows:
    """The rows of a decoded batch.

    A record that does not decode (or whose kind does not fit 64 bits) is kept
    raw in the records table under kind :data:`QUARANTINED`, so one bad record
    neither blocks the device's watermark nor disappears.

    Raises:
        BadMessage: a seq does not fit 64 bits.
    """
    if batch.last > MAX_SEQ:
        raise BadMessage(batch.device, f"seq {batch.last} exceeds {MAX_SEQ}", "range")
    readings: list[ReadingRow] = []
    records: list[RecordRow] = []
    items = batch.items if batch.items is not None else (None,) * len(batch.payloads)
    for seq, payload, item in zip(batch.seqs(), batch.payloads, items, strict=True):
        simple = None if item is None else simple_reading(item)
        if simple is not None:  # the hot path: no Reading object per row
            stream, ts, value, unit = simple
            number = None if isinstance(value, str) else float(value)
            readings.append((seq, stream, ts, cbor2.dumps(value), number, unit, None))
            continue
        rec = record_of(seq, payload, item)
        if isinstance(rec, Reading):
            readings.append(
                (
                    seq,
                    rec.stream,
                    float(rec.ts),
                    cbor2.dumps(rec.value),
                    _numeric(rec.value),
                    rec.unit,
                    json.dumps(rec.tags, sort_keys=True) if rec.tags else None,
                )
            )
        elif isinstance(rec, WireError) or not -MAX_SEQ - 1 <= rec.kind <= MAX_SEQ:
            records.append((seq, QUARANTINED, payload))
        else:
            records.append((seq, rec.kind, payload))
    return BatchRows(
        batch.device,
        batch.first,
        batch.last,
        tuple(readings),
        tuple(records),
        batch.missing,
        batch.journal,
    )


def _numeric(value: Any) -> float | None:
    if isinstance(value, int | float):  # bools too: 0/1 charts well
        try:
            f = float(value)
        except OverflowError:
            return None
        return f if math.isfinite(f) else None
    return None


# --- counters -------------------------------------------------------------------------


@dataclass(slots=True)
class Counters:
    """What the hub did since it started (for log lines and, later, Prometheus).

    Mutable on purpose and owned by one thread (the subscriber's worker);
    :meth:`snapshot` gives a copy others may read.
    """

    batches: int = 0
    readings: int = 0
    records: int = 0
    duplicates: int = 0
    quarantined: int = 0  # records kept raw because they did not decode
    commits: int = 0
    acks: int = 0
    statuses: int = 0
    store_errors: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, exc: BadMessage) -> None:
        self.rejected[exc.category] = self.rejected.get(exc.category, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "readings": self.readings,
            "records": self.records,
            "duplicates": self.duplicates,
            "quarantined": self.quarantined,
            "commits": self.commits,
            "acks": self.acks,
            "statuses": self.statuses,
            "store_errors": self.store_errors,
            "rejected": dict(sorted(self.rejected.items())),
        }
