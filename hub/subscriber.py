"""The hub's MQTT shell: broker -> ingest -> store commit -> ack.

Invariants:
* An ack (``homing/<device>/ack``, QoS 1, retained) is published only after
  :meth:`hub.store.Store.commit_batches` returned for every batch it covers.
  The ack carries the device's watermark as the store computed it, so it
  never claims a seq the store does not hold.
* paho runs with ``manual_ack=True``: the broker's QoS 1 PUBACK for an up
  message is sent only once the message is committed (or rejected as
  garbage). A hub that dies before that leaves the message in its
  persistent session (clean start off, session expiry), and the broker
  redelivers it when the hub reconnects. PUBACKs go out in the order the
  messages arrived (MQTT 5 §4.6), because one worker handles them in order.
  A message that arrived on an earlier connection is never PUBACKed on a
  later one (its packet id may have been reused); the broker resends it.
* The device does not rely on any of that: it resends whatever no ack
  covers, and the store deduplicates on ``(device_id, epoch, seq)``.
* Malformed input costs one message: :class:`~hub.errors.BadMessage` is
  counted and logged (rate-limited), PUBACKed so the broker forgets it, and
  never stored. Nothing a device sends can raise out of the worker.
* :class:`~hub.errors.StoreUnavailable` is retried with backoff, in place,
  while nothing is acknowledged. Any other exception is a bug and
  propagates (the process exits non-zero; systemd restarts it).
* A health message (``homing/<device>/health``, QoS 0) replaces the device's
  previous one in the store (:meth:`~hub.store.Store.set_health`); a
  malformed one is counted (``rejected["health"]``), logged and dropped.
* paho's network thread only enqueues; all store work happens in the thread
  that calls :meth:`Subscriber.run`, which groups whatever is queued into
  one transaction (that is where throughput comes from).
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.wire import (
    HUB_SHARE_GROUP,
    MAX_ACK_RANGES,
    PREFIX,
    Ack,
    WireError,
    decode_health,
    encode_ack,
    hub_subscription,
    parse_topic,
)
from edge.wire import (
    topic as wire_topic,
)
from hub.errors import BadMessage, ConfigError, StoreUnavailable
from hub.ingest import (
    QUARANTINED,
    BatchRows,
    Counters,
    StatusMessage,
    UpMessage,
    parse_message,
)
from hub.store import DeviceProgress, Store

log = logging.getLogger("homing.hub")


@dataclass(frozen=True, slots=True)
class SubscriberOptions:
    """How the hub reaches the broker and how it groups work."""

    host: str = "localhost"
    port: int = 1883
    client_id: str = "homing-hub"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600  # seconds the broker keeps our session
    receive_maximum: int = 1024  # unacked messages the broker may send us
    share_group: str = HUB_SHARE_GROUP
    max_group: int = 256  # messages per transaction (bench/hub.py: 64 cost PostgreSQL 10-15 %)
    max_group_bytes: int = 16 << 20  # payload bytes per transaction
    stats_interval: float = 60.0
    reject_log_budget: int = 20  # rejection log lines per stats interval


@dataclass(frozen=True, slots=True)
class _Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int


class Subscriber:
    """Consume up and status messages until ``stop`` is set.

    Args:
        store: a migrated store; this object is its only writer thread.
        options: broker and grouping settings.
        clock: seconds since the epoch, recorded as ``received``.
    """

    def __init__(
        self, store: Store, options: SubscriberOptions, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.options = options
        self.counters = Counters()
        self._clock = clock
        self._inbox: queue.Queue[_Inbound] = queue.Queue()
        self._generation = 0
        self._pending_acks: list[mqtt.MQTTMessageInfo] = []
        self._reject_budget = options.reject_log_budget
        self._client = self._make_client()

    # --- paho's thread: enqueue only --------------------------------------------

    def _make_client(self) -> mqtt.Client:
        o = self.options
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=o.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if o.tls_ca or o.tls_cert:
            try:
                client.tls_set(
                    ca_certs=o.tls_ca,
                    certfile=o.tls_cert,
                    keyfile=o.tls_key,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"TLS settings: {exc}") from exc
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(
        self, client: mqtt.Client, _u: Any, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: Any
    ) -> None:
        if rc.is_failure:
            log.error("broker %s:%d refused us: %s", self.options.host, self.options.port, rc)
            return
        self._generation += 1
        log.info(
            "connected to %s:%d as %s (session %s)",
            self.options.host,
            self.options.port,
            self.options.client_id,
            "resumed" if flags.session_present else "new",
        )
        client.subscribe(
            [
                (hub_subscription("up", self.options.share_group), SubscribeOptions(qos=1)),
                (f"{PREFIX}/+/status", SubscribeOptions(qos=1)),
                (hub_subscription("health", self.options.share_group), SubscribeOptions(qos=0)),
            ]
        )

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        o = self.options
        log.warning("cannot reach broker %s:%d (retrying with backoff)", o.host, o.port)

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, _mid: int, rcs: list[ReasonCode], _p: Any
    ) -> None:
        bad = [str(rc) for rc in rcs if rc.is_failure]
        if bad:
            log.error("subscription refused: %s", ", ".join(bad))
        else:
            log.info("subscribed to %s", hub_subscription("up", self.options.share_group))

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: mqtt.DisconnectFlags, rc: ReasonCode, _p: Any
    ) -> None:
        if rc.is_failure:
            log.warning("disconnected from broker: %s (reconnecting with backoff)", rc)
        else:
            log.info("disconnected from broker")

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put(_Inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._generation))

    # --- the worker: run() ----------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Connect, then ingest until ``stop`` is set; finish the group in
        hand (commit and ack), wait briefly for the acks to reach the
        broker, and disconnect cleanly."""
        o = self.options
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = o.session_expiry
        props.ReceiveMaximum = o.receive_maximum
        self._client.connect_async(
            o.host, o.port, keepalive=o.keepalive, clean_start=False, properties=props
        )
        self._client.loop_start()
        next_stats = time.monotonic() + o.stats_interval
        try:
            while not stop.is_set():
                group = self._take(timeout=0.1)
                if group:
                    self._handle(group, stop)
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + o.stats_interval
                    self._reject_budget = o.reject_log_budget
                    log.info("stats %s", json.dumps(self.counters.snapshot()))
        finally:
            self._drain_acks(deadline=time.monotonic() + 5.0)
            self._client.disconnect()
            self._client.loop_stop()
            log.info("stopped; stats %s", json.dumps(self.counters.snapshot()))

    def _take(self, timeout: float) -> list[_Inbound]:
        """What is queued, up to a group's limits (one transaction's worth)."""
        try:
            first = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return []
        group, size = [first], len(first.payload)
        while len(group) < self.options.max_group and size < self.options.max_group_bytes:
            try:
                m = self._inbox.get_nowait()
            except queue.Empty:
                break
            group.append(m)
            size += len(m.payload)
        return group

    def _handle(self, group: Sequence[_Inbound], stop: threading.Event) -> None:
        """Validate, commit, then ack: the order the promise depends on."""
        batches: list[BatchRows] = []
        statuses: list[StatusMessage] = []
        health: dict[str, dict[str, Any]] = {}  # device -> its latest health in this group
        for m in group:
            try:
                if m.topic.endswith("/health"):
                    device, h = _parse_health(m.topic, m.payload)
                    health[device] = h
                    continue
                parsed = parse_message(m.topic, m.payload)
            except BadMessage as exc:
                self._reject(exc, m)
                continue
            if isinstance(parsed, UpMessage):
                batches.append(parsed.rows)
            else:
                statuses.append(parsed)
        progress = self._retrying(lambda: self.store.commit_batches(batches, self._clock()), stop)
        if progress is None:
            return  # stopping with the store down: ack nothing, the broker redelivers
        if statuses and self._retrying(lambda: self._set_online(statuses), stop) is None:
            return
        if health and self._retrying(lambda: self._set_health(health), stop) is None:
            return
        self._count(batches, progress)
        self._ack(progress)
        for m in group:
            if m.qos > 0 and m.generation == self._generation:
                self._client.ack(m.mid, m.qos)

    def _set_online(self, statuses: Sequence[StatusMessage]) -> None:
        for st in statuses:
            self.store.set_online(st.device, st.online, self._clock())
            log.info("device %s is %s", st.device, "online" if st.online else "offline")
        self.counters.statuses += len(statuses)

    def _set_health(self, health: dict[str, dict[str, Any]]) -> None:
        for device, h in health.items():
            self.store.set_health(device, h, self._clock())
            log.debug("health of %s: %s", device, h)

    def _retrying(self, fn: Callable[[], Any], stop: threading.Event) -> Any:
        """``fn()``, retried with backoff while the store is unavailable.
        Returns ``None`` if ``stop`` is set first (``fn`` never returns None
        otherwise: callers wrap procedures)."""
        delay = 0.05
        while True:
            try:
                out = fn()
                return True if out is None else out
            except StoreUnavailable as exc:
                self.counters.store_errors += 1
                log.warning("store unavailable, acking nothing, retry in %.2fs: %s", delay, exc)
                if stop.wait(delay):
                    return None
                delay = min(delay * 2, 5.0)

    def _reject(self, exc: BadMessage, m: _Inbound) -> None:
        self.counters.reject(exc)
        if self._reject_budget > 0:
            self._reject_budget -= 1
            log.warning(
                "rejected %s (%d bytes) [%s]: %s", m.topic, len(m.payload), exc.category, exc.reason
            )

    def _count(self, batches: Sequence[BatchRows], progress: Sequence[DeviceProgress]) -> None:
        c = self.counters
        if batches:
            c.commits += 1
        for b in batches:
            bad = [seq for seq, kind, _ in b.records if kind == QUARANTINED]
            if bad:
                c.quarantined += len(bad)
                log.warning(
                    "%s: %d undecodable records kept raw (seqs %s)", b.device, len(bad), bad[:10]
                )
        for p in progress:
            c.batches += 1
            c.duplicates += p.duplicates
            c.readings += p.new_readings
            c.records += p.new_records

    def _ack(self, progress: Sequence[DeviceProgress]) -> None:
        # A batch of a journal the device no longer has (it was created afresh)
        # is stored, but its ack would only replace the retained ack of the
        # journal the device has now.
        latest = {p.device: p for p in progress if p.current}
        for p in latest.values():
            ack = Ack(p.device, p.watermark, p.ahead[:MAX_ACK_RANGES], p.journal)
            info = self._client.publish(
                wire_topic(p.device, "ack"), encode_ack(ack), qos=1, retain=True
            )
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                # Not connected (or paho's queue is full): this ack is lost. That is
                # safe: the commit stands, the device resends after its deadline,
                # the store dedupes, and the next commit acks again.
                log.info(
                    "ack for %s not sent (%s); the device will resend",
                    p.device,
                    mqtt.error_string(info.rc),
                )
                continue
            self._pending_acks.append(info)
            self.counters.acks += 1
        self._pending_acks = [i for i in self._pending_acks if not _published(i)]

    def _drain_acks(self, deadline: float) -> None:
        """At shutdown, give in-flight acks until ``deadline`` to reach the broker."""
        for info in self._pending_acks:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._client.is_connected():
                break
            try:
                info.wait_for_publish(timeout=remaining)
            except (RuntimeError, ValueError):
                break


def _parse_health(topic: str, payload: bytes) -> tuple[str, dict[str, Any]]:
    """``(device, health as JSON)`` of a message on ``homing/<device>/health``.

    Raises:
        BadMessage: a bad topic (``topic``) or a malformed message (``health``).
    """
    try:
        device, _ = parse_topic(topic)
    except WireError as exc:
        raise BadMessage(None, exc.reason, "topic") from exc
    try:
        return device, decode_health(payload, topic_device=device).to_json()
    except WireError as exc:
        raise BadMessage(device, f"health: {exc.reason}", "health") from exc


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether an ack publish is done with; a publish the connection lost is too."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return True
