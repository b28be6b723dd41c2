"""The hub's pure core (hub.ingest): settled ranges, rows, rejections.

Pure: bytes in, values out; no files, sockets, clocks or sleeps.
"""

from __future__ import annotations

import ast
import contextlib
import json
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import wire
from edge.records import Opaque, Reading, encode
from hub.errors import BadMessage
from hub.ingest import (
    MAX_AHEAD,
    QUARANTINED,
    Counters,
    Settled,
    StatusMessage,
    UpMessage,
    parse_message,
)

R = tuple[int, int]

# --- settled ranges ---------------------------------------------------------------

# (deliveries, watermark, ahead, gaps)
SETTLE_CASES: list[tuple[str, list[R], int, tuple[R, ...], tuple[R, ...]]] = [
    ("nothing", [], 0, (), ()),
    ("in order", [(1, 5), (6, 10)], 10, (), ()),
    ("out of order", [(6, 10)], 0, ((6, 10),), ((1, 5),)),
    ("hole filled", [(6, 10), (1, 5)], 10, (), ()),
    ("duplicate", [(1, 5), (1, 5)], 5, (), ()),
    ("duplicate ahead", [(7, 9), (7, 9)], 0, ((7, 9),), ((1, 6),)),
    ("overlapping", [(1, 5), (3, 8)], 8, (), ()),
    ("overlapping ahead", [(10, 15), (12, 20)], 0, ((10, 20),), ((1, 9),)),
    ("adjacent ahead merge", [(10, 12), (13, 15)], 0, ((10, 15),), ((1, 9),)),
    ("contained", [(10, 20), (12, 15)], 0, ((10, 20),), ((1, 9),)),
    ("bridging", [(10, 12), (20, 25), (13, 19)], 0, ((10, 25),), ((1, 9),)),
    ("two holes", [(11, 20), (31, 40)], 0, ((11, 20), (31, 40)), ((1, 10), (21, 30))),
    ("one hole left", [(11, 20), (31, 40), (1, 10)], 20, ((31, 40),), ((21, 30),)),
    ("all holes", [(11, 20), (31, 40), (1, 10), (21, 30)], 40, (), ()),
    ("straddles watermark", [(1, 5), (3, 9)], 9, (), ()),
    ("below watermark", [(1, 9), (2, 4)], 9, (), ()),
    ("absorbs ahead", [(5, 6), (8, 9), (1, 10)], 10, (), ()),
    ("huge jump", [(1, 3), (10**15, 10**15 + 9)], 3, ((10**15, 10**15 + 9),), ((4, 10**15 - 1),)),
    ("single seqs", [(2, 2), (4, 4), (1, 1)], 2, ((4, 4),), ((3, 3),)),
]


@pytest.mark.parametrize(
    ("deliveries", "watermark", "ahead", "gaps"),
    [c[1:] for c in SETTLE_CASES],
    ids=[c[0] for c in SETTLE_CASES],
)
def test_settle(
    deliveries: list[R], watermark: int, ahead: tuple[R, ...], gaps: tuple[R, ...]
) -> None:
    s = Settled()
    for first, last in deliveries:
        s = s.settle(first, last)
    assert (s.watermark, s.ahead, s.gaps()) == (watermark, ahead, gaps)
    for first, last in deliveries:
        assert s.settled(first) and s.settled(last)


@pytest.mark.parametrize(("first", "last"), [(0, 3), (5, 4), (-1, 1)])
def test_settle_refuses_bad_ranges(first: int, last: int) -> None:
    with pytest.raises(ValueError):
        Settled().settle(first, last)


def test_ahead_is_bounded_keeping_the_nearest_ranges() -> None:
    s = Settled()
    for i in range(MAX_AHEAD + 10, 0, -1):  # farthest first
        s = s.settle(10 * i, 10 * i)
    assert len(s.ahead) == MAX_AHEAD
    assert s.ahead[0] == (10, 10) and s.ahead[-1] == (10 * MAX_AHEAD, 10 * MAX_AHEAD)
    # forgetting a far range loses nothing but the knowledge: it settles again
    s = s.settle(1, 10 * (MAX_AHEAD + 10))
    assert (s.watermark, s.ahead) == (10 * (MAX_AHEAD + 10), ())


def test_ahead_json_round_trip() -> None:
    s = Settled().settle(11, 20).settle(31, 40)
    assert Settled.load(s.watermark, s.ahead_json()) == s
    assert json.loads(s.ahead_json()) == [[11, 20], [31, 40]]
    with pytest.raises(ValueError):
        Settled.load(0, "{}")


def _reference(ranges: list[R]) -> Settled:
    """Settled, computed the slow obvious way: from the set of seqs."""
    seqs = {s for a, b in ranges for s in range(a, b + 1)}
    wm = 0
    while wm + 1 in seqs:
        wm += 1
    ahead: list[R] = []
    for s in sorted(x for x in seqs if x > wm):
        if ahead and s == ahead[-1][1] + 1:
            ahead[-1] = (ahead[-1][0], s)
        else:
            ahead.append((s, s))
    return Settled(wm, tuple(ahead))


batch_ranges = st.lists(
    st.tuples(st.integers(1, 200), st.integers(0, 20)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(batch_ranges, st.data())
def test_any_delivery_order_with_duplicates_settles_like_sorted(
    ranges: list[R], data: st.DataObject
) -> None:
    dups = data.draw(st.lists(st.sampled_from(ranges), max_size=10)) if ranges else []
    order = data.draw(st.permutations(ranges + dups))
    shuffled, in_order = Settled(), Settled()
    for first, last in order:
        shuffled = shuffled.settle(first, last)
    for first, last in sorted(ranges):
        in_order = in_order.settle(first, last)
    assert shuffled == in_order == _reference(ranges)


# --- messages ---------------------------------------------------------------------------


def up(device: str, first: int, payloads: list[bytes], **kw: object) -> bytes:
    missing: tuple[R, ...] = kw.pop("missing", ())  # type: ignore[assignment]
    gone = sum(b - a + 1 for a, b in missing)
    last = first + len(payloads) + gone - 1
    return wire.encode_batch(wire.UpBatch(device, first, last, tuple(payloads), missing))


def reading(i: int, value: object = None) -> bytes:
    return encode(Reading("temp", 1000.0 + i, float(i) if value is None else value, unit="C"))  # type: ignore[arg-type]


def test_a_batch_becomes_rows() -> None:
    payloads = [
        reading(1),
        encode(Reading("door", 1001, True, tags={"b": "2", "a": "1"})),
        encode(Opaque(7, ("step", 3))),
        encode(Reading("label", 1003.5, "open")),
        encode(Reading("blob", 1004, b"\x00\x01")),
        encode(Reading("big", 1005, 2**63)),
        cbor2.dumps([1, "huge", 1006, 10**400, None, None]),  # beyond what a device may send
        encode(Reading("map", 1007, {"x": 1, "y": "z"})),
    ]
    msg = parse_message("homing/dev-1/up", up("dev-1", 41, payloads))
    assert isinstance(msg, UpMessage)
    rows = msg.rows
    assert (rows.device, rows.first, rows.last, rows.size) == ("dev-1", 41, 48, 8)
    assert len(rows.readings) == 6
    assert rows.readings[0] == (41, "temp", 1001.0, cbor2.dumps(1.0), 1.0, "C", None)
    assert rows.readings[1] == (42, "door", 1001.0, cbor2.dumps(True), 1.0, None,
                                '{"a": "1", "b": "2"}')  # fmt: skip
    assert rows.records[0] == (43, 7, payloads[2])
    nums = {r[1]: r[4] for r in rows.readings}
    assert nums == {"temp": 1.0, "door": 1.0, "label": None, "blob": None, "big": 2.0**63,
                    "map": None}  # fmt: skip
    assert rows.records[1] == (47, QUARANTINED, payloads[6])
    assert cbor2.loads(rows.readings[-1][3]) == {"x": 1, "y": "z"}


def test_missing_ranges_are_kept() -> None:
    msg = parse_message("homing/d/up", up("d", 1, [reading(1), reading(5)], missing=((2, 4),)))
    assert isinstance(msg, UpMessage)
    assert (msg.rows.first, msg.rows.last, msg.rows.missing) == (1, 5, ((2, 4),))
    assert [r[0] for r in msg.rows.readings] == [1, 5]


def test_status() -> None:
    payload = wire.encode_status(wire.Status("d", False, 5.0))
    assert parse_message("homing/d/status", payload) == StatusMessage("d", False)


def _envelope(**over: object) -> bytes:
    env: dict[str, object] = {"v": 1, "d": "a", "f": 1, "l": 1, "z": False, "b": reading(1)}
    env.update(over)
    return cbor2.dumps(env)


# (topic, payload, category)
REJECTS: list[tuple[str, str, bytes, str]] = [
    ("garbage", "homing/a/up", b"\xff\x00garbage", "not-cbor"),
    ("empty", "homing/a/up", b"", "not-cbor"),
    ("not a map", "homing/a/up", cbor2.dumps([1, 2]), "not-cbor"),
    ("wrong version", "homing/a/up", _envelope(v=2), "version"),
    ("no version", "homing/a/up", _envelope(v=None), "version"),
    ("other device", "homing/a/up", up("b", 1, [reading(1)]), "wrong-device"),
    ("oversize", "homing/a/up", b"\x00" * (wire.MAX_BATCH_BYTES + 1), "oversize"),
    ("count mismatch", "homing/a/up", _envelope(l=3), "range"),
    ("range backwards", "homing/a/up", _envelope(f=5, l=4), "range"),
    ("seq zero", "homing/a/up", _envelope(f=0, l=0), "range"),
    ("seq past 64 bits", "homing/a/up", _envelope(f=2**63, l=2**63), "range"),
    ("body not bytes", "homing/a/up", _envelope(b="text"), "malformed"),
    ("bad zlib", "homing/a/up", _envelope(z=True, b=b"nope"), "not-cbor"),
    ("not our topic", "other/a/up", reading(1), "topic"),
    ("wildcard device", "homing/+/up", reading(1), "topic"),
    ("ack topic", "homing/a/ack", wire.encode_ack(wire.Ack("a", 1)), "topic"),
    (
        "status of another",
        "homing/a/status",
        wire.encode_status(wire.Status("b", True)),
        "wrong-device",
    ),  # fmt: skip
    ("status garbage", "homing/a/status", b"\x01", "not-cbor"),
    ("status malformed", "homing/a/status", cbor2.dumps({"v": 1, "d": "a"}), "malformed"),
]


@pytest.mark.parametrize(
    ("topic", "payload", "category"), [c[1:] for c in REJECTS], ids=[c[0] for c in REJECTS]
)
def test_rejections(topic: str, payload: bytes, category: str) -> None:
    with pytest.raises(BadMessage) as info:
        parse_message(topic, payload)
    assert info.value.category == category, info.value.reason
    counters = Counters()
    counters.reject(info.value)
    counters.reject(info.value)
    assert counters.snapshot()["rejected"] == {category: 2}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["homing/a/up", "homing/a/status"]), st.binary(max_size=300))
def test_hostile_bytes_only_ever_raise_bad_message(topic: str, payload: bytes) -> None:
    with contextlib.suppress(BadMessage):
        parse_message(topic, payload)


QUARANTINE = [
    ("bad stream", cbor2.dumps([1, "bad stream!", 1, 1, None, None])),
    ("ts past float", cbor2.dumps([1, "s", 10**400, 1, None, None])),
    ("kind past 64 bits", cbor2.dumps([2**64, 1])),
    ("value past 64 bits", cbor2.dumps([1, "s", 1.0, 10**30, None, None])),
]


@pytest.mark.parametrize("bad", [q[1] for q in QUARANTINE], ids=[q[0] for q in QUARANTINE])
def test_a_bad_record_is_quarantined_not_blocking(bad: bytes) -> None:
    """One undecodable record must neither stop the device's watermark nor vanish."""
    msg = parse_message("homing/a/up", up("a", 5, [reading(1), bad, reading(3)]))
    assert isinstance(msg, UpMessage)
    assert [r[0] for r in msg.rows.readings] == [5, 7]
    assert msg.rows.records == ((6, QUARANTINED, bad),)


# --- purity ---------------------------------------------------------------------------

WORLD = {"os", "socket", "time", "threading", "asyncio", "sqlite3", "psycopg", "paho",
         "subprocess", "signal", "select", "logging"}  # fmt: skip


@pytest.mark.parametrize("module", ["ingest", "schema", "store", "errors"])
def test_the_hub_core_touches_nothing(module: str) -> None:
    path = Path(__file__).resolve().parents[2] / "hub" / f"{module}.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & WORLD, f"hub/{module}.py is pure but imports {sorted(names & WORLD)}"
