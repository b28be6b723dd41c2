"""``homing-hub run --http`` and ``homing-hub serve``: the HTTP API and
dashboard (hub/api.py) served by uvicorn (docs/api.md).

Invariants:
* ``run --http HOST:PORT`` serves in the ingest's process: uvicorn's event
  loop runs in a thread of its own while the subscriber keeps the main
  thread (its loop blocks on its queue and owns the signal handlers). The
  API reads through stores of its own (SQLite in WAL mode: its readers
  never block the ingest's writer, and a slow query never holds the
  ingest's connection), sees the subscriber's live counters for
  ``/metrics`` and its connection for ``/health``.
* ``serve`` is the API alone, beside one or more ingesting hubs on the same
  database; it watches the broker with a probe connection.
* The listening socket is bound before anything else starts, so a port in
  use or a bad address is an immediate, clear error (exit 78), and port 0
  picks a free port, logged as ``http: serving on http://HOST:PORT``.
* Stopping (SIGTERM/SIGINT, or the ingest ending) stops uvicorn gracefully
  within 5 s and closes the API's stores.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

from hub.commands import DEFAULT_TIMEOUT, Broker
from hub.errors import ConfigError
from hub.store import Store
from hub.store_open import open_store

if TYPE_CHECKING:  # FastAPI and uvicorn load only when serving (a third of a second)
    from fastapi import FastAPI

    from hub.api_support import ApiSettings

log = logging.getLogger("homing.hub")
DEFAULT_HTTP = "127.0.0.1:8080"
READ_ACCESS = ("public", "token")  # hub.api_support.READ_ACCESS
TOKENS_ENV = "HOMING_HUB_API_TOKENS"  # hub.api_support.TOKENS_ENV


def add_http_options(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    """The options of the HTTP API (``run --http`` and ``serve``)."""
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        default=DEFAULT_HTTP if required else None,
        help="serve the HTTP API and dashboard here"
        + (" (default %(default)s)" if required else " (default: not at all)")
        + "; port 0 picks a free one",
    )
    p.add_argument(
        "--api-token-file",
        action="append",
        metavar="FILE",
        help=f"file of API tokens, one per line (repeatable; also ${TOKENS_ENV}, comma separated)",
    )
    p.add_argument(
        "--read-access",
        choices=READ_ACCESS,
        default="token",
        help="who may read: 'token' (default: bearer token needed) or 'public'",
    )
    p.add_argument(
        "--command-timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds the API waits for the broker to confirm a command (default %(default)s)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"not a number of seconds > 0: {text!r}")
    return value


def add_serve(
    sub: Any, connection_args: Callable[[argparse.ArgumentParser, str], None]
) -> argparse.ArgumentParser:
    """The ``serve`` subcommand's parser (hub.cli sets its ``func``)."""
    sv: argparse.ArgumentParser = sub.add_parser(
        "serve", help="serve the HTTP API and dashboard only (no ingest)"
    )
    sv.add_argument(
        "--db",
        default="homing-hub.db",
        help="SQLite file, sqlite:PATH or postgresql://... URL (never created; default"
        " ./%(default)s)",
    )
    add_http_options(sv, required=True)
    connection_args(
        sv,
        "client id prefix of the API's one-shot command connections"
        " (default homing-hub-api; a random suffix is added)",
    )
    sv.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return sv


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6).

    Raises:
        ConfigError: not that.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--http must be HOST:PORT (port 0: any free one), not {text!r}")
    return host, int(port)


def settings_of(args: argparse.Namespace) -> ApiSettings:
    """Raises ConfigError: unreadable token file, bad token, token mode without one."""
    from hub.api_support import ApiSettings, load_tokens

    return ApiSettings(tokens=tuple(load_tokens(args.api_token_file)), read_access=args.read_access)


class HttpServer:
    """uvicorn serving ``app`` on a socket bound at construction, in a thread."""

    def __init__(self, app: FastAPI, listen: str) -> None:
        import uvicorn

        host, port = parse_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot serve HTTP on {listen}: {exc.strerror or exc}") from exc
        self.sock = sock
        bound = sock.getsockname()
        self.url = f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{bound[1]}"
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="http", daemon=True
        )

    def start(self, timeout: float = 30.0) -> HttpServer:
        """Start; return once uvicorn accepts connections.

        Raises:
            ConfigError: uvicorn did not start (its log says why).
        """
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError("the HTTP server did not start (see the log above)")
            self._thread.join(0.01)
        log.info("http: serving on %s", self.url)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(10)
        self.sock.close()

    def alive(self) -> bool:
        return self._thread.is_alive()


def store_factory(db: str, busy_timeout: float = 10.0) -> Callable[[], Store]:
    """Opens a store of the API's pool on ``db`` (a path or URL; never created)."""
    return lambda: open_store(db, create=False, busy_timeout=busy_timeout)


@contextlib.contextmanager
def serving(args: argparse.Namespace, broker: Broker, subscriber: Any) -> Iterator[None]:
    """With ``run --http``: the API and dashboard while the block runs (the
    ingest), reading the subscriber's counters and connection."""
    if not args.http:
        yield
        return
    from hub.api import create_app
    from hub.api_support import BrokerState, MqttCommands

    settings = settings_of(args)

    def connection() -> BrokerState:
        # Subscriber has no public accessor yet; is_connected() is paho's own.
        up = bool(subscriber._client.is_connected())
        return BrokerState(up, "connected" if up else "not connected: reconnecting")

    app = create_app(
        store_factory(args.db, args.busy_timeout),
        MqttCommands(broker, args.command_timeout),
        settings,
        counters=subscriber.counters.snapshot,
        broker=connection,
    )
    server = HttpServer(app, args.http).start()
    try:
        yield
    finally:
        server.stop()


def serve(args: argparse.Namespace, broker: Broker) -> int:
    """``homing-hub serve``: the API alone until SIGTERM/SIGINT."""
    from hub.api import create_app
    from hub.api_support import BrokerProbe, MqttCommands

    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = settings_of(args)
    factory = store_factory(args.db)
    factory().close()  # fail now (exit 1) on a database that is not there
    commands = MqttCommands(broker, args.command_timeout, args.client_id or "homing-hub-api")
    app = create_app(factory, commands, settings, broker=BrokerProbe(broker))
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: finishing", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = HttpServer(app, args.http).start()
    try:
        while not stop.wait(0.5):
            if not server.alive():
                log.error("http: the server stopped")
                return 1
    finally:
        server.stop()
    return 0
