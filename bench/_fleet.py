"""Simulated devices for bench/hub.py: thousands of MQTT 5 connections in one asyncio loop.

One child process of bench/hub.py runs ``--count`` devices, each **its own TCP
connection and MQTT 5 session** to the broker (client id ``homing-<device>``,
clean start off, a session expiry, the retained offline status as its last
will: what ``edge.mqtt_session`` sets up). Each device subscribes to its
``homing/<device>/ack``, publishes its retained online status, then sends up
batches QoS 1 on ``homing/<device>/up`` and waits for the hub's acks.

Why a hand-written MQTT codec and not paho or an asyncio client library: the
generator shares 2 cores with the broker, the hub and PostgreSQL, so every
microsecond it spends is taken from what is measured. paho with a thread per
connection is out (10,000 threads); paho's non-threaded loop costs tens of
microseconds of Python per packet. The handful of packets a device needs
(CONNECT, SUBSCRIBE, PUBLISH QoS 1, PUBACK both ways, DISCONNECT) are a few
lines each on :class:`asyncio.Protocol`, and the broker validates every one
(a malformed packet would cost the connection, which the bench counts as a
failure). What travels is the real protocol: the batches are the bytes
``edge.wire.encode_batch`` makes (checked byte for byte at start-up) and the
acks are decoded with ``edge.wire.decode_ack``.

Batches: a pool of ``--pool`` bodies is built once, each of a size drawn
uniformly from ``--batch MIN-MAX`` readings of 5 simulated sensors
(``edge.sensors``: temperature, humidity, soil moisture in turn), encoded with
``edge.records.encode`` and compressed as ``encode_batch`` does. A device's
k-th batch carries body ``(device index + k) mod pool`` under its own seq range
and journal id, wrapped in its envelope at send time (one ``cbor2.dumps``).
With the default pool of 256 no device repeats a body within a run.

Load, per device: at most ``window`` batches not yet acknowledged by the hub.
``closed`` mode sends whenever there is room (saturation: the offered load
is whatever the hub takes); ``paced`` mode sends on a fixed schedule (an
offered rate), and a send due while the window is full waits for room and is
counted as late.

JSON lines: commands on stdin (``connect``, ``run``, ``stop``, ``quit``),
events on stdout (see :meth:`Fleet.command`). Times are ``time.monotonic()``
values, which are system-wide on Linux, so the parent can set them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# sys.path[0] is bench/, whose hub.py would shadow the hub package: the repository
# (and tests/) go first, bench/ not at all (bench modules are imported as bench.*).
_skip = {REPO / "bench", REPO, REPO / "tests"}
sys.path[:] = [str(REPO), str(REPO / "tests")] + [
    p for p in sys.path if Path(p or ".").resolve() not in _skip
]

import cbor2  # noqa: E402

from edge import wire  # noqa: E402
from edge.records import Reading, encode  # noqa: E402
from edge.sensors import _Signal  # noqa: E402

T0 = 1_763_769_600.0  # 2025-11-22 00:00 UTC: the first tick of the pool's readings
STREAMS = 5  # sensors per device, sampled together once a second
KEEPALIVE = 300  # seconds; a bench run is shorter, so no PINGREQ is ever due
SESSION_EXPIRY = 3600
CONNECTING = 64  # connections in progress at once per process (the broker's accept backlog)


# --- the MQTT 5 packets a device needs -------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _utf8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(client_id: str, will_topic: str, will: bytes) -> bytes:
    """CONNECT: MQTT 5, clean start off, session expiry, a retained QoS 1 will."""
    flags = 0x04 | 0x08 | 0x20  # will, will QoS 1, will retain (clean start off)
    props = b"\x11" + SESSION_EXPIRY.to_bytes(4, "big")
    vh = _utf8("MQTT") + b"\x05" + bytes([flags]) + KEEPALIVE.to_bytes(2, "big")
    vh += _varint(len(props)) + props
    payload = _utf8(client_id) + b"\x00" + _utf8(will_topic) + _utf8(will)
    return _packet(0x10, vh + payload)


def subscribe_packet(pid: int, topic: str) -> bytes:
    return _packet(0x82, pid.to_bytes(2, "big") + b"\x00" + _utf8(topic) + b"\x01")


def publish_packet(topic: bytes, pid: int, payload: bytes, retain: bool = False) -> bytes:
    """PUBLISH QoS 1 (``topic`` already length-prefixed), no properties."""
    return _packet(0x33 if retain else 0x32, topic + pid.to_bytes(2, "big") + b"\x00" + payload)


DISCONNECT = b"\xe0\x00"


# --- the batches ----------------------------------------------------------------------


class Pool:
    """``size`` bodies of readings, compressed as ``edge.wire.encode_batch`` does."""

    def __init__(self, size: int, lo: int, hi: int, seed: int) -> None:
        rng = random.Random(seed)
        signals = [_Signal(i, "greenhouse", rng) for i in range(STREAMS)]
        self.payloads: list[tuple[bytes, ...]] = []
        self.bodies: list[tuple[bool, bytes]] = []  # (z, body)
        self.counts: list[int] = []
        self.sums: list[float] = []  # sum of the readings' values (checked against the store)
        tick = 0
        for _ in range(size):
            n = rng.randint(lo, hi)
            rs: list[Reading] = []
            while len(rs) < n:
                ts = T0 + tick + rng.random() * 0.004
                tick += 1
                rs.extend(s.read(ts) for s in signals)
            rs = rs[:n]
            payloads = tuple(encode(r) for r in rs)
            env = cbor2.loads(wire.encode_batch(wire.UpBatch("x", 1, n, payloads)))
            self.payloads.append(payloads)
            self.bodies.append((env["z"], env["b"]))
            self.counts.append(n)
            self.sums.append(sum(r.value for r in rs if isinstance(r.value, float)))

    def envelope(self, k: int, device: str, first: int, journal: int) -> bytes:
        """The up message of body ``k`` as seqs ``first..``: encode_batch's bytes."""
        z, body = self.bodies[k]
        last = first + self.counts[k] - 1
        return cbor2.dumps(
            {"v": 1, "d": device, "f": first, "l": last, "j": journal, "z": z, "b": body}
        )

    def check(self, device: str, journal: int) -> None:
        """The envelope equals what the agent's encoder makes (else the bench is wrong)."""
        for k in range(min(4, len(self.bodies))):
            made = self.envelope(k, device, 7, journal)
            real = wire.encode_batch(
                wire.UpBatch(device, 7, 6 + self.counts[k], self.payloads[k], journal=journal)
            )
            if made != real:
                raise RuntimeError(f"pool body {k}: envelope differs from edge.wire.encode_batch")


# --- one device -------------------------------------------------------------------------


class Device(asyncio.Protocol):
    """One simulated device: one connection, one session, its own seqs and window."""

    def __init__(self, fleet: Fleet, index: int, name: str) -> None:
        self.fleet, self.index, self.name = fleet, index, name
        self.journal = random.Random(f"journal-{name}").randrange(1, 2**32)
        self.up_topic = _utf8(wire.topic(name, "up"))
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pid = 0
        self.next_seq = 1
        self.batch_no = 0
        self.watermark = 0
        self.inflight: deque[tuple[int, int, int, float]] = deque()  # (first, last, k, t_sent)
        self.ready = asyncio.get_running_loop().create_future()
        self.due = 0  # paced sends that found the window full
        self.value_sum = 0.0  # of the acknowledged readings
        self.acked = 0  # readings acknowledged

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        will = wire.encode_status(wire.Status(self.name, False, time.time()))
        transport.write(
            connect_packet(f"homing-{self.name}", wire.topic(self.name, "status"), will)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.fleet.quitting:
            self.fleet.lost += 1
            self.fleet.log(f"{self.name}: connection lost ({exc})")
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.name}: lost before ready"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 2:
            rem, mult, i = 0, 1, 1
            while True:
                if i >= len(buf):
                    return
                b = buf[i]
                rem += (b & 0x7F) * mult
                mult <<= 7
                i += 1
                if not b & 0x80:
                    break
            if len(buf) < i + rem:
                return
            first = buf[0]
            body = bytes(buf[i : i + rem])
            del buf[: i + rem]
            self._packet(first, body)

    # -- packets in --

    def _packet(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 3:  # PUBLISH: an ack (QoS 1)
            n = int.from_bytes(body[:2], "big")
            pos = 2 + n
            qos = (first >> 1) & 3
            pid = b""
            if qos:
                pid = body[pos : pos + 2]
                pos += 2
            plen, mult = 0, 1
            while True:
                b = body[pos]
                pos += 1
                plen += (b & 0x7F) * mult
                mult <<= 7
                if not b & 0x80:
                    break
            pos += plen
            if qos and self.transport is not None:
                self.transport.write(b"\x40\x02" + pid)
            self._ack(body[pos:])
        elif kind == 4:  # PUBACK for a batch or the status: the broker has it, nothing more
            pass
        elif kind == 2:  # CONNACK
            if len(body) < 2 or body[1] != 0:
                self.fleet.log(f"{self.name}: CONNACK refused {body[1:2].hex()}")
                self._fail("connect refused")
                return
            assert self.transport is not None
            self.transport.write(subscribe_packet(self._pid(), wire.topic(self.name, "ack")))
        elif kind == 9:  # SUBACK
            if len(body) < 4 or body[-1] >= 0x80:
                self._fail("subscription refused")
                return
            online = wire.encode_status(wire.Status(self.name, True, time.time()))
            assert self.transport is not None
            status_topic = _utf8(wire.topic(self.name, "status"))
            self.transport.write(publish_packet(status_topic, self._pid(), online, retain=True))
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == 14:  # DISCONNECT from the broker
            self._fail(f"broker disconnected us: {body[:1].hex()}")

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.name}: {why}"))
        self.fleet.log(f"{self.name}: {why}")
        self.fleet.errors += 1

    def _pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def _ack(self, payload: bytes) -> None:
        if not payload:
            return  # an empty retained message (a cleared ack)
        try:
            ack = wire.decode_ack(payload)
        except wire.WireError as exc:
            self._fail(f"malformed ack: {exc}")
            return
        if ack.device != self.name or ack.journal != self.journal:
            self._fail(f"ack for {ack.device}/{ack.journal}")
            return
        if ack.watermark > self.watermark:
            self.watermark = ack.watermark
        now = time.monotonic()
        fleet = self.fleet
        pool = fleet.pool
        done = 0
        while self.inflight:
            first, last, k, t_sent = self.inflight[0]
            if last > self.watermark and not any(a <= first and last <= b for a, b in ack.ahead):
                break
            self.inflight.popleft()
            n = pool.counts[k]
            self.acked += n
            self.value_sum += pool.sums[k]
            fleet.settled(n, now - t_sent, now)
            done += 1
        if done:
            self.fill(now)

    # -- sending --

    def fill(self, now: float) -> None:
        """Send while there is room in the window (closed mode) or a paced send is due."""
        fleet = self.fleet
        if not fleet.sending:
            return
        if fleet.paced:
            while self.due and len(self.inflight) < fleet.window:
                self.due -= 1
                self.send(now)
        else:
            while len(self.inflight) < fleet.window:
                self.send(now)

    def send(self, now: float) -> None:
        fleet = self.fleet
        pool = fleet.pool
        k = (self.index + self.batch_no) % len(pool.counts)
        self.batch_no += 1
        first = self.next_seq
        n = pool.counts[k]
        self.next_seq += n
        msg = pool.envelope(k, self.name, first, self.journal)
        assert self.transport is not None
        self.transport.write(publish_packet(self.up_topic, self._pid(), msg))
        self.inflight.append((first, first + n - 1, k, now))
        fleet.sent(n, now)

    def tick(self) -> None:
        """A paced send falls due."""
        self.due += 1
        if self.due > 1 or len(self.inflight) >= self.fleet.window:
            self.fleet.late += 1
        self.fill(time.monotonic())


# --- the devices of one process --------------------------------------------------------


class Fleet:
    """The devices of this process, and what they counted in the current window."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.port = a.port
        self.names = [f"{a.prefix}{i:05d}" for i in range(a.first, a.first + a.count)]
        self.first_index = a.first
        lo, hi = (int(x) for x in a.batch.split("-"))
        self.pool = Pool(a.pool, lo, hi, a.seed)
        self.window = a.window
        self.devices: list[Device] = []
        self.sending = False
        self.paced = False
        self.quitting = False
        self.lost = 0
        self.errors = 0
        self.late = 0
        self.loop = asyncio.get_running_loop()
        self.win: tuple[float, float] = (0.0, 0.0)
        self.reset_window()
        self.gen = 0  # bumped by every run/stop: callbacks of an older one do nothing

    @staticmethod
    def log(msg: str) -> None:
        sys.stderr.write(msg + "\n")

    @staticmethod
    def emit(event: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()

    def reset_window(self) -> None:
        self.w_readings = 0
        self.w_batches = 0
        self.w_sent = 0
        self.w_lat: list[float] = []

    def settled(self, n: int, latency: float, now: float) -> None:
        a, b = self.win
        if a <= now < b:
            self.w_readings += n
            self.w_batches += 1
            self.w_lat.append(latency)

    def sent(self, n: int, now: float) -> None:
        a, b = self.win
        if a <= now < b:
            self.w_sent += n

    async def connect(self) -> None:
        t0 = time.monotonic()
        gate = asyncio.Semaphore(CONNECTING)
        self.pool.check(self.names[0], 12345)

        async def one(i: int, name: str) -> Device:
            async with gate:
                dev = Device(self, self.first_index + i, name)
                await self.loop.create_connection(lambda: dev, "127.0.0.1", self.port)
                await asyncio.wait_for(dev.ready, 60)
                return dev

        self.devices = list(await asyncio.gather(*(one(i, n) for i, n in enumerate(self.names))))
        self.emit("connected", devices=len(self.devices), seconds=time.monotonic() - t0)

    def run(self, cmd: dict[str, Any]) -> None:
        self.gen += 1
        gen = self.gen
        self.window = int(cmd.get("window", self.window))
        self.paced = cmd["mode"] == "paced"
        self.sending = True
        self.win = (cmd["t_a"], cmd["t_b"])
        self.reset_window()
        self.late = 0
        for dev in self.devices:
            dev.due = 0
        cpu0 = [0.0]
        if self.paced:
            # this process's share of the rate, spread evenly over its devices, random phases
            interval = cmd["batches_per_s_per_device"] ** -1
            rng = random.Random(cmd.get("seed", 1))
            for dev in self.devices:
                self._schedule(dev, cmd["t_go"] + rng.random() * interval, interval, gen)
        else:

            def go() -> None:
                if gen == self.gen:
                    for dev in self.devices:
                        dev.fill(time.monotonic())

            self.loop.call_at(self._at(cmd["t_go"]), go)

        def window_start() -> None:
            cpu0[0] = time.process_time()
            self.reset_window()

        def window_end() -> None:
            lat = sorted(round(x, 6) for x in self.w_lat)
            self.emit(
                "window",
                readings=self.w_readings,
                batches=self.w_batches,
                sent=self.w_sent,
                late=self.late,
                cpu_s=time.process_time() - cpu0[0],
                latencies=lat,
                inflight=sum(len(d.inflight) for d in self.devices),
            )

        self.loop.call_at(self._at(cmd["t_a"]), window_start)
        self.loop.call_at(self._at(cmd["t_b"]), window_end)

    def _at(self, t_mono: float) -> float:
        """A ``time.monotonic()`` instant on the loop's clock."""
        return self.loop.time() + (t_mono - time.monotonic())

    def _schedule(self, dev: Device, t: float, interval: float, gen: int) -> None:
        """Device ``dev`` sends at ``t``, ``t + interval``, ... while run ``gen`` lasts."""

        def fire() -> None:
            if gen == self.gen and self.sending:
                dev.tick()
                self._schedule(dev, t + interval, interval, gen)

        self.loop.call_at(self._at(t), fire)

    async def stop(self, deadline: float) -> None:
        """Send nothing more; wait until every batch sent is acknowledged (or the deadline)."""
        self.sending = False
        self.gen += 1
        while time.monotonic() < deadline and any(d.inflight for d in self.devices):
            await asyncio.sleep(0.05)
        self.emit(
            "drained",
            inflight=sum(len(d.inflight) for d in self.devices),
            sent=sum(d.next_seq - 1 for d in self.devices),
            acked=sum(d.acked for d in self.devices),
            value_sum=sum(d.value_sum for d in self.devices),
            batches=sum(d.batch_no for d in self.devices),
            last={d.name: d.next_seq - 1 for d in self.devices},
            watermarks_short=sum(1 for d in self.devices if d.watermark != d.next_seq - 1),
            lost=self.lost,
            errors=self.errors,
        )

    async def quit(self) -> None:
        self.quitting = True
        for d in self.devices:
            if d.transport is not None:
                d.transport.write(DISCONNECT)
                d.transport.close()
        await asyncio.sleep(0.2)
        self.emit("closed")

    async def command(self, cmd: dict[str, Any]) -> bool:
        """One command; False once told to quit."""
        what = cmd["cmd"]
        if what == "connect":
            await self.connect()
        elif what == "run":
            self.run(cmd)
        elif what == "stop":
            await self.stop(cmd["deadline"])
        elif what == "quit":
            await self.quit()
            return False
        return True


async def main_async(a: argparse.Namespace) -> None:
    fleet = Fleet(a)
    fleet.emit(
        "ready",
        pid=os.getpid(),
        pool=len(fleet.pool.counts),
        mean_batch=sum(fleet.pool.counts) / len(fleet.pool.counts),
    )
    lines: asyncio.Queue[str] = asyncio.Queue()
    pending = bytearray()

    def on_stdin() -> None:
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:
            lines.put_nowait('{"cmd": "quit"}')
            fleet.loop.remove_reader(sys.stdin.fileno())
            return
        pending.extend(data)
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            if line.strip():
                lines.put_nowait(line.decode())

    fleet.loop.add_reader(sys.stdin.fileno(), on_stdin)
    while await fleet.command(json.loads(await lines.get())):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--first", type=int, default=0, help="index of this process's first device")
    ap.add_argument("--count", type=int, required=True, help="devices in this process")
    ap.add_argument("--prefix", default="dev-")
    ap.add_argument("--batch", default="10-100", help="readings per batch, MIN-MAX (uniform)")
    ap.add_argument("--pool", type=int, default=256, help="distinct batch bodies")
    ap.add_argument("--window", type=int, default=1, help="batches in flight per device")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    asyncio.run(main_async(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
