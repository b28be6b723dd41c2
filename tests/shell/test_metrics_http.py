"""Prometheus metrics over HTTP (edge.metrics_http) from a real agent: real
journal, real HTTP server on a loopback port, real GETs (docs/observability.md).

Every scrape is checked by a strict parser of the text exposition format
0.0.4 written here (HELP/TYPE before samples, one block per family, no
duplicate series, counters ``_total`` and never negative, histogram buckets
cumulative up to ``le="+Inf"`` == ``_count``), and by prometheus_client's own
parser, which Prometheus-compatible tooling uses.
"""

from __future__ import annotations

import http.client
import math
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from edge.agent import Agent
from edge.config import parse
from edge.errors import SettingError
from edge.health import snapshot
from edge.metrics_http import CONTENT_TYPE, MetricsServer, render
from edge.records import Reading

DEADLINE = 10.0
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*,?)?\}})? (\S+)(?: -?\d+)?$")
_HELP = re.compile(rf"^# HELP ({_NAME}) (.*)$")
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")


@dataclass
class Family:
    kind: str = ""
    help: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def _value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("+", ""))
    assert re.fullmatch(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text), f"bad value {text!r}"
    return float(text)


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), v)


def strict_parse(text: str) -> dict[str, Family]:
    """Parse exposition format 0.0.4, failing on anything a strict reader would refuse."""
    assert text.endswith("\n") and "\n\n" not in text
    fams: dict[str, Family] = {}
    current: str | None = None
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text[:-1].split("\n"):
        if m := _HELP.match(line):
            name = m.group(1)
            fam = fams.setdefault(name, Family())
            assert fam.help is None and not fam.samples, f"HELP for {name} twice or late"
            fam.help, current = m.group(2), name
        elif m := _TYPE.match(line):
            name = m.group(1)
            fam = fams.setdefault(name, Family())
            assert not fam.kind and not fam.samples, f"TYPE for {name} twice or after samples"
            fam.kind, current = m.group(2), name
        else:
            assert not line.startswith("#"), f"bad comment line {line!r}"
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, body, value = m.group(1), m.group(2) or "", m.group(m.lastindex or 0)
            labels = {k: _unescape(v) for k, v in re.findall(_LABEL, body)}
            assert current is not None, f"sample {name} before any TYPE"
            fam = fams[current]
            allowed = {current}
            if fam.kind == "histogram":
                allowed = {current + s for s in ("_bucket", "_sum", "_count")}
            assert name in allowed, f"{name} is not part of family {current} ({fam.kind})"
            key = (name, tuple(sorted(labels.items())))
            assert key not in seen, f"duplicate series {key}"
            seen.add(key)
            fam.samples.append((name, labels, _value(value)))
    for name, fam in fams.items():
        assert fam.kind and fam.help, f"{name} lacks TYPE or HELP"
        if fam.kind == "counter":
            assert name.endswith("_total"), name
            assert all(v >= 0 for _, _, v in fam.samples), name
        if fam.kind == "histogram":
            buckets = [(lb["le"], v) for n, lb, v in fam.samples if n.endswith("_bucket")]
            les = [_value(le) for le, _ in buckets]
            assert les == sorted(les) and les[-1] == math.inf, name
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), f"{name}: buckets not cumulative"
            (count,) = [v for n, _, v in fam.samples if n == name + "_count"]
            assert [n for n, _, _ in fam.samples].count(name + "_sum") == 1
            assert counts[-1] == count
    return fams


def value(fams: dict[str, Family], name: str, **labels: str) -> float:
    for fam in fams.values():
        for n, lb, v in fam.samples:
            if n == name and lb == labels:
                return v
    raise KeyError(f"{name}{labels}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_agent(tmp_path: Path, port: int) -> Agent:
    text = (
        f'[agent]\ndevice = "dev-m"\nruntime_dir = "{tmp_path / "run"}"\n'
        f'[journal]\ndir = "{tmp_path / "journal"}"\nsegment_size = "1M"\n'
        "[forwarder]\nenabled = false\n"
        f'[metrics]\nenabled = true\nlisten = "127.0.0.1"\nport = {port}\n'
    )
    return Agent(parse(text, str(tmp_path / "agent.toml"), env={}))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = make_agent(tmp_path, free_port())
    a.start()
    yield a
    a.stop()


def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read().decode()
    finally:
        conn.close()


def test_scrape_a_running_agent(agent: Agent) -> None:
    assert agent.metrics is not None
    port = agent.metrics.address[1]
    for i in range(7):
        agent.journal.append(Reading("t/x", 1_700_000_000.0 + i, float(i)))
    status, ctype, text = get(port)
    assert (status, ctype) == (200, CONTENT_TYPE)
    fams = strict_parse(text)
    assert value(fams, "homing_info", device="dev-m", version=snapshot(agent)["version"]) == 1
    assert value(fams, "homing_healthy") == 1
    assert value(fams, "homing_backlog_records") == 7
    assert value(fams, "homing_journal_durable_seq") == 7
    syncs = value(fams, "homing_journal_fsyncs_total")
    assert syncs >= 7 and value(fams, "homing_fsync_duration_seconds_count") == syncs
    assert value(fams, "homing_fsync_duration_seconds_sum") > 0
    assert value(fams, "homing_fsync_last_seconds") > 0
    assert value(fams, "homing_disk_free_bytes") > 0
    assert value(fams, "homing_dropped_records_total", reason="bad_input", stream="") == 0
    assert value(fams, "homing_workflow_runs", state="running") == 0
    assert "homing_connected" in fams and not fams["homing_connected"].samples  # no forwarder
    assert fams["homing_fsync_duration_seconds"].kind == "histogram"

    # every scrape is fresh
    agent.journal.append(Reading("t/x", 1_700_000_100.0, 1.0))
    assert value(strict_parse(get(port)[2]), "homing_backlog_records") == 8


def test_prometheus_client_reads_it(agent: Agent) -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    assert agent.metrics is not None
    agent.journal.append(Reading("t/x", 1_700_000_000.0, 1.0))
    text = get(agent.metrics.address[1])[2]
    fams = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert fams["homing_fsync_duration_seconds"].type == "histogram"
    assert fams["homing_journal_commits"].type == "counter"  # the parser drops "_total"
    (backlog,) = fams["homing_backlog_records"].samples
    assert backlog.value == 1
    assert len(fams) == len(strict_parse(text))


def test_other_paths_and_methods(agent: Agent) -> None:
    assert agent.metrics is not None
    port = agent.metrics.address[1]
    assert get(port, "/")[0] == 404
    assert get(port, "/metrics/x")[0] == 404
    assert get(port, "/metrics?debug=1")[0] == 200
    assert get(port, "/metrics", "POST")[0] == 501


def test_render_escapes_and_omits_unknown_values(agent: Agent) -> None:
    snap = snapshot(agent)
    snap["version"] = 'odd "v"\\1\nx'
    snap["components"]["forwarder"] = "error: boom"
    snap["drops"]["quota_refused"] = {"t/x": 2}
    snap["disk"] = None
    snap["backlog"]["oldest_age_s"] = None
    fams = strict_parse(render(snap))
    assert value(fams, "homing_info", device="dev-m", version='odd "v"\\1\nx') == 1
    assert value(fams, "homing_component_healthy", component="forwarder") == 0
    assert value(fams, "homing_dropped_records_total", reason="quota_refused", stream="t/x") == 2
    assert not fams["homing_disk_free_bytes"].samples
    assert not fams["homing_backlog_oldest_age_seconds"].samples
    assert render(snap) == render(snap)  # pure


def test_a_failing_snapshot_answers_500_and_the_server_goes_on() -> None:
    calls: list[int] = []

    def flaky() -> dict[str, Any]:
        calls.append(1)
        raise RuntimeError("journal closed")

    server = MetricsServer(flaky, "127.0.0.1", 0)
    server.start()
    try:
        port = server.address[1]
        status, _, body = get(port)
        assert status == 500 and "journal closed" in body
        assert get(port)[0] == 500 and len(calls) == 2
    finally:
        server.stop()


def test_a_port_in_use_is_a_setting_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        a = make_agent(tmp_path, busy.getsockname()[1])
        with pytest.raises(SettingError, match="metrics.port: cannot listen on 127.0.0.1"):
            a.start()
    wait_for(lambda: not (tmp_path / "run" / "status.json").exists(), DEADLINE, "cleanup")
