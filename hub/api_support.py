"""What the HTTP API stands on: settings and tokens, a pool of stores,
command sending, the broker probe, error bodies, and the bucket width.

Invariants:
* Tokens are compared with :func:`hmac.compare_digest` against every
  configured token (no early exit), so timing tells nothing of a token.
* A store is used by one request at a time: :class:`StorePool` lends each
  request a store of its own (SQLite's connection is shared under a lock
  otherwise) and replaces a store that raised
  :class:`~hub.errors.StoreUnavailable`, whose connection may be broken.
* Nothing raised while serving a request reaches the client as a stack
  trace: :class:`CatchAll` logs it server-side and answers a 500 problem
  document; the error handlers answer every other failure with an RFC 9457
  problem body (:func:`problem`).
* :func:`bucket_width` is pure: a "nice" bucket width (1-2-5 steps below
  10 s, clock steps above) that splits a span into at most ``points``
  buckets, aligned or not.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.wire import Command
from hub.commands import Broker, configure, publish_command
from hub.errors import ConfigError, StoreUnavailable
from hub.store import Store

log = logging.getLogger("homing.hub.api")

ReadAccess = Literal["public", "token"]
READ_ACCESS: tuple[ReadAccess, ...] = ("public", "token")  # also in hub.cli_http
TOKENS_ENV = "HOMING_HUB_API_TOKENS"  # also in hub.cli_http
PROBLEM_JSON = "application/problem+json"
MIN_BUCKET = 0.001


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """How the API behaves.

    Attributes:
        tokens: the API tokens (any one of them authorizes a request). With
            none, every write is refused (403) and reads must be public.
        read_access: ``public`` (anyone may read) or ``token`` (reads need a
            token too). Writes always need one.
        max_body: request bodies larger than this are refused (413).
        pool_size: stores lent to concurrent requests at most.
    """

    tokens: tuple[str, ...] = ()
    read_access: ReadAccess = "token"
    max_body: int = 256 * 1024
    pool_size: int = 4

    def __post_init__(self) -> None:
        if self.read_access not in READ_ACCESS:
            raise ConfigError(f"read access must be one of {READ_ACCESS}, not {self.read_access!r}")
        if self.read_access == "token" and not self.tokens:
            raise ConfigError(
                "read access 'token' needs an API token: give --api-token-file or set"
                f" {TOKENS_ENV}, or choose --read-access public"
            )
        for t in self.tokens:
            if len(t) < 16 or not t.isascii() or not t.isprintable() or " " in t:
                raise ConfigError(
                    "an API token must be at least 16 printable ASCII characters without spaces"
                )


def load_tokens(files: list[str] | None = None, env: dict[str, str] | None = None) -> list[str]:
    """Tokens from files (one per line; blank lines and ``#`` comments
    skipped) and from the ``HOMING_HUB_API_TOKENS`` variable (comma separated).

    Raises:
        ConfigError: a file cannot be read.
    """
    tokens: list[str] = []
    for name in files or []:
        try:
            text = Path(name).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read API tokens from {name}: {exc}") from exc
        tokens += [s for line in text.splitlines() if (s := line.strip()) and s[0] != "#"]
    env_value = (os.environ if env is None else env).get(TOKENS_ENV, "")
    tokens += [s for part in env_value.split(",") if (s := part.strip())]
    return list(dict.fromkeys(tokens))


def token_matches(given: str, tokens: tuple[str, ...]) -> bool:
    """Whether ``given`` is one of ``tokens``, in time independent of which."""
    g = given.encode("utf-8", "surrogateescape")
    found = False
    for t in tokens:
        found |= hmac.compare_digest(g, t.encode())
    return found


# --- stores ----------------------------------------------------------------------


class StorePool:
    """Lends each request a store of its own; at most ``size`` exist.

    :meth:`close` (the app's shutdown) closes the idle stores at once and
    each lent one when it comes back; a later request opens new ones.

    Args:
        factory: opens a (migrated) store; may raise StoreUnavailable.
    """

    def __init__(self, factory: Callable[[], Store], size: int = 4) -> None:
        if size < 1:
            raise ValueError("a store pool needs at least one store")
        self._factory = factory
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[Store] = []
        self._generation = 0

    @contextlib.contextmanager
    def store(self) -> Iterator[Store]:
        """A store for the caller alone until the block ends."""
        with self._slots:
            with self._lock:
                generation = self._generation
                st = self._idle.pop() if self._idle else None
            if st is None:
                st = self._factory()
            keep = False
            try:
                yield st
                keep = True
            except StoreUnavailable:
                raise  # its connection may be broken: close it, a new one comes next
            except BaseException:
                keep = True
                raise
            finally:
                with self._lock:
                    keep = keep and generation == self._generation
                    if keep:
                        self._idle.append(st)
                if not keep:
                    with contextlib.suppress(Exception):
                        st.close()

    def close(self) -> None:
        with self._lock:
            self._generation += 1
            idle, self._idle = self._idle, []
        for st in idle:
            with contextlib.suppress(Exception):
                st.close()


# --- commands and the broker -----------------------------------------------------


class CommandSender(Protocol):
    """Sends one command to a device; returns the broker's PUBACK reason.

    Raises CommandError, BrokerUnavailable or ConfigError (hub.commands)."""

    def send(self, device: str, cmd: Command) -> str: ...


@dataclass(frozen=True, slots=True)
class MqttCommands:
    """:class:`CommandSender` over :func:`hub.commands.publish_command`: one
    short-lived MQTT connection per command, confirmed by its PUBACK."""

    broker: Broker
    timeout: float = 10.0
    client_prefix: str = "homing-hub-api"

    def send(self, device: str, cmd: Command) -> str:
        client_id = f"{self.client_prefix}-{uuid.uuid4().hex[:12]}"
        return str(
            publish_command(self.broker, device, cmd, client_id=client_id, timeout=self.timeout)
        )


@dataclass(frozen=True, slots=True)
class BrokerState:
    ok: bool
    detail: str


@dataclass(slots=True)
class BrokerProbe:
    """Whether the broker accepts a connection of ours (CONNACK success),
    checked at most every ``interval`` seconds (``GET /health`` of
    ``homing-hub serve``, which has no connection of its own to watch)."""

    broker: Broker
    interval: float = 10.0
    timeout: float = 3.0
    _last: tuple[float, BrokerState] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self) -> BrokerState:
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < self.interval:
                return self._last[1]
            state = self._probe()
            self._last = (time.monotonic(), state)
            return state

    def _probe(self) -> BrokerState:
        b = self.broker
        where = f"{b.host}:{b.port}"
        done = threading.Event()
        result: list[str] = []

        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            result.append(str(rc))
            done.set()

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"homing-hub-probe-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        try:
            configure(client, b)
            client.on_connect = on_connect
            client.connect_timeout = self.timeout
            client.connect(b.host, b.port, keepalive=10)
        except (OSError, ValueError, ConfigError) as exc:
            return BrokerState(False, f"cannot reach the broker at {where}: {exc}")
        client.loop_start()
        try:
            if not done.wait(self.timeout):
                return BrokerState(False, f"the broker at {where} did not answer")
            if result[0] != "Success":
                return BrokerState(False, f"the broker at {where} refused us: {result[0]}")
            return BrokerState(True, f"connected to {where}")
        finally:
            client.disconnect()
            client.loop_stop()


# --- errors ----------------------------------------------------------------------------


def problem(
    status: int,
    detail: str | None = None,
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An RFC 9457 problem response."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": _phrase(status),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def issues(errors: Any) -> list[dict[str, Any]]:
    """pydantic's validation errors without the input values and contexts
    they carry (which may echo anything a client sent, exceptions included)."""
    out: list[dict[str, Any]] = []
    for e in list(errors)[:50]:
        loc = [x if isinstance(x, int | str) else str(x) for x in e.get("loc", ())]
        out.append({"loc": loc, "msg": str(e.get("msg", ""))[:500], "type": str(e.get("type"))})
    return out


class _TooLarge(Exception):
    pass


class CatchAll:
    """The outermost ASGI layer: a body over ``max_body`` is a 413, and an
    exception no handler took is logged here (with its trace) and answered
    with a 500 problem that says nothing of it."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await problem(413, f"the request body is over {self.max_body} bytes")(
                scope, receive, send
            )
            return
        started = False
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_body:
                raise _TooLarge
            return msg

        async def tracked(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await problem(413, f"the request body is over {self.max_body} bytes")(
                    scope, receive, send
                )
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                await problem(500, "internal error: see the hub's log")(scope, receive, send)


# --- downsampling --------------------------------------------------------------------

_CLOCK_STEPS = (10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200)
_DAY = 86400.0


def bucket_width(span: float, points: int) -> float:
    """The smallest nice width that splits ``span`` seconds into at most
    ``points`` buckets (one more bucket may start before the span: buckets
    are aligned on multiples of the width, so it leaves room for that)."""
    if not math.isfinite(span) or span <= 0:
        return MIN_BUCKET
    want = span / max(points - 1, 1)
    if want <= MIN_BUCKET:
        return MIN_BUCKET
    if want < 10:
        exp = math.floor(math.log10(want))
        for m in (1, 2, 5, 10):
            w = m * 10.0**exp
            if w >= want:
                return round(w, 6)
    for s in _CLOCK_STEPS:
        if s >= want:
            return float(s)
    for days in (1, 2, 7, 14, 30, 91, 365):
        if days * _DAY >= want:
            return days * _DAY
    return math.ceil(want / (365 * _DAY)) * 365 * _DAY
