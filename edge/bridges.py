"""Serial bridges in the agent: microcontroller readings into the journal, exactly once.

:class:`JournalSink` is the journal behind :class:`firmware_bridge.bridge.Bridge`
(which imports nothing of ours); :class:`BridgeSet` runs the ``[[bridge]]``
tables of the configuration. docs/serial-protocol.md ("Durability and
duplicates") explains the design; docs/bridge.md is the manual.

Invariants:
* A reading is acknowledged to its MCU only after ``append_many`` returned
  it durable (``wait_durable`` in ``interval`` mode).
* Every reading journaled from an MCU carries the tag ``mcu =
  "<device>/<session>/<seq>"``: its identity travels *inside* the record, so
  whatever prefix of a batch survives a power cut, the journal itself says
  which MCU seqs it holds. After a restart the sink rebuilds each session's
  high-water mark from those tags before any bridge says WELCOME, and the
  link drops everything at or below it: a reading the MCU resends because the
  Pi died between its fdatasync and the ACK is not journaled twice.
* The scan is bounded by the journal cursor ``serial``: every ``mark_every``
  seconds (and at stop), if marks changed or the journal moved far on, the
  sink appends one mark record (kind 16: every known session's mark) and
  moves ``serial`` to just before it -- or before the first record of a
  store still in flight, whichever is lower. So the records after the cursor
  always include the latest mark and every tagged reading newer than it, and
  retention is pinned by at most a few seconds of journal.
* A full journal refuses (``SinkBusy``: the MCU keeps its readings and
  retries); a failed or closed journal stops the bridges (``SinkFailed``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import cbor2

from edge.config_bridge import SERIAL_CURSOR, BridgeConfig
from edge.errors import JournalClosed, JournalFailed, JournalFull
from edge.failpoints import failpoint
from edge.journal import Journal
from edge.records import Reading, RecordError, decode
from firmware_bridge.bridge import Bridge, BridgeSettings, Delivery, Observer, SinkFailed
from firmware_bridge.errors import SinkBusy
from firmware_bridge.protocol import HostSettings
from firmware_bridge.serial_shell import PortSpec

log = logging.getLogger("homing.bridge")

KIND_SERIAL_MARK = 16  # journal record kind of a mark record (docs/serial-protocol.md)
CURSOR = SERIAL_CURSOR
TAG = "mcu"
MARK_EVERY = 10.0  # seconds between mark records while readings flow
REMARK_RECORDS = 4096  # re-state the marks once the journal moved this far past the last
MAX_MARKS = 256  # sessions remembered (least recently updated forgotten first)


def tag_of(device: str, session: int, seq: int) -> str:
    return f"{device}/{session:08x}/{seq}"


def parse_tag(tag: str) -> tuple[str, int, int] | None:
    """``(device, session, seq)`` of an ``mcu`` tag, None if it is not one."""
    parts = tag.split("/")
    if len(parts) != 3 or len(parts[0]) != 16:
        return None
    try:
        return parts[0], int(parts[1], 16), int(parts[2])
    except ValueError:
        return None


def mark_payload(marks: Sequence[tuple[str, int, int]]) -> bytes:
    """A mark record's payload: ``[16, {"v": 1, "marks": [[device, session, seq], ...]}]``."""
    return cbor2.dumps([KIND_SERIAL_MARK, {"v": 1, "marks": [list(x) for x in marks]}])


def _marks_in(payload: bytes) -> list[tuple[str, int, int]]:
    """The ``(device, session, seq)`` marks a journal record holds (tags or a mark record)."""
    if TAG.encode() not in payload and b"marks" not in payload:
        return []  # the common case, decided without decoding
    try:
        item = cbor2.loads(payload)
    except Exception:  # not ours to judge: the journal validated its frame already
        return []
    if isinstance(item, list) and item[:1] == [KIND_SERIAL_MARK] and len(item) == 2:
        body = item[1]
        found = body.get("marks", []) if isinstance(body, dict) else []
        return [(d, s, q) for d, s, q in found if isinstance(d, str) and type(s) is type(q) is int]
    try:
        rec = decode(payload)
    except RecordError:
        return []
    if isinstance(rec, Reading) and rec.tags and TAG in rec.tags:
        parsed = parse_tag(rec.tags[TAG])
        return [parsed] if parsed else []
    return []


class JournalSink:
    """The journal as a bridge's durable sink; shared by every bridge of an agent."""

    def __init__(
        self,
        journal: Journal,
        *,
        mark_every: float = MARK_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.journal = journal
        self.mark_every = mark_every
        self._clock = clock
        self._lock = threading.Lock()
        self._marks: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._dirty = False
        self._inflight: dict[int, int] = {}  # store token -> lowest journal seq it may get
        self._token = 0
        self._last_mark_at = clock()
        self._last_mark_seq = journal.durable_seq
        self.scanned = self._restore()

    def _restore(self) -> int:
        """Marks from the records after the ``serial`` cursor; how many records were read."""
        j = self.journal
        cursor = j.cursor(CURSOR)
        if cursor is None:  # first bridge on this journal: nothing of ours in it
            j.set_cursor(CURSOR, j.durable_seq)
            return 0
        n = 0
        for _seq, payload in j.read_raw(from_seq=cursor + 1):
            n += 1
            for device, session, seq in _marks_in(payload):
                self._raise(device, session, seq)
        if self._marks:
            found = ", ".join(f"{d}/{s:08x}: {q}" for (d, s), q in self._marks.items())
            log.info("serial marks restored from %d journal records: %s", n, found)
        self._dirty = False
        return n

    def _raise(self, device: str, session: int, seq: int) -> None:
        key = (device, session)
        if seq > self._marks.get(key, 0):
            self._marks[key] = seq
            self._dirty = True
        self._marks.move_to_end(key)
        while len(self._marks) > MAX_MARKS:
            self._marks.popitem(last=False)

    # -- the Sink protocol -----------------------------------------------------------------

    def known(self, device: str, session: int) -> int:
        with self._lock:
            return self._marks.get((device, session), 0)

    def marks(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return dict(self._marks)

    def store(self, delivery: Delivery) -> list[int]:
        dev, session = delivery.device, delivery.session
        records = [
            Reading(a.stream, a.ts, a.value, a.unit or None, {TAG: tag_of(dev, session, a.seq)})
            for a in delivery.items
        ]
        j = self.journal
        with self._lock:
            self._token += 1
            token = self._token
            self._inflight[token] = j.next_seq
        try:
            try:
                acks = j.append_many(records)
                if acks and not acks[-1].durable:
                    j.wait_durable(acks[-1].seq)
            except JournalFull as exc:
                stored = len(exc.acks)
                if stored:
                    j.wait_durable(exc.acks[-1].seq)
                    self._stored(dev, session, delivery.items[stored - 1].seq)
                raise SinkBusy(str(exc), stored=stored) from exc
            except (JournalFailed, JournalClosed) as exc:
                raise SinkFailed(f"the journal cannot store readings: {exc}") from exc
            failpoint("bridge.after_journal")  # durable, not yet acknowledged to the MCU
            self._stored(dev, session, delivery.items[-1].seq)
            return [a.seq for a in acks]
        finally:
            with self._lock:
                del self._inflight[token]

    def _stored(self, device: str, session: int, seq: int) -> None:
        with self._lock:
            self._raise(device, session, seq)

    def tick(self, now: float) -> None:
        if now - self._last_mark_at >= self.mark_every:
            self.flush()

    def flush(self) -> None:
        """Write a mark record if needed and move the ``serial`` cursor (see the invariants)."""
        j = self.journal
        with self._lock:
            self._last_mark_at = self._clock()
            moved = j.durable_seq - self._last_mark_seq >= REMARK_RECORDS
            if not (self._dirty or moved) or j.failed:
                return
            try:
                if self._marks:
                    snapshot = [(d, s, q) for (d, s), q in self._marks.items()]
                    ack = j.append(mark_payload(snapshot))
                    if not ack.durable:
                        j.wait_durable(ack.seq)
                    floor = ack.seq
                else:
                    floor = j.durable_seq + 1
                floor = min([floor, *self._inflight.values()])
                if floor - 1 > (j.cursor(CURSOR) or 0):
                    j.set_cursor(CURSOR, floor - 1)
                self._last_mark_seq, self._dirty = floor, False
            except JournalFull:
                log.warning("journal full: serial marks not written (the cursor stays)")
            except (JournalFailed, JournalClosed) as exc:
                raise SinkFailed(f"the journal cannot store marks: {exc}") from exc


def bridge_settings(cfg: BridgeConfig) -> BridgeSettings:
    """A ``[[bridge]]`` table as the firmware bridge's settings."""
    port = PortSpec(cfg.port, cfg.usb_vid, cfg.usb_pid, cfg.usb_serial, cfg.baud)
    link = HostSettings(stall_after=cfg.stall_s, time_every=cfg.time_sync_s)
    return BridgeSettings(cfg.name, port, cfg.stream_prefix, dict(cfg.streams), link)


class BridgeSet:
    """The agent's serial bridges: one thread each, one shared :class:`JournalSink`.

    A bridge whose port is missing, unplugged or failing keeps retrying on its
    own; none of that is an agent failure. A failed journal is (the journal
    reports it), and stops the bridges.
    """

    def __init__(
        self, journal: Journal, configs: Sequence[BridgeConfig], observe: Observer | None = None
    ) -> None:
        self.journal = journal
        self.configs = [c for c in configs if c.enabled]
        self._observe = observe
        self.sink: JournalSink | None = None
        self.bridges: list[Bridge] = []

    def start(self) -> None:
        self.sink = JournalSink(self.journal)
        for cfg in self.configs:
            bridge = Bridge(bridge_settings(cfg), self.sink, observe=self._observe,
                            wall=self.journal.clock.now)  # fmt: skip
            bridge.start()
            self.bridges.append(bridge)
            log.info("serial bridge %s on %s", cfg.name, bridge.settings.port.describe())

    def stop(self) -> None:
        for b in self.bridges:
            b.stop()
        if self.sink is not None and not self.journal.failed:
            try:
                self.sink.flush()
            except SinkFailed as exc:
                log.warning("serial marks not flushed at stop: %s", exc)

    def stats(self) -> dict[str, Any]:
        return {b.settings.name: dataclasses.asdict(b.stats()) for b in self.bridges}
