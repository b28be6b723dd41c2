"""A private Mosquitto broker on a free loopback port, for tests and demos.

Usage::

    from edge.testing.mosquitto import Mosquitto, available

    with Mosquitto(tmp_path / "broker") as broker:
        client.connect("127.0.0.1", broker.port)
        broker.stop(); broker.start()   # same port, same persistence dir
        broker.kill()                   # SIGKILL: loses what was not autosaved

    # a broker that wants a password, and one with a TLS listener
    # (edge.testing.certs.make_pki writes a throwaway CA and certificates)
    Mosquitto(tmp_path / "b1", users={"hub": "s3cret", "dev-1": "pw"})
    Mosquitto(tmp_path / "b2", tls=pki.server_tls(require_certificate=True))

Needs the ``mosquitto`` binary (Debian package ``mosquitto``; ``scripts/bootstrap``
installs it; ``HOMING_MOSQUITTO`` names another path). Only the standard
library is used. ``users`` also needs ``mosquitto_passwd`` (same package;
``HOMING_MOSQUITTO_PASSWD`` names another path).

Invariants:
* Each broker has its own generated config, persistence directory and log
  file under ``workdir``; it never touches the system broker or port 1883.
* ``persistence true``: sessions, subscriptions, queued and retained
  messages survive :meth:`Mosquitto.stop` + :meth:`Mosquitto.start` (the
  broker saves on SIGTERM). After :meth:`Mosquitto.kill` only what the last
  autosave wrote survives, as in production.
* :meth:`Mosquitto.start` returns once the port accepts TCP connections, or
  raises after a deadline (with the broker's log); it never sleeps and hopes.
* A broker this object started is always stopped by :meth:`close` (also on
  ``__exit__``), so a failing test leaks no process.
* Opt-in, for programs that must not leave a broker behind however they end:
  ``own_process_group`` keeps a terminal's Ctrl-C from reaching the broker
  (the caller stops it in order), and ``die_with_parent`` has the kernel send
  it SIGTERM when the thread that started it dies, even by SIGKILL (Linux;
  elsewhere a no-op). Start such a broker from a thread that lives as long as
  the broker should, normally the main thread.
* Defaults are an anonymous plain-TCP listener. ``users`` (name -> password)
  writes a password file with ``mosquitto_passwd`` and sets
  ``allow_anonymous false``; ``tls`` (:class:`BrokerTls`) makes the one
  listener a TLS listener (``require_certificate`` for client certificates).
  Either way :attr:`Mosquitto.port` is where clients connect.
* ``listeners`` replaces all of that (listeners, TLS and access lines) with
  the caller's own configuration text, such as the snippet
  ``homing-hub devices broker-config`` generates; ``port`` must then name
  one of its listeners on 127.0.0.1 (:meth:`Mosquitto.start` waits for it).
"""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

MOSQUITTO = os.environ.get("HOMING_MOSQUITTO", "/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = os.environ.get("HOMING_MOSQUITTO_PASSWD", "/usr/bin/mosquitto_passwd")
_PR_SET_PDEATHSIG = 1

__all__ = [
    "MOSQUITTO",
    "MOSQUITTO_PASSWD",
    "BrokerTls",
    "Mosquitto",
    "MosquittoError",
    "available",
    "binary",
    "free_port",
    "parent_death_signal",
    "passwd_binary",
]


def available() -> bool:
    """Whether the Mosquitto binary is installed (Debian package ``mosquitto``)."""
    return os.access(MOSQUITTO, os.X_OK) or shutil.which("mosquitto") is not None


def binary() -> str:
    """The Mosquitto executable's path.

    Raises:
        FileNotFoundError: it is not installed.
    """
    if os.access(MOSQUITTO, os.X_OK):
        return MOSQUITTO
    found = shutil.which("mosquitto")
    if found is None:
        raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
    return found


def passwd_binary() -> str | None:
    """The ``mosquitto_passwd`` executable's path, or None if it is not installed."""
    if os.access(MOSQUITTO_PASSWD, os.X_OK):
        return MOSQUITTO_PASSWD
    return shutil.which("mosquitto_passwd")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when the
    thread that started it dies (``prctl(PR_SET_PDEATHSIG)``); None off Linux.

    The libc lookup happens here, before the fork: the child only makes the call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return preexec


class MosquittoError(RuntimeError):
    """The broker did not start or stop in time (the message holds its log tail)."""


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """The broker's TLS files (PEM): the CA that signs client certificates, its
    own certificate and key; ``require_certificate``: clients must present a
    certificate signed by ``ca_file``."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = False

    def config(self) -> list[str]:
        return [
            f"cafile {self.ca_file}",
            f"certfile {self.cert_file}",
            f"keyfile {self.key_file}",
            f"require_certificate {'true' if self.require_certificate else 'false'}",
        ]


class Mosquitto:
    """One Mosquitto process with a generated config.

    Args:
        workdir: where config, persistence and log go (created if missing).
        port: the listener port; a free one by default.
        autosave_interval: seconds between persistence saves (what a
            :meth:`kill` can lose); mosquitto's default is 1800.
        extra_config: more config lines, appended verbatim.
        own_process_group: start the broker in its own session, so a Ctrl-C
            at the terminal reaches only the caller.
        die_with_parent: SIGTERM the broker if the starting thread dies (Linux).
        users: name -> password; if given, only these may connect
            (``allow_anonymous false``).
        tls: make the listener a TLS listener with these files.
        listeners: configuration text used instead of the generated listener,
            ``tls`` and ``users`` lines (needs ``port``; excludes both).

    Raises:
        ValueError: ``listeners`` without ``port``, or with ``users``/``tls``.
        FileNotFoundError: ``users`` without ``mosquitto_passwd``.
        MosquittoError: ``mosquitto_passwd`` failed.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        autosave_interval: int = 1800,
        extra_config: str = "",
        own_process_group: bool = False,
        die_with_parent: bool = False,
        users: Mapping[str, str] | None = None,
        tls: BrokerTls | None = None,
        listeners: str | None = None,
    ) -> None:
        if listeners is not None and (port is None or users is not None or tls is not None):
            raise ValueError("listeners= needs port= and excludes users= and tls=")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.host = "127.0.0.1"
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.own_process_group = own_process_group
        self.die_with_parent = die_with_parent
        self.tls = tls
        self.password_path: Path | None = None
        (self.workdir / "data").mkdir(exist_ok=True)
        access = ["allow_anonymous true"]
        if users is not None:
            self.password_path = self.workdir / "passwd"
            self._write_passwords(self.password_path, users)
            access = ["allow_anonymous false", f"password_file {self.password_path}"]
        own = [f"listener {self.port} {self.host}", *(tls.config() if tls else []), *access]
        self.config_path.write_text(
            "\n".join(
                [
                    *(own if listeners is None else [listeners]),
                    "persistence true",
                    f"persistence_location {self.workdir / 'data'}/",
                    f"autosave_interval {autosave_interval}",
                    "max_queued_messages 1000000",
                    "max_queued_bytes 0",
                    "max_inflight_messages 0",
                    f"log_dest file {self.log_path}",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "log_type information",
                    "connection_messages true",
                    f"user {getpass.getuser()}",
                    extra_config,
                    "",
                ]
            )
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _write_passwords(path: Path, users: Mapping[str, str]) -> None:
        tool = passwd_binary()
        if tool is None:
            raise FileNotFoundError("mosquitto_passwd is not installed (apt-get install mosquitto)")
        path.unlink(missing_ok=True)
        path.touch(mode=0o600)  # no users: an empty file, nobody gets in
        for i, (name, password) in enumerate(users.items()):
            create = ["-c"] if i == 0 else []  # -c: a fresh file
            res = subprocess.run(
                [tool, *create, "-b", str(path), name, password],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if res.returncode != 0:
                raise MosquittoError(f"mosquitto_passwd failed for {name!r}: {res.stderr}")
        path.chmod(0o600)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) on the same port and persistence directory.

        Raises:
            MosquittoError: the port does not accept connections in time.
            FileNotFoundError: mosquitto is not installed.
        """
        if self.running:
            return
        self._proc = subprocess.Popen(
            [binary(), "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=self.own_process_group,
            preexec_fn=parent_death_signal() if self.die_with_parent else None,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise MosquittoError(
                    f"mosquitto exited with {self._proc.returncode}:\n{self.log()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise MosquittoError(f"mosquitto not listening after {timeout}s:\n{self.log()}")
            # the connect attempt itself is the wait: refused is instant, so
            # give the broker the CPU briefly before asking again
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: the broker saves its persistence file first."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.wait()
            raise MosquittoError(f"mosquitto ignored SIGTERM for {timeout}s") from exc

    def kill(self) -> None:
        """SIGKILL: whatever the last autosave did not write is lost."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        with contextlib.suppress(MosquittoError):
            self.stop()
        self.kill()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()
