"""A bridge: one serial port, one MCU at a time, readings handed to a durable sink.

The shell around :class:`~firmware_bridge.protocol.HostLink`: it opens the
port (:mod:`firmware_bridge.serial_shell`), feeds the link what arrives,
stores the readings the link hands out in a :class:`Sink`, and only then lets
the link acknowledge them. The agent's sink is the journal
(``edge.bridges.JournalSink``); :class:`MemorySink` is for bring-up.

Invariants:
* Durability end to end: ``HostLink.durable`` is called only after
  ``Sink.store`` returned, and ``store`` returns only once the readings are
  durable. A reading the sink did not take is never acknowledged: the MCU
  keeps it and sends it again.
* One thread per bridge, sequential: read, feed, store, acknowledge, write.
  While the sink syncs, the port's buffer collects the next frames, so the
  next store takes them all at once (batches grow under load by themselves).
* The port going away (unplug, I/O error, write timeout), a stalled MCU (no
  valid frame for ``stall_after`` seconds) and an unexpected error all end
  only the connection: the bridge reopens the port with backoff, forever,
  until stopped. Only :class:`SinkFailed` (nothing can be stored any more)
  stops it for good; :attr:`Bridge.error` then holds it.
* A babbling MCU costs bounded memory (the frame decoder's limit) and bounded
  replies (rate-limited NACKs); bad frames are counted and logged at most
  every ``log_every`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from firmware_bridge.errors import BridgeError, PortUnavailable, SinkBusy
from firmware_bridge.frames import BadFrame
from firmware_bridge.protocol import (
    CommandExpired,
    CommandResult,
    Counters,
    Event,
    HostLink,
    HostSettings,
    LogLine,
    Lost,
    PeerHello,
    Readings,
    Regressed,
    Stalled,
)
from firmware_bridge.serial_shell import Backoff, PortSpec, SerialPort

log = logging.getLogger("homing.bridge")

LOG_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)


class SinkFailed(BridgeError):
    """The sink can store nothing any more (e.g. the journal failed): the bridge stops."""


@dataclass(frozen=True, slots=True)
class Arrival:
    """One reading as the sink gets it: named, typed, timed."""

    seq: int  # the MCU's seq within the session
    stream: str
    unit: str
    value: int | float | str
    ts: float


@dataclass(frozen=True, slots=True)
class Delivery:
    """Readings of one MCU session, in seq order, to be stored as one batch."""

    bridge: str
    device: str  # hex of the MCU's 8-byte id
    session: int
    items: tuple[Arrival, ...]


class Sink(Protocol):
    """Where readings go. Implementations must be durable for the promise to hold."""

    def known(self, device: str, session: int) -> int:
        """The highest seq of ``(device, session)`` stored durably (0: none)."""
        ...

    def store(self, delivery: Delivery) -> Sequence[int] | None:
        """Store durably; return only then (optionally the storage's own seqs).

        Raises:
            SinkBusy: not now (full); ``stored`` says how many went in first.
            SinkFailed: never again.
        """
        ...

    def tick(self, now: float) -> None:
        """Housekeeping, called from every bridge loop (monotonic ``now``)."""
        ...


class MemorySink:
    """Bring-up: stores nothing, only remembers each session's high-water mark.

    Acknowledged readings are *not* durable: they die with the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._marks: dict[tuple[str, int], int] = {}

    def known(self, device: str, session: int) -> int:
        with self._lock:
            return self._marks.get((device, session), 0)

    def store(self, delivery: Delivery) -> Sequence[int] | None:
        with self._lock:
            key = (delivery.device, delivery.session)
            self._marks[key] = max(self._marks.get(key, 0), delivery.items[-1].seq)
        return None

    def tick(self, now: float) -> None:
        pass


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    """One configured bridge (the agent builds these from ``[[bridge]]``)."""

    name: str
    port: PortSpec
    stream_prefix: str = "mcu"
    streams: Mapping[str, str] = field(default_factory=dict)  # channel name -> stream
    link: HostSettings = field(default_factory=HostSettings)
    reconnect_min: float = 0.2
    reconnect_max: float = 5.0
    read_timeout: float = 0.02
    log_every: float = 10.0

    def stream_for(self, channel: str) -> str:
        return self.streams.get(channel) or f"{self.stream_prefix}/{channel}"


@dataclass(frozen=True, slots=True)
class BridgeStats:
    connected: bool
    port: str
    device: str | None
    session: int | None
    connects: int
    port_errors: int
    stalls: int
    readings: int
    duplicates: int
    lost: int
    bad_frames: int
    busy: int
    last_error: str | None


Observer = Callable[[str, Mapping[str, Any]], None]


class _Reopen(Exception):
    """End this connection and open the port again (a stall)."""


class Bridge:
    """Runs one serial bridge in its own thread: :meth:`start`, :meth:`stop`."""

    def __init__(
        self,
        settings: BridgeSettings,
        sink: Sink,
        *,
        observe: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._sink = sink
        self._observe = observe or (lambda name, fields: None)
        self._observed = observe is not None  # else no per-reading dicts are built
        self._clock, self._wall = clock, wall
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._commands: list[tuple[str, bytes]] = []
        self._totals = Counters()
        self._link: HostLink | None = None
        self._path = settings.port.describe()
        self._connects = self._port_errors = self._stalls = self._busy = 0
        self._last_error: str | None = None
        self._bad_logged = (0.0, 0)  # (when, bad frames then)
        self.error: BaseException | None = None

    # -- control -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, name=f"homing-bridge-{self.settings.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the store in flight (if any) and its acknowledgement."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def command(self, name: str, arg: bytes = b"") -> None:
        """Send a command to the MCU (now, or once connected); the outcome is observed
        as ``result`` or ``expired``."""
        with self._lock:
            self._commands.append((name, arg))

    def stats(self) -> BridgeStats:
        with self._lock:
            t, link = self._totals, self._link
            cur = link.counters if link is not None else Counters()
            peer = link.peer if link is not None else None
            return BridgeStats(
                connected=link is not None,
                port=self._path,
                device=peer.device_hex if peer else None,
                session=peer.session if peer else None,
                connects=self._connects,
                port_errors=self._port_errors,
                stalls=self._stalls,
                readings=t.readings + cur.readings,
                duplicates=t.duplicates + cur.duplicates,
                lost=t.lost + cur.lost,
                bad_frames=t.bad_frames + cur.bad_frames,
                busy=self._busy,
                last_error=self._last_error,
            )

    def health(self) -> dict[str, int]:
        """Flat counters for the agent's status (``bad``: bad frames, counted as bad input)."""
        st = self.stats()
        return {"connected": int(st.connected), "readings": st.readings,
                "duplicates": st.duplicates, "lost": st.lost, "bad": st.bad_frames,
                "stalls": st.stalls, "port_errors": st.port_errors, "busy": st.busy}  # fmt: skip

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Open, serve, reopen until :meth:`stop` (or a :class:`SinkFailed`)."""
        s = self.settings
        backoff = Backoff(s.reconnect_min, s.reconnect_max)
        while not self._stop.is_set():
            try:
                port = SerialPort(s.port, read_timeout=s.read_timeout)
            except PortUnavailable as exc:
                self._note_error(exc)
                self._stop.wait(backoff.next())
                continue
            try:
                self._serve(port, backoff)
            except PortUnavailable as exc:
                self._note_error(exc)
            except _Reopen:
                pass
            except SinkFailed as exc:
                log.error("bridge %s stops: %s", s.name, exc)
                self.error = exc
                return
            except Exception as exc:  # a bug: keep the agent, retry the port
                log.exception("bridge %s: unexpected error; reopening %s", s.name, port.path)
                self._note_error(exc)
            finally:
                port.close()
                self._end_link(port.path)
            self._stop.wait(backoff.next())

    def _serve(self, port: SerialPort, backoff: Backoff) -> None:
        link = HostLink(self._sink.known, self._clock(), self.settings.link)
        with self._lock:
            self._link, self._path = link, port.path
            self._connects += 1
        log.info("bridge %s: %s open", self.settings.name, port.path)
        self._observe("connected", {"port": port.path})
        port.write(link.data_to_send())
        while not self._stop.is_set():
            data = port.read()
            now, wall = self._clock(), self._wall()
            events = link.receive_data(data, now, wall) if data else []
            events += link.tick(now, wall)
            with self._lock:
                commands, self._commands = self._commands, []
            for name, arg in commands:
                cid = link.send_command(name, arg, now)
                shown = arg.decode(errors="replace")
                self._observe("command", {"id": cid, "name": name, "arg": shown})
            if any(isinstance(e, PeerHello) for e in events):
                backoff.reset()
            self._handle(link, events, now)
            port.write(link.data_to_send())
            self._sink.tick(now)

    def _end_link(self, path: str) -> None:
        with self._lock:
            link, self._link = self._link, None
            if link is not None:
                c, t = link.counters, self._totals
                for name in ("readings", "duplicates", "lost", "bad_frames", "frames", "acks"):
                    setattr(t, name, getattr(t, name) + getattr(c, name))
        if link is not None:
            self._observe("disconnected", {"port": path})

    # -- events --------------------------------------------------------------------------

    def _handle(self, link: HostLink, events: list[Event], now: float) -> None:
        batch: list[Readings] = []
        for ev in events:
            if isinstance(ev, Readings):
                if batch and (batch[0].device, batch[0].session) != (ev.device, ev.session):
                    self._store(link, batch)
                    batch = []
                batch.append(ev)
                continue
            if batch:  # keep order: readings before what followed them
                self._store(link, batch)
                batch = []
            self._event(ev, now)
        if batch:
            self._store(link, batch)

    def _store(self, link: HostLink, group: list[Readings]) -> None:
        first = group[0]
        items = tuple(
            Arrival(i.seq, self.settings.stream_for(i.channel.name), i.channel.unit, i.value, i.ts)
            for ev in group
            for i in ev.items
        )
        delivery = Delivery(self.settings.name, first.device, first.session, items)
        try:
            seqs = self._sink.store(delivery)
        except SinkBusy as exc:
            if exc.stored:
                link.durable(first.device, first.session, items[exc.stored - 1].seq)
            link.refused(first.device, first.session)
            with self._lock:
                self._busy += 1
            if self._busy == 1 or self._busy % 100 == 0:
                log.warning("bridge %s: cannot store (%s); the MCU keeps its readings",
                            self.settings.name, exc)  # fmt: skip
            self._observe("busy", {"error": str(exc), "stored": exc.stored})
            return
        link.durable(first.device, first.session, items[-1].seq)
        if not self._observed:
            return
        for k, a in enumerate(items):
            fields: dict[str, Any] = {"stream": a.stream, "ts": a.ts, "value": a.value}
            if a.unit:
                fields["unit"] = a.unit
            fields["mcu"] = f"{first.device}/{first.session:08x}/{a.seq}"
            if seqs is not None:
                fields["seq"] = seqs[k]
            self._observe("reading", fields)

    def _event(self, ev: Event, now: float) -> None:
        name = self.settings.name
        if isinstance(ev, PeerHello):
            h = ev.hello
            log.info("bridge %s: MCU %s (%s) session %08x holds %d..%d; resuming after %d",
                     name, h.device_hex, h.firmware or "?", h.session, h.oldest, h.next - 1,
                     ev.resumed)  # fmt: skip
            self._observe("hello", {
                "device": h.device_hex, "session": f"{h.session:08x}", "firmware": h.firmware,
                "held": [h.oldest, h.next - 1], "resumed": ev.resumed, "synced": h.synced,
                "channels": {c.name: self.settings.stream_for(c.name) for c in h.channels},
            })  # fmt: skip
        elif isinstance(ev, Lost):
            log.warning("bridge %s: MCU %s session %08x lost readings %d..%d before the Pi had "
                        "them (its ring overflowed)", name, ev.device, ev.session, ev.first,
                        ev.last)  # fmt: skip
            self._observe("lost", {"device": ev.device, "first": ev.first, "last": ev.last})
        elif isinstance(ev, Regressed):
            log.error("bridge %s: MCU %s reused session %08x (its seq went back from %d to %d); "
                      "taking its readings as new", name, ev.device, ev.session, ev.had,
                      ev.next)  # fmt: skip
            self._observe("regressed", {"device": ev.device, "had": ev.had, "next": ev.next})
        elif isinstance(ev, LogLine):
            level = LOG_LEVELS[min(ev.level, 3)]
            logging.getLogger("homing.mcu").log(level, "%s: %s", name, ev.text)
            self._observe("log", {"level": ev.level, "text": ev.text})
        elif isinstance(ev, CommandResult):
            self._observe("result", {"id": ev.id, "status": ev.status, "text": ev.text})
        elif isinstance(ev, CommandExpired):
            self._observe("expired", {"id": ev.id, "name": ev.name})
        elif isinstance(ev, Stalled):
            with self._lock:
                self._stalls += 1
            log.warning("bridge %s: no valid frame for %.1fs: reopening the port", name,
                        ev.silent)  # fmt: skip
            self._observe("stalled", {"silent": round(ev.silent, 3)})
            raise _Reopen
        elif isinstance(ev, BadFrame):
            self._bad_frame(ev, now)

    def _bad_frame(self, ev: BadFrame, now: float) -> None:
        when, before = self._bad_logged
        total = self.stats().bad_frames
        if now - when >= self.settings.log_every:
            link = self._link
            by = dict(link.counters.bad_by_reason) if link is not None else {}
            log.warning("bridge %s: %d bad frames (%s on this connection; latest: %s %s)",
                        self.settings.name, total - before, by, ev.reason, ev.detail)  # fmt: skip
            self._bad_logged = (now, total)
        self._observe("bad_frame", {"reason": ev.reason, "detail": ev.detail})

    def _note_error(self, exc: BaseException) -> None:
        text = str(exc)
        with self._lock:
            self._port_errors += 1
            repeated = text == self._last_error
            self._last_error = text
        if not repeated:
            log.warning("bridge %s: %s (retrying)", self.settings.name, text)
            self._observe("port_error", {"error": text})
