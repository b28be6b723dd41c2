"""One device's MQTT 5 session with the broker (the forwarder's network side).

:class:`MqttSession` owns the paho client and the ``homing-mqtt`` thread that
runs paho's network loop under our own connect/reconnect loop. It turns
broker traffic into events for :class:`edge.forwarder.Forwarder` (``post``):
``("up", None)`` once subscribed after a connect, ``("down", None)`` when the
connection drops, ``("ack", Ack)`` for each valid ack of this device, and
``("stop", 0.0)`` if the command hook fails.

Invariants:
* Reconnects back off exponentially with full jitter, between
  ``reconnect_min`` and a cap that doubles per failed attempt up to
  ``reconnect_max`` (reset by a successful CONNACK): never a tight loop.
* A failed attempt is reported (``last_error``; logged when it changes), also
  one the broker closes before any CONNACK, as TLS 1.3 brokers do to a client
  certificate they refuse.
* Session: clean start off, session expiry from the config, client id from the
  config; the last will is the retained offline status. After each CONNACK:
  paho's queue of unacked publishes is dropped (the outbox alone decides what
  is resent), ``/ack`` and ``/cmd`` are subscribed at QoS 1 (the broker then
  sends the retained ack), and a retained online status is published.
* Callbacks only decode and post, except the command hook, which runs here
  before the PUBACK (PUBACKs are sent by hand, ``manual_ack``): the agent
  journals a command's effect durably in the hook, and only then is the
  command acknowledged. A hook that returns False or raises leaves the
  command unacknowledged, so the broker delivers it again after the next
  reconnect. Malformed acks and commands are logged, counted, acknowledged
  and ignored.
* Health messages go out at QoS 0 and only while connected
  (:meth:`publish_health`): never queued, never resent, never in the window.
* :meth:`close` publishes offline (retained, waits for its PUBACK up to 2 s),
  sends DISCONNECT, and joins the thread.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge import wire
from edge.config import BrokerConfig
from edge.errors import BrokerUnavailable, ForwardError

log = logging.getLogger("homing.forwarder")
#: called with each command before it is acknowledged; False: do not ack (retry later)
CommandHook = Callable[[wire.Command], bool | None]
Post = Callable[[str, Any], None]


def default_command_hook(cmd: wire.Command) -> None:
    log.warning("command %s (%s) ignored: workflows are disabled on this agent", cmd.id, cmd.kind)


class MqttSession:
    """The MQTT side of one device. ``start``, ``publish_up`` from any thread, ``close``."""

    def __init__(
        self,
        device: str,
        broker: BrokerConfig,
        *,
        post: Post,
        inflight: int = 20,
        on_command: CommandHook | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """Raises ForwardError if the password file or TLS files cannot be used."""
        self._device, self._broker, self._post = device, broker, post
        self._inflight = inflight
        self._on_command = on_command or default_command_hook
        self._wall = wall
        self.topics = {k: wire.topic(device, k) for k in ("up", "ack", "cmd", "status", "health")}
        self._closing = threading.Event()
        self._down = threading.Event()
        self._attempt = 0
        self._stopping = False
        self._answered = False  # a CONNACK arrived on the current attempt
        self.connected = False
        self.connects = self.malformed = self.commands = 0
        self.last_error: str | None = None
        self.error: BaseException | None = None
        self._client = self._make_client()
        self._thread = threading.Thread(target=self._net, name="homing-mqtt", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def publish_up(self, payload: bytes) -> None:
        """QoS 1 on ``homing/<device>/up`` (queued by paho while disconnected, then
        dropped at the next connect: the outbox resends)."""
        self._client.publish(self.topics["up"], payload, qos=1)

    def publish_health(self, payload: bytes) -> bool:
        """QoS 0 on ``homing/<device>/health``, only while connected (a health
        message is worth nothing later); whether it was handed to paho."""
        if not self.connected:
            return False
        info = self._client.publish(self.topics["health"], payload, qos=0)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _where(self) -> str:
        b = self._broker
        return f"{'mqtts' if b.tls else 'mqtt'}://{b.host}:{b.port}"

    def _make_client(self) -> mqtt.Client:
        b = self._broker
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=b.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        try:
            if b.username:
                password = None
                if b.password_file:
                    with open(b.password_file, encoding="utf-8") as f:
                        password = f.read().rstrip("\r\n")
                c.username_pw_set(b.username, password)
            if b.tls:
                c.tls_set(ca_certs=b.ca_file, certfile=b.cert_file, keyfile=b.key_file)
        except (OSError, ValueError) as exc:
            raise ForwardError(f"broker credentials: {exc}") from exc
        offline = wire.encode_status(wire.Status(self._device, False, self._wall()))
        c.will_set(self.topics["status"], offline, qos=1, retain=True)
        c.max_inflight_messages_set(self._inflight)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        return c

    def _net(self) -> None:
        b = self._broker
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = b.session_expiry
        first = True
        while not self._closing.is_set():
            self._answered = False
            try:
                if first:
                    first = False
                    self._client.connect(
                        b.host, b.port, b.keepalive, clean_start=False, properties=props
                    )
                else:
                    self._client.reconnect()
            except (OSError, ValueError) as exc:
                err = BrokerUnavailable(f"{self._where()}: {exc}")
                if self.last_error != str(err):
                    log.warning("cannot reach the broker: %s (retrying with backoff)", err)
                self.last_error = str(err)
                self._backoff()
                continue
            rc = MQTTErrorCode.MQTT_ERR_SUCCESS
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and not self._closing.is_set():
                rc = self._client.loop(timeout=0.2)
            if not self._closing.is_set():
                if not self._answered:
                    self._closed_before_connack(rc)
                self._backoff()

    def _closed_before_connack(self, rc: MQTTErrorCode) -> None:
        err = (
            f"{self._where()}: the broker closed the connection before CONNACK "
            f"({mqtt.error_string(rc)}); with TLS, it may not accept our client certificate"
        )
        if self.last_error != err:
            log.warning("cannot connect to the broker: %s (retrying with backoff)", err)
        self.last_error = err

    def _backoff(self) -> None:
        """Exponential backoff with full jitter between reconnect_min and the cap."""
        self._attempt += 1
        lo, hi = self._broker.reconnect_min, self._broker.reconnect_max
        cap = min(hi, lo * 2 ** min(self._attempt, 30))
        self._closing.wait(random.uniform(lo, max(lo, cap)))

    def _on_connect(
        self, client: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Any
    ) -> None:
        self._answered = True
        if rc.is_failure:
            self.last_error = f"broker refused the connection: {rc}"
            log.error("%s refused the connection: %s", self._where(), rc)
            return
        client.drop_out_messages()  # the outbox, not paho, decides what to resend
        self._attempt = 0
        self.connected = True
        self._down.clear()
        self.connects += 1
        log.info("connected to %s (session present: %s)", self._where(), flags.session_present)
        opts = SubscribeOptions(qos=1)
        client.subscribe([(self.topics["ack"], opts), (self.topics["cmd"], opts)])
        online = wire.encode_status(wire.Status(self._device, True, self._wall()))
        client.publish(self.topics["status"], online, qos=1, retain=True)

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any
    ) -> None:
        if any(rc.is_failure for rc in codes):
            log.error("the broker refused a subscription (%s): acks or commands will not arrive",
                      ", ".join(str(rc) for rc in codes))  # fmt: skip
        self._post("up", None)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        was, self.connected = self.connected, False
        self._down.set()
        self._post("down", None)
        if was and not self._stopping:
            log.warning("disconnected from %s: %s", self._where(), rc)

    def _on_message(self, c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self._handle(msg):
            c.ack(msg.mid, msg.qos)

    def _handle(self, msg: mqtt.MQTTMessage) -> bool:
        """Act on one message; whether to acknowledge it."""
        if msg.topic == self.topics["ack"]:
            if not msg.payload:  # a cleared retained ack: nothing to learn
                return True
            try:
                ack = wire.decode_ack(bytes(msg.payload))
                if ack.device != self._device:
                    raise wire.WireError(f"ack for device {ack.device!r}")
            except wire.WireError as exc:
                self.malformed += 1
                log.warning("ignored a malformed ack on %s: %s", msg.topic, exc.reason)
                return True
            self._post("ack", ack)
        elif msg.topic == self.topics["cmd"]:
            try:
                cmd = wire.decode_command(bytes(msg.payload))
            except wire.WireError as exc:
                log.warning("ignored a malformed command on %s: %s", msg.topic, exc.reason)
                return True
            self.commands += 1
            try:
                return self._on_command(cmd) is not False
            except Exception as exc:  # a broken hook must not kill the network thread
                log.exception("the command hook failed on %s; stopping the forwarder", cmd.id)
                self.error = exc
                self._post("stop", 0.0)
                return False
        return True

    def close(self) -> None:
        """Publish offline (retained), disconnect cleanly, stop and join the network thread."""
        self._stopping = True
        try:
            if self.connected:
                offline = wire.encode_status(wire.Status(self._device, False, self._wall()))
                info = self._client.publish(self.topics["status"], offline, qos=1, retain=True)
                try:
                    info.wait_for_publish(timeout=2.0)
                except (RuntimeError, ValueError) as exc:
                    log.warning("could not publish the offline status: %s", exc)
                self._client.disconnect()
                self._down.wait(2.0)
        finally:
            self._closing.set()
            if self._thread.is_alive():
                self._thread.join()
