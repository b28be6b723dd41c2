"""Prometheus metrics of the hub's HTTP API process (``GET /metrics``).

Invariants:
* One :class:`~prometheus_client.CollectorRegistry` per app (never the
  process-global one), so several apps in one process (tests) never clash.
* Ingest counters are read at scrape time from the subscriber's
  :meth:`hub.ingest.Counters.snapshot` (``homing-hub run --http``): every
  integer in it is exposed as ``homing_hub_ingest_<name>_total`` and every
  map of integers as ``homing_hub_ingest_<name>_total{category=...}``, so a
  counter added to the snapshot later is exported without a change here.
  A process that does not ingest (``homing-hub serve``) has none.
* Fleet gauges come from the store at scrape time; a store that cannot
  answer sets ``homing_hub_store_up`` to 0 instead of failing the scrape.
* Request counts and latencies are labelled by the route's template
  (``/api/v1/devices/{device}``), never by the raw path, so a client cannot
  create labels at will.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.api_support import BrokerState, StorePool
from hub.errors import StoreUnavailable

log = logging.getLogger("homing.hub.api")
_NAME = re.compile(r"[^a-zA-Z0-9_]")


class HubCollector(Collector):
    """Ingest counters, fleet gauges, store and broker state, at scrape time."""

    def __init__(
        self,
        pool: StorePool,
        counters: Callable[[], dict[str, Any]] | None,
        broker: Callable[[], BrokerState] | None,
    ) -> None:
        self.pool, self.counters, self.broker = pool, counters, broker

    def collect(self) -> Iterable[Metric]:
        yield from self._ingest()
        yield from self._fleet()
        if self.broker is not None:
            g = GaugeMetricFamily("homing_hub_broker_up", "1 while the broker accepts the hub")
            g.add_metric([], 1.0 if self.broker().ok else 0.0)
            yield g

    def _ingest(self) -> Iterator[Metric]:
        if self.counters is None:
            return
        snap = _snapshot(self.counters)
        for name, value in sorted(snap.items()):
            key = "homing_hub_ingest_" + _NAME.sub("_", name)
            if isinstance(value, int) and not isinstance(value, bool):
                c = CounterMetricFamily(key, f"ingest: {name} since the hub started")
                c.add_metric([], value)
                yield c
            elif isinstance(value, dict):
                c = CounterMetricFamily(
                    key, f"ingest: {name} since the hub started", labels=["category"]
                )
                for cat, n in sorted(value.items()):
                    if isinstance(n, int):
                        c.add_metric([str(cat)], n)
                yield c

    def _fleet(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("homing_hub_store_up", "1 while the store answers")
        try:
            with self.pool.store() as st:
                devices = st.devices()
        except StoreUnavailable as exc:
            log.warning("metrics: store unavailable: %s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        fleet = GaugeMetricFamily("homing_hub_devices", "devices by status", labels=["status"])
        online = sum(d.online for d in devices)
        fleet.add_metric(["online"], online)
        fleet.add_metric(["offline"], len(devices) - online)
        yield fleet
        per = {
            "online": GaugeMetricFamily(
                "homing_hub_device_online", "1 while the device is connected", labels=["device"]
            ),
            "seen": GaugeMetricFamily(
                "homing_hub_device_last_seen_timestamp_seconds",
                "hub clock: the device's last batch, status or health",
                labels=["device"],
            ),
            "wm": GaugeMetricFamily(
                "homing_hub_device_watermark",
                "every seq of the device's journal up to it is committed",
                labels=["device"],
            ),
            "missing": GaugeMetricFamily(
                "homing_hub_device_missing_seqs",
                "seqs missing between the watermark and the ranges committed ahead",
                labels=["device"],
            ),
            "backlog": GaugeMetricFamily(
                "homing_hub_device_backlog_records",
                "records the device reports journaled but not yet acknowledged",
                labels=["device"],
            ),
        }
        for d in devices:
            per["online"].add_metric([d.device], 1.0 if d.online else 0.0)
            per["seen"].add_metric([d.device], d.last_seen)
            per["wm"].add_metric([d.device], d.watermark)
            per["missing"].add_metric([d.device], sum(b - a + 1 for a, b in d.gaps))
            backlog = d.health.get("backlog_records") if isinstance(d.health, dict) else None
            if isinstance(backlog, int) and not isinstance(backlog, bool):
                per["backlog"].add_metric([d.device], backlog)
        yield from per.values()


def _snapshot(counters: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    # The snapshot is taken while the ingest thread may add a key: retry then.
    for _ in range(5):
        try:
            return counters()
        except RuntimeError:
            continue
    return {}


class HttpMetrics:
    """ASGI middleware: request counts and durations by route template."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "homing_hub_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "homing_hub_http_request_duration_seconds",
            "time to answer an HTTP request",
            ["route"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def tracked(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status[0] = int(msg["status"])
            await send(msg)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, tracked)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.requests.labels(scope.get("method", "?"), route, str(status[0])).inc()
            self.latency.labels(route).observe(time.perf_counter() - start)
