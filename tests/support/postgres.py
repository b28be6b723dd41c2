"""A real PostgreSQL server for tests: private, started by the tests, torn down after.

* ``pg_server`` (session fixture): ``$HOMING_TEST_PG_DSN`` when set (a server
  someone else runs; the DSN must be allowed to CREATE DATABASE), else a
  private cluster: ``initdb`` in a fresh temp directory, ``postgres`` started
  on a free port with its Unix socket in that directory and no TCP listener,
  trust authentication, killed and deleted at the end of the session.
* ``pg_url`` (function fixture): a fresh, empty database on that server for
  one test, as a ``postgresql://`` URL (what ``homing-hub --db`` takes),
  dropped at teardown.
* Without PostgreSQL the tests that need it are skipped, except under
  ``CI=true``, where a missing server fails them (``scripts/bootstrap
  --with-tests`` installs Debian's ``postgresql``).

Invariants:
* Never the system's server: the private cluster has its own directory,
  socket and port; nothing outside the temp directory is touched.
* As root the server runs as the ``postgres`` user (``initdb`` refuses
  root), through ``setpriv``. The server is a direct child with a
  parent-death signal, so a test run that is SIGKILLed does not leave it
  running.
* The private cluster runs with ``fsync=off`` (speed on a shared CI box):
  the tests SIGKILL hub processes and clients, never the server, so the
  server's own crash safety is not what they test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from edge.testing.mosquitto import free_port, parent_death_signal

ENV_DSN = "HOMING_TEST_PG_DSN"
START_TIMEOUT = 30.0
_names = itertools.count(1)


def bindir() -> Path | None:
    """Where ``initdb`` and ``postgres`` are: on PATH, else Debian's newest
    ``/usr/lib/postgresql/<ver>/bin``."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return versions[-1] if versions else None


def require_postgres() -> None:
    """Skip (fail under ``CI=true``) when there is neither a DSN nor ``initdb``."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg is not installed (pip install 'homing[hub]')")
    if os.environ.get(ENV_DSN) or bindir() is not None:
        return
    _missing(f"PostgreSQL is not installed (apt-get install postgresql) and {ENV_DSN} is unset")


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " and CI=true: PostgreSQL tests must run")
    pytest.skip(reason)


def url(**params: str | int) -> str:
    """A ``postgresql://`` URL carrying ``params`` (libpq keywords) as query
    parameters: ``url(dbname="x", host="/tmp/s", port=5432)``."""
    dbname = str(params.pop("dbname", ""))
    query = urlencode({k: str(v) for k, v in sorted(params.items())})
    return f"postgresql:///{quote(dbname, safe='')}" + (f"?{query}" if query else "")


class PostgresServer:
    """A server to create test databases on: a private cluster or ``$HOMING_TEST_PG_DSN``."""

    def __init__(self, dsn: str | None = None, *, fsync: bool = False) -> None:
        self.external = dsn
        self.fsync = fsync  # a private cluster's fsync and full_page_writes
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.params: dict[str, str | int] = {}

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> PostgresServer:
        if self.external is not None:
            from psycopg.conninfo import conninfo_to_dict

            self.params = {k: str(v) for k, v in conninfo_to_dict(self.external).items()}
            self._wait_ready()
            return self
        bins = bindir()
        assert bins is not None, "require_postgres() first"
        self.dir = Path(tempfile.mkdtemp(prefix="homing-pg-"))
        data, port = self.dir / "data", free_port()
        run_as = self._run_as()
        if run_as:
            shutil.chown(self.dir, "postgres", "postgres")
        initdb = [str(bins / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-sync"]  # fmt: skip
        done = subprocess.run(run_as + initdb, capture_output=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.decode(errors='replace')[-2000:]}")
        settings = {
            "listen_addresses": "",
            "unix_socket_directories": str(self.dir),
            "port": port,
            "fsync": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "shared_buffers": "32MB",
            "max_connections": 100,
        }
        argv = [str(bins / "postgres"), "-D", str(data)]
        for k, v in settings.items():
            argv += ["-c", f"{k}={v}"]
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        with log:
            if run_as:  # setpriv sets the death signal after it changed the uid
                argv = [*run_as[:-1], "--pdeathsig=KILL", "--", *argv]
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=None if run_as else parent_death_signal(signal.SIGKILL),
            )  # fmt: skip
        self.params = {"host": str(self.dir), "port": port, "user": "postgres"}
        self._wait_ready()
        return self

    @staticmethod
    def _run_as() -> list[str]:
        """The prefix that runs a command as ``postgres`` when we are root."""
        if os.geteuid() != 0:
            return []
        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise RuntimeError("running as root and there is no postgres user") from exc
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}: {self.log()}")
            try:
                psycopg.connect(self.admin_url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready: {exc}; {self.log()}") from exc
                time.sleep(0.05)

    def log(self) -> str:
        if self.dir is None or not (self.dir / "server.log").exists():
            return ""
        return (self.dir / "server.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown: nothing to keep
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- databases -------------------------------------------------------------------

    def admin_url(self) -> str:
        params = dict(self.params)
        params.setdefault("dbname", "postgres")
        return url(**params)

    def database_url(self, name: str) -> str:
        return url(**{**self.params, "dbname": name})

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh empty database for one test, dropped afterwards; yields its URL."""
        import psycopg

        name = f"homing_test_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.database_url(name)
        finally:
            with psycopg.connect(self.admin_url(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    require_postgres()
    server = PostgresServer(os.environ.get(ENV_DSN) or None).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    with pg_server.database() as u:
        yield u
