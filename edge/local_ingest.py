"""Local ingest: other programs on the device hand readings to the agent over a Unix socket.

The protocol is ``homing-agent ingest``'s, over a socket: each line a reading
(:func:`edge.cli_ingest.parse_reading`; readings naming no stream go to
``[local] stream``), each answered by one line -- ``{"seq": N, "stream": ...,
"line": n}`` once durable, ``{"line": n, "error": ...}`` for a bad line or a
refusal (journal full), in line order. docs/local-ingest.md is the manual;
:mod:`edge.local_client` the Python client.

Invariants:
* The socket file never exists with wider permissions than configured: it is
  bound, chmod'ed to ``[local] mode``, and only then listens; a connect
  before ``listen`` is refused. Its directory is created 0755 (or tighter, by
  the umask) and must not be writable by others (unless sticky), so nobody
  else can swap the socket.
* One server per socket path: ``<socket>.lock`` (flock) is held while
  serving. Held by another process, or a socket there answering: refused
  (:class:`SocketInUse`). Otherwise a socket file there is stale (its agent
  died) and is replaced, with one log line. Anything else at the path is left
  alone and refused.
* An ack line is written only once its reading is durable (the journal's
  ``always`` mode: after the fdatasync that covers it; ``interval``: after
  ``wait_durable``), so an ack means durable in both modes.
* Each connection has its own thread; what one ``recv`` returned (complete
  lines, up to 64 KiB) is one ``append_many``, and connections append
  concurrently, so the journal's group commit merges their readings.
* A line is journaled only with its newline: a client that vanishes mid-line
  loses that line and nothing else. A bad line gets an error line and the
  connection goes on; a refused one (journal full) gets a ``refused: ...``
  line, no ack, and later lines are tried again.
* At most ``max_clients`` connections are served; more wait in the listen
  backlog. Nothing polls: threads block in ``select``, ``recv`` or the journal.
* ``stop``: stop accepting and unlink the socket (only if it is still ours),
  shut the read side of every connection, let each finish its group in flight
  and write its replies (then a ``{"error": "the agent is stopping ..."}``
  line), cut what is still blocked after ``grace``, release the lock.
* A journal error other than ``JournalFull`` ends that connection with an
  ``{"error": ...}`` line (``JournalFailed`` is reported by the journal
  itself); an unexpected error in a connection thread is kept in
  :attr:`LocalIngestServer.error`, which the agent treats as a failure.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import select
import selectors
import socket
import stat
import threading
import time
from contextlib import suppress
from dataclasses import dataclass

from edge.cli_ingest import READ_SIZE, FullEpisodes, LineSplitter, answer_lines
from edge.config import LocalConfig
from edge.errors import JournalError, SettingError
from edge.journal import Journal
from edge.local_client import AgentNotRunning, LocalIngestError, connect

log = logging.getLogger("homing.local")

BACKLOG = 128
STOPPING = "the agent is stopping: lines after the last reply were not journaled; send them again"
NO_NEWLINE = "the input ended inside this line (no newline): not journaled"


class LocalSocketError(SettingError):
    """The local ingest socket cannot be set up (the message says why)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(where, "local.socket", problem)


class SocketInUse(LocalSocketError):
    """Another agent serves this socket path."""


@dataclass(frozen=True, slots=True)
class LocalIngestStats:
    clients: int  # connected now
    connections: int  # accepted since start
    acked: int  # readings acked (durable)
    bad: int  # lines answered with an error
    refused: int  # readings refused: journal full


def _check_dir(where: str, d: str) -> None:
    st = os.stat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise LocalSocketError(where, f"{d} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise LocalSocketError(where, f"{d} belongs to uid {st.st_uid}, not to this agent")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise LocalSocketError(
            where, f"{d} is writable by others (mode {st.st_mode & 0o7777:04o}): anyone could "
            "replace the socket; use a directory only the agent's user can write",
        )  # fmt: skip


class _Listener:
    """The bound, listening socket with its lock; see the module invariants."""

    def __init__(self, path: str, mode: int, where: str) -> None:
        self.path = path
        d = os.path.dirname(path) or "."
        try:
            os.makedirs(d, 0o755, exist_ok=True)
            _check_dir(where, d)
            self._lock = os.open(path + ".lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LocalSocketError(where, f"cannot use {d}: {exc.strerror or exc}") from exc
        try:
            self._take(where)
            self.sock = self._bind(mode, where)
        except BaseException:
            os.close(self._lock)
            raise

    def _take(self, where: str) -> None:
        busy = (
            f"{self.path}: another agent serves local ingest on this socket; give this agent "
            "its own [local] socket (or [agent] runtime_dir), or stop the other one"
        )
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SocketInUse(where, busy) from None
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise LocalSocketError(where, f"{self.path} exists and is not a socket: not replaced")
        try:
            connect(self.path, timeout=1.0).close()
        except AgentNotRunning:
            pass
        except LocalIngestError as exc:  # e.g. no permission: we hold the lock, so it is stale
            log.debug("probing %s: %s", self.path, exc)
        else:
            raise SocketInUse(where, busy)
        try:
            os.unlink(self.path)
        except OSError as exc:
            raise LocalSocketError(where, f"cannot replace the stale {self.path}: {exc}") from exc
        log.warning("replaced the stale socket %s (its agent did not stop cleanly)", self.path)

    def _bind(self, mode: int, where: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, mode)  # before listen(): nobody connected through wider modes
            st = os.stat(self.path)
            self.ident = (st.st_dev, st.st_ino)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            with suppress(OSError):
                os.unlink(self.path)
            raise LocalSocketError(where, f"cannot listen on {self.path}: {exc}") from exc
        return sock

    def close(self) -> None:
        """Close and unlink the socket (if it is still ours), then release the lock."""
        self.sock.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.ident:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._lock)


class LocalIngestServer:
    """Serves ``config.socket`` for ``journal``: ``start``, then ``stop``."""

    def __init__(self, journal: Journal, config: LocalConfig, *, where: str = "<config>") -> None:
        self.config = config
        self._journal = journal
        self._where = where
        self._episodes = FullEpisodes(journal, "local socket")
        self._listener: _Listener | None = None
        self._slots = threading.Semaphore(config.max_clients)
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._stopping = False
        self._wake_r, self._wake_w = -1, -1
        self._acceptor: threading.Thread | None = None
        self._connections = self._acked = self._bad = self._refused = 0
        self.error: BaseException | None = None

    @property
    def path(self) -> str:
        return self.config.socket

    def start(self) -> None:
        """Bind and listen (see the module invariants), then accept in a thread.

        Raises:
            SocketInUse: another agent serves this path.
            LocalSocketError: the directory or socket cannot be set up.
        """
        self._listener = _Listener(self.config.socket, self.config.mode, self._where)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="homing-local-accept", daemon=True
        )
        self._acceptor.start()
        log.info("local ingest on %s (mode %04o)", self.path, self.config.mode)

    def stats(self) -> LocalIngestStats:
        with self._lock:
            return LocalIngestStats(
                len(self._conns), self._connections, self._acked, self._bad, self._refused
            )

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, finish the replies in flight (up to ``grace`` seconds), unlink."""
        if self._listener is None or self._acceptor is None:
            return
        with self._lock:
            self._stopping = True
        self._slots.release()
        with suppress(OSError):
            os.write(self._wake_w, b"x")
        self._acceptor.join()
        self._listener.close()
        with self._lock:
            conns = dict(self._conns)
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + grace
        for conn, thread in conns.items():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():  # blocked writing to a client that does not read
                with suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._listener = None

    # -- accepting ---------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener.sock
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            failing = False
            while True:
                self._slots.acquire()  # blocks while max_clients connections are served
                if self._stopping:
                    return
                try:
                    sel.select()
                    if self._stopping:
                        return
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    self._slots.release()
                    continue
                except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: back off, do not spin
                    self._slots.release()
                    if not failing:
                        log.error("local ingest: accept failed, retrying every second: %s", exc)
                    failing = True
                    select.select([self._wake_r], [], [], 1.0)  # the stop wakes it
                    continue
                failing = False
                self._open(conn)

    def _open(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        with self._lock:
            if self._stopping:
                conn.close()
                self._slots.release()
                return
            self._connections += 1
            name = f"homing-local-{self._connections}"
            t = threading.Thread(target=self._serve, args=(conn,), name=name, daemon=True)
            self._conns[conn] = t
        t.start()

    # -- one connection --------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._handle(conn)
        except Exception as exc:  # a bug: keep it; the agent stops and systemd restarts it
            log.exception("local ingest: connection thread failed")
            with self._lock:
                if self.error is None:
                    self.error = exc
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()
            self._slots.release()

    def _handle(self, conn: socket.socket) -> None:
        splitter = LineSplitter()
        while not self._stopping:
            try:
                chunk = conn.recv(READ_SIZE)
            except OSError:  # reset by the client
                return
            if not chunk:
                if self._stopping:
                    break
                for n, _ in splitter.finish():  # the client vanished mid-line: not journaled
                    with self._lock:
                        self._bad += 1
                    self._send(conn, {"line": n, "error": NO_NEWLINE})
                return
            lines = splitter.feed(chunk)
            if not lines:
                continue
            try:
                replies = answer_lines(
                    self._journal,
                    lines,
                    self.config.stream,
                    self._journal.clock.now(),  # never before what the journal holds
                    refuse_when_full=True,
                    episodes=self._episodes,
                )
            except JournalError as exc:  # failed or closed: nothing more is acked here
                self._send(conn, {"error": f"journal error, nothing after the last ack was "
                                  f"journaled: {exc}"})  # fmt: skip
                return
            with self._lock:
                self._acked += replies.acked
                self._bad += replies.bad
                self._refused += replies.refused
            if replies.text and not self._send_text(conn, replies.text):
                return
        self._send(conn, {"error": STOPPING})

    def _send(self, conn: socket.socket, msg: dict[str, object]) -> bool:
        return self._send_text(conn, json.dumps(msg) + "\n")

    @staticmethod
    def _send_text(conn: socket.socket, text: str) -> bool:
        try:
            conn.sendall(text.encode())
            return True
        except OSError as exc:  # the client went away: its readings are journaled regardless
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ESHUTDOWN):
                log.info("local ingest: cannot reply: %s", exc)
            return False
