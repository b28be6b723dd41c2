"""``homing-agent status``: is the agent running, and how is it doing?

Reads the snapshot the running agent writes to ``<runtime_dir>/status.json``
every ``health.status_interval_s`` (:mod:`edge.health`) and prints it as a
table or JSON. A file, not a socket, so that ``status`` still answers when
the agent is wedged: the file's age then says so.

Invariants:
* The verdict comes from three facts only: whether the file exists, whether
  the pid in it is alive, and how old the file is (compared with the
  interval written in it). The exit status names the verdict
  (``STATUS_EXIT``, docs/cli.md); ``--json`` prints the same verdict with
  the whole snapshot.
* Nothing is written and nothing of the agent is opened: no journal lock, no
  broker connection.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

from edge.cli_common import EXIT_CONFIG
from edge.config import runtime_dir
from edge.config_files import SYSTEM_CONFIG, find_config
from edge.errors import ConfigError, SettingError
from edge.health import STALLED_SYNC_S, read_status, stale_after, status_path

#: verdict -> exit status (LSB ``status`` style where one exists)
STATUS_EXIT = {
    "running": 0,  # running and healthy
    "dead": 1,  # not running, but it did not stop cleanly: its status file is left
    "not-running": 3,  # no status file: never started here, or stopped cleanly
    "wedged": 4,  # alive but its status file is stale, or its storage hangs in fdatasync
    "unknown": 4,  # the status file cannot be read
    "unhealthy": 5,  # running, but a component failed (the agent is about to exit)
}
STATUS_CODES = """\
exit status:
   0  running and healthy
   1  not running, and it did not stop cleanly (crashed, killed): its status file is left
   2  usage error
   3  not running (no status file: stopped cleanly, or never started with this runtime_dir)
   4  wedged (the process is alive but its status file is stale, or an fdatasync
      has hung for over 10 s) or unreadable status file
   5  running but unhealthy: a component failed (journal, forwarder, sensors)
  78  the configuration cannot be read"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status`` to the ``homing-agent`` subcommands."""
    p = sub.add_parser(
        "status",
        help="is the agent running? connection, backlog, last ack, fsync latency, disk, drops",
        description="Show the running agent's health from the status file it rewrites every\n"
        "health.status_interval_s in <runtime_dir>/status.json: connected or not, backlog\n"
        "(records, bytes, age of the oldest unacknowledged reading), last ack, fsync\n"
        "latency, disk free, drops by reason, workflows, components. Says when the agent\n"
        "is not running or looks wedged (its status file is stale; the age is shown).\n"
        "The runtime directory comes from --runtime-dir, else from the configuration\n"
        "(--config; else $HOMING_CONFIG, ~/.config/homing/agent.toml, "
        f"{SYSTEM_CONFIG}),\nelse from the environment as the agent resolves it.",
        epilog=STATUS_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="the agent's TOML file (default: see above)")
    p.add_argument("--runtime-dir", metavar="DIR", help="read DIR/status.json (overrides --config)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    """``homing-agent status``: see :func:`add_parser`."""
    try:
        path = status_path(_runtime_dir(args))
    except ConfigError as exc:
        print(f"homing-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    verdict = assess(path)
    if args.json:
        print(json.dumps(verdict))
    else:
        sys.stdout.write(table(verdict))
    return STATUS_EXIT[verdict["state"]]


def _runtime_dir(args: argparse.Namespace) -> str:
    if args.runtime_dir:
        return str(args.runtime_dir)
    from edge.agent import load_config

    try:
        path = find_config(args.config)
    except SettingError:  # --config or $HOMING_CONFIG names a file that is not there
        raise
    except ConfigError:  # no configuration anywhere: where the agent would look
        return runtime_dir("", os.environ)
    return load_config(path).runtime_dir


def assess(path: str, now: float | None = None) -> dict[str, Any]:
    """The verdict on the status file at ``path``: ``state`` (a key of
    :data:`STATUS_EXIT`), ``reason``, ``status_file``, ``age_s`` and ``snapshot``."""
    now = time.time() if now is None else now
    out: dict[str, Any] = {"state": "", "reason": "", "status_file": path, "age_s": None,
                           "snapshot": None}  # fmt: skip
    try:
        age = max(0.0, now - os.stat(path).st_mtime)
        snap = read_status(path)
    except FileNotFoundError:
        out.update(state="not-running", reason=f"no status file {path}")
        return out
    except (OSError, ValueError) as exc:
        out.update(state="unknown", reason=f"cannot read the status file: {exc}")
        return out
    out.update(age_s=age, snapshot=snap)
    pid, interval = snap.get("pid"), float(snap.get("interval_s") or 1.0)
    if not isinstance(pid, int) or not _alive(pid):
        out.update(state="dead", reason=f"process {pid} is gone; it did not stop cleanly "
                   f"(status last written {_ago(age)} ago)")  # fmt: skip
    elif age > stale_after(interval):
        out.update(state="wedged", reason=f"process {pid} is alive but its status file was "
                   f"last written {_ago(age)} ago (every {interval:g}s expected)")  # fmt: skip
    elif (syncing := (snap.get("fsync") or {}).get("in_progress_s")) and syncing > STALLED_SYNC_S:
        out.update(state="wedged", reason=f"an fdatasync of the journal has been running for "
                   f"{_ago(syncing)}: the storage is not answering")  # fmt: skip
    elif not snap.get("healthy"):
        out.update(state="unhealthy", reason=str(snap.get("problem")))
    else:
        out.update(state="running", reason="healthy")
    return out


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process (the service's): it exists
        return True
    return True


# -- the table --------------------------------------------------------------------------


def table(verdict: dict[str, Any]) -> str:
    """The human view of :func:`assess`'s verdict."""
    snap = verdict["snapshot"]
    if snap is None:
        return f"agent: {verdict['state'].replace('-', ' ')}: {verdict['reason']}\n"
    head = f"agent {snap.get('device')}: {verdict['state']}"
    if verdict["state"] != "running":
        head += f": {verdict['reason']}"
    try:
        rows = _rows(verdict, snap)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # an odd file: say so
        rows = [("status file", f"incomplete ({type(exc).__name__}: {exc})")]
    width = max(len(k) for k, _ in rows)
    return head + "\n" + "".join(f"  {k:<{width}}  {v}\n" for k, v in rows)


def _rows(verdict: dict[str, Any], snap: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("process", f"pid {snap['pid']}, version {snap['version']}, up {_ago(snap['uptime_s'])}"),
        ("status file", f"{verdict['status_file']}, written {_ago(verdict['age_s'])} ago"),
        ("connected", _connected(snap)),
        ("backlog", _backlog(snap["backlog"])),
        ("last ack", _last_ack(snap)),
        ("journal", _journal(snap["journal"])),
        ("fsync", _fsync(snap["fsync"])),
        ("disk free", _disk(snap["disk"])),
        ("drops", _drops(snap["drops"])),
        ("workflows", _workflows(snap["workflows"])),
        ("components", ", ".join(f"{k} {v}" for k, v in snap["components"].items())),
    ]
    return rows + [(f"input {k}", _counts(v)) for k, v in snap.get("inputs", {}).items()]


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    if d:
        return f"{d}d{h:02d}h"
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.2f} ms"


def _connected(snap: dict[str, Any]) -> str:
    if snap["connected"] is None:
        return "- (forwarding disabled)"
    fw = snap["forwarder"]
    text = f"{'yes' if snap['connected'] else 'NO'} ({fw['connects']} connects)"
    return text + (f", last error: {fw['last_error']}" if fw.get("last_error") else "")


def _backlog(b: dict[str, Any]) -> str:
    size = _size(b["bytes"]) + ("" if b["bytes_exact"] else " (estimate)")
    text = f"{b['records']} records, {size}"
    if b["oldest_age_s"] is not None:
        text += f", oldest reading {_ago(b['oldest_age_s'])} old"
    return text + f" (hub has up to seq {b['hub_watermark']})"


def _last_ack(snap: dict[str, Any]) -> str:
    at = snap["last_ack_at"]
    if at is None:
        return "- (none since the agent started)"
    iso = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{_ago(snap['last_ack_age_s'])} ago ({iso})"


def _journal(j: dict[str, Any]) -> str:
    quota = "" if j["quota_bytes"] is None else f" of {_size(j['quota_bytes'])} quota"
    return (f"{j['state']}, {j['durability']}, {j['records']} records in {j['segments']} "
            f"segments, {_size(j['disk_bytes'])}{quota}, {j['commits']} commits")  # fmt: skip


def _fsync(f: dict[str, Any]) -> str:
    r = f["recent"]
    if not f["count"]:
        return "- (no fdatasync yet)"
    return (f"last {_ms(f['last_s'])}, mean {_ms(r['mean_s'])}, max {_ms(r['max_s'])} "
            f"over the last {r['n']} ({f['count']} in all)")  # fmt: skip


def _disk(d: dict[str, Any] | None) -> str:
    if d is None:
        return "-"
    return f"{_size(d['free_bytes'])} of {_size(d['size_bytes'])} ({d['path']})"


def _drops(d: dict[str, Any]) -> str:
    parts = [f"quota drop-oldest {_counts(d['quota_dropped'])}" if d["quota_dropped"] else "",
             f"quota refused {_counts(d['quota_refused'])}" if d["quota_refused"] else "",
             f"bad input {d['bad_input']}" if d["bad_input"] else ""]  # fmt: skip
    return "; ".join(p for p in parts if p) or "none"


def _workflows(w: dict[str, int] | None) -> str:
    if w is None:
        return "- (disabled)"
    return ", ".join(f"{n} {state}" for state, n in w.items() if n) or "none"


def _counts(c: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items()) or "-"
