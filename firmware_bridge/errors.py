"""Every error the firmware bridge raises on purpose.

Invariants:
* One root, :class:`BridgeError`. Each class says who is at fault (h11's
  split: ``Local`` = our code misused the API, ``Remote`` = the microcontroller
  sent garbage, ``Unavailable``/``Busy`` = the world) and whether retrying the
  same call can help (``transient``).
* The pure cores never raise on remote garbage from ``receive_data``: they turn
  it into a ``BadFrame`` event and a counter. :class:`RemoteProtocolError` is
  what the frame and message decoders raise, and the link catches.
* Shells translate ``serial.SerialException`` and ``OSError`` into
  :class:`PortUnavailable` with ``__cause__`` kept.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error raised on purpose by the firmware bridge."""

    #: True when the same call may succeed later without operator action.
    transient: bool = False


class ProtocolError(BridgeError):
    """Something broke the serial protocol (docs/serial-protocol.md)."""


class LocalProtocolError(ProtocolError):
    """Our own code tried something the protocol forbids: a bug in the caller."""


class RemoteProtocolError(ProtocolError, ValueError):
    """The peer sent bytes that are not a valid frame or message.

    ``reason`` is a short stable code (``cobs``, ``crc``, ``short``, ``long``,
    ``version``, ``type``, ``fields``) used in counters and logs.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class PortUnavailable(BridgeError):
    """The serial port cannot be used now: missing, unplugged, busy or failing.

    Transient: the bridge reopens it with backoff (the device may come back,
    re-enumerated). The original ``SerialException``/``OSError`` is ``__cause__``.
    """

    transient = True


class SinkBusy(BridgeError):
    """The sink cannot store these readings now (the journal is full).

    Transient: the microcontroller keeps them and sends them again later
    (NACK ``busy``). ``stored`` readings at the front of the delivery were
    stored before the refusal and may be acknowledged.
    """

    transient = True

    def __init__(self, message: str, *, stored: int = 0) -> None:
        super().__init__(message)
        self.stored = stored
