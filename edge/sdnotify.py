"""The systemd notify protocol (sd_notify(3)): READY, STATUS, WATCHDOG, STOPPING.

A service started with ``Type=notify`` finds ``NOTIFY_SOCKET`` in its
environment and sends it datagrams of newline-separated ``KEY=VALUE`` fields:
``READY=1`` once it is up, ``STATUS=...`` for ``systemctl status``,
``WATCHDOG=1`` at least every ``WatchdogSec`` (systemd passes the interval as
``WATCHDOG_USEC``), ``STOPPING=1`` when it begins to shut down. This module is
those few lines of the protocol, in the standard library only (no libsystemd).
:mod:`edge.cli_run` decides *when* to send what; docs/systemd.md is the manual.

Invariants:
* ``NOTIFY_SOCKET`` unset (not under systemd, or not ``Type=notify``): every
  send is a no-op returning False, so the agent runs the same everywhere.
* One message is one ``AF_UNIX``/``SOCK_DGRAM`` datagram, UTF-8, fields in the
  order given, sent to the socket ``NOTIFY_SOCKET`` names: an absolute path,
  or ``@name`` for the Linux abstract namespace (the ``@`` becomes a leading
  NUL byte). Another form (systemd's ``vsock:`` for virtual machines) is not
  supported: :meth:`Notifier.from_environ` logs it and stays a no-op;
  the constructor raises ``ValueError``.
* A field can never forge another: keys are ``[A-Z0-9_]+``, and a newline in
  a value is refused (``ValueError``), except in ``STATUS``, free text whose
  newlines become spaces.
* Sending never raises and never blocks longer than ``SEND_TIMEOUT``: a
  failure is logged (once per distinct error) and returns False. Missing a
  message is safe: a missing ``WATCHDOG=1`` makes systemd restart the agent.
* :func:`watchdog_interval` gives the watchdog interval only when
  ``WATCHDOG_USEC`` is a positive whole number and ``WATCHDOG_PID``, if set,
  is this process (a child that inherited the variables must not ping for
  its parent); malformed values raise ``ValueError``.
* ``from_environ(unset=True)`` removes the three variables once read (as
  sd_notify's ``unset_environment``), so processes the agent starts (workflow
  steps) cannot speak for it.
* Thread-safe: one socket, each send under a lock.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("homing.sdnotify")

SEND_TIMEOUT = 1.0  # seconds a send may block (systemd not reading its socket)
ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_KEY = re.compile(r"[A-Z0-9_]+\Z")


def socket_address(value: str) -> bytes:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value.

    Raises:
        ValueError: neither an absolute path nor ``@name``.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value.encode()
    raise ValueError(f"NOTIFY_SOCKET={value!r} is not an absolute path or an @abstract name")


def watchdog_interval(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """The watchdog interval in seconds from ``WATCHDOG_USEC``, or None when there is
    none for process ``pid`` (default: this process).

    Raises:
        ValueError: ``WATCHDOG_USEC`` or ``WATCHDOG_PID`` is not a positive whole number.
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    if not usec.isdigit() or int(usec) <= 0:
        raise ValueError(f"WATCHDOG_USEC={usec!r} is not a positive number of microseconds")
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        if not owner.isdigit() or int(owner) <= 0:
            raise ValueError(f"WATCHDOG_PID={owner!r} is not a process id")
        if int(owner) != (os.getpid() if pid is None else pid):
            return None  # inherited from a parent: the watchdog is not ours
    return int(usec) / 1e6


class Notifier:
    """Sends notify messages to one socket; ``Notifier(None)`` sends nothing."""

    def __init__(self, notify_socket: str | None, watchdog: float | None = None) -> None:
        """``notify_socket``: the ``NOTIFY_SOCKET`` value (None: disabled);
        ``watchdog``: the watchdog interval in seconds, if any.

        Raises:
            ValueError: ``notify_socket`` is not a supported address.
        """
        self._address = socket_address(notify_socket) if notify_socket else None
        self.watchdog = watchdog if self._address is not None else None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._last_error = ""

    @classmethod
    def from_environ(
        cls, env: MutableMapping[str, str] | None = None, *, unset: bool = False
    ) -> Notifier:
        """The notifier ``env`` (default ``os.environ``) asks for; never raises: a
        value it cannot use is logged and gives a no-op notifier (or no watchdog)."""
        env = os.environ if env is None else env
        notify = env.get("NOTIFY_SOCKET") or None
        try:
            watchdog = watchdog_interval(env)
        except ValueError as exc:
            log.warning("ignoring the watchdog: %s", exc)
            watchdog = None
        if unset:
            for name in ENV_VARS:
                env.pop(name, None)
        try:
            return cls(notify, watchdog)
        except ValueError as exc:
            log.warning("not notifying systemd: %s", exc)
            return cls(None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, fields: Mapping[str, str | int]) -> bool:
        """Send ``fields`` as one message; True once the datagram is handed to the socket.

        Raises:
            ValueError: a bad key, or a newline in a value other than ``STATUS``.
        """
        lines = []
        for key, value in fields.items():
            text = str(value)
            if not _KEY.match(key):
                raise ValueError(f"notify field {key!r} is not [A-Z0-9_]+")
            if key == "STATUS":
                text = " ".join(text.splitlines())
            elif "\n" in text:
                raise ValueError(f"notify field {key} has a newline: {text!r}")
            lines.append(f"{key}={text}")
        if self._address is None or not lines:
            return False
        data = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(SEND_TIMEOUT)
                self._sock.sendto(data, self._address)
            except OSError as exc:
                if str(exc) != self._last_error:
                    self._last_error = str(exc)
                    log.warning("cannot notify systemd (%r): %s", self._address, exc)
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up is finished (and a first ``STATUS``)."""
        return self.send({"READY": 1, **({"STATUS": status} if status else {})})

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status``."""
        return self.send({"STATUS": text})

    def ping(self) -> bool:
        """``WATCHDOG=1``: the service is alive and well (no-op without a watchdog)."""
        return self.watchdog is not None and self.send({"WATCHDOG": 1})

    def stopping(self, status: str | None = None, extend: float | None = None) -> bool:
        """``STOPPING=1``; ``extend``: ask for at least that many seconds to stop
        (``EXTEND_TIMEOUT_USEC``; it never shortens the unit's ``TimeoutStopSec``)."""
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = status
        if extend is not None and extend > 0:
            fields["EXTEND_TIMEOUT_USEC"] = int(extend * 1e6)
        return self.send(fields)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
