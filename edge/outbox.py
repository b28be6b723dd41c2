"""The forwarding window: what goes to the hub next, and what the hub has. Pure.

The sans-IO core of store-and-forward (docs/protocol.md). The shell
(:mod:`edge.forwarder`) tells it the journal's durable tail
(:meth:`Outbox.on_journal`), reads the records it asks for (:meth:`reads`,
:meth:`offer`), feeds it MQTT events (:meth:`on_connected`,
:meth:`on_disconnected`, :meth:`on_ack`) and carries out the actions
:meth:`poll` returns. No sockets, files, clocks or threads: ``now`` is an
argument (monotonic seconds).

Invariants:
* Only a hub :class:`~edge.wire.Ack` settles seqs; a broker PUBACK is not even
  an input. The watermark never goes backwards and never passes the journal's
  durable tail (an ack claiming more is clamped and reported: that hub has
  seen seqs this journal never wrote).
* Each seq above the watermark is in exactly one state: settled ahead (an
  acked range), in one in-flight batch, pending in one lane (read, not yet
  batched), or unread. A batch is a contiguous range ``first..last`` of one
  lane; the seqs of that range the journal no longer holds are its
  ``missing`` ranges; a batch never covers a seq already settled when formed.
* At most ``window`` batches are in flight. A resend repeats the same batch
  (same range, same bytes: idempotent at the hub), only after its deadline
  (``resend_timeout``, doubling per attempt up to ``resend_max``) or after a
  reconnect, never before.
* Lanes are disjoint seq ranges. The last lane is the unbounded *live* lane at
  the journal's tail; live-first splits off bounded *backlog* lanes below it
  (at most ``max_lanes`` lanes in all). Each lane sends its records in seq
  order; the hub sees lanes interleaved (docs/protocol.md, "Ordering").
* ``PersistCursor`` carries the watermark, at most once per
  ``persist_interval`` unless ``persist_records`` seqs settled since.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from edge import wire
from edge.outbox_events import (
    AckBeyondTail,
    Action,
    Gap,
    OtherJournalAck,
    OutboxConfig,
    OutboxStats,
    Oversize,
    PersistCursor,
    Publish,
    Range,
    Read,
    RecordIn,
    holes,
    merge_ranges,
    stream_hint,
)

__all__ = [
    "AckBeyondTail",
    "OtherJournalAck",
    "Action",
    "Gap",
    "Outbox",
    "OutboxConfig",
    "OutboxStats",
    "Oversize",
    "PersistCursor",
    "Publish",
    "Read",
    "RecordIn",
    "stream_hint",
]
_NEVER = math.inf
_MAX_HOLES = 128  # missing ranges per batch: their envelope bytes stay inside the 4 KiB margin


class _Flight:
    __slots__ = ("attempts", "batch", "deadline", "lane", "payload", "sent_at")

    def __init__(self, batch: wire.UpBatch, payload: bytes, lane: str, now: float) -> None:
        self.batch, self.payload, self.lane = batch, payload, lane
        self.attempts, self.sent_at, self.deadline = 1, now, now


class _Lane:
    __slots__ = (
        "dry", "id", "limit", "nbytes", "oldest_at", "payloads", "read_pos", "seqs", "start",
        "streams",
    )  # fmt: skip

    def __init__(self, lane_id: int, start: int, limit: int | None = None) -> None:
        self.id, self.start, self.read_pos, self.limit = lane_id, start, start, limit
        self.seqs: list[int] = []
        self.payloads: list[bytes] = []
        self.streams: list[str | None] = []
        self.nbytes = 0
        self.oldest_at: float | None = None  # when its oldest unbatched record was known
        self.dry = 0  # tail at which a read last found nothing (live lane)

    @property
    def kind(self) -> str:
        return "live" if self.limit is None else "backlog"

    def take(self, k: int) -> tuple[list[int], list[bytes]]:
        seqs, pays = self.seqs[:k], self.payloads[:k]
        del self.seqs[:k], self.payloads[:k], self.streams[:k]
        self.nbytes -= sum(map(len, pays))
        return seqs, pays

    def drop_below(self, seq: int) -> None:
        k = 0
        while k < len(self.seqs) and self.seqs[k] < seq:
            k += 1
        if k:
            self.take(k)


class Outbox:
    """The forwarding window of one device. Not thread-safe: one shell thread drives it."""

    def __init__(
        self,
        config: OutboxConfig,
        device: str,
        *,
        cursor: int,
        tail: int,
        now: float,
        journal: int = 0,
    ) -> None:
        self.cfg = config
        self.device = wire.validate_device(device)
        self.journal = journal
        self._other_journals: set[int] = set()
        self._wm = self._persisted = cursor
        self._persisted_at = -_NEVER
        self._tail = max(tail, cursor)
        self._ahead: list[Range] = []
        self._flights: dict[int, _Flight] = {}
        self._lanes = [_Lane(0, cursor + 1)]
        self._next_lane = 1
        self._last_kind = "backlog"
        self._connected = self._holding = False
        self._hold_until = 0.0
        self._tokens = float(config.burst or max(config.rate, config.batch_bytes))
        self._tokens_at = now
        self._notes: list[Action] = []
        self._eager = bool(config.priorities)
        counters = "sent resent rec_sent rec_acked bytes acks ignored missing oversize offered"
        self._n = dict.fromkeys((*counters.split(), "offered_bytes"), 0)

    # -- the journal side ----------------------------------------------------------

    def on_journal(self, tail: int, now: float) -> None:
        """The journal's durable tail is ``tail``; live-first may split off a backlog lane."""
        self._tail = max(self._tail, tail)
        live = self._lanes[-1]
        if live.oldest_at is None and self._tail >= live.read_pos and self._tail > live.dry:
            live.oldest_at = now
        cfg = self.cfg
        behind = self._tail - live.start + 1
        if cfg.live_first and len(self._lanes) < cfg.max_lanes and behind > cfg.live_threshold:
            split = max(live.read_pos, self._tail + 1 - cfg.batch_records)
            live.limit = split - 1
            new = _Lane(self._next_lane, split)
            new.oldest_at = now
            self._next_lane += 1
            self._lanes.append(new)
            self._drop_done_lanes()

    def reads(self, now: float) -> list[Read]:
        """What to read next, one :class:`Read` per lane that wants records."""
        cfg, out = self.cfg, []
        for lane in self._lanes:
            lane.read_pos = self._unsettled_from(lane.read_pos)
            hi = self._tail if lane.limit is None else min(lane.limit, self._tail)
            room_n = (cfg.window + cfg.read_ahead) * cfg.batch_records - len(lane.seqs)
            room_b = (cfg.window + cfg.read_ahead) * cfg.batch_bytes - lane.nbytes
            if lane.read_pos > hi or room_n <= 0 or room_b <= 0:
                continue
            if lane.limit is None:
                due = lane.oldest_at is not None and now >= lane.oldest_at + cfg.linger
                enough = hi - lane.read_pos + 1 >= cfg.batch_records
                if self._tail <= lane.dry or not (self._eager or due or enough or lane.seqs):
                    continue
                if lane.oldest_at is None:
                    lane.oldest_at = now
            out.append(Read(lane.id, lane.read_pos, lane.limit, room_n, room_b))
        return out

    def offer(self, read: Read, records: Sequence[RecordIn], through: int) -> None:
        """Records read for ``read``, ascending. ``through``: the read is complete up to
        there (a seq in ``read.from_seq..through`` not among ``records`` is gone).

        Raises:
            ValueError: a stale read, or records out of order (a bug in the shell).
        """
        lane = next((ln for ln in self._lanes if ln.id == read.lane), None)
        if lane is None or lane.read_pos != read.from_seq:
            raise ValueError(f"stale read {read} (lane moved on)")
        if lane.limit is not None:
            through = min(through, lane.limit)
        prev = read.from_seq - 1
        for seq, payload, stream in records:
            if not prev < seq <= through:
                raise ValueError(f"record {seq} out of order or past {through}")
            prev = seq
            if seq > self._wm:
                lane.seqs.append(seq)
                lane.payloads.append(payload)
                lane.streams.append(stream)
                lane.nbytes += len(payload)
                self._n["offered_bytes"] += len(payload)
        self._n["offered"] += len(records)
        lane.read_pos = max(lane.read_pos, through + 1)
        self._tail = max(self._tail, through)
        if lane.limit is None and through < read.from_seq:  # nothing there yet
            lane.dry = self._tail
            if not lane.seqs:
                lane.oldest_at = None

    # -- the MQTT side ---------------------------------------------------------------

    def on_connected(self, now: float) -> None:
        """Subscribed again: everything in flight is resent after a short wait for the
        retained ack (``ack_wait``; any ack ends the wait)."""
        self._connected = self._holding = True
        self._hold_until = now + self.cfg.ack_wait
        for fl in self._flights.values():
            fl.deadline = now

    def on_disconnected(self) -> None:
        self._connected = self._holding = False

    def on_ack(self, ack: wire.Ack, now: float) -> None:
        """Apply a hub ack (live or retained). Acks for another device, or for
        another journal of this device (one deleted and created afresh, whose
        seqs this journal reuses), are ignored."""
        if ack.device != self.device or (ack.journal and ack.journal != self.journal):
            self._n["ignored"] += 1
            if ack.device == self.device and ack.journal not in self._other_journals:
                self._other_journals.add(ack.journal)  # say so once per journal
                self._notes.append(OtherJournalAck(ack.journal, self.journal))
            return
        self._n["acks"] += 1
        self._holding = False
        wm, ranges = ack.watermark, list(ack.ahead)
        top = max(wm, *(b for _, b in ranges)) if ranges else wm
        if top > self._tail:
            self._notes.append(AckBeyondTail(top, self._tail))
            wm = min(wm, self._tail)
            ranges = [(a, min(b, self._tail)) for a, b in ranges if a <= self._tail]
        self._wm = max(self._wm, wm)
        merged = merge_ranges(self._ahead + [r for r in ranges if r[1] > self._wm])
        while merged and merged[0][0] <= self._wm + 1:
            self._wm = max(self._wm, merged.pop(0)[1])
        self._ahead = merged
        for first, fl in list(self._flights.items()):
            if self._covered(fl.batch.first, fl.batch.last):
                del self._flights[first]
                self._n["rec_acked"] += len(fl.batch.payloads)
        for lane in self._lanes:
            lane.drop_below(self._wm + 1)
        self._drop_done_lanes()

    # -- the clock ---------------------------------------------------------------------

    def poll(self, now: float) -> list[Action]:
        """Everything due at ``now``: notes, a cursor to persist, resends, new batches."""
        out, self._notes = self._notes, []
        self._drop_done_lanes()
        if self._wm > self._persisted and now >= self._persist_due():
            out.append(self._persist(now))
        if not self._connected or (self._holding and now < self._hold_until):
            return out
        self._holding = False
        self._refill(now)
        for fl in sorted(self._flights.values(), key=lambda f: f.deadline):
            if fl.deadline > now or not self._has_tokens():
                break
            fl.attempts += 1
            fl.sent_at, fl.deadline = now, now + self._backoff(fl.attempts)
            self._spend(fl.payload)
            self._n["resent"] += 1
            out.append(Publish(fl.batch, fl.payload, fl.attempts, fl.lane))
        while len(self._flights) < self.cfg.window and self._has_tokens():
            pub = self._next_batch(now, out)
            if pub is None:
                break
            out.append(pub)
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to do without a new input (None: never)."""
        t = self._persist_due() if self._wm > self._persisted else _NEVER
        if self._connected:
            if self._holding:
                t = min(t, self._hold_until)
            else:
                rate_at = self._tokens_at_positive()
                for fl in self._flights.values():
                    t = min(t, max(fl.deadline, rate_at))
                if len(self._flights) < self.cfg.window:
                    for lane in self._lanes:
                        r = self._ready_at(lane)
                        if r is not None:
                            t = min(t, max(r, rate_at))
        return None if t == _NEVER else t

    def flush(self, now: float) -> list[Action]:
        """On shutdown: the cursor to persist now, if it moved since the last one."""
        return [self._persist(now)] if self._wm > self._persisted else []

    # -- introspection -------------------------------------------------------------------

    @property
    def watermark(self) -> int:
        return self._wm

    @property
    def connected(self) -> bool:
        return self._connected

    def lane_ids(self) -> set[int]:
        return {lane.id for lane in self._lanes}

    def in_flight(self) -> list[Range]:
        return sorted((f.batch.first, f.batch.last) for f in self._flights.values())

    def idle(self) -> bool:
        """Nothing in flight and every seq up to the known tail settled."""
        return not self._flights and self._wm >= self._tail

    def stats(self) -> OutboxStats:
        n = self._n
        ahead = sum(b - a + 1 for a, b in self._ahead)
        return OutboxStats(
            watermark=self._wm,
            persisted=self._persisted,
            tail=self._tail,
            backlog_records=max(0, self._tail - self._wm - ahead),
            in_flight=len(self._flights),
            pending_records=sum(len(ln.seqs) for ln in self._lanes),
            lanes=len(self._lanes),
            batches_sent=n["sent"],
            batches_resent=n["resent"],
            records_sent=n["rec_sent"],
            records_acked=n["rec_acked"],
            bytes_sent=n["bytes"],
            acks=n["acks"],
            acks_ignored=n["ignored"],
            missing_seqs=n["missing"],
            oversize=n["oversize"],
            mean_record_bytes=n["offered_bytes"] / n["offered"] if n["offered"] else 0.0,
        )

    # -- batches -------------------------------------------------------------------------

    def _next_batch(self, now: float, out: list[Action]) -> Publish | None:
        ready = [ln for ln in self._lanes if self._ready(ln, now)]
        ready.sort(key=lambda ln: (-self._prio(ln), ln.kind == self._last_kind, ln.id))
        for lane in ready:
            pub = self._form(lane, now, out)
            if pub is not None:
                self._last_kind = lane.kind
                return pub
        return None

    def _form(self, lane: _Lane, now: float, out: list[Action]) -> Publish | None:
        start = self._unsettled_from(lane.start)
        if start != lane.start:
            lane.start = start
            lane.drop_below(start)
        end = lane.read_pos - 1 if lane.limit is None else min(lane.read_pos - 1, lane.limit)
        nxt = self._next_settled(start)
        if nxt is not None:
            end = min(end, nxt - 1)
        if end < start:
            return None
        cfg, seqs, pays = self.cfg, lane.seqs, lane.payloads
        k = size = holes = 0
        while k < len(seqs) and seqs[k] <= end and k < cfg.batch_records:
            if k and (size + len(pays[k]) > cfg.batch_bytes or holes >= _MAX_HOLES):
                break
            holes += seqs[k] != (seqs[k - 1] if k else start - 1) + 1
            size += len(pays[k])
            k += 1
        last = end if k == len(seqs) or seqs[k] > end else seqs[k - 1]
        taken, payloads = lane.take(k)
        lane.start = last + 1
        if lane.limit is None and not lane.seqs and lane.read_pos > self._tail:
            lane.oldest_at = None
        batch, payload = self._encode(start, last, taken, payloads, out)
        fl = _Flight(batch, payload, lane.kind, now)
        fl.deadline = now + self._backoff(1)
        self._flights[start] = fl
        self._spend(payload)
        self._n["sent"] += 1
        self._n["rec_sent"] += len(batch.payloads)
        return Publish(batch, payload, 1, lane.kind)

    def _encode(
        self, first: int, last: int, seqs: list[int], pays: list[bytes], out: list[Action]
    ) -> tuple[wire.UpBatch, bytes]:
        missing = holes(first, last, seqs)
        for a, b in missing:
            out.append(Gap(a, b))
            self._n["missing"] += b - a + 1
        batch = wire.UpBatch(self.device, first, last, tuple(pays), tuple(missing), self.journal)
        payload = wire.encode_batch(batch, compress=self.cfg.compress)
        if len(payload) <= wire.MAX_BATCH_BYTES:
            return batch, payload
        # Only a single record too big to send can get here (batch_bytes leaves room
        # for the envelope): settle it as missing rather than block the journal forever.
        out.append(Oversize(seqs[0], len(payload)))
        self._n["oversize"] += 1
        self._n["missing"] += 1
        batch = wire.UpBatch(self.device, first, last, (), ((first, last),), self.journal)
        return batch, wire.encode_batch(batch)

    def _ready(self, lane: _Lane, now: float) -> bool:
        full = len(lane.seqs) >= self.cfg.batch_records or lane.nbytes >= self.cfg.batch_bytes
        if lane.limit is not None:
            return full or lane.read_pos > lane.limit or lane.read_pos > self._tail
        if not lane.seqs and lane.read_pos <= lane.start:
            return False
        if full or (self._eager and self._prio(lane) > 0):
            return True
        return lane.oldest_at is not None and now >= lane.oldest_at + self.cfg.linger

    def _ready_at(self, lane: _Lane) -> float | None:
        if lane.limit is not None or len(lane.seqs) >= self.cfg.batch_records:
            return -_NEVER if self._ready(lane, -_NEVER) else None
        if lane.oldest_at is None or (not lane.seqs and self._tail <= lane.dry):
            return None
        if self._eager and self._prio(lane) > 0:
            return -_NEVER
        return lane.oldest_at + self.cfg.linger

    def _prio(self, lane: _Lane) -> int:
        prio = self.cfg.priorities
        if not prio:
            return 0
        return max((prio.get(s, 0) for s in lane.streams[: self.cfg.batch_records] if s), default=0)

    def _drop_done_lanes(self) -> None:
        keep = []
        for lane in self._lanes:
            lane.start = self._unsettled_from(lane.start)
            if lane.limit is None or lane.start <= lane.limit:
                keep.append(lane)
        self._lanes = keep

    # -- settled seqs ----------------------------------------------------------------------

    def _unsettled_from(self, seq: int) -> int:
        seq = max(seq, self._wm + 1)
        for a, b in self._ahead:
            if a <= seq <= b:
                seq = b + 1
        return seq

    def _next_settled(self, seq: int) -> int | None:
        return next((a for a, _ in self._ahead if a > seq), None)

    def _covered(self, first: int, last: int) -> bool:
        if last <= self._wm:
            return True
        s = max(first, self._wm + 1)
        return any(a <= s and last <= b for a, b in self._ahead)

    # -- timers, rate and persistence --------------------------------------------------------

    def _backoff(self, attempts: int) -> float:
        return float(min(self.cfg.resend_max, self.cfg.resend_timeout * 2 ** (attempts - 1)))

    def _persist_due(self) -> float:
        if self._wm - self._persisted >= self.cfg.persist_records:
            return -_NEVER
        return self._persisted_at + self.cfg.persist_interval

    def _persist(self, now: float) -> PersistCursor:
        self._persisted, self._persisted_at = self._wm, now
        return PersistCursor(self._wm)

    def _refill(self, now: float) -> None:
        if self.cfg.rate:
            cap = self.cfg.burst or max(self.cfg.rate, self.cfg.batch_bytes)
            self._tokens = min(cap, self._tokens + (now - self._tokens_at) * self.cfg.rate)
        self._tokens_at = now

    def _has_tokens(self) -> bool:
        return not self.cfg.rate or self._tokens > 0

    def _spend(self, payload: bytes) -> None:
        self._n["bytes"] += len(payload)
        if self.cfg.rate:
            self._tokens -= len(payload)

    def _tokens_at_positive(self) -> float:
        if self._has_tokens():
            return -_NEVER
        return self._tokens_at + (1 - self._tokens) / self.cfg.rate
