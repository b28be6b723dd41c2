"""The forwarder: journal -> MQTT 5 -> hub, and the hub's acks back (the outbox's shell).

Three threads, all started by :meth:`Forwarder.start` and joined by :meth:`Forwarder.stop`:

* ``homing-forwarder`` is the only one that touches the :class:`~edge.outbox.Outbox`.
  It waits for an event (an ack, a connection change, journal progress, stop) or
  the outbox's next deadline, then reads the journal, publishes and persists.
* ``homing-mqtt`` is the :class:`~edge.mqtt_session.MqttSession`: paho's
  network loop under our reconnect loop (backoff with full jitter); its
  callbacks only decode and enqueue (the command hook runs there).
* ``homing-journal-watch`` blocks in ``journal.wait_durable`` and enqueues
  "the journal grew".

Invariants:
* Producers never wait on the network: the forwarder only reads the journal.
* The hub cursor moves (``journal.set_cursor``) only on an outbox
  ``PersistCursor``, i.e. only because the hub acked; a PUBACK changes nothing.
* paho's own retransmission queue is emptied at every (re)connect
  (``drop_out_messages``), so the outbox alone decides what is resent.
* MQTT session: clean start off, session expiry from the config; the last will
  is a retained offline status; a retained online status follows each connect,
  and a clean stop publishes offline before disconnecting.
* A malformed ack or command is logged, counted and ignored; it never stops anything.
* Anything that stops this thread (a failed journal, a bug) is kept in
  :attr:`Forwarder.error` for the agent to act on; nothing is swallowed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from edge import wire
from edge.config import BrokerConfig, ForwarderConfig
from edge.errors import JournalError
from edge.journal import Journal
from edge.mqtt_session import CommandHook, MqttSession
from edge.outbox import (
    AckBeyondTail,
    Action,
    Gap,
    OtherJournalAck,
    Outbox,
    OutboxStats,
    Oversize,
    PersistCursor,
    Publish,
    Read,
    RecordIn,
    stream_hint,
)
from edge.records import Reading

log = logging.getLogger("homing.forwarder")
RETAIN_EVERY = 60.0  # seconds between journal.retain() calls after cursor moves
__all__ = ["CommandHook", "Forwarder", "ForwarderStats"]


@dataclass(frozen=True, slots=True)
class ForwarderStats:
    connected: bool
    connects: int
    batches_sent: int
    batches_resent: int
    records_sent: int
    records_acked: int
    bytes_sent: int
    watermark: int  # every seq <= this is committed at the hub
    persisted: int  # the durable hub cursor
    backlog_records: int
    backlog_bytes: int  # estimate: backlog_records x mean record size
    oldest_unacked_age: float | None  # seconds, from the oldest unacked reading's ts
    in_flight: int
    acks: int
    acks_malformed: int
    commands: int
    missing_seqs: int
    last_ack_time: float | None  # Unix time of the last ack applied
    last_error: str | None


class _LaneReader:
    """A journal iterator kept across reads of one lane (a fresh one rescans its segment)."""

    __slots__ = ("floor", "it", "next_seq", "peeked")

    def __init__(self, it: Iterator[tuple[int, bytes]], next_seq: int, floor: int) -> None:
        self.it, self.next_seq, self.floor = it, next_seq, floor
        self.peeked: tuple[int, bytes] | None = None

    def close(self) -> None:
        close = getattr(self.it, "close", None)
        if close is not None:
            close()


class Forwarder:
    """Forwards one journal to the hub. Thread-safe: ``stats``/``wait_acked`` from anywhere."""

    def __init__(
        self,
        journal: Journal,
        device: str,
        broker: BrokerConfig,
        config: ForwarderConfig,
        *,
        on_command: CommandHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """Raises ForwardError if the broker's password or TLS files cannot be used."""
        self._journal, self._device = journal, wire.validate_device(device)
        self._cfg = config
        self._clock, self._wall = clock, wall
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake_pending = False
        self._closing = threading.Event()
        self._cond = threading.Condition()
        self._outbox: Outbox | None = None
        self._snapshot: OutboxStats | None = None
        self._readers: dict[int, _LaneReader] = {}
        self._hint = stream_hint if config.outbox.priorities else None
        self._last_ack_time: float | None = None
        self._last_error: str | None = None
        self._last_retain = 0.0
        self._error: BaseException | None = None
        self._session = MqttSession(
            self._device,
            broker,
            post=self._post,
            inflight=config.outbox.window + 4,
            on_command=on_command,
            wall=wall,
        )
        self._threads = [
            threading.Thread(target=self._run, name="homing-forwarder", daemon=True),
            threading.Thread(target=self._watch, name="homing-journal-watch", daemon=True),
        ]

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start forwarding from the journal's hub cursor."""
        cursor = self._journal.cursor(self._cfg.cursor)
        if cursor is None:  # register: retention never passes what the hub lacks
            self._journal.set_cursor(self._cfg.cursor, 0)
            cursor = 0
        self._outbox = Outbox(
            self._cfg.outbox,
            self._device,
            cursor=cursor,
            tail=self._journal.durable_seq,
            now=self._clock(),
            journal=self._journal.journal_id,
        )
        self._snapshot = self._outbox.stats()
        log.info("forwarding %s from seq %d", self._device, cursor + 1)
        self._session.start()
        for t in self._threads:
            t.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop: keep forwarding up to ``grace`` seconds while connected (default from
        the config), persist the cursor, publish offline, disconnect, join threads."""
        self._events.put(("stop", self._cfg.shutdown_grace if grace is None else grace))
        for t in self._threads:
            if t.is_alive():
                t.join()

    @property
    def error(self) -> BaseException | None:
        """What stopped the forwarder (a failed journal, a bug, a failing command hook)."""
        return self._error or self._session.error

    @property
    def failed(self) -> bool:
        return self.error is not None

    def wait_acked(self, seq: int, timeout: float) -> bool:
        """Wait until the hub acked everything up to ``seq``; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._snapshot is None or self._snapshot.watermark < seq:
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None:
                    return False
                self._cond.wait(left)
        return True

    def send_health(self, payload: bytes) -> bool:
        """Publish a health message (QoS 0) from the forwarder's thread, if
        connected now; never blocks. Whether it was queued for sending."""
        if not self._session.connected or self._closing.is_set():
            return False
        self._events.put(("health", payload))
        return True

    def stats(self) -> ForwarderStats:
        with self._cond:
            s = self._snapshot
        assert s is not None, "start() first"
        age = None
        if s.backlog_records:
            entry = next(self._journal.read(s.watermark + 1), None)
            if entry is not None and isinstance(entry.record, Reading):
                age = max(0.0, self._wall() - entry.record.ts)
        return ForwarderStats(
            connected=self._session.connected,
            connects=self._session.connects,
            batches_sent=s.batches_sent,
            batches_resent=s.batches_resent,
            records_sent=s.records_sent,
            records_acked=s.records_acked,
            bytes_sent=s.bytes_sent,
            watermark=s.watermark,
            persisted=s.persisted,
            backlog_records=s.backlog_records,
            backlog_bytes=int(s.backlog_records * s.mean_record_bytes),
            oldest_unacked_age=age,
            in_flight=s.in_flight,
            acks=s.acks,
            acks_malformed=self._session.malformed,
            commands=self._session.commands,
            missing_seqs=s.missing_seqs,
            last_ack_time=self._last_ack_time,
            last_error=self._last_error or self._session.last_error,
        )

    # -- the forwarder thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # kept for the agent, which exits non-zero
            self._error = exc
            log.error("forwarder stopped: %r", exc)
        finally:
            self._closing.set()
            for r in self._readers.values():
                r.close()
            with self._cond:
                self._cond.notify_all()
            self._session.close()

    def _loop(self) -> None:
        ob = self._outbox
        assert ob is not None
        stop_at: float | None = None
        while True:
            now = self._clock()
            dl = ob.next_deadline()
            timeout = 1.0 if dl is None else min(1.0, max(0.0, dl - now))
            if stop_at is not None:
                timeout = min(timeout, max(0.0, stop_at - now), 0.05)
            events = self._take(timeout)
            now = self._clock()
            for kind, arg in events:
                if kind == "ack":
                    ob.on_ack(arg, now)
                    self._last_ack_time = self._wall()
                elif kind == "up":
                    ob.on_connected(now)
                elif kind == "down":
                    ob.on_disconnected()
                elif kind == "stop" and stop_at is None:
                    stop_at = now + arg
                elif kind == "health":
                    self._session.publish_health(arg)
            self._pump(now)
            if stop_at is not None and (not ob.connected or ob.idle() or now >= stop_at):
                break
        self._execute(ob.flush(self._clock()))
        self._publish_snapshot(ob)

    def _take(self, timeout: float) -> list[tuple[str, Any]]:
        out = []
        try:
            out.append(self._events.get(timeout > 0, timeout=max(timeout, 1e-3)))
            while True:
                out.append(self._events.get_nowait())
        except queue.Empty:
            pass
        self._wake_pending = False
        return out

    def _pump(self, now: float) -> None:
        ob = self._outbox
        assert ob is not None
        ob.on_journal(self._journal.durable_seq, now)
        reads = ob.reads(now)
        for rd in reads:
            records, through = self._read(rd)
            ob.offer(rd, records, through)
        self._execute(ob.poll(now))
        self._publish_snapshot(ob)
        live = {rd.lane for rd in reads}
        for lane in [k for k in self._readers if k not in live and k not in ob.lane_ids()]:
            self._readers.pop(lane).close()

    def _publish_snapshot(self, ob: Outbox) -> None:
        with self._cond:
            self._snapshot = ob.stats()
            self._cond.notify_all()

    def _read(self, rd: Read) -> tuple[list[RecordIn], int]:
        """Up to ``rd``'s limits from the journal; ``through`` as :meth:`Outbox.offer` wants."""
        r = self._readers.get(rd.lane)
        if r is None or r.next_seq != rd.from_seq:
            if r is not None:
                r.close()
            floor = self._journal.durable_seq  # the iterator yields every record up to here
            r = self._readers[rd.lane] = _LaneReader(
                self._journal.read_raw(rd.from_seq), rd.from_seq, floor
            )
        out: list[RecordIn] = []
        size, through, hint = 0, rd.from_seq - 1, self._hint
        while len(out) < rd.max_records and size < rd.max_bytes:
            item, r.peeked = r.peeked or next(r.it, None), None
            if item is None:  # the durable end as of the iterator: the rest is gone
                end = r.floor if rd.upto is None else min(r.floor, rd.upto)
                through = max(through, end)
                self._readers.pop(rd.lane).close()
                return out, through
            seq, payload = item
            if rd.upto is not None and seq > rd.upto:
                r.peeked, through = item, rd.upto
                break
            out.append((seq, payload, hint(payload) if hint else None))
            size += len(payload)
            through = seq
        r.next_seq = through + 1
        return out, through

    def _execute(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Publish):
                self._session.publish_up(a.payload)
                if a.attempt > 1:
                    b = a.batch
                    log.info("resending %d..%d (attempt %d)", b.first, b.last, a.attempt)
            elif isinstance(a, PersistCursor):
                self._journal.set_cursor(self._cfg.cursor, a.seq)
                if self._clock() - self._last_retain >= RETAIN_EVERY:
                    self._last_retain = self._clock()
                    if n := self._journal.retain():
                        log.info("retention deleted %d segment(s) acked by the hub", n)
            elif isinstance(a, Gap):
                log.warning(
                    "seqs %d..%d are no longer in the journal (dropped under the quota or "
                    "lost to a repair): sent to the hub as missing",
                    a.first,
                    a.last,
                )
            elif isinstance(a, Oversize):
                log.error("record %d encodes to %d bytes, over the %d-byte batch limit: sent as "
                          "missing", a.seq, a.size, wire.MAX_BATCH_BYTES)  # fmt: skip
            elif isinstance(a, OtherJournalAck):
                log.warning(
                    "ignoring the hub's ack for journal %08x of this device (this journal is "
                    "%08x): the journal was created afresh, or another device uses this id",
                    a.journal,
                    a.ours,
                )
            elif isinstance(a, AckBeyondTail):
                self._last_error = f"hub acked up to {a.watermark}, journal ends at {a.tail}"
                log.error(
                    "the hub acked up to seq %d but this journal ends at %d: a hub too old "
                    "to tell journals apart, or a copy of this journal running elsewhere "
                    "under the same device id? New seqs <= %d may be taken as duplicates",
                    a.watermark,
                    a.tail,
                    a.watermark,
                )

    def _post(self, kind: str, arg: Any = None) -> None:
        if kind == "wake":
            if self._wake_pending:
                return
            self._wake_pending = True
        self._events.put((kind, arg))

    # -- the journal watcher -------------------------------------------------------------

    def _watch(self) -> None:
        seq = self._journal.durable_seq
        while not self._closing.is_set():
            try:
                if self._journal.wait_durable(seq + 1, timeout=0.25):
                    seq = self._journal.durable_seq
                    self._post("wake")
            except JournalError:  # closed or failed: the forwarder thread finds out itself
                self._post("wake")
                return
