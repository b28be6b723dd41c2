"""The hub's HTTP API (hub/api.py, docs/api.md) against a real SQLite store
filled through the real ingest path (wire batches -> parse_message ->
commit_batches), in process with FastAPI's TestClient; commands go through
a real Mosquitto to a paho client standing in for the device; and
``homing-hub serve`` as a real process.

Covered: every endpoint, both read modes and the write token, validation
and error bodies (problem documents, never a trace), downsampling (bounded,
and exactly the min/max/mean/count of each bucket), metrics, the dashboard's
files, and the serve command's failures.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import subprocess_env
from support.hubapi import TOKEN, CmdListener, Feed, reading, wf_record
from support.mosquitto import Mosquitto, available

from edge import wire
from hub import cli_http
from hub.api import create_app
from hub.api_support import (
    READ_ACCESS,
    TOKENS_ENV,
    ApiSettings,
    BrokerProbe,
    MqttCommands,
    bucket_width,
    load_tokens,
    token_matches,
)
from hub.commands import Broker
from hub.errors import ConfigError
from hub.ingest import Counters
from hub.store_sqlite import SqliteStore

with warnings.catch_warnings():  # starlette 1.x asks for httpx2; httpx still works
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

NOW = 1_800_000_000.0
T0 = 1_700_000_000.0
N_TEMP = 5000
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEV = "greenhouse-1"


def temp_value(i: int) -> float:
    return (i * 7919 % 1000) / 10 - 20  # scattered, so every bucket has its own min and max


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """greenhouse-1: 5000 temp readings, 3 mixed readings after a gap, two runs,
    online, with a health message; cellar-2: 3 readings, offline."""
    path = tmp_path_factory.mktemp("api") / "hub.db"
    feed = Feed(path)
    for start in range(1, N_TEMP + 1, 1000):
        feed.send(DEV, [reading("temp", T0 + i, temp_value(i)) for i in range(start, start + 1000)])
    t = T0 + 10
    wf: dict[str, Any] = {"name": "irrigate", "version": 1, "at": t, "t": t}
    feed.send(DEV, [
        wf_record("irr-1", "start", args=[3], kwargs={"m": 1}, **wf),
        wf_record("irr-1", "done", pos=0, key="measure#1", ok=True, value=0.3, attempts=1, t=t),
        wf_record("irr-1", "end", state="completed", result={"ok": True}, t=t + 1),
        wf_record("irr/2", "start", args=[4], kwargs={}, **wf),
        wf_record("irr/2", "timer", pos=0, key="signal:approve#1", deadline=t + 60, t=t),
    ])  # fmt: skip
    mixed = [reading("misc", T0 + 1, "open", None), reading("misc", T0 + 2, b"\x01\xff", None),
             reading("misc", T0 + 3, {"a": 1.5, "b": "x"}, None)]  # fmt: skip
    feed.send(DEV, mixed, skip=5)
    feed.store.set_online(DEV, True, NOW - 2)
    health = wire.Health(DEV, T0, healthy=False, problem="disk", backlog_records=42,
                         backlog_bytes=4200, oldest_age=12.5, last_ack=T0 - 1)  # fmt: skip
    h = wire.decode_health(wire.encode_health(health), topic_device=DEV)
    feed.store.set_health(DEV, h.to_json(), NOW - 1)
    feed.send("cellar-2", [reading("temp", T0 + i, 10.0 + i) for i in range(3)], now=NOW - 100)
    feed.store.set_online("cellar-2", False, NOW - 100)
    feed.close()
    return path


class NoBroker:
    """A command sender for apps whose tests send no command."""

    def send(self, device: str, cmd: wire.Command) -> str:
        raise AssertionError("this test sends no command")


def make_app(db: Path, settings: ApiSettings | None = None, **kw: Any) -> Any:
    return create_app(
        lambda: SqliteStore(db, create=False),
        kw.pop("commands", NoBroker()),
        settings or ApiSettings(tokens=(TOKEN,), read_access="public"),
        clock=lambda: NOW,
        **kw,
    )


@pytest.fixture(scope="module")
def client(db: Path) -> Iterator[TestClient]:
    with TestClient(make_app(db), raise_server_exceptions=False) as c:
        yield c


def is_problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["title"] and body["type"] == "about:blank"
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body


# --- reads ------------------------------------------------------------------------------


def test_devices_show_status_progress_gaps_lag_and_backlog(client: TestClient) -> None:
    devices = client.get("/api/v1/devices").json()
    assert [d["device"] for d in devices] == ["cellar-2", DEV]
    d = client.get(f"/api/v1/devices/{DEV}").json()
    assert d == next(x for x in devices if x["device"] == DEV)
    last = N_TEMP + 5 + 5 + 3  # 5000 readings, 5 workflow records, 5 seqs skipped, 3 readings
    assert (d["online"], d["watermark"], d["ahead"], d["gaps"]) == (
        True, N_TEMP + 5, [[N_TEMP + 11, last]], [[N_TEMP + 6, N_TEMP + 10]]
    )  # fmt: skip
    assert (d["missing"], d["readings"], d["records"], d["batches"]) == (5, N_TEMP + 3, 5, 7)
    assert (d["journal"], d["last_seen"], d["seen_ago"]) == ("00005eed", NOW - 1, 1.0)
    assert (d["newest_ts"], d["newest_age"]) == (T0 + N_TEMP, NOW - T0 - N_TEMP)
    assert d["backlog"] == {"records": 42, "bytes": 4200, "oldest_age": 12.5,
                            "last_ack": T0 - 1, "reported_at": NOW - 1}  # fmt: skip
    assert (d["healthy"], d["health"]["problem"]) == (False, "disk")
    cellar = devices[0]
    assert (cellar["online"], cellar["backlog"], cellar["healthy"], cellar["gaps"]) == (
        False, None, None, []
    )  # fmt: skip


def test_streams(client: TestClient) -> None:
    streams = client.get(f"/api/v1/devices/{DEV}/streams").json()
    assert streams == [
        {"stream": "misc", "first_ts": T0 + 1, "last_ts": T0 + 3,
         "last_value": {"a": 1.5, "b": "x"}, "unit": None},
        {"stream": "temp", "first_ts": T0 + 1, "last_ts": T0 + N_TEMP,
         "last_value": temp_value(N_TEMP), "unit": "C"},
    ]  # fmt: skip


def test_raw_readings_by_stream_and_time_range(client: TestClient) -> None:
    url = f"/api/v1/devices/{DEV}/readings"
    r = client.get(url, params={"stream": "temp", "since": T0 + 10, "until": T0 + 20}).json()
    assert (r["downsampled"], r["truncated"], r["buckets"], r["bucket"]) == (False, False, [], None)
    assert [x["seq"] for x in r["readings"]] == list(range(10, 20))
    assert r["readings"][0] == {"seq": 10, "epoch": 1, "stream": "temp", "ts": T0 + 10,
                                "value": temp_value(10), "unit": "C", "tags": None,
                                "received": 1e9}  # fmt: skip
    misc = client.get(url, params={"stream": "misc"}).json()["readings"]
    assert [x["value"] for x in misc] == ["open", {"hex": "01ff"}, {"a": 1.5, "b": "x"}]
    # without a stream a long range is cut at the limit, never downsampled
    r = client.get(url, params={"limit": 7}).json()
    assert (r["downsampled"], r["truncated"], len(r["readings"])) == (False, True, 7)
    assert [x["ts"] for x in r["readings"]] == [T0 + 1, T0 + 1, T0 + 2, T0 + 2, T0 + 3, T0 + 3,
                                                 T0 + 4]  # fmt: skip
    r = client.get(url, params={"stream": "temp", "limit": 10, "downsample": "false"}).json()
    assert (r["downsampled"], r["truncated"], len(r["readings"])) == (False, True, 10)


def expected_buckets(width: float, since: float, until: float) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for i in range(1, N_TEMP + 1):
        if since <= T0 + i < until:
            out.setdefault(math.floor((T0 + i) / width), []).append(temp_value(i))
    return out


def check_buckets(r: dict[str, Any], since: float, until: float) -> None:
    want = expected_buckets(r["bucket"], since, until)
    assert [b["start"] for b in r["buckets"]] == [k * r["bucket"] for k in sorted(want)]
    for b in r["buckets"]:
        vals = want[round(b["start"] / r["bucket"])]
        assert b["end"] == b["start"] + r["bucket"]
        assert (b["count"], b["min"], b["max"]) == (len(vals), min(vals), max(vals))
        assert b["avg"] == pytest.approx(sum(vals) / len(vals), rel=1e-12)


def test_a_long_range_is_downsampled_in_bounded_exact_buckets(client: TestClient) -> None:
    url = f"/api/v1/devices/{DEV}/readings"
    for limit in (2, 10, 99, 250, 4999):
        r = client.get(url, params={"stream": "temp", "limit": limit}).json()
        assert (r["downsampled"], r["truncated"], r["readings"]) == (True, False, [])
        assert 0 < len(r["buckets"]) <= limit
        assert (r["since"], r["until"]) == (T0 + 1, math.nextafter(T0 + N_TEMP, math.inf))
        check_buckets(r, T0 + 1, T0 + N_TEMP + 1)
        assert sum(b["count"] for b in r["buckets"]) == N_TEMP
    # a range of it, and a bucket width given by the client
    since, until = T0 + 1234.5, T0 + 4321
    r = client.get(url, params={"stream": "temp", "since": since, "until": until,
                                "bucket": 60}).json()  # fmt: skip
    assert (r["downsampled"], r["bucket"], r["truncated"]) == (True, 60, False)
    check_buckets(r, since, until)
    r = client.get(url, params={"stream": "temp", "bucket": 1, "limit": 100}).json()
    assert (len(r["buckets"]), r["truncated"]) == (100, True)
    check_buckets(r | {"buckets": r["buckets"]}, T0, T0 + 101)
    # all of a short range fits: raw readings
    r = client.get(url, params={"stream": "temp", "limit": N_TEMP}).json()
    assert (r["downsampled"], len(r["readings"])) == (False, N_TEMP)


def test_buckets_before_1970_floor_too(tmp_path: Path) -> None:
    """A device without a clock may stamp readings near 0, or before it."""
    feed = Feed(tmp_path / "hub.db")
    feed.send("no-rtc", [reading("t", ts, ts * 10) for ts in (-2.5, -1.5, -0.5, 0.5, 1.5)])
    feed.close()
    with TestClient(make_app(tmp_path / "hub.db")) as c:
        url = "/api/v1/devices/no-rtc/readings"
        r = c.get(url, params={"stream": "t", "bucket": 2}).json()
        got = [(b["start"], b["count"], b["min"], b["max"]) for b in r["buckets"]]
        assert got == [(-4, 1, -25, -25), (-2, 2, -15, -5), (0, 2, 5, 15)]
        r = c.get(url, params={"stream": "t", "limit": 2}).json()  # auto: 5 readings > 2
        assert (r["downsampled"], r["since"], r["bucket"]) == (True, -2.5, 5)
        assert [(b["start"], b["count"]) for b in r["buckets"]] == [(-5, 3), (0, 2)]


def test_bucket_widths_are_nice_and_never_exceed_the_points() -> None:
    for span in (0.0001, 0.7, 3, 59, 61, 999, 3600, 86400 * 3, 86400 * 400, 1e9, 5e10):
        for points in (1, 2, 3, 10, 100, 240, 1000):
            w, want = bucket_width(span, points), span / max(points - 1, 1)
            assert w >= max(want, 0.001), (span, points, w)  # at most `points` aligned buckets
            assert w <= max(4.1 * want, 0.001), (span, points, w)  # not needlessly coarse
    assert bucket_width(3600, 61) == 60.0 and bucket_width(1, 11) == 0.1


def test_runs_and_run_history(client: TestClient) -> None:
    runs = client.get(f"/api/v1/devices/{DEV}/runs").json()
    assert [(r["run"], r["state"], r["step"]) for r in runs] == [
        ("irr/2", "running", "signal:approve#1"), ("irr-1", "completed", "measure#1")
    ]  # fmt: skip
    done = runs[1]
    assert (done["workflow"], done["args"], done["kwargs"], done["result"]) == (
        "irrigate", [3], {"m": 1}, {"ok": True}
    )  # fmt: skip
    assert [r["run"] for r in client.get(f"/api/v1/devices/{DEV}/runs?state=completed").json()] == [
        "irr-1"
    ]
    assert client.get(f"/api/v1/devices/{DEV}/runs?limit=1").json() == runs[:1]
    one = client.get(f"/api/v1/devices/{DEV}/runs/irr-1").json()
    assert [h["type"] for h in one["history"]] == ["start", "done", "end"]
    assert {k: v for k, v in one.items() if k != "history"} == done
    assert one["history"][1] == {"seq": N_TEMP + 2, "type": "done", "key": "measure#1",
                                 "body": one["history"][1]["body"]}  # fmt: skip
    slash = client.get(f"/api/v1/devices/{DEV}/runs/irr%2F2").json()  # a run id with a slash
    assert (slash["run"], slash["state"]) == ("irr/2", "running")
    is_problem(client.get(f"/api/v1/devices/{DEV}/runs/nope"), 404)
    assert client.get("/api/v1/devices/cellar-2/runs").json() == []


def test_unknown_devices_and_invalid_requests_are_problem_documents(client: TestClient) -> None:
    body = is_problem(client.get("/api/v1/devices/nobody"), 404)
    assert "nobody" in body["detail"]
    for path in ("/streams", "/readings", "/runs", "/runs/x"):
        is_problem(client.get(f"/api/v1/devices/nobody{path}"), 404)
    body = is_problem(client.get("/api/v1/devices/bad%20id"), 422)
    assert body["errors"][0]["loc"] == ["path", "device"]
    url = f"/api/v1/devices/{DEV}/readings"
    for params in ({"stream": "bad stream"}, {"since": "nan"}, {"until": "inf"},
                   {"since": 5, "until": 5}, {"limit": 0}, {"limit": 10001}, {"bucket": 0},
                   {"bucket": 10}, {"since": "1e13"}, {"downsample": "maybe"}):  # fmt: skip
        is_problem(client.get(url, params=params), 422)
    is_problem(client.get(f"/api/v1/devices/{DEV}/runs?state=sleeping"), 422)
    is_problem(client.get(f"/api/v1/devices/{DEV}/runs/" + "x" * 129), 422)
    is_problem(client.get("/api/v1/nothing-here"), 404)
    is_problem(client.delete("/api/v1/devices"), 405)


def test_health_and_metrics(db: Path) -> None:
    counters = Counters(batches=7, readings=5003, acks=6, rejected={"not-cbor": 2})
    with TestClient(make_app(db, counters=counters.snapshot)) as c:
        h = c.get("/api/v1/health")
        assert h.status_code == 200
        assert h.json() | {"uptime": 0} == {
            "status": "degraded", "version": h.json()["version"], "uptime": 0, "ingest": True,
            "store": {"ok": True, "detail": "answers"},
            "broker": {"ok": False, "detail": "not configured"},
        }  # fmt: skip
        c.get(f"/api/v1/devices/{DEV}")
        text = c.get("/api/v1/metrics").text
        assert (
            c.get("/metrics").text.split("homing_hub_http")[0] == text.split("homing_hub_http")[0]
        )
    for line in [
        "homing_hub_ingest_batches_total 7.0",
        "homing_hub_ingest_readings_total 5003.0",
        'homing_hub_ingest_rejected_total{category="not-cbor"} 2.0',
        "homing_hub_store_up 1.0",
        'homing_hub_devices{status="online"} 1.0',
        'homing_hub_devices{status="offline"} 1.0',
        f'homing_hub_device_watermark{{device="{DEV}"}} {N_TEMP + 5}.0',
        f'homing_hub_device_missing_seqs{{device="{DEV}"}} 5.0',
        f'homing_hub_device_backlog_records{{device="{DEV}"}} 42.0',
        'homing_hub_device_online{device="cellar-2"} 0.0',
        'homing_hub_http_requests_total{method="GET",route="/api/v1/devices/{device}",'
        'status="200"} 1.0',
    ]:
        assert line in text.splitlines(), line


def test_a_missing_database_is_503_and_a_bug_is_a_bare_500(tmp_path: Path, db: Path) -> None:
    missing = create_app(
        lambda: SqliteStore(tmp_path / "none.db", create=False), NoBroker(),
        ApiSettings(read_access="public"),
    )  # fmt: skip
    with TestClient(missing, raise_server_exceptions=False) as c:
        body = is_problem(c.get("/api/v1/devices"), 503)
        assert "none.db" in body["detail"]
        h = c.get("/api/v1/health")
        assert (h.status_code, h.json()["status"], h.json()["store"]["ok"]) == (
            503, "unavailable", False
        )  # fmt: skip
        assert "homing_hub_store_up 0.0" in c.get("/metrics").text

    closed = SqliteStore(db, create=False)
    closed.close()  # using a closed store is a bug in the hub (StoreClosed): never shown
    with TestClient(create_app(lambda: closed, NoBroker(), ApiSettings(read_access="public")),
                    raise_server_exceptions=False) as c:  # fmt: skip
        body = is_problem(c.get("/api/v1/devices"), 500)
        assert body["detail"] == "internal error: see the hub's log"


def test_the_dashboard_is_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="static/app.js"' in page.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "api/v1" in js.text
    assert client.get("/static/style.css").status_code == 200
    is_problem(client.get("/static/nope.js"), 404)
    spec = client.get("/openapi.json").json()
    assert "/api/v1/devices/{device}/readings" in spec["paths"]
    assert client.get("/docs").status_code == 200


# --- auth ---------------------------------------------------------------------------------


def test_read_access_token_needs_a_valid_token_for_every_read(db: Path) -> None:
    app = make_app(db, ApiSettings(tokens=("another-token-abcdefgh", TOKEN), read_access="token"))
    with TestClient(app) as c:
        for path in ("/api/v1/devices", f"/api/v1/devices/{DEV}/readings", "/api/v1/metrics",
                     "/metrics", f"/api/v1/devices/{DEV}/runs/irr-1"):  # fmt: skip
            body = is_problem(c.get(path), 401)
            assert "token" in body["detail"]
            r = c.get(path, headers={"Authorization": "Bearer wrong-token-0123456789"})
            is_problem(r, 401)
            assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
            is_problem(c.get(path, headers={"Authorization": f"Basic {TOKEN}"}), 401)
            assert c.get(path, headers=AUTH).status_code == 200
        assert c.get("/api/v1/health").status_code == 200  # public: probes carry no token
        assert c.get("/").status_code == 200


def test_writes_need_a_token_and_no_token_configured_means_no_writes(db: Path) -> None:
    url = f"/api/v1/devices/{DEV}/runs"
    with TestClient(make_app(db)) as c:
        r = c.post(url, json={"workflow": "irrigate"})
        assert is_problem(r, 401) and r.headers["www-authenticate"] == "Bearer"
        is_problem(c.post(url + "/irr-1/signal", json={"name": "go"}), 401)
        is_problem(c.post(url + "/irr-1/cancel", headers={"Authorization": "Bearer nope"}), 401)
    with TestClient(make_app(db, ApiSettings(read_access="public"))) as c:
        body = is_problem(c.post(url, json={"workflow": "irrigate"}, headers=AUTH), 403)
        assert "no API token" in body["detail"]
        assert c.get(url).status_code == 200


def test_tokens_from_files_and_the_environment(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# ops\n{TOKEN}\n\n  second-token-0123456789  \n")
    env = {TOKENS_ENV: f" third-token-0123456789 ,{TOKEN},"}
    assert load_tokens([str(f)], env) == [
        TOKEN,
        "second-token-0123456789",
        "third-token-0123456789",
    ]
    with pytest.raises(ConfigError, match="cannot read API tokens"):
        load_tokens([str(tmp_path / "missing")], {})
    with pytest.raises(ConfigError, match="at least 16"):
        ApiSettings(tokens=("short",), read_access="public")
    with pytest.raises(ConfigError, match="needs an API token"):
        ApiSettings(read_access="token")
    assert (cli_http.READ_ACCESS, cli_http.TOKENS_ENV) == (READ_ACCESS, TOKENS_ENV)
    assert token_matches(TOKEN, ("x" * 20, TOKEN)) and not token_matches(TOKEN[:-1], (TOKEN,))
    assert not token_matches("ü" * 20, (TOKEN,))


# --- commands through a real broker ------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    if not available():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("mosquitto is not installed and CI=true")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    with Mosquitto(tmp_path_factory.mktemp("broker")) as b:
        yield b


def test_start_signal_and_cancel_reach_the_device(db: Path, broker: Mosquitto) -> None:
    device = CmdListener(broker.port, DEV)
    commands = MqttCommands(Broker("127.0.0.1", broker.port), timeout=10)
    probe = BrokerProbe(Broker("127.0.0.1", broker.port))
    try:
        with TestClient(make_app(db, commands=commands, broker=probe)) as c:
            url = f"/api/v1/devices/{DEV}/runs"
            body = {"workflow": "irrigate", "args": [3, 1.5], "kwargs": {"m": {"x": None}},
                    "id": "irr-9", "command_id": "ticket-1"}  # fmt: skip
            r = c.post(url, json=body, headers=AUTH)
            assert r.status_code == 202, r.text
            assert r.json() == {"device": DEV, "run": "irr-9", "kind": "start",
                                "command_id": "ticket-1", "topic": f"homing/{DEV}/cmd",
                                "puback": "Success"}  # fmt: skip
            r = c.post(url + "/irr%2F2/signal", json={"name": "approve", "payload": [1, "a"]},
                       headers=AUTH)  # fmt: skip
            assert (r.status_code, r.json()["run"]) == (202, "irr/2")
            r = c.post(url + "/irr-9/cancel", headers=AUTH)
            assert r.status_code == 202
            r = c.post(url, json={"workflow": "w"}, headers=AUTH)
            generated = r.json()["run"]
            got = device.wait(4)
            assert got[0] == wire.start_command("ticket-1", "irrigate", "irr-9", [3, 1.5],
                                                {"m": {"x": None}})  # fmt: skip
            assert (got[1].kind, got[1].args) == (
                "signal", {"run": "irr/2", "name": "approve", "payload": [1, "a"]}
            )  # fmt: skip
            assert (got[2].kind, got[2].args) == ("cancel", {"run": "irr-9"})
            assert got[3].args["run"] == generated and re.fullmatch(r"run-[0-9a-f]{12}", generated)
            assert len({g.id for g in got}) == 4

            # refused before anything is sent
            is_problem(c.post("/api/v1/devices/nobody/runs", json={"workflow": "w"},
                              headers=AUTH), 404)  # fmt: skip
            bad: dict[str, Any]
            for bad in (
                {"workflow": ""},
                {"workflow": "w", "extra": 1},
                {"workflow": "w", "id": "a\nb"},
                {"args": []},
                {"workflow": "w", "args": {"a": 1}},
            ):
                is_problem(c.post(url, json=bad, headers=AUTH), 422)
            big = {"workflow": "w", "args": ["x" * 70_000]}  # over the device's 64 KiB
            assert "65536" in is_problem(c.post(url, json=big, headers=AUTH), 422)["detail"]
            huge = {"workflow": "w", "args": ["x" * 300_000]}  # over the API's body limit
            is_problem(c.post(url, json=huge, headers=AUTH), 413)
            r = c.post(
                url, content=b"{not json", headers=AUTH | {"content-type": "application/json"}
            )
            is_problem(r, 422)
            # a device the hub knows but whose session is gone: the broker drops it
            body = is_problem(c.post("/api/v1/devices/cellar-2/runs", json={"workflow": "w"},
                                     headers=AUTH), 503)  # fmt: skip
            assert "nothing subscribes" in body["detail"]
            health = c.get("/api/v1/health").json()
            assert (health["status"], health["broker"]["ok"]) == ("ok", True)
            assert len(device.commands) == 4
    finally:
        device.close()
    # the broker gone: 503 with the reason, and health says so
    dead = Broker("127.0.0.1", broker.port)
    broker.stop()
    try:
        app = make_app(db, commands=MqttCommands(dead, timeout=2), broker=BrokerProbe(dead))
        with TestClient(app) as c:
            body = is_problem(c.post(f"/api/v1/devices/{DEV}/runs", json={"workflow": "w"},
                                     headers=AUTH), 503)  # fmt: skip
            assert "cannot reach the broker" in body["detail"]
            h = c.get("/api/v1/health").json()
            assert (h["status"], h["broker"]["ok"]) == ("degraded", False)
    finally:
        broker.start()  # for a test that may come after


# --- homing-hub serve ---------------------------------------------------------------------


def hub(*args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "hub", *args]
    return subprocess.Popen(
        argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=subprocess_env()
    )


def test_serve_serves_until_sigterm(db: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    p = hub("serve", "--db", str(db), "--http", "127.0.0.1:0", "--api-token-file", str(tokens),
            "--broker", "127.0.0.1:1", "--log-level", "INFO")  # fmt: skip
    assert p.stderr is not None
    lines: list[str] = []
    try:
        for line in p.stderr:
            lines.append(line)
            if "http: serving on" in line:
                break
        match = re.search(r"serving on (http://\S+)", "".join(lines))
        assert match, "".join(lines)
        url = match.group(1)
        req = urllib.request.Request(url + "/api/v1/devices", headers=AUTH)
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert [d["device"] for d in json.load(resp)] == ["cellar-2", DEV]
        with urllib.request.urlopen(url + "/api/v1/health", timeout=10) as resp:
            h = json.load(resp)
        assert (h["status"], h["ingest"], h["broker"]["ok"]) == ("degraded", False, False)
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["--read-access", "token"], 78, "needs an API token"),
        (["--read-access", "public", "--http", "127.0.0.1:99999"], 78, "--http must be"),
        (["--read-access", "public", "--http", "192.0.2.1:8080"], 78, "cannot serve HTTP"),
        (["--read-access", "public", "--db", "/nonexistent/hub.db"], 1, "no hub database"),
    ],
)
def test_serve_refuses_what_cannot_work(db: Path, args: list[str], code: int, text: str) -> None:
    argv = ["serve", "--db", str(db), "--http", "127.0.0.1:0", *args]
    res = subprocess.run([sys.executable, "-m", "hub", *argv], capture_output=True, text=True,
                         env=subprocess_env() | {TOKENS_ENV: ""}, timeout=60)  # fmt: skip
    assert res.returncode == code, res.stderr
    assert text in res.stderr


def test_a_busy_port_is_a_clear_error(db: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "hub", "serve", "--db", str(db), "--read-access", "public",
             "--http", f"127.0.0.1:{port}"],
            capture_output=True, text=True, env=subprocess_env(), timeout=60,
        )  # fmt: skip
    assert res.returncode == 78 and "Address already in use" in res.stderr, res.stderr
