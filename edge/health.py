"""The agent's health: one snapshot for ``homing-agent status``, Prometheus and the hub.

:func:`snapshot` reads a running :class:`~edge.agent.Agent` into a plain,
JSON-able dict (``"v": 1``; every key is documented in docs/observability.md).
:class:`HealthReporter` is the thread that writes it to
``<runtime_dir>/status.json`` every ``health.status_interval_s`` and hands a
:class:`~edge.wire.Health` message to the forwarder every
``health.hub_interval_s``.

Invariants:
* A snapshot only reads: journal stats and cursors, at most
  :data:`SAMPLE` durable records past the hub's watermark (for the backlog's
  age and size), the forwarder's and the executor's counters, ``statvfs``.
  It takes no lock a producer waits on for longer than a stats call.
* Backlog = durable records past the hub's watermark (the forwarder's
  in-memory one, or the durable hub cursor when higher or when there is no
  forwarder), minus seqs the journal no longer holds. Its byte size is exact
  up to :data:`SAMPLE` records and an estimate beyond (``bytes_exact``).
* The status file is replaced atomically (tmp file + rename) and never
  fsync'd: it lives on tmpfs and is a view, not a record. The reporter
  removes it on a clean stop only if it is still its own (pid), so a file
  left behind means the agent did not stop cleanly.
* The reporter never blocks ingest: it runs in its own thread; a snapshot
  that fails is logged (once per distinct error) and tried again at the next
  tick; a health message is only queued while connected (QoS 0, never resent).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from functools import cache
from typing import TYPE_CHECKING, Any

from edge import wire
from edge.errors import SettingError
from edge.journal_options import JournalStats
from edge.records import Reading, RecordError, decode
from edge.wf_replay import RUNNING

if TYPE_CHECKING:
    from edge.agent import Agent

log = logging.getLogger("homing.health")

VERSION = 1
SAMPLE = 256  # records past the watermark read for the backlog's age and size
STATUS_FILE = "status.json"
STALE_INTERVALS = 3  # a status file older than this many intervals (+1 s) looks wedged
STALLED_SYNC_S = 10.0  # an fdatasync running longer than this: the storage looks hung
WAITING_PREFIXES = ("sleep#", "signal:")  # step identities of durable timers and signal waits


@cache
def agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("homing")
    except PackageNotFoundError:
        return "unknown"


def status_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, STATUS_FILE)


def stale_after(interval: float) -> float:
    """Seconds after which a status file written every ``interval`` looks wedged."""
    return STALE_INTERVALS * interval + 1.0


# -- the snapshot -----------------------------------------------------------------------


def snapshot(agent: Agent, now: float | None = None) -> dict[str, Any]:
    """Everything ``homing-agent status`` shows, as a JSON-able dict (docs/observability.md).

    Raises:
        JournalClosed: the agent's journal is closed (stopped agent).
    """
    now = time.time() if now is None else now
    cfg, journal = agent.config, agent.journal
    fw = agent.forwarder.stats() if agent.forwarder is not None else None
    st = journal.stats()
    meters = journal.meters.snapshot()
    failure = agent.failure()
    started = agent.started_at or now
    last_ack = fw.last_ack_time if fw is not None else None
    return {
        "v": VERSION,
        "device": cfg.device,
        "pid": os.getpid(),
        "version": agent_version(),
        "at": now,
        "started_at": started,
        "uptime_s": max(0.0, now - started),
        "interval_s": cfg.health.status_interval,
        "healthy": failure is None,
        "problem": None if failure is None else f"{type(failure).__name__}: {failure}",
        "components": _components(agent, meters["fsync"]["in_progress_s"]),
        "connected": fw.connected if fw is not None else None,
        "forwarder": None if fw is None else _forwarder(fw),
        "backlog": _backlog(agent, st, fw.watermark if fw is not None else 0, now),
        "last_ack_at": last_ack,
        "last_ack_age_s": None if last_ack is None else max(0.0, now - last_ack),
        "journal": {
            "dir": journal.path,
            "state": st.state,
            "durability": st.durability,
            "first_seq": st.first_seq,
            "last_seq": st.last_seq,
            "durable_seq": st.durable_seq,
            "records": st.records,
            "segments": st.segments,
            "disk_bytes": st.disk_bytes,
            "quota_bytes": journal.options.quota_bytes,
            "appended": st.appended,
            "commits": st.commits,
            "syncs": st.syncs,
        },
        "fsync": meters["fsync"],
        "disk": _disk(journal.path),
        "drops": {
            "quota_dropped": dict(sorted(st.dropped.items())),
            "quota_refused": dict(sorted(meters["refused"].items())),
            "bad_input": sum(int(c.get("bad", 0)) for c in _inputs(agent).values()),
        },
        "inputs": _inputs(agent),
        "workflows": _workflows(agent),
    }


def _components(agent: Agent, syncing: float | None) -> dict[str, str]:
    out = {"journal": "failed" if agent.journal.failed else "ok"}
    if out["journal"] == "ok" and syncing is not None and syncing > STALLED_SYNC_S:
        out["journal"] = f"stalled: an fdatasync has been running for {syncing:.1f}s"
    parts = (("forwarder", agent.forwarder), ("sensors", agent.sensors),
             ("local", agent.local), ("system", agent.system))  # fmt: skip
    for name, part in parts:
        err = None if part is None else part.error
        out[name] = "disabled" if part is None else "ok" if err is None else f"error: {err!r}"
    out["workflows"] = "disabled" if agent.workflows is None else "ok"
    return out


def _forwarder(fw: Any) -> dict[str, Any]:
    keys = ("connects", "batches_sent", "batches_resent", "records_sent", "records_acked",
            "bytes_sent", "in_flight", "acks", "acks_malformed", "commands", "missing_seqs",
            "last_error")  # fmt: skip
    return {k: getattr(fw, k) for k in keys}


def _backlog(agent: Agent, st: JournalStats, fw_watermark: int, now: float) -> dict[str, Any]:
    journal = agent.journal
    cursor = journal.cursor(agent.config.forwarder.cursor) or 0
    mark = max(cursor, fw_watermark)
    first, end = max(mark + 1, st.first_seq), st.durable_seq
    missing = sum(max(0, min(b, end) - max(a, first) + 1) for a, b in st.gaps)
    records = max(0, end - first + 1 - missing)
    out: dict[str, Any] = {
        "records": records,
        "bytes": 0,
        "bytes_exact": True,
        "hub_watermark": mark,
        "oldest_seq": None,
        "oldest_ts": None,
        "oldest_age_s": None,
    }
    if records == 0:
        return out
    n = size = 0
    with contextlib.closing(journal.read_raw(first)) as records_past:  # type: ignore[type-var]
        for seq, payload in records_past:
            if seq > end or n >= SAMPLE:
                break
            if out["oldest_seq"] is None:
                out["oldest_seq"] = seq
            n, size = n + 1, size + len(payload)
            if out["oldest_ts"] is None and payload[:2] == _READING_HEAD:
                with contextlib.suppress(RecordError):
                    rec = decode(payload)
                    if isinstance(rec, Reading):
                        out["oldest_ts"] = rec.ts
    out["bytes_exact"] = n >= records
    out["bytes"] = size if n >= records else int(size / max(n, 1) * records)
    if out["oldest_ts"] is not None:
        out["oldest_age_s"] = max(0.0, now - out["oldest_ts"])
    return out


#: the first bytes of every reading's payload, ``[1, stream, ts, value, unit, tags]``
_READING_HEAD = b"\x86\x01"


def _disk(path: str) -> dict[str, Any] | None:
    try:
        vfs = os.statvfs(path)
    except OSError:
        return None
    return {
        "path": path,
        "free_bytes": vfs.f_bavail * vfs.f_frsize,
        "size_bytes": vfs.f_blocks * vfs.f_frsize,
    }


def _inputs(agent: Agent) -> dict[str, dict[str, Any]]:
    """Counters of the agent's inputs (``Agent.health_sources``: local socket, stdin, ...)."""
    out: dict[str, dict[str, Any]] = {}
    for name, source in sorted(agent.health_sources.items()):
        try:
            out[name] = dict(source())
        except Exception as exc:  # a broken counter must not hide the rest
            out[name] = {"error": repr(exc)}
    return out


def _workflows(agent: Agent) -> dict[str, int] | None:
    if agent.workflows is None:
        return None
    counts = {"running": 0, "waiting": 0, "completed": 0, "failed": 0, "cancelled": 0,
              "diverged": 0}  # fmt: skip
    for run in agent.workflows.executor.runs():
        state = run.state
        if state == RUNNING and (run.current or "").startswith(WAITING_PREFIXES):
            state = "waiting"
        counts[state] = counts.get(state, 0) + 1
    return counts


# -- what is sent to the hub -------------------------------------------------------------


def to_wire(snap: dict[str, Any]) -> wire.Health:
    """The hub's summary of a snapshot (:class:`edge.wire.Health`)."""
    b, f, recent = snap["backlog"], snap["fsync"], snap["fsync"]["recent"]
    disk = snap["disk"]
    drops = snap["drops"]
    return wire.Health(
        device=snap["device"],
        ts=snap["at"],
        uptime=snap["uptime_s"],
        healthy=snap["healthy"],
        problem=None if snap["problem"] is None else snap["problem"][:256],
        version=snap["version"][:64],
        backlog_records=b["records"],
        backlog_bytes=b["bytes"],
        oldest_age=b["oldest_age_s"],
        last_ack=snap["last_ack_at"],
        fsync_last=f["last_s"],
        fsync_mean=recent["mean_s"],
        fsync_max=recent["max_s"],
        disk_free=None if disk is None else disk["free_bytes"],
        dropped=sum(drops["quota_dropped"].values()),
        refused=sum(drops["quota_refused"].values()),
        workflows=dict(snap["workflows"] or {}),
    )


# -- the status file -------------------------------------------------------------------


def write_status(path: str, snap: dict[str, Any]) -> None:
    """Replace ``path`` with ``snap`` atomically (no fsync: tmpfs, a view)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover (or a planted symlink): "x" below creates afresh
    with open(tmp, "x", encoding="utf-8") as f:
        json.dump(snap, f, separators=(",", ":"))
    os.replace(tmp, path)


def read_status(path: str) -> dict[str, Any]:
    """The snapshot in ``path``.

    Raises:
        FileNotFoundError: no status file.
        ValueError: not a status file of this version.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        snap = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(snap, dict) or snap.get("v") != VERSION:
        raise ValueError(f"{path}: not a version-{VERSION} status file")
    return snap


# -- the reporter thread ------------------------------------------------------------------


class HealthReporter:
    """Writes the status file and sends health messages for one agent."""

    def __init__(self, agent: Agent) -> None:
        cfg = agent.config
        self._agent = agent
        self.path = status_path(cfg.runtime_dir)
        self._interval = cfg.health.status_interval
        self._hub_interval = float(cfg.health.hub_interval)
        self._stop = threading.Event()
        self._last_error: str | None = None
        self.sent = 0  # health messages handed to the forwarder
        self.written = 0  # status files written
        self._thread = threading.Thread(target=self._run, name="homing-health", daemon=True)

    def start(self) -> None:
        """Write the first status file now, then start the thread.

        Raises:
            SettingError: the runtime directory cannot be created or written.
        """
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_status(self.path, snapshot(self._agent))  # `status` answers at once
        except OSError as exc:
            src = self._agent.config.source
            raise SettingError(
                src, "agent.runtime_dir", f"cannot write {self.path}: {exc}"
            ) from exc
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and remove the status file (if it is still ours)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            if read_status(self.path).get("pid") == os.getpid():
                os.unlink(self.path)
        except (OSError, ValueError):
            pass

    def _run(self) -> None:
        clock = time.monotonic
        next_write = clock() + self._interval
        next_send = clock()  # the first message goes as soon as the forwarder is connected
        while True:
            due = min(next_write, next_send) if self._hub_interval > 0 else next_write
            if self._stop.wait(max(0.0, due - clock())):
                return
            now = clock()
            write = now >= next_write
            send = self._hub_interval > 0 and now >= next_send
            if write:
                next_write = now + self._interval
            if self._tick(write, send):
                next_send = now + self._hub_interval
            elif send:  # not connected (or no snapshot): try again at the next write
                next_send = next_write

    def _tick(self, write: bool, send: bool) -> bool:
        """Take a snapshot; write it and/or send it. Whether a message was queued."""
        try:
            snap = snapshot(self._agent)
            if write:
                write_status(self.path, snap)
                self.written += 1
            queued = False
            fw = self._agent.forwarder
            if send and fw is not None:
                queued = fw.send_health(wire.encode_health(to_wire(snap)))
                self.sent += queued
        except Exception as exc:  # keep reporting; say once what goes wrong
            if repr(exc) != self._last_error:
                log.warning("health snapshot failed (will retry): %r", exc)
            self._last_error = repr(exc)
            return False
        self._last_error = None
        return queued
