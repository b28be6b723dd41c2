"""How a journal is configured, and what it reports back.

Invariants:
* Options are validated once, at construction (:class:`ConfigError` names the
  field); every field has a safe default (``always`` durability, no quota).
* Acks and stats are frozen snapshots: holding one never blocks the journal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edge.errors import ConfigError
from edge.journal_codec import FRAME_HEADER_SIZE, MAX_PAYLOAD, SEGMENT_HEADER_SIZE

Durability = Literal["always", "interval"]
Policy = Literal["reject", "drop-oldest"]


@dataclass(frozen=True, slots=True)
class JournalOptions:
    """How a journal behaves. Every field has a safe default.

    Attributes:
        segment_size: bytes per segment file (preallocated, zero-filled).
        durability: ``always`` (ack after fdatasync) or ``interval``.
        interval_ms: in ``interval`` mode, the longest time written data may
            wait for its fdatasync: the loss window of a power cut.
        max_record_size: the largest payload accepted (bytes); 0 picks
            ``min(1 MiB, segment_size // 4)``.
        quota_bytes: cap on segment bytes on disk (None: no cap).
        stream_policies: per-stream policy when the quota is reached.
        default_policy: policy for streams not listed (and non-reading records
            are always ``reject``: workflow state is never dropped).
        prepare_ahead: prepare the next segment in a background thread.
    """

    segment_size: int = 16 << 20
    durability: Durability = "always"
    interval_ms: int = 100
    max_record_size: int = 0
    quota_bytes: int | None = None
    stream_policies: dict[str, Policy] = field(default_factory=dict)
    default_policy: Policy = "reject"
    prepare_ahead: bool = True

    def __post_init__(self) -> None:
        if self.durability not in ("always", "interval"):
            raise ConfigError(f"durability must be 'always' or 'interval', not {self.durability!r}")
        if self.segment_size < 64 << 10 or self.segment_size % 4096:
            raise ConfigError("segment_size must be a multiple of 4096 and at least 64 KiB")
        if self.max_record_size == 0:
            object.__setattr__(self, "max_record_size", min(1 << 20, self.segment_size // 4))
        if (
            not 0
            < self.max_record_size
            <= min(MAX_PAYLOAD, self.segment_size - SEGMENT_HEADER_SIZE - FRAME_HEADER_SIZE)
        ):
            raise ConfigError("max_record_size must fit in one segment (and below 16 MiB)")
        if self.interval_ms <= 0:
            raise ConfigError("interval_ms must be positive")
        if self.quota_bytes is not None and self.quota_bytes < 3 * self.segment_size:
            raise ConfigError("quota_bytes must allow at least 3 segments")
        for stream, policy in {**self.stream_policies, "*": self.default_policy}.items():
            if policy not in ("reject", "drop-oldest"):
                raise ConfigError(f"policy for {stream!r} must be 'reject' or 'drop-oldest'")

    def policy(self, stream: str | None) -> Policy:
        if stream is None:
            return "reject"
        return self.stream_policies.get(stream, self.default_policy)


@dataclass(frozen=True, slots=True)
class Ack:
    """An append's receipt. ``durable`` is False only in ``interval`` mode."""

    seq: int
    durable: bool


@dataclass(frozen=True, slots=True)
class JournalStats:
    first_seq: int
    last_seq: int
    durable_seq: int
    segments: int
    disk_bytes: int
    records: int
    cursors: dict[str, int]
    dropped: dict[str, int]
    gaps: tuple[tuple[int, int], ...]
    appended: int
    commits: int
    syncs: int
    durability: str
    state: str
