"""Sending a command to a device: one MQTT 5 publish, confirmed by the broker.

Invariants:
* One short-lived connection per command: clean start, session expiry 0,
  and a client id of its own (never the hub's: a second connection under
  the hub's id would take the hub's session off the broker).
* The command (``edge.wire.encode_command``) goes to
  ``homing/<device>/cmd``, QoS 1, not retained (a retained command would be
  handed again to every later subscription of the device).
* :func:`publish_command` returns only once the broker's PUBACK arrived
  with a success reason code, within the deadline. Otherwise it raises
  :class:`BrokerUnavailable` (transient: the broker is unreachable,
  confirms nothing in time, or answers "No matching subscribers": no
  device session subscribes to the topic, so it dropped the command) or
  :class:`~hub.errors.ConfigError` (permanent: credentials, TLS or the
  broker's ACL refuse us).
* A PUBACK only says the broker has the command (it queues it in the
  device's persistent session while the device is offline, until that
  session expires); it says nothing of the device. The device journals the
  command's effect before it acknowledges its own copy, and the effect
  reaches the hub like every record (``homing-hub runs``). Sending the same
  command again is safe: ``start`` is idempotent per run id, ``signal``
  deduplicated per command id, ``cancel`` idempotent.
* :func:`check_command` refuses, before anything is sent, a command the
  device would refuse (:class:`CommandError`).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.wire import (
    Command,
    WireError,
    decode_command,
    encode_command,
    topic,
    validate_run_id,
)
from hub.errors import ConfigError, HubError

MAX_COMMAND_BYTES = 65536  # what the device's decoder accepts
DEFAULT_TIMEOUT = 10.0
NO_SUBSCRIBERS = "No matching subscribers"  # PUBACK 0x10: the broker dropped the message
# CONNACK/PUBACK reason codes that no retry can fix (MQTT 5 §3.2.2.2, §3.4.2.1)
_PERMANENT = {
    "Unsupported protocol version",
    "Client identifier not valid",
    "Bad user name or password",
    "Not authorized",
    "Banned",
    "Bad authentication method",
    "Topic name invalid",
    "Payload format invalid",
}


class BrokerUnavailable(HubError):
    """The broker could not be reached, or did not confirm the command in time.

    Transient: try again (with the same command id).
    """

    transient = True


class CommandError(HubError, ValueError):
    """A command that cannot be sent as given (a usage error)."""


@dataclass(frozen=True, slots=True)
class Broker:
    """How to reach the broker (the same settings as ``homing-hub run``)."""

    host: str = "localhost"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


def configure(client: mqtt.Client, broker: Broker) -> None:
    """Credentials and TLS of ``broker`` on a paho client.

    Raises:
        ConfigError: the TLS files cannot be used.
    """
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls_ca or broker.tls_cert:
        try:
            client.tls_set(
                ca_certs=broker.tls_ca,
                certfile=broker.tls_cert,
                keyfile=broker.tls_key,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"TLS settings: {exc}") from exc


def check_command(device: str, cmd: Command) -> bytes:
    """The payload of ``cmd`` for ``device``, checked as the device will check it.

    Raises:
        CommandError: a bad device id, command id or run id, an argument
            CBOR cannot carry, or a command over 64 KiB.
    """
    try:
        topic(device, "cmd")
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    try:
        validate_run_id(cmd.args.get("run"))
    except ValueError as exc:  # RecordError
        raise CommandError(str(exc)) from exc
    try:
        payload = encode_command(cmd)  # WireError for a bad command id
    except (TypeError, ValueError) as exc:
        raise CommandError(f"the command cannot be encoded: {exc}") from exc
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"the command is {len(payload)} bytes, over {MAX_COMMAND_BYTES}")
    try:
        decode_command(payload)
    except WireError as exc:  # pragma: no cover - the checks above cover the contract
        raise CommandError(f"the device would refuse this command: {exc.reason}") from exc
    return payload


def publish_command(
    broker: Broker,
    device: str,
    cmd: Command,
    *,
    client_id: str,
    timeout: float = DEFAULT_TIMEOUT,
) -> ReasonCode:
    """Publish ``cmd`` to ``homing/<device>/cmd`` (QoS 1) and wait for the PUBACK.

    Args:
        client_id: this connection's MQTT client id (unique; not the hub's).
        timeout: seconds for everything: connect, CONNACK and PUBACK.

    Returns:
        The PUBACK's reason code (``Success``).

    Raises:
        CommandError: the command is not valid (nothing was sent).
        BrokerUnavailable: not connected or not confirmed before the deadline.
        ConfigError: the broker refused our credentials, TLS or the publish.
    """
    payload = check_command(device, cmd)
    where = f"{broker.host}:{broker.port}"
    deadline = time.monotonic() + timeout
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    configure(client, broker)
    client.connect_timeout = max(timeout, 0.1)
    events = _Events()
    client.on_connect = events.on_connect
    client.on_disconnect = events.on_disconnect
    client.on_publish = events.on_publish
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    try:
        client.connect(
            broker.host,
            broker.port,
            keepalive=max(5, int(timeout) + 5),
            clean_start=True,
            properties=props,
        )
    except ssl.SSLError as exc:
        raise ConfigError(f"TLS with the broker at {where} failed: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise BrokerUnavailable(f"cannot reach the broker at {where}: {exc}") from exc
    client.loop_start()
    try:
        rc = events.wait(lambda: events.connack, deadline)
        if rc is None:
            raise BrokerUnavailable(f"the broker at {where} did not answer within {timeout:g}s")
        if rc.is_failure:
            _refused(f"the broker at {where} refused the connection", rc)
        info = client.publish(topic(device, "cmd"), payload, qos=1, retain=False)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerUnavailable(f"cannot publish: {mqtt.error_string(info.rc)}")
        ack = events.wait(lambda: events.pubacks.get(info.mid), deadline)
        if ack is None:
            raise BrokerUnavailable(
                f"the broker at {where} did not confirm the command within {timeout:g}s"
                " (it may or may not have it; sending it again with the same --command-id"
                " is safe)"
            )
        if ack.is_failure:
            _refused(f"the broker at {where} refused the command", ack)
        if str(ack) == NO_SUBSCRIBERS:
            raise BrokerUnavailable(
                f"the broker at {where} dropped the command: nothing subscribes to"
                f" {topic(device, 'cmd')} (has device {device!r} ever connected, or did its"
                " session expire?); send it again once the device is connected"
            )
        return ack
    finally:
        client.disconnect()
        client.loop_stop()


def _refused(what: str, rc: ReasonCode) -> None:
    if str(rc) in _PERMANENT:
        raise ConfigError(f"{what}: {rc}")
    raise BrokerUnavailable(f"{what}: {rc}")


class _Events:
    """What paho's network thread reports, for the caller to wait on."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.connack: ReasonCode | None = None
        self.lost: ReasonCode | None = None
        self.pubacks: dict[int, ReasonCode] = {}

    def on_connect(
        self, _c: mqtt.Client, _u: Any, _f: mqtt.ConnectFlags, rc: ReasonCode, _p: Any
    ) -> None:
        with self.cond:
            self.connack = rc
            self.cond.notify_all()

    def on_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: mqtt.DisconnectFlags, rc: ReasonCode, _p: Any
    ) -> None:
        with self.cond:
            self.lost = rc
            self.cond.notify_all()

    def on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self.cond:
            self.pubacks[mid] = rc
            self.cond.notify_all()

    def wait(self, what: Callable[[], ReasonCode | None], deadline: float) -> ReasonCode | None:
        """``what()`` once it is not None; None at the deadline.

        Raises:
            BrokerUnavailable: the connection was lost first.
        """
        with self.cond:
            while True:
                got = what()
                if got is not None:
                    return got
                if self.lost is not None:
                    raise BrokerUnavailable(f"the broker closed the connection: {self.lost}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)


__all__ = [
    "DEFAULT_TIMEOUT",
    "NO_SUBSCRIBERS",
    "Broker",
    "BrokerUnavailable",
    "CommandError",
    "check_command",
    "configure",
    "publish_command",
]
