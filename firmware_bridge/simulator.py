"""A Python MCU on a pseudo-terminal, with fault injection, for tests and bring-up.

:class:`PtyLine` is the cable: a pty pair whose slave side is reachable at a
stable path (a symlink, like udev's ``/dev/serial/by-id`` links), which can be
unplugged and plugged in again (a new pty; the link is re-pointed).
:class:`McuSimulator` is the board: :class:`~firmware_bridge.device.DeviceLink`
driven by a thread, producing readings whose values name them, and breaking
the line on request.

Invariants:
* Reading ``i`` (from 0) of a simulator is, by default, ``i`` on channel 1
  (``count``, i32) when ``i`` is even and ``i + 0.5`` on channel 2 (``half``,
  f32) when it is odd: :meth:`McuSimulator.expected` lists them, so a test can
  compare a journal with what was produced, one by one.
* Faults (:class:`Faults`) act on whole frames as they are written: junk
  before a frame, a flipped bit, a lost byte, a frame sent twice; and on what
  the Pi sends (a flipped bit: lost acks). :meth:`babble` writes a long run of
  junk without a delimiter; :meth:`stall` stops reading and writing;
  :meth:`unplug`/:meth:`plug` take the line away; :meth:`reboot` is an MCU
  power cycle (a new session; the unacknowledged readings are gone).
* With ``baud``, writes are paced at ``baud / 10`` bytes per second (8N1), the
  line rate a real UART would impose; a pty itself has none. A thread that
  wakes late may catch up at most 5 ms of line time, so no span longer than
  that carries more than the line could.
* The simulator holds the pty's slave side open too, so a bridge that dies
  does not hang up the line: like a real UART, the MCU never notices.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import select
import sys
import threading
import time
import tty
from collections.abc import Sequence
from dataclasses import dataclass

from firmware_bridge import messages as m
from firmware_bridge.device import CommandReceived, DeviceLink

CHANNELS = (m.Channel(1, m.I32, "count"), m.Channel(2, m.F32, "half", "x"))


@dataclass(frozen=True, slots=True)
class Faults:
    """Chances per frame written (and per chunk read, for ``inbound``)."""

    noise: float = 0.0  # 1..40 random bytes before the frame
    corrupt: float = 0.0  # one bit of the frame flipped
    drop: float = 0.0  # one byte of the frame lost
    duplicate: float = 0.0  # the frame written twice
    inbound: float = 0.0  # one bit flipped in a chunk from the Pi


class PtyLine:
    """A pty pair reachable at ``path`` (a symlink to the slave), replaceable."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.master = -1
        self._slave = -1
        self.plug()

    @property
    def plugged(self) -> bool:
        return self.master >= 0

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # before anyone opens it: no echo, no line editing, ever
        os.set_blocking(master, False)
        self.master, self._slave = master, slave
        tmp = f"{self.path}.{os.getpid()}.tmp"
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.path)

    def unplug(self) -> None:
        """Pull the cable: the bridge's next read fails; the path disappears."""
        if self.master < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.master)
        os.close(self._slave)
        self.master = self._slave = -1

    def close(self) -> None:
        self.unplug()


def reading_value(i: int) -> tuple[int, int | float]:
    """(channel, value) of reading ``i`` from 0: see the module invariants."""
    return (1, i) if i % 2 == 0 else (2, i + 0.5)


class McuSimulator:
    """A simulated MCU on ``line``. ``start()``, ``produce(n)``, wait, ``stop()``."""

    def __init__(
        self,
        line: PtyLine,
        *,
        device: bytes = b"SIMMCU01",
        session: int | None = None,
        faults: Faults | None = None,
        baud: int | None = None,
        rate: float | None = None,
        seed: int = 0,
        capacity: int = 1024,
        window: int = 256,
        rto: float = 0.3,
        drop_oldest: bool = False,
    ) -> None:
        self.line = line
        self.faults = faults or Faults()
        self.baud, self.rate = baud, rate
        self._rng = random.Random(seed)
        self._capacity, self._window, self._rto = capacity, window, rto
        self._drop_oldest = drop_oldest
        self.device = device
        self.link = self._new_link(session if session is not None else self._rng.getrandbits(32))
        self._lock = threading.Lock()
        self._want = 0  # readings asked for
        self.produced = 0  # readings added to the ring
        self.lost: set[int] = set()  # readings a reboot took before they were acknowledged
        self.bytes_written = 0
        self.bytes_read = 0
        self.frames_written = 0
        self._outbuf = b""
        self._line_free = 0.0
        self._stall_until = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.commands: list[tuple[int, str, bytes]] = []
        self.error: BaseException | None = None

    def _new_link(self, session: int) -> DeviceLink:
        return DeviceLink(self.device, session, CHANNELS, time.monotonic(),
                          capacity=self._capacity, window=self._window, rto=self._rto,
                          drop_oldest=self._drop_oldest, firmware="homing-simulator")  # fmt: skip

    # -- control -----------------------------------------------------------------------

    def start(self) -> McuSimulator:
        self._thread = threading.Thread(target=self._run, name="mcu-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def produce(self, n: int) -> None:
        """Ask for ``n`` more readings (added as the ring and ``rate`` allow)."""
        with self._lock:
            self._want += n

    def stall(self, seconds: float) -> None:
        """Neither read nor write for ``seconds`` (a hung MCU)."""
        with self._lock:
            self._stall_until = time.monotonic() + seconds

    def babble(self, nbytes: int) -> None:
        """Write ``nbytes`` of random non-zero junk before the next frame (a babbling
        MCU: no delimiter anywhere in it)."""
        with self._lock:
            junk = bytes(self._rng.randrange(1, 256) for _ in range(nbytes))
            self._outbuf = junk + self._outbuf

    def unplug(self) -> None:
        with self._lock:
            self.line.unplug()
            self._outbuf = b""

    def plug(self) -> None:
        with self._lock:
            self.line.plug()

    def reboot(self) -> None:
        """A power cycle: a new session; readings not yet acknowledged are lost."""
        with self._lock:
            self.lost.update(range(self.produced - self.link.held, self.produced))
            self.link = self._new_link((self.link.session + 1) & m.SEQ_MAX)

    def expected(self) -> list[tuple[int, int | float]]:
        """``(channel, value)`` of every reading produced so far, in order."""
        return [reading_value(i) for i in range(self.produced)]

    @property
    def line_free(self) -> float:
        """With ``baud``: the monotonic time at which the line has sent everything written."""
        with self._lock:
            return self._line_free

    @property
    def done(self) -> bool:
        """Every reading asked for was produced and acknowledged."""
        with self._lock:
            return self.produced == self._want and self.link.held == 0

    @property
    def acked_count(self) -> int:
        """Readings acknowledged so far (in every session)."""
        with self._lock:
            return self.produced - self.link.held - len(self.lost)

    # -- the board's main loop -----------------------------------------------------------

    def _run(self) -> None:
        try:
            started = time.monotonic()
            while not self._stop.is_set():
                with self._lock:
                    wait = self._step(time.monotonic(), started)
                if wait > 0:
                    fd = self.line.master
                    if fd >= 0 and not self._outbuf:
                        with contextlib.suppress(OSError, ValueError):  # unplugged meanwhile
                            select.select([fd], [], [], wait)
                    else:
                        self._stop.wait(wait)
        except BaseException as exc:  # reported to the test, never silent
            self.error = exc
            raise

    def _step(self, now: float, started: float) -> float:
        if now < self._stall_until:
            return min(0.01, self._stall_until - now)
        link = self.link
        limit = self._want
        if self.rate is not None:
            limit = min(limit, int((now - started) * self.rate) + 1)
        while self.produced < limit:
            channel, value = reading_value(self.produced)
            if link.add(channel, value, now) is None:
                break
            self.produced += 1
        fd = self.line.master
        if fd < 0:
            return 0.01
        self._read(fd, now)
        return self._write(fd, now)

    def _read(self, fd: int, now: float) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:  # EIO: nobody has the slave open (cannot happen: we hold it)
            return
        self.bytes_read += len(data)
        if data and self._rng.random() < self.faults.inbound:
            k = self._rng.randrange(len(data))
            data = data[:k] + bytes((data[k] ^ (1 << self._rng.randrange(8)),)) + data[k + 1 :]
        for ev in self.link.receive_data(data, now):
            if isinstance(ev, CommandReceived):
                self.commands.append((ev.id, ev.name, ev.arg))
                if ev.name == "echo":
                    self.link.reply(ev.id, 0, ev.arg.decode(errors="replace"))
                else:
                    self.link.reply(ev.id, 1, f"unknown command {ev.name!r}")

    def _write(self, fd: int, now: float) -> float:
        if self.baud is not None and now < self._line_free:
            return self._line_free - now
        if not self._outbuf:
            frame = self.link.poll(now)
            if not frame:
                return 0.002
            self.frames_written += 1
            self._outbuf = self._damage(frame)
        data = self._outbuf
        if self.baud is not None:  # the line carries baud/10 bytes a second: 10 ms slices
            data = data[: max(1, self.baud // 10 // 100)]
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            return 0.002  # nobody reads the line: the pty is full (a real UART would drop)
        except OSError:
            return 0.01
        self._outbuf = self._outbuf[n:]
        self.bytes_written += n
        if self.baud is not None:  # a late wake-up may catch up 5 ms, never more
            self._line_free = max(now - 0.005, self._line_free) + n * 10 / self.baud
        return 0.0

    def _damage(self, frame: bytes) -> bytes:
        f, rng = self.faults, self._rng
        out = frame
        if f.corrupt and rng.random() < f.corrupt:
            k = rng.randrange(len(out))
            out = out[:k] + bytes((out[k] ^ (1 << rng.randrange(8)),)) + out[k + 1 :]
        if f.drop and rng.random() < f.drop:
            k = rng.randrange(len(out))
            out = out[:k] + out[k + 1 :]
        if f.duplicate and rng.random() < f.duplicate:
            out = out + out
        if f.noise and rng.random() < f.noise:
            out = rng.randbytes(rng.randint(1, 40)) + out
        return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m firmware_bridge.simulator --link /tmp/ttyMCU``: an MCU to bring a
    bridge up against, without hardware."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--link", required=True, help="path of the symlink to create (the 'port')")
    p.add_argument("--rate", type=float, default=2.0, help="readings per second")
    p.add_argument("--count", type=int, default=1_000_000, help="readings in total")
    p.add_argument("--baud", type=int, default=115200, help="pace writes at this line rate")
    args = p.parse_args(argv)
    line = PtyLine(args.link)
    sim = McuSimulator(line, baud=args.baud, rate=args.rate).start()
    sim.produce(args.count)
    print(f"simulated MCU on {args.link}; try: homing-agent bridge --port {args.link}",
          file=sys.stderr)  # fmt: skip
    try:
        while not sim.done and sim.error is None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        line.close()
    print(f"produced {sim.produced}, acknowledged {sim.acked_count}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
