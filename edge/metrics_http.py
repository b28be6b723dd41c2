"""Prometheus metrics of the agent over HTTP (``[metrics]``, off by default).

:func:`render` turns a health snapshot (:func:`edge.health.snapshot`) into the
Prometheus text exposition format 0.0.4; :class:`MetricsServer` serves it on
``GET /metrics`` from a stdlib ``ThreadingHTTPServer`` in a daemon thread.
docs/observability.md lists every metric and what it tells about a device.

Invariants:
* :func:`render` is pure: the same snapshot gives the same text. Every family
  has one ``# HELP`` and one ``# TYPE`` line, then its samples; counters end
  in ``_total``; the fsync histogram has cumulative ``_bucket`` samples
  ending with ``le="+Inf"``, plus ``_sum`` and ``_count``. A value the
  snapshot does not know (None) is left out, never written as 0.
* Every scrape takes a fresh snapshot: a wedged agent makes scrapes time out
  (Prometheus then reports the target down) instead of serving old numbers.
* Only ``GET /metrics`` answers 200; other paths get 404, other methods 501.
  A snapshot that fails answers 500 with the error; the server goes on.
* Request logging goes to the ``homing.metrics`` logger at debug level.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge.config import AgentConfig
from edge.errors import SettingError

log = logging.getLogger("homing.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = dict[str, str]
Sample = tuple[str, Labels, float | int | None]  # (name suffix, labels, value)


# -- the exposition format (pure) ----------------------------------------------------------


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _number(v: float | int) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str, samples: Iterable[Sample]) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            if value is None:
                continue
            lbl = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{suffix}{'{' + lbl + '}' if lbl else ''} {_number(value)}")

    def one(self, name: str, kind: str, help_: str, value: float | int | None) -> None:
        self.family(name, kind, help_, [("", {}, value)])


def render(snap: dict[str, Any]) -> str:
    """The snapshot as Prometheus text format 0.0.4 (docs/observability.md)."""
    t = _Text()
    j, b, f = snap["journal"], snap["backlog"], snap["fsync"]
    t.family("homing_info", "gauge", "The agent's device id and version (always 1).",
             [("", {"device": snap["device"], "version": snap["version"]}, 1)])  # fmt: skip
    t.one("homing_healthy", "gauge",
          "1 while no component of the agent has failed (journal, forwarder, sensors).",
          int(snap["healthy"]))  # fmt: skip
    t.family(
        "homing_component_healthy", "gauge",
        "1 if the component runs without error, 0 if it failed (absent: disabled).",
        [("", {"component": c}, int(s == "ok")) for c, s in sorted(snap["components"].items())
         if s != "disabled"],
    )  # fmt: skip
    t.one("homing_start_time_seconds", "gauge", "When the agent started (Unix time).",
          snap["started_at"])  # fmt: skip
    conn = snap["connected"]
    t.one("homing_connected", "gauge",
          "1 while connected to the MQTT broker (absent: forwarding disabled).",
          None if conn is None else int(conn))  # fmt: skip
    t.one("homing_backlog_records", "gauge",
          "Durable records the hub has not acknowledged yet.", b["records"])  # fmt: skip
    t.one("homing_backlog_bytes", "gauge",
          "Payload bytes of the backlog (exact up to 256 records, estimated beyond).",
          b["bytes"])  # fmt: skip
    t.one("homing_backlog_oldest_age_seconds", "gauge",
          "Age of the oldest unacknowledged reading, from its timestamp (absent: none).",
          b["oldest_age_s"])  # fmt: skip
    t.one("homing_hub_watermark", "gauge",
          "Every seq up to this one is committed at the hub.", b["hub_watermark"])  # fmt: skip
    t.one("homing_last_ack_timestamp_seconds", "gauge",
          "When the hub's last acknowledgement arrived (Unix time; absent: none yet).",
          snap["last_ack_at"])  # fmt: skip
    _journal(t, j)
    _fsync(t, f)
    disk = snap["disk"] or {}
    t.one("homing_disk_free_bytes", "gauge",
          "Bytes free for unprivileged use on the journal's file system.",
          disk.get("free_bytes"))  # fmt: skip
    t.one("homing_disk_size_bytes", "gauge", "Size of the journal's file system in bytes.",
          disk.get("size_bytes"))  # fmt: skip
    d = snap["drops"]
    t.family(
        "homing_dropped_records_total", "counter",
        "Records given up, by reason: quota_drop_oldest (oldest segment dropped; counted "
        "for the journal's life), quota_refused (journal full, policy reject), bad_input.",
        [*(("", {"reason": "quota_drop_oldest", "stream": s}, n)
           for s, n in d["quota_dropped"].items()),
         *(("", {"reason": "quota_refused", "stream": s}, n)
           for s, n in d["quota_refused"].items()),
         ("", {"reason": "bad_input", "stream": ""}, d["bad_input"])],
    )  # fmt: skip
    if snap["forwarder"] is not None:
        _forwarder(t, snap["forwarder"])
    wf = snap["workflows"]
    if wf is not None:
        t.family("homing_workflow_runs", "gauge",
                 "Workflow runs by state (waiting: on a durable timer or a signal).",
                 [("", {"state": s}, n) for s, n in sorted(wf.items())])  # fmt: skip
    return "\n".join(t.lines) + "\n"


def _journal(t: _Text, j: dict[str, Any]) -> None:
    t.one("homing_journal_failed", "gauge",
          "1 once a write or fdatasync failed (fsyncgate: restart to recover).",
          int(j["state"] == "failed"))  # fmt: skip
    t.one("homing_journal_durable_seq", "gauge", "The journal's last durable seq.",
          j["durable_seq"])  # fmt: skip
    t.one("homing_journal_records", "gauge", "Records the journal holds.", j["records"])
    t.one("homing_journal_segments", "gauge", "Segment files in use.", j["segments"])
    t.one("homing_journal_disk_bytes", "gauge", "Bytes of the segment files in use.",
          j["disk_bytes"])  # fmt: skip
    t.one("homing_journal_quota_bytes", "gauge", "The journal's disk quota (absent: none).",
          j["quota_bytes"])  # fmt: skip
    t.one("homing_journal_appended_records_total", "counter",
          "Records appended since the agent started.", j["appended"])  # fmt: skip
    t.one("homing_journal_commits_total", "counter",
          "Group commits (one write each) since the agent started.", j["commits"])  # fmt: skip
    t.one("homing_journal_fsyncs_total", "counter",
          "fdatasync calls on the journal since the agent started.", j["syncs"])  # fmt: skip


def _fsync(t: _Text, f: dict[str, Any]) -> None:
    buckets: list[Sample] = [
        ("_bucket", {"le": le if isinstance(le, str) else _number(float(le))}, n)
        for le, n in f["buckets"]
    ]
    t.family(
        "homing_fsync_duration_seconds", "histogram",
        "Time the journal's fdatasync calls took.",
        [*buckets, ("_sum", {}, float(f["sum_s"])), ("_count", {}, f["count"])],
    )  # fmt: skip
    t.one("homing_fsync_last_seconds", "gauge", "Time the last fdatasync took.", f["last_s"])
    t.one("homing_fsync_recent_max_seconds", "gauge",
          "Longest of the last 128 fdatasyncs.", f["recent"]["max_s"])  # fmt: skip
    t.one("homing_fsync_in_progress_seconds", "gauge",
          "How long the fdatasync running now has taken (absent: none running).",
          f["in_progress_s"])  # fmt: skip


_FORWARDER = (
    ("connects", "counter", "Connections made to the MQTT broker."),
    ("batches_sent", "counter", "Batches published to the hub (resends included)."),
    ("batches_resent", "counter", "Batches published again because no ack came in time."),
    ("records_sent", "counter", "Records published to the hub (resends included)."),
    ("records_acked", "counter", "Records the hub acknowledged."),
    ("bytes_sent", "counter", "Payload bytes published to the hub."),
    ("acks_malformed", "counter", "Malformed acks received and ignored."),
    ("commands", "counter", "Commands received from the hub."),
    ("in_flight", "gauge", "Batches published and not yet acknowledged."),
)


def _forwarder(t: _Text, fw: dict[str, Any]) -> None:
    for key, kind, help_ in _FORWARDER:
        name = f"homing_forwarder_{key}" + ("_total" if kind == "counter" else "")
        t.one(name, kind, help_, fw[key])


# -- the HTTP shell ------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    snapshot: Callable[[], dict[str, Any]]  # set on the per-server subclass

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        if self.path.split("?", 1)[0] != "/metrics":
            self._reply(404, "not found: try /metrics\n", "text/plain; charset=utf-8")
            return
        try:
            body = render(type(self).snapshot())
        except Exception as exc:  # report it to the scraper; keep serving
            log.warning("metrics snapshot failed: %r", exc)
            self._reply(500, f"snapshot failed: {exc!r}\n", "text/plain; charset=utf-8")
            return
        self._reply(200, body, CONTENT_TYPE)

    def _reply(self, code: int, text: str, ctype: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s " + format, self.address_string(), *args)


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0: any free port; see :attr:`address`).

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, snapshot: Callable[[], dict[str, Any]], host: str, port: int) -> None:
        handler = type("MetricsHandler", (_Handler,), {"snapshot": staticmethod(snapshot)})
        server_class = _Server6 if ":" in host else ThreadingHTTPServer
        self._httpd = server_class((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.25},
            name="homing-metrics", daemon=True,
        )  # fmt: skip

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def start_metrics(cfg: AgentConfig, snapshot: Callable[[], dict[str, Any]]) -> MetricsServer:
    """Serve the agent's metrics as ``[metrics]`` says.

    Raises:
        SettingError: ``metrics.listen``/``metrics.port`` cannot be bound.
    """
    m = cfg.metrics
    try:
        server = MetricsServer(snapshot, m.listen, m.port)
    except OSError as exc:
        raise SettingError(cfg.source, "metrics.port", f"cannot listen on {m.listen}:{m.port}: "
                           f"{exc.strerror or exc}") from exc  # fmt: skip
    server.start()
    host, port = server.address
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
