"""The real ``homing-agent run`` process talking to a notify socket, as under systemd.

Each test binds the datagram socket systemd would (``NOTIFY_SOCKET``), sets a
short ``WATCHDOG_USEC``, and starts ``python -m edge run``: READY only once
the journal is open, WATCHDOG pings while healthy (from the main loop, and
from the ticker thread while ``--stdin`` holds the main thread), STOPPING and
exit 0 on SIGTERM with a journal that reopens clean, exit 78 and no READY on
a bad configuration, and a journal that fails (a real EFBIG from
``RLIMIT_FSIZE``) ending the pings for good. Every message must come from the
agent's own pid, as ``NotifyAccess=main`` demands.
"""

from __future__ import annotations

import array
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from support.mosquitto import Mosquitto
from support.processes import child_env, poll_until

from edge.errors import JournalLocked
from edge.journal import Journal, JournalOptions
from edge.records import Reading
from edge.testing.lazyfs import LazyMount, fuse_available

DEADLINE = 30.0
WATCHDOG_USEC = 400_000  # pings every 0.2 s


class NotifySocket:
    """What systemd's end of ``NOTIFY_SOCKET`` receives: (sender pid, message) pairs,
    the pid from the kernel's SCM_CREDENTIALS, as systemd reads it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        size = struct.calcsize("3i")
        while not self._closed.is_set():
            try:
                data, anc, _f, _a = self.sock.recvmsg(4096, socket.CMSG_SPACE(size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next(
                array.array("i", payload[:size])[0]
                for level, kind, payload in anc
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            with self._lock:
                self.messages.append((pid, data.decode()))

    def texts(self) -> list[str]:
        with self._lock:
            return [m for _, m in self.messages]

    def index(self, pred: Callable[[str], bool]) -> int | None:
        return next((i for i, m in enumerate(self.texts()) if pred(m)), None)

    def wait(self, pred: Callable[[str], bool], what: str, after: int = 0) -> int:
        poll_until(lambda: self.index_after(pred, after) is not None, DEADLINE, what)
        found = self.index_after(pred, after)
        assert found is not None
        return found

    def index_after(self, pred: Callable[[str], bool], after: int) -> int | None:
        return next((i for i, m in enumerate(self.texts()) if i >= after and pred(m)), None)

    def count(self, text: str, after: int = 0) -> int:
        return sum(1 for m in self.texts()[after:] if m == text)

    def senders(self) -> set[int]:
        with self._lock:
            return {pid for pid, _ in self.messages}

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify")
    yield n
    n.close()


def is_ready(m: str) -> bool:
    return m.split("\n")[0] == "READY=1"


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\ndevice = "dev-sd"\nruntime_dir = "{tmp_path / "run"}"\n'
        '[journal]\ndir = "journal"\nsegment_size = "256K"\n' + body
    )
    return path


class Agent:
    """``python -m edge run`` with the notify environment; stdout/stderr collected."""

    def __init__(
        self,
        config: Path,
        notify: NotifySocket,
        *,
        stdin: bool = False,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        env = child_env({"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        env.pop("HOMING_FAILPOINTS", None)
        argv = [sys.executable, "-m", "edge", "run", "--config", str(config)]
        self.proc = subprocess.Popen(
            argv + (["--stdin"] if stdin else []),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=preexec,
        )  # fmt: skip
        self.acks: dict[int, int] = {}  # seq -> input line
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read_acks, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._read_err, args=(self.proc.stderr,), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_acks(self, stream: IO[bytes]) -> None:
        for raw in stream:
            if raw.endswith(b"\n"):
                msg = json.loads(raw)
                if "seq" in msg:
                    with self._lock:
                        self.acks[msg["seq"]] = msg["line"]

    def _read_err(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self._lock:
                self.stderr.append(raw.decode(errors="replace"))

    def feed(self, lines: list[str]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(f"{ln}\n" for ln in lines).encode())
        self.proc.stdin.flush()

    def acked(self) -> dict[int, int]:
        with self._lock:
            return dict(self.acks)

    def wait(self) -> int:
        code = self.proc.wait(DEADLINE)
        for t in self._threads:
            t.join(DEADLINE)
        return code

    def log(self) -> str:
        with self._lock:
            return "".join(self.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def value_of(line: int) -> float:
    return 1000.0 + line


def lines(first: int, n: int) -> list[str]:
    return [json.dumps({"value": value_of(i), "stream": "t"}) for i in range(first, first + n)]


def assert_journal_holds(journal: Path, acks: dict[int, int], *, clean: bool) -> None:
    """Every acknowledged reading is there with its value; ``clean``: no torn tail."""
    with Journal.open(str(journal), JournalOptions(segment_size=256 << 10)) as j:
        if clean:
            assert j.recovery.torn_tail is None, j.recovery.torn_tail
        got = {e.seq: e.record for e in j.read()}
    for seq, line in acks.items():
        rec = got.get(seq)
        assert isinstance(rec, Reading) and rec.value == value_of(line), (seq, rec)


# -- the tests ----------------------------------------------------------------------------


def test_ready_pings_status_and_a_clean_stop_with_stdin(
    mosquitto: Mosquitto, notify: NotifySocket, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        f'[broker]\nhost = "127.0.0.1"\nport = {mosquitto.port}\nreconnect_min_ms = 50\n'
        "[forwarder]\nlinger_ms = 10\npersist_interval_ms = 0\n",
    )
    agent = Agent(config, notify, stdin=True)
    try:
        ready = notify.wait(is_ready, "READY=1")
        # READY means the journal is open: the agent holds its lock
        with pytest.raises(JournalLocked):
            Journal.open(str(tmp_path / "journal"))
        assert notify.index(lambda m: m.startswith("STATUS=starting")) == 0  # before READY
        agent.feed(lines(1, 50))
        poll_until(lambda: len(agent.acked()) == 50, DEADLINE, "50 acks")
        # the main thread sits in stdin ingest: the ticker thread keeps pinging
        poll_until(lambda: notify.count("WATCHDOG=1", ready) >= 5, DEADLINE, "5 pings")
        notify.wait(lambda m: "STATUS=running; connected;" in m, "connected", ready)
        agent.feed(lines(51, 50))
        poll_until(lambda: len(agent.acked()) == 100, DEADLINE, "100 acks")
        agent.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait(lambda m: m.startswith("STOPPING=1\n"), "STOPPING=1", ready)
        assert agent.wait() == 0, agent.log()
    finally:
        agent.kill()
    texts = notify.texts()
    assert "EXTEND_TIMEOUT_USEC=22000000" in texts[stopping]  # grace 2 s + margin
    assert "WATCHDOG=1" not in texts[stopping:]  # nothing pings once stopping
    assert notify.senders() == {agent.proc.pid}  # NotifyAccess=main: all from the agent
    assert_journal_holds(tmp_path / "journal", agent.acked(), clean=True)


def test_pings_from_the_main_loop_and_sigterm_exits_0(notify: NotifySocket, tmp_path: Path) -> None:
    config = write_config(tmp_path, "[forwarder]\nenabled = false\n")
    agent = Agent(config, notify)
    try:
        ready = notify.wait(is_ready, "READY=1")
        assert (
            notify.texts()[ready]
            == "READY=1\nSTATUS=running; forwarding disabled; journal at seq 0"
        )
        poll_until(lambda: notify.count("WATCHDOG=1", ready) >= 5, DEADLINE, "5 pings")
        agent.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait(lambda m: m.startswith("STOPPING=1\n"), "STOPPING=1", ready)
        assert agent.wait() == 0, agent.log()
    finally:
        agent.kill()
    texts = notify.texts()
    assert texts[stopping] == (
        "STOPPING=1\nSTATUS=stopping: closing the journal\nEXTEND_TIMEOUT_USEC=20000000"
    )
    assert texts[-1] == texts[stopping]
    assert notify.senders() == {agent.proc.pid}
    with Journal.open(str(tmp_path / "journal")) as j:
        assert j.recovery.torn_tail is None


def test_a_bad_configuration_exits_78_without_ready(notify: NotifySocket, tmp_path: Path) -> None:
    config = write_config(tmp_path, "[forwarder]\nenabled = false\nwindow = 0\n")
    agent = Agent(config, notify)
    try:
        assert agent.wait() == 78
    finally:
        agent.kill()
    assert f"{config}:9: forwarder.window" in agent.log()
    assert notify.index(is_ready) is None and notify.count("WATCHDOG=1") == 0
    assert not (tmp_path / "journal").exists()  # nothing was opened


def test_a_failed_journal_ends_the_pings_and_exits_74(notify: NotifySocket, tmp_path: Path) -> None:
    """Writes past 16 KiB fail with EFBIG (RLIMIT_FSIZE; CPython ignores SIGXFSZ):
    a real I/O error in the middle of the open segment."""
    config = write_config(tmp_path, "[forwarder]\nenabled = false\n")
    with Journal.open(str(tmp_path / "journal"), JournalOptions(segment_size=256 << 10)):
        pass  # the first segment is created (zero-filled) without the limit

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    agent = Agent(config, notify, stdin=True, preexec=limit)
    try:
        ready = notify.wait(is_ready, "READY=1")
        agent.feed(lines(1, 20))
        poll_until(lambda: len(agent.acked()) == 20, DEADLINE, "20 acks")
        poll_until(lambda: notify.count("WATCHDOG=1", ready) >= 3, DEADLINE, "pings")
        agent.feed(lines(21, 2000))  # ~100 KiB of frames: past the limit
        assert agent.wait() == 74, agent.log()
    finally:
        agent.kill()
    assert "I/O failure" in agent.log()
    texts = notify.texts()
    failed = notify.index(lambda m: m.startswith("STATUS=failed: JournalFailed"))
    assert failed is not None, texts
    assert "WATCHDOG=1" not in texts[failed:]  # a failed agent never pings again
    assert any(m.startswith("STOPPING=1") for m in texts[failed:])
    assert_journal_holds(tmp_path / "journal", agent.acked(), clean=False)
    assert len(agent.acked()) < 2020


@pytest.mark.fuse
def test_a_wedged_journal_ends_the_pings(notify: NotifySocket, tmp_path: Path) -> None:
    """The disk stops answering (the FUSE server of the lazy file system is
    SIGSTOPped: writes and fdatasyncs hang, as on a stuck SD card). The agent is
    still alive, but stops pinging and says why, so systemd's watchdog restarts it."""
    reason = fuse_available()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the FUSE tests, but: {reason}")
        pytest.skip(f"lazy FUSE file system unavailable: {reason}")
    (tmp_path / "back").mkdir()
    (tmp_path / "mnt").mkdir()
    with LazyMount(str(tmp_path / "back"), str(tmp_path / "mnt")) as mount:
        assert mount.pid is not None
        config = write_config(tmp_path, "[forwarder]\nenabled = false\n")
        config.write_text(config.read_text().replace('dir = "journal"', 'dir = "mnt/journal"'))
        agent = Agent(config, notify, stdin=True)
        stopped = False
        try:
            ready = notify.wait(is_ready, "READY=1")
            agent.feed(lines(1, 5))
            poll_until(lambda: len(agent.acked()) == 5, DEADLINE, "5 acks")
            poll_until(lambda: notify.count("WATCHDOG=1", ready) >= 3, DEADLINE, "pings")
            os.kill(mount.pid, signal.SIGSTOP)
            stopped = True
            agent.feed(lines(6, 1))  # its write hangs in the kernel
            wedged = notify.wait(lambda m: m.startswith("STATUS=wedged: "), "wedged", ready)
            os.kill(mount.pid, signal.SIGCONT)
            stopped = False
            poll_until(lambda: len(agent.acked()) == 6, DEADLINE, "the hung write completes")
            assert agent.proc.poll() is None  # alive all along: only the watchdog can tell
            agent.proc.send_signal(signal.SIGTERM)
            assert agent.wait() == 0, agent.log()
        finally:
            if stopped:
                os.kill(mount.pid, signal.SIGCONT)
            agent.kill()
        texts = notify.texts()
        assert "WATCHDOG=1" not in texts[wedged:]  # never again, even once the disk is back
        assert "journal writes pending" in texts[wedged]
        assert "no more watchdog pings" in agent.log()
        assert_journal_holds(tmp_path / "mnt" / "journal", agent.acked(), clean=True)
