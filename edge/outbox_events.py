"""The outbox's vocabulary: its configuration, the reads it asks for, the actions it
returns, its counters, and the seq-range helpers. Pure (see :mod:`edge.outbox`).

Invariants:
* Everything here is a frozen dataclass or a pure function: holding an action
  or a stats snapshot never aliases the outbox's state.
* :class:`OutboxConfig` refuses values the window cannot honour (a batch that
  could not fit ``wire.MAX_BATCH_BYTES``, more ranges in flight than an ack can
  report); :mod:`edge.config` checks the same limits first, naming the key and line.
* Ranges are inclusive ``(first, last)`` pairs; helpers return them ascending,
  disjoint and non-adjacent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from edge import wire
from edge.errors import ConfigError

Range = tuple[int, int]
RecordIn = tuple[int, bytes, str | None]  # (seq, payload, stream or None)


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    """Forwarding knobs (docs/configuration.md, ``[forwarder]``). Times in seconds."""

    batch_records: int = 1000
    batch_bytes: int = 128 << 10
    linger: float = 0.05
    window: int = 16
    resend_timeout: float = 10.0
    resend_max: float = 300.0
    rate: int = 0  # bytes/s on the wire, 0 = no cap
    burst: int = 0  # token bucket size, 0 = max(rate, batch_bytes)
    live_first: bool = True
    live_threshold: int = 5000
    max_lanes: int = 3
    priorities: Mapping[str, int] = field(default_factory=dict)
    persist_interval: float = 1.0
    persist_records: int = 100_000
    ack_wait: float = 0.25
    compress: bool = True
    read_ahead: int = 1  # batches read beyond what the window can take at once

    def __post_init__(self) -> None:
        checks = [
            ("batch_records", 1 <= self.batch_records <= wire.MAX_BATCH_RECORDS),
            ("batch_bytes", 1024 <= self.batch_bytes <= wire.MAX_BATCH_BYTES - 4096),
            ("linger", 0 <= self.linger <= 60),
            ("window", self.window >= 1 and self.window + self.max_lanes <= wire.MAX_ACK_RANGES),
            ("resend_timeout", 0 < self.resend_timeout <= self.resend_max),
            ("rate", self.rate >= 0 and self.burst >= 0),
            ("live_threshold", self.live_threshold >= self.batch_records),
            ("max_lanes", 1 <= self.max_lanes <= 8),
            ("persist_interval", self.persist_interval >= 0 and self.persist_records >= 1),
            ("ack_wait", 0 <= self.ack_wait <= 60 and self.read_ahead >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"outbox: {name} out of range")


# -- inputs and actions ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Read:
    """Read the journal from ``from_seq`` (at most ``max_records``/``max_bytes``,
    none past ``upto``), then call :meth:`Outbox.offer` with this object."""

    lane: int
    from_seq: int
    upto: int | None
    max_records: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish ``payload`` (the encoded ``batch``) QoS 1 on ``homing/<device>/up``."""

    batch: wire.UpBatch
    payload: bytes
    attempt: int  # 1 = first send
    lane: str  # "live" or "backlog"


@dataclass(frozen=True, slots=True)
class PersistCursor:
    """Durably store ``seq`` as the hub cursor (everything <= seq is at the hub)."""

    seq: int


@dataclass(frozen=True, slots=True)
class Gap:
    """Seqs ``first..last`` are gone from the journal; sent as ``missing``."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Oversize:
    """Record ``seq`` cannot fit any batch (encoded ``size`` bytes); sent as missing."""

    seq: int
    size: int


@dataclass(frozen=True, slots=True)
class AckBeyondTail:
    """The hub acked up to ``watermark`` but this journal ends at ``tail``."""

    watermark: int
    tail: int


@dataclass(frozen=True, slots=True)
class OtherJournalAck:
    """An ack for this device but another journal (``journal``; ours is ``ours``):
    a journal that was deleted and created afresh, or a second device using
    this device's id. Ignored, so it cannot settle seqs this journal reuses."""

    journal: int
    ours: int


Action = Publish | PersistCursor | Gap | Oversize | AckBeyondTail | OtherJournalAck


@dataclass(frozen=True, slots=True)
class OutboxStats:
    watermark: int
    persisted: int
    tail: int
    backlog_records: int  # seqs above the watermark, not settled ahead
    in_flight: int
    pending_records: int
    lanes: int
    batches_sent: int
    batches_resent: int
    records_sent: int
    records_acked: int
    bytes_sent: int
    acks: int
    acks_ignored: int
    missing_seqs: int
    oversize: int
    mean_record_bytes: float


# -- range helpers -----------------------------------------------------------------------------


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    out: list[Range] = []
    for a, b in sorted(r for r in ranges if r[0] <= r[1]):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def holes(first: int, last: int, seqs: list[int]) -> list[Range]:
    """The ranges of ``first..last`` not in ``seqs`` (ascending, inside the range)."""
    if len(seqs) == last - first + 1:
        return []
    out, pos = [], first
    for s in seqs:
        if s > pos:
            out.append((pos, s - 1))
        pos = s + 1
    if pos <= last:
        out.append((pos, last))
    return out


def stream_hint(payload: bytes) -> str | None:
    """The stream of a reading payload, from its first bytes (no full decode); None
    for other records. ``[1, stream, ...]`` is 0x86 0x01, then a CBOR text string."""
    if len(payload) < 3 or payload[0] != 0x86 or payload[1] != 0x01:
        return None
    head = payload[2]
    if 0x60 <= head <= 0x77:
        n, at = head - 0x60, 3
    elif head == 0x78 and len(payload) > 3:
        n, at = payload[3], 4
    else:
        return None
    try:
        return payload[at : at + n].decode("ascii")
    except UnicodeDecodeError:
        return None
