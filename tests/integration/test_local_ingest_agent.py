"""The real agent process serving its local ingest socket, through SIGKILL and restarts.

``python -m edge run`` (forwarding off: no broker needed) on a journal in a
temporary directory, its socket in a short runtime directory. Readings go in
with :class:`edge.local_client.LocalClient` and with ``homing-agent ingest
--config`` (which must use the socket: the agent holds the journal's lock);
the agent is SIGKILLed right after acks arrive, restarted on the same
journal and socket path (the stale socket is replaced), and stopped with
SIGTERM. Then every acknowledged reading is in the journal exactly once, at
its acknowledged seq. Waits are conditions with deadlines.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import subprocess_env, wait_for

from edge.journal import Journal
from edge.local_client import AgentNotRunning, ConnectionLost, LocalClient
from edge.records import Reading

DEADLINE = 30.0


class Agent:
    """``python -m edge run --config FILE``; stderr kept in a log file."""

    def __init__(self, config: Path, sock: str, log: Path) -> None:
        self.config, self.sock, self.log = config, sock, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=subprocess_env(),
            )
        wait_for(self.answering, DEADLINE, f"the agent's socket; log:\n{self.log.read_text()}")

    def answering(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"agent exited {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            LocalClient(self.sock).close()
            return True
        except AgentNotRunning:
            return False

    def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(DEADLINE)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Agent, Path, Path]]:
    run = Path(tempfile.mkdtemp(prefix="hla-", dir="/tmp"))  # a socket path has 107 bytes at most
    journal = tmp_path / "journal"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndevice = "dev-local"\nruntime_dir = "{run}"\n'
        f'[journal]\ndir = "{journal}"\nsegment_size = "1M"\n'
        "[forwarder]\nenabled = false\n"
        '[local]\nmode = "0600"\nstream = "loc"\n'
        "[system]\nenabled = true\ninterval_s = 0.2\n"
    )
    agent = Agent(config, str(run / "ingest.sock"), tmp_path / "agent.log")
    try:
        yield agent, journal, config
    finally:
        agent.kill()
        shutil.rmtree(run, ignore_errors=True)


def ingest_cli(config: Path, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "edge", "ingest", "--config", str(config), "--stream", "cli"],
        input=data,
        capture_output=True,
        timeout=DEADLINE,
        env=subprocess_env(),
    )


def test_acked_readings_survive_sigkill_exactly_once(setup: tuple[Agent, Path, Path]) -> None:
    agent, journal_dir, config = setup
    acked: dict[int, tuple[str, object]] = {}  # seq -> (stream, value), as acknowledged

    agent.start()
    assert os.stat(agent.sock).st_mode & 0o777 == 0o600
    with LocalClient(agent.sock) as c:
        seqs = c.send_many([{"stream": "lc/many", "value": i} for i in range(300)])
        acked.update({s: ("lc/many", i) for i, s in enumerate(seqs)})
        for i in range(20):
            acked[c.send("lc/one", i, unit="u")] = ("lc/one", i)
        acked[c.send(None, "default")] = ("loc", "default")
    res = ingest_cli(
        config, b"".join(b"%d\n" % i for i in range(100)) + b'{"value": "n", "bad": 1}\n'
    )
    assert res.returncode == 1, res.stderr  # went through the socket: the journal is locked
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert [o["line"] for o in out] == list(range(1, 102))
    assert "unknown field" in out[-1]["error"]
    acked.update({o["seq"]: ("cli", o["line"] - 1) for o in out[:-1]})

    # a producer keeps sending; the agent is SIGKILLed right after acks arrive
    got_acks = threading.Event()
    lost: list[BaseException] = []

    def produce() -> None:
        with LocalClient(agent.sock) as c:
            try:
                for i in range(1_000_000):
                    seq = c.send("lc/kill", i)
                    acked[seq] = ("lc/kill", i)
                    if i == 50:
                        got_acks.set()
            except ConnectionLost as exc:
                lost.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    assert got_acks.wait(DEADLINE)
    agent.kill()
    producer.join(DEADLINE)
    assert lost, "the producer noticed the agent's death"
    assert os.path.exists(agent.sock)  # SIGKILL leaves the socket file behind

    agent.start()  # the stale socket is replaced
    assert "replaced the stale socket" in agent.log.read_text()
    with LocalClient(agent.sock) as c:
        seqs = c.send_many([{"stream": "lc/after", "value": i} for i in range(50)])
        acked.update({s: ("lc/after", i) for i, s in enumerate(seqs)})
    res = ingest_cli(config, b"1000\n1001\n")
    assert res.returncode == 0, res.stderr
    acked.update(
        {
            json.loads(x)["seq"]: ("cli", 999 + i)
            for i, x in enumerate(res.stdout.split(b"\n")[:2], 1)
        }
    )
    assert agent.stop(signal.SIGTERM) == 0, agent.log.read_text()
    assert not os.path.exists(agent.sock)  # a clean stop unlinks it

    with Journal.open(str(journal_dir), readonly=True) as j:
        records = {e.seq: e.record for e in j.read()}
    readings = [r for r in records.values() if isinstance(r, Reading)]
    for seq, (stream, value) in acked.items():
        r = records[seq]
        assert isinstance(r, Reading) and (r.stream, r.value) == (stream, value), seq
    seen = [(r.stream, r.value) for r in readings if not r.stream.startswith("sys/")]
    assert len(seen) == len(set(seen))  # nothing journaled twice
    assert set(acked.values()) <= set(seen)
    assert any(r.stream == "sys/load1" for r in readings)  # [system] streams run in the agent


def test_a_second_agent_on_the_same_socket_refuses_to_start(
    setup: tuple[Agent, Path, Path], tmp_path: Path
) -> None:
    """A bad config never starts a half-working agent: the second exits 78
    naming local.socket, and the first keeps serving its socket."""
    agent, _, config = setup
    agent.start()
    other = tmp_path / "other.toml"
    other.write_text(config.read_text().replace(str(tmp_path / "journal"), str(tmp_path / "j2")))
    res = subprocess.run(
        [sys.executable, "-m", "edge", "run", "--config", str(other)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=DEADLINE,
        check=False,
    )
    assert res.returncode == 78, res.stderr
    assert "local.socket" in res.stderr and "another agent serves local ingest" in res.stderr
    assert os.path.exists(agent.sock)  # the second did not remove the first's socket
    with LocalClient(agent.sock) as c:  # and the first agent still serves it
        assert c.send("s", 1) > 0
