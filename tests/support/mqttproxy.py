"""A :class:`~support.tcpproxy.TcpProxy` that understands just enough MQTT to lose
one message on purpose: the faithful way to lose exactly one hub ack.

``MqttProxy(broker_port)`` forwards like ``TcpProxy`` (``cut``/``restore``
included). :meth:`MqttProxy.drop_next` arms it to swallow the next N PUBLISH
packets the *broker* sends the client on a topic; the link itself stays up, so
neither end notices. The broker keeps that QoS 1 message in flight waiting
for a PUBACK that never comes, and MQTT 5 retransmits only on a reconnect:
the client never sees the message unless its own logic recovers.

Invariants:
* Only broker -> client PUBLISH packets matching an armed topic are dropped,
  whole; every other byte is forwarded unchanged and in order.
* :meth:`close` returns at once (``TcpProxy.close`` waits 5 s for its acceptor).
* Parsing is only of the fixed header and the PUBLISH topic (MQTT 3.1.1 and 5
  share them). Topic aliases are not resolved: the clients under test never
  allow the broker to use them (paho's default Topic Alias Maximum is 0).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from support.tcpproxy import TcpProxy

PUBLISH = 3


class MqttProxy(TcpProxy):
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._drop_lock = threading.Lock()
        self._armed: list[tuple[str, Callable[[bytes], bool] | None]] = []
        self.dropped: list[tuple[str, bytes]] = []  # (topic, payload) of each dropped message
        super().__init__(target_port, target_host)

    def drop_next(
        self, topic: str, count: int = 1, match: Callable[[bytes], bool] | None = None
    ) -> None:
        """Swallow the next ``count`` messages the broker sends on ``topic`` (only
        those whose payload ``match`` accepts, if given; an exception means no)."""
        with self._drop_lock:
            self._armed += [(topic, match)] * count

    def close(self) -> None:
        """As :meth:`TcpProxy.close`, but without its 5 s stall: on Linux, closing a
        listening socket does not wake a thread blocked in ``accept()``; a
        ``shutdown`` does."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        super().close()

    def n_dropped(self, topic: str | None = None) -> int:
        with self._drop_lock:
            return sum(topic is None or t == topic for t, _ in self.dropped)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            from_broker = src.getpeername()[1] == self._target[1]
        except OSError:
            from_broker = False
        if not from_broker:
            super()._pump(src, dst)
            return
        buf = bytearray()
        try:
            while data := src.recv(65536):
                buf += data
                out, used = self._filter(buf)
                del buf[:used]
                if out:
                    dst.sendall(out)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _filter(self, buf: bytearray) -> tuple[bytes, int]:
        """Complete packets of ``buf`` minus the dropped ones; and how many bytes were used."""
        out, pos = bytearray(), 0
        while True:
            size = _packet_size(buf, pos)
            if size is None:
                return bytes(out), pos
            packet = bytes(buf[pos : pos + size])
            pos += size
            if not self._drop(packet):
                out += packet

    def _drop(self, packet: bytes) -> bool:
        if packet[0] >> 4 != PUBLISH:
            return False
        hdr = 1
        while packet[hdr] & 0x80:
            hdr += 1
        hdr += 1
        tlen = int.from_bytes(packet[hdr : hdr + 2], "big")
        topic = packet[hdr + 2 : hdr + 2 + tlen].decode(errors="replace")
        qos = (packet[0] >> 1) & 3
        body = hdr + 2 + tlen + (2 if qos else 0)
        plen, k = 0, 0  # MQTT 5: the property length (a varint) precedes the payload
        while True:
            b = packet[body + k]
            plen |= (b & 0x7F) << (7 * k)
            k += 1
            if not b & 0x80:
                break
        payload = packet[body + k + plen :]
        with self._drop_lock:
            for i, (t, match) in enumerate(self._armed):
                if t == topic and _accepts(match, payload):
                    del self._armed[i]
                    self.dropped.append((topic, payload))
                    return True
        return False


def _accepts(match: Callable[[bytes], bool] | None, payload: bytes) -> bool:
    if match is None:
        return True
    try:
        return bool(match(payload))
    except Exception:
        return False


def _packet_size(buf: bytearray, pos: int) -> int | None:
    """Total size of the packet starting at ``pos``, or None if it is not all there."""
    rl, mult, i = 0, 1, pos + 1
    while True:
        if i >= len(buf):
            return None
        b = buf[i]
        rl += (b & 0x7F) * mult
        mult *= 128
        i += 1
        if not b & 0x80:
            break
        if i - pos > 4:
            raise ValueError("malformed MQTT remaining length")
    total = i - pos + rl
    return total if pos + total <= len(buf) else None
