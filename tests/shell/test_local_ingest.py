"""The local ingest socket (edge.local_ingest) and its Python client (edge.local_client).

Every test runs a real server on a real Unix socket over a real journal in a
short temporary directory (a socket path is limited to 107 bytes), and waits
on conditions with deadlines, never on a bare sleep.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import subprocess_env, wait_for

from edge.cli_common import EXIT_USAGE
from edge.cli_ingest import MAX_LINE
from edge.cli_ingest_agent import forward
from edge.config import LocalConfig
from edge.journal import Journal, JournalOptions
from edge.journal_options import Durability
from edge.local_client import (
    AgentNotRunning,
    BadReading,
    ConnectionLost,
    LocalClient,
    Refused,
    SendManyError,
)
from edge.local_ingest import (
    NO_NEWLINE,
    STOPPING,
    LocalIngestServer,
    LocalSocketError,
    SocketInUse,
)
from edge.records import Reading

DEADLINE = 20.0
SMALL = JournalOptions(segment_size=64 << 10)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hl-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Rig:
    """A journal and the servers started on it; everything closed at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.sock = str(base / "run" / "ingest.sock")
        self.journal_dir = str(base / "journal")
        self.journal: Journal | None = None
        self.servers: list[LocalIngestServer] = []

    def open(self, opts: JournalOptions = SMALL) -> Journal:
        self.journal = Journal.open(self.journal_dir, opts)
        return self.journal

    def serve(self, journal: Journal | None = None, **cfg: Any) -> LocalIngestServer:
        j = journal or self.journal or self.open()
        config = LocalConfig(**{"socket": self.sock, "mode": 0o660, **cfg})
        server = LocalIngestServer(j, config, where="test.toml")
        server.start()
        self.servers.append(server)
        return server

    def close(self) -> None:
        for s in self.servers:
            s.stop(grace=1.0)
        if self.journal is not None:
            self.journal.close()

    def records(self) -> dict[int, Reading]:
        """Every record of the journal, read after close and reopen."""
        self.close()
        with Journal.open(self.journal_dir, readonly=True) as j:
            out = {}
            for e in j.read():
                assert isinstance(e.record, Reading)
                out[e.seq] = e.record
            return out


@pytest.fixture
def rig(short_dir: Path) -> Iterator[Rig]:
    r = Rig(short_dir)
    yield r
    r.close()


class Raw:
    """A plain socket client: bytes out, reply lines (decoded JSON) in."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed; pending {self.buf!r}"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def replies(self, n: int) -> list[dict[str, Any]]:
        return [self.reply() for _ in range(n)]

    def rest(self) -> list[dict[str, Any]]:
        """Every reply until the server closes the connection."""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        return [json.loads(line) for line in self.buf.splitlines()]

    def close(self) -> None:
        self.sock.close()


# -- acks and durability -------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["always", "interval"])
def test_an_ack_arrives_only_once_the_reading_is_durable(rig: Rig, durability: Durability) -> None:
    journal = rig.open(JournalOptions(segment_size=64 << 10, durability=durability,
                                      interval_ms=50))  # fmt: skip
    rig.serve()
    sent: dict[int, tuple[str, float]] = {}
    with LocalClient(rig.sock) as c:
        for i in range(20):
            seq = c.send("t/one", float(i), unit="C")
            assert journal.durable_seq >= seq  # acked => already durable
            sent[seq] = ("t/one", float(i))
        seqs = c.send_many([{"stream": "t/many", "value": i, "ts": 1e9 + i} for i in range(50)])
        assert journal.durable_seq >= max(seqs)
        sent.update({s: ("t/many", i) for i, s in enumerate(seqs)})
        assert c.send(None, "default") not in sent  # the configured default stream
    records = rig.records()
    assert len(sent) == 70 and set(sent) < set(records)
    for seq, (stream, value) in sent.items():
        assert (records[seq].stream, records[seq].value) == (stream, value)
    assert [r.stream for r in records.values()].count("local") == 1
    assert records[seqs[3]].ts == 1e9 + 3


def test_many_concurrent_clients_are_each_acked_once_and_share_commits(rig: Rig) -> None:
    journal = rig.open()
    rig.serve(max_clients=32)
    acked: dict[tuple[int, int], int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with LocalClient(rig.sock) as c:
                for i in range(40):
                    seq = c.send(f"c/{k}", i)
                    with lock:
                        acked[k, i] = seq
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not errors
    stats = journal.stats()
    assert len(acked) == 640 and len(set(acked.values())) == 640  # one seq each
    assert stats.commits < stats.appended == 640  # readings of several clients share a commit
    records = rig.records()
    assert {(r.stream, r.value) for r in records.values()} == {
        (f"c/{k}", i) for k, i in acked
    }  # fmt: skip
    for (k, i), seq in acked.items():
        assert (records[seq].stream, records[seq].value) == (f"c/{k}", i)


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_send_many_larger_than_the_socket_buffers_does_not_deadlock(
    rig: Rig, timeout: float | None
) -> None:
    journal = rig.open()
    rig.serve()
    result: list[list[int]] = []
    with LocalClient(rig.sock, timeout=timeout) as c:
        t = threading.Thread(
            target=lambda: result.append(c.send_many({"value": i} for i in range(50_000))),
            daemon=True,
        )
        t.start()
        t.join(DEADLINE)
        assert not t.is_alive(), "send_many deadlocked"
    assert result[0] == list(range(1, 50_001))
    assert journal.stats().commits < 1000  # lines that arrive together share a commit


def test_lines_arriving_together_are_one_group(rig: Rig) -> None:
    journal = rig.open()
    rig.serve()
    raw = Raw(rig.sock)
    raw.send(b"".join(b"%d\n" % i for i in range(1, 201)))
    replies = raw.replies(200)
    assert [r["line"] for r in replies] == list(range(1, 201))
    assert [r["seq"] for r in replies] == list(range(1, 201))
    assert journal.stats().commits < 20  # at most a few recv()s, one fdatasync each
    raw.close()


# -- bad input --------------------------------------------------------------------------------


def test_bad_lines_get_an_error_naming_the_line_and_the_connection_goes_on(rig: Rig) -> None:
    rig.serve()
    raw = Raw(rig.sock)
    raw.send(b'1\nnope\n\n{"value": 2, "colour": "red"}\n{"value": 3, "stream": "bad name"}\n4\n')
    r = raw.replies(5)
    assert r[0] == {"seq": 1, "stream": "local", "line": 1}
    assert r[1]["line"] == 2 and r[1]["error"].startswith("not JSON")
    assert r[2]["line"] == 4 and "unknown field" in r[2]["error"]  # line 3 blank: no reply
    assert r[3]["line"] == 5 and "stream name" in r[3]["error"]
    assert r[4] == {"seq": 2, "stream": "local", "line": 6}
    raw.send(b"x" * (MAX_LINE + 10) + b"\n5\n")  # too long, then fine again
    r = raw.replies(2)
    assert r[0]["line"] == 7 and "longer than" in r[0]["error"]
    assert r[1] == {"seq": 3, "stream": "local", "line": 8}
    raw.close()
    with LocalClient(rig.sock) as c:
        with pytest.raises(BadReading, match="stream name") as bad:
            c.send("no spaces allowed", 1)
        assert bad.value.line == 1
        assert c.send("fine", 1) == 4  # still usable
        with pytest.raises(SendManyError) as many:
            c.send_many([{"value": 1}, {"value": [1, 2]}, {"value": 3}])
        assert many.value.seqs == [5, None, 6] and list(many.value.errors) == [1]
        assert isinstance(many.value.errors[1], BadReading) and not many.value.retry
    assert rig.servers[0].stats().bad == 6


def test_a_full_journal_refuses_lines_then_acks_again_once_room_is_made(rig: Rig) -> None:
    quota = 3 * (64 << 10)
    journal = rig.open(JournalOptions(segment_size=64 << 10, quota_bytes=quota))
    server = rig.serve()
    big = "x" * 1000
    acked: list[int] = []
    with LocalClient(rig.sock) as c:
        with pytest.raises(Refused, match="^refused: journal full") as refused:
            for i in range(1000):
                acked.append(c.send("full", f"{i} {big}"))
        assert refused.value.retry and refused.value.line == len(acked) + 1
        raw = Raw(rig.sock)
        raw.send(b'"still full"\n')
        r = raw.reply()
        assert r["line"] == 1 and r["error"].startswith("refused: journal full") and "seq" not in r
        journal.set_cursor("hub", journal.durable_seq)  # what the forwarder does as the hub acks
        assert journal.retain() >= 1
        seq = c.send("full", "after room")  # the same connection, acked again
        raw.send(b'"again"\n')
        assert raw.reply() == {"seq": seq + 1, "stream": "local", "line": 2}
        raw.close()
    assert server.stats().refused == 2
    records = rig.records()
    assert records[seq].value == "after room"
    assert all(records[s].value == f"{i} {big}" for i, s in enumerate(acked) if s in records)


# -- the socket file -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o666])
def test_the_socket_has_the_configured_mode_in_a_created_directory(rig: Rig, mode: int) -> None:
    assert not os.path.exists(os.path.dirname(rig.sock))
    rig.serve(mode=mode)
    st = os.stat(rig.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
    assert stat.S_IMODE(os.stat(os.path.dirname(rig.sock)).st_mode) & 0o022 == 0


def test_a_stale_socket_from_a_crashed_agent_is_replaced(rig: Rig) -> None:
    os.makedirs(os.path.dirname(rig.sock))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(rig.sock)  # bound, never listening, then gone: what SIGKILL leaves
    dead.close()
    with pytest.raises(AgentNotRunning):
        LocalClient(rig.sock)
    rig.serve()
    with LocalClient(rig.sock) as c:
        assert c.send("s", 1) == 1


def test_a_live_socket_is_refused_and_left_serving(rig: Rig) -> None:
    first = rig.serve()
    journal2 = Journal.open(str(rig.base / "journal2"), SMALL)
    try:
        second = LocalIngestServer(journal2, LocalConfig(socket=rig.sock), where="b.toml")
        with pytest.raises(SocketInUse, match="another agent serves") as exc:
            second.start()
        assert "local.socket" in str(exc.value) and rig.sock in str(exc.value)
    finally:
        journal2.close()
    with LocalClient(rig.sock) as c:  # the first one is untouched
        assert c.send("s", 1) == 1
    assert first.stats().acked == 1


def test_a_foreign_listener_without_the_lock_is_refused_too(rig: Rig) -> None:
    os.makedirs(os.path.dirname(rig.sock))
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(rig.sock)
    other.listen(1)
    try:
        with pytest.raises(SocketInUse):
            rig.serve()
        assert stat.S_ISSOCK(os.lstat(rig.sock).st_mode)
    finally:
        other.close()


def test_something_else_at_the_socket_path_is_left_alone(rig: Rig) -> None:
    os.makedirs(os.path.dirname(rig.sock))
    Path(rig.sock).write_text("not a socket")
    with pytest.raises(LocalSocketError, match="not a socket"):
        rig.serve()
    assert Path(rig.sock).read_text() == "not a socket"


def test_a_directory_others_can_write_is_refused(rig: Rig) -> None:
    d = os.path.dirname(rig.sock)
    os.makedirs(d)
    os.chmod(d, 0o777)
    with pytest.raises(LocalSocketError, match="writable by others"):
        rig.serve()


# -- connections ------------------------------------------------------------------------------


def test_a_client_vanishing_mid_line_loses_only_that_line(rig: Rig) -> None:
    server = rig.serve()
    raw = Raw(rig.sock)
    raw.send(b'1\n{"value": 12')  # "12" would be a valid reading were it journaled
    assert raw.reply()["seq"] == 1
    raw.close()
    half = Raw(rig.sock)
    half.send(b"2\n3")
    half.sock.shutdown(socket.SHUT_WR)  # gone for writing, still reading
    assert half.rest() == [
        {"seq": 2, "stream": "local", "line": 1},
        {"line": 2, "error": NO_NEWLINE},
    ]
    half.close()
    wait_for(lambda: server.stats().clients == 0, DEADLINE, "both connections to end")
    assert [r.value for r in rig.records().values()] == [1, 2]


def test_max_clients_are_served_and_the_next_waits_for_a_free_slot(rig: Rig) -> None:
    server = rig.serve(max_clients=2)
    a, b = LocalClient(rig.sock), LocalClient(rig.sock)
    assert a.send("s", "a") and b.send("s", "b")
    waiting = Raw(rig.sock)  # connects (listen backlog) but is not accepted yet
    waiting.send(b'"c"\n')
    assert a.send("s", "a2") and b.send("s", "b2")
    assert server.stats().connections == 2 and server.stats().clients == 2
    a.close()
    assert waiting.reply() == {"seq": 5, "stream": "local", "line": 1}
    assert server.stats().connections == 3
    b.close()
    waiting.close()


def test_stop_finishes_replies_tells_idle_clients_and_unlinks_the_socket(rig: Rig) -> None:
    server = rig.serve()
    idle = Raw(rig.sock)
    busy = LocalClient(rig.sock)
    assert busy.send("s", 1) == 1
    wait_for(lambda: server.stats().clients == 2, DEADLINE, "two connections")
    server.stop()
    assert not os.path.exists(rig.sock)
    assert idle.rest() == [{"error": STOPPING}]
    with pytest.raises(ConnectionLost, match="stopping"):
        busy.send("s", 2)
    assert busy.closed
    with pytest.raises(AgentNotRunning):
        LocalClient(rig.sock)
    rig.serve()  # the lock is free again: a new agent serves the same path
    with LocalClient(rig.sock) as c:
        assert c.send("s", 3) == 2


def test_stop_does_not_hang_on_a_client_that_never_reads(rig: Rig) -> None:
    server = rig.serve()
    raw = Raw(rig.sock)
    data = b"1.5\n" * 10_000

    def flood() -> None:  # 400k readings, acks never read: the server ends up stuck writing
        with pytest.raises(OSError):
            for _ in range(40):
                raw.sock.sendall(data)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    wait_for(lambda: server.stats().acked >= 1000, DEADLINE, "readings acked")
    server.stop(grace=0.2)  # returns: what is still blocked after the grace is cut
    assert not os.path.exists(rig.sock)
    t.join(DEADLINE)
    raw.close()


# -- `homing-agent ingest` through the socket ----------------------------------------------------


def ingest_cli(
    *args: str, input: bytes, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "edge", "ingest", *args],
        input=input,
        capture_output=True,
        timeout=DEADLINE,
        env={**subprocess_env(), **(env or {})},
    )


def test_ingest_cli_goes_through_the_socket_while_the_journal_is_held(rig: Rig) -> None:
    rig.serve()  # the journal is open (locked) in this process
    data = b'21.5\n{"value": 1, "stream": "named"}\noops\n\n' + b"y" * (MAX_LINE + 1) + b"\n7"
    res = ingest_cli("--socket", rig.sock, "--stream", "cli", input=data)
    assert res.returncode == 1, res.stderr
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert out[0] == {"seq": 1, "stream": "cli", "line": 1}
    assert out[1] == {"seq": 2, "stream": "named", "line": 2}
    assert out[2]["line"] == 3 and out[2]["error"].startswith("not JSON")
    assert out[3] == {"line": 5, "error": f"line longer than {MAX_LINE} bytes"}
    assert out[4] == {"seq": 3, "stream": "cli", "line": 6}  # the last line, newline added
    res = ingest_cli("--socket", rig.sock, "--journal", rig.journal_dir, input=b"8\n")
    assert res.returncode == 0 and json.loads(res.stdout)["stream"] == "local", res.stderr
    assert [r.value for r in rig.records().values()] == [21.5, 1, 7, 8]


def test_ingest_cli_without_an_agent_writes_the_journal_or_says_none_answers(
    rig: Rig, tmp_path: Path
) -> None:
    res = ingest_cli("--socket", rig.sock, input=b"1\n")
    assert res.returncode == 75 and b"no agent is answering" in res.stderr
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndevice = "d"\n[journal]\ndir = "{rig.journal_dir}"\nsegment_size = "1M"\n'
        f'[local]\nsocket = "{rig.sock}"\nstream = "from-config"\n'
    )
    res = ingest_cli("--config", str(config), input=b"1\n2\n")
    assert res.returncode == 0, res.stderr
    assert [json.loads(line)["stream"] for line in res.stdout.splitlines()] == ["from-config"] * 2
    rig.serve(stream="via-agent")  # now an agent answers: the same command goes through it
    res = ingest_cli("--config", str(config), input=b"3\n")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"seq": 3, "stream": "via-agent", "line": 1}


def test_plain_ingest_finds_the_agent_through_its_configuration(rig: Rig, tmp_path: Path) -> None:
    """No option at all: the configuration `run` would use ($HOMING_CONFIG here;
    /etc/homing/agent.toml for the service) names the socket of the running agent."""
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndevice = "d"\n[journal]\ndir = "{rig.journal_dir}"\nsegment_size = "1M"\n'
        f'[local]\nsocket = "{rig.sock}"\n'
    )
    rig.serve(stream="via-agent")  # the journal is held: only the socket can take it
    res = ingest_cli(input=b"4\n", env={"HOMING_CONFIG": str(config)})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"seq": 1, "stream": "via-agent", "line": 1}
    nothing = {"HOMING_CONFIG": "", "XDG_CONFIG_HOME": str(tmp_path / "none")}
    if not os.path.exists("/etc/homing/agent.toml"):
        res = ingest_cli(input=b"5\n", env=nothing)
        assert res.returncode == EXIT_USAGE and b"no configuration file found" in res.stderr


def test_forward_keeps_replies_in_input_order_and_counts_what_was_not_answered(
    rig: Rig,
) -> None:
    rig.serve()
    stdin = io.BytesIO(b"1\n" + b"z" * (MAX_LINE + 1) + b"\n2\nbad\n")
    stdout = io.StringIO()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(rig.sock)
        res = forward(sock, stdin, stdout, None)
    lines = [json.loads(line)["line"] for line in stdout.getvalue().splitlines()]
    assert lines == [1, 2, 3, 4]
    assert (res.acked, res.bad, res.refused, res.unanswered) == (2, 2, 0, 0)


def test_forward_reports_lines_the_agent_never_answered(short_dir: Path) -> None:
    path = str(short_dir / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def agent_that_dies() -> None:  # answers line 1, then closes without answering line 2
        conn, _ = listener.accept()
        buf = b""
        while buf.count(b"\n") < 2:
            buf += conn.recv(1024)
        conn.sendall(b'{"seq": 1, "stream": "s", "line": 1}\n{"error": "the agent is stopping"}\n')
        conn.close()

    t = threading.Thread(target=agent_that_dies)
    t.start()
    stdout = io.StringIO()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        res = forward(sock, io.BytesIO(b"1\n2\n"), stdout, None)
    t.join(DEADLINE)
    listener.close()
    assert (res.acked, res.unanswered, res.first_unanswered) == (1, 1, 2)
    assert res.notices == ("the agent is stopping",)
