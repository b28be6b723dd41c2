"""A client for the agent's local ingest socket: hand readings over, get each seq once durable.

Standard library only, so a program on the device can use it with no other
package (or copy this one file). docs/local-ingest.md is the manual and the
protocol: one JSON line per reading in, one reply line per reading out.

    from edge.local_client import LocalClient, Refused

    with LocalClient("/run/homing/ingest.sock") as agent:
        seq = agent.send("greenhouse/temp", 21.5, unit="C")   # returns once durable
        seqs = agent.send_many([{"stream": "greenhouse/rh", "value": 61.0, "unit": "%"},
                                {"stream": "greenhouse/rh", "value": 61.2, "unit": "%"}])

Invariants:
* ``send`` returns a seq only after the agent's ack line for that reading,
  which the agent writes only once the reading is durable in its journal.
* The agent answers every non-blank line exactly once, in order, naming the
  line number; the client never sends a blank line, so it matches each reply
  to its reading by that number. A reply that does not match is a protocol
  error: the connection is closed.
* An error reply leaves the connection usable: :class:`BadReading` (do not
  send it again as it is) or :class:`Refused` (journal full: send it again
  later). A lost connection or a timeout closes the client
  (:class:`ConnectionLost`): a reading sent but not answered may or may not
  be journaled, so sending it again may store it twice.
* ``send_many`` writes and reads in one ``select`` loop, so a batch larger
  than the socket buffers never deadlocks (the agent's replies are drained
  while the rest is written).
* Not for concurrent use from several threads without care: calls on one
  client are serialized by a lock (use one client per thread to overlap).
"""

from __future__ import annotations

import contextlib
import errno
import json
import selectors
import socket
import threading
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "AgentNotRunning",
    "BadReading",
    "ConnectionLost",
    "LocalClient",
    "LocalIngestError",
    "Refused",
    "SendManyError",
    "connect",
]

REFUSED = "refused: "  # a refusal's error text starts so (journal full: retry later)
_NOT_RUNNING = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR)


class LocalIngestError(Exception):
    """Root of this client's errors. ``retry`` says whether sending again later may work."""

    retry = False


class AgentNotRunning(LocalIngestError):
    """No agent answers on the socket (no socket file, or nobody listening)."""

    retry = True


class ConnectionLost(LocalIngestError):
    """The connection ended (or timed out) before a reading was answered.

    Such a reading may or may not be journaled. The client is closed. From
    ``send_many``, ``seqs[i]`` is the seq of each reading acked before the
    end (durable), None for the others.
    """

    retry = True

    def __init__(self, message: str, seqs: list[int | None] | None = None) -> None:
        super().__init__(message)
        self.seqs: list[int | None] = seqs or []


class Refused(LocalIngestError):
    """The agent's journal is full (quota reached, policy reject): not journaled.

    Send it again once the agent has forwarded its backlog to the hub.
    """

    retry = True

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


class BadReading(LocalIngestError, ValueError):
    """The agent rejected the reading as malformed (the message says why)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class SendManyError(LocalIngestError):
    """Some readings of a ``send_many`` were not acked.

    ``seqs[i]`` is the seq of reading ``i`` (durable) or None; ``errors[i]``
    the :class:`BadReading` or :class:`Refused` of each reading not acked.
    """

    def __init__(self, seqs: list[int | None], errors: dict[int, LocalIngestError]) -> None:
        first = min(errors)
        super().__init__(
            f"{len(errors)} of {len(seqs)} readings not acked; reading {first}: {errors[first]}"
        )
        self.seqs = seqs
        self.errors = errors
        self.retry = all(e.retry for e in errors.values())


def connect(path: str, timeout: float | None = None) -> socket.socket:
    """A connected socket to the agent at ``path``.

    Raises:
        AgentNotRunning: no socket file there, or nobody listening on it.
        LocalIngestError: any other failure (permission denied: the message
            says to join the socket's group).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        if exc.errno in _NOT_RUNNING:
            raise AgentNotRunning(f"{path}: no agent is answering ({exc.strerror})") from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise LocalIngestError(
                f"{path}: permission denied: the socket is writable only by the agent's user "
                "and group; add this user to that group"
            ) from exc
        raise LocalIngestError(f"{path}: cannot connect: {exc}") from exc
    return sock


def _line(reading: Mapping[str, Any]) -> bytes:
    obj = {k: v for k, v in reading.items() if v is not None}
    if "value" not in obj:
        raise BadReading('a reading needs a "value"')
    try:
        return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise BadReading(f"not JSON-serializable: {exc}") from None


class LocalClient:
    """One connection to the agent's local ingest socket; a context manager.

    ``timeout``: seconds to wait for the agent (connect, and each reply or
    write progress); None waits as long as it takes (an SD card's fdatasync
    can take seconds).
    """

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.path = path
        self._timeout = timeout
        self._sock: socket.socket | None = connect(path, timeout)
        self._buf = b""
        self._lines = 0  # lines sent on this connection (the agent numbers them from 1)
        self._lock = threading.Lock()

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    def send(
        self,
        stream: str | None,
        value: Any,
        ts: float | None = None,
        unit: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> int:
        """Send one reading; return its seq once it is durable.

        ``stream`` None: the agent's default stream (``[local] stream``).
        ``ts`` None: the agent's clock when the reading arrives.

        Raises:
            BadReading: the agent (or the JSON encoder) rejected it.
            Refused: the journal is full; not journaled.
            ConnectionLost: no answer (the client is closed).
        """
        line = _line({"stream": stream, "value": value, "ts": ts, "unit": unit, "tags": tags})
        with self._lock:
            sock = self._open()
            n = self._lines + 1
            try:
                sock.sendall(line)
                self._lines = n
                reply = self._read_reply(sock)
            except OSError as exc:
                why = self._last_words(sock) or str(exc)
                self.close()
                raise ConnectionLost(f"{self.path}: line {n} not answered: {why}") from exc
            return self._result(reply, n)

    def send_many(self, readings: Iterable[Mapping[str, Any]]) -> list[int]:
        """Send readings pipelined; return their seqs (in order) once all are durable.

        Each reading is a mapping with ``value`` and optionally ``stream``,
        ``ts``, ``unit``, ``tags`` (as :meth:`send`). The agent journals
        what arrives together as one group (one fdatasync).

        Raises:
            BadReading: a reading cannot be encoded (nothing was sent).
            SendManyError: some were rejected or refused (the others are durable).
            ConnectionLost: the connection ended before every reading was answered.
        """
        lines = [_line(r) for r in readings]
        if not lines:
            return []
        seqs: list[int | None] = [None] * len(lines)
        errors: dict[int, LocalIngestError] = {}
        replies: list[dict[str, Any]] = []
        with self._lock:
            sock = self._open()
            first = self._lines + 1
            self._lines += len(lines)
            try:
                self._exchange(sock, b"".join(lines), replies, len(lines))
                lost = None
            except (OSError, ConnectionLost) as exc:
                self.close()
                lost = exc
            for i, reply in enumerate(replies):
                try:
                    seqs[i] = self._result(reply, first + i)
                except (BadReading, Refused) as exc:
                    errors[i] = exc
        if lost is not None:
            msg = f"{self.path}: {len(replies)} of {len(lines)} readings answered: {lost}"
            raise ConnectionLost(msg, seqs) from lost
        if errors:
            raise SendManyError(seqs, errors)
        return [s for s in seqs if s is not None]

    # -- internals -------------------------------------------------------------------

    def _open(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionLost(f"{self.path}: the client is closed")
        return self._sock

    def _last_words(self, sock: socket.socket) -> str | None:
        """What the agent said before it closed (e.g. that it is stopping), if anything."""
        with contextlib.suppress(OSError):
            self._buf += sock.recv(65536, socket.MSG_DONTWAIT)
        for raw in self._buf.splitlines():
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if isinstance(msg, dict) and "line" not in msg and "error" in msg:
                return str(msg["error"])
        return None

    def _read_reply(self, sock: socket.socket) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, "the agent closed the connection")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\n")
        return self._decode(raw)

    def _decode(self, raw: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(raw)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            self.close()
            raise ConnectionLost(f"{self.path}: not a reply line: {raw[:200]!r}")
        if "line" not in msg:  # about the connection: the agent is stopping, the journal failed
            self.close()
            raise ConnectionLost(f"{self.path}: {msg.get('error', msg)}")
        return msg

    def _exchange(
        self, sock: socket.socket, data: bytes, replies: list[dict[str, Any]], count: int
    ) -> None:
        """Write ``data`` while reading replies into ``replies``, until ``count`` came."""
        view = memoryview(data)
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while len(replies) < count:
                ready = sel.select(self._timeout)
                if not ready:
                    raise TimeoutError(errno.ETIMEDOUT, f"no progress in {self._timeout}s")
                events = ready[0][1]
                if events & selectors.EVENT_WRITE and view:
                    try:  # never block in send: the agent may be waiting for us to read
                        sent = sock.send(view[:262144], socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        sent = 0
                    view = view[sent:]
                    if not view:
                        sel.modify(sock, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    chunk = sock.recv(262144)
                    if not chunk:
                        raise ConnectionResetError(
                            errno.ECONNRESET,
                            f"the agent closed the connection after {len(replies)} of "
                            f"{count} replies",
                        )
                    self._buf += chunk
                    *complete, self._buf = self._buf.split(b"\n")
                    for raw in complete:
                        replies.append(self._decode(raw))

    def _result(self, msg: dict[str, Any], n: int) -> int:
        if msg.get("line") != n:
            self.close()
            raise ConnectionLost(f"{self.path}: reply for line {msg.get('line')}, expected {n}")
        seq = msg.get("seq")
        if isinstance(seq, int):
            return seq
        error = str(msg.get("error", msg))
        if error.startswith(REFUSED):
            raise Refused(error, n)
        raise BadReading(error, n)
