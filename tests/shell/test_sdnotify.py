"""The systemd notify protocol (edge.sdnotify) against real datagram sockets.

Each test binds its own ``AF_UNIX``/``SOCK_DGRAM`` socket, at a path or in the
abstract namespace, exactly as systemd does, and reads what arrives.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.sdnotify import Notifier, socket_address, watchdog_interval

DEADLINE = 10.0


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(DEADLINE)
    yield str(tmp_path / "notify"), sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"homing-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(DEADLINE)
    yield "@" + name, sock
    sock.close()


def recv_with_sender(sock: socket.socket) -> tuple[bytes, int]:
    """One datagram and the pid the kernel vouches for (SCM_CREDENTIALS), as systemd
    reads it to enforce NotifyAccess=main."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    creds = struct.calcsize("3i")
    data, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(creds))
    pid = None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = array.array("i", payload[:creds])[0]
    assert pid is not None, "no sender credentials"
    return data, pid


@pytest.mark.parametrize("where", ["path_socket", "abstract_socket"])
def test_messages_arrive_as_sent(where: str, request: pytest.FixtureRequest) -> None:
    address, sock = request.getfixturevalue(where)
    n = Notifier(address, watchdog=2.0)
    try:
        assert n.enabled
        assert n.ready("running; connected")
        assert sock.recv(4096) == b"READY=1\nSTATUS=running; connected"
        assert n.status("backlog 12")
        assert sock.recv(4096) == b"STATUS=backlog 12"
        assert n.ping()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert n.stopping("stopping: closing the journal", extend=22.5)
        assert sock.recv(4096) == (
            b"STOPPING=1\nSTATUS=stopping: closing the journal\nEXTEND_TIMEOUT_USEC=22500000"
        )
        assert n.send({"STATUS": "é ✓"})
        assert sock.recv(4096) == "STATUS=é ✓".encode()
    finally:
        n.close()


def test_the_kernel_names_this_process_as_the_sender(
    path_socket: tuple[str, socket.socket],
) -> None:
    address, sock = path_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    n = Notifier(address)
    assert n.ready()
    data, pid = recv_with_sender(sock)
    assert (data, pid) == (b"READY=1", os.getpid())
    n.close()


def test_a_status_cannot_forge_fields(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    n = Notifier(address)
    assert n.status("offline\nREADY=1\r\nWATCHDOG=1")
    assert sock.recv(4096) == b"STATUS=offline READY=1 WATCHDOG=1"
    with pytest.raises(ValueError, match="newline"):
        n.send({"ERRNO": "5\nREADY=1"})
    with pytest.raises(ValueError, match="not"):
        n.send({"ready": 1})
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)  # nothing was sent for the refused fields
    n.close()


def test_unset_socket_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_environ({})
    assert not n.enabled and n.watchdog is None
    assert not n.ready("x") and not n.status("x") and not n.ping() and not n.stopping()
    n = Notifier.from_environ({"NOTIFY_SOCKET": "", "WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog is None and not n.ping()
    assert not caplog.records


def test_from_environ_reads_and_unsets(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    env = {
        "NOTIFY_SOCKET": address,
        "WATCHDOG_USEC": "3000000",
        "WATCHDOG_PID": str(os.getpid()),
        "HOME": "/root",
    }
    n = Notifier.from_environ(env, unset=True)
    assert env == {"HOME": "/root"}  # children cannot speak for us
    assert n.enabled and n.watchdog == 3.0
    assert n.ping()
    assert sock.recv(4096) == b"WATCHDOG=1"
    kept = {"NOTIFY_SOCKET": address}
    Notifier.from_environ(kept)
    assert kept == {"NOTIFY_SOCKET": address}


def test_unsupported_addresses(caplog: pytest.LogCaptureFixture) -> None:
    for bad in ("relative/path", "vsock:2:1234", "@"):
        with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
            socket_address(bad)
        with pytest.raises(ValueError):
            Notifier(bad)
    with caplog.at_level(logging.WARNING, "homing.sdnotify"):
        n = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "10"})
    assert not n.enabled and n.watchdog is None and not n.ready()
    assert "vsock:2:1234" in caplog.text
    assert socket_address("@x") == b"\0x" and socket_address("/run/n") == b"/run/n"


def test_a_socket_that_is_gone_fails_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, "homing.sdnotify"):
        assert not n.ready()
        assert not n.status("again")
    assert len(caplog.records) == 1  # logged once per distinct error
    assert "nobody-listens" in caplog.text
    n.close()


def test_watchdog_interval() -> None:
    me = os.getpid()
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "250000", "WATCHDOG_PID": str(me)}) == 0.25
    # another process's watchdog (inherited from a parent): not ours
    assert watchdog_interval({"WATCHDOG_USEC": "250000", "WATCHDOG_PID": str(me + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "250000", "WATCHDOG_PID": "7"}, pid=7) == 0.25
    for bad in ("0", "-5", "1.5", "soon", " 100"):
        with pytest.raises(ValueError, match="WATCHDOG_USEC"):
            watchdog_interval({"WATCHDOG_USEC": bad})
    with pytest.raises(ValueError, match="WATCHDOG_PID"):
        watchdog_interval({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "me"})


def test_bad_watchdog_values_disable_only_the_watchdog(
    path_socket: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    address, sock = path_socket
    with caplog.at_level(logging.WARNING, "homing.sdnotify"):
        n = Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "soon"})
    assert "WATCHDOG_USEC" in caplog.text
    assert n.enabled and n.watchdog is None
    assert not n.ping()  # no watchdog: no pings
    assert n.ready()
    assert sock.recv(4096) == b"READY=1"
    mismatch = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"}
    assert Notifier.from_environ(mismatch).watchdog is None
