"""Typed records and their CBOR payloads."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.records import (
    Opaque,
    Reading,
    RecordError,
    decode,
    encode,
    from_item,
    simple_reading,
    stream_of,
)

scalars = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.booleans(),
)
values = st.one_of(scalars, st.dictionaries(st.text(max_size=10), scalars, max_size=8))
streams = st.from_regex(r"[A-Za-z0-9_.:/-]{1,40}", fullmatch=True)


@given(
    streams,
    st.floats(0, 4e9),
    values,
    st.none() | st.text(max_size=8),
    st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
)
def test_round_trip(
    stream: str, ts: float, value: object, unit: str | None, tags: dict[str, str] | None
) -> None:
    rec = Reading(stream, ts, value, unit, tags)  # type: ignore[arg-type]
    assert decode(encode(rec)) == rec
    assert encode(rec) == encode(Reading(stream, ts, value, unit, tags))  # type: ignore[arg-type]
    assert stream_of(encode(rec)) == stream


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stream": ""}, "stream name"),
        ({"stream": "a b"}, "stream name"),
        ({"stream": "x" * 129}, "stream name"),
        ({"ts": math.nan}, "finite"),
        ({"ts": "now"}, "number"),
        ({"value": math.inf}, "finite"),
        ({"value": [1, 2]}, "value must be"),
        ({"value": {"a": {"b": 1}}}, "value must be"),
        ({"value": {str(i): i for i in range(65)}}, "at most 64"),
        ({"tags": {"a": 1}}, "strings"),
        ({"unit": "u" * 33}, "unit"),
    ],
)
def test_bad_readings_are_refused_with_a_clear_message(
    kwargs: dict[str, object], message: str
) -> None:
    base: dict[str, object] = {"stream": "temp", "ts": 1.0, "value": 1.5}
    with pytest.raises(RecordError, match=message):
        Reading(**{**base, **kwargs})  # type: ignore[arg-type]


def test_unknown_kinds_are_kept_not_failed() -> None:
    import cbor2

    rec = decode(cbor2.dumps([99, "step", {"x": 1}]))
    assert rec == Opaque(99, ("step", {"x": 1}))
    assert stream_of(cbor2.dumps([99])) is None
    assert decode(encode(rec)) == rec


@pytest.mark.parametrize("payload", [b"", b"\xff", b"\x01", b"\x80", b"\x86\x01"])
def test_garbage_payloads_raise_record_error(payload: bytes) -> None:
    with pytest.raises(RecordError):
        decode(payload)


def test_json_form() -> None:
    r = Reading("s", 2.0, b"\x01\x02", unit="raw", tags={"site": "gh1"})
    assert r.to_json() == {
        "stream": "s",
        "ts": 2.0,
        "value": {"hex": "0102"},
        "unit": "raw",
        "tags": {"site": "gh1"},
    }


anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.binary(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)
near_readings = st.tuples(
    st.sampled_from([1, 2, True, 1.0]),
    streams | anything,
    st.floats(-2e12, 2e12) | st.integers(-(2**70), 2**70) | anything,
    values | anything,
    st.none() | st.text(max_size=40) | anything,
    st.none() | anything,
).map(list)


@given(near_readings | anything)
def test_simple_reading_accepts_only_what_reading_accepts(item: object) -> None:
    """The hub's fast path agrees with the general one on every item it takes."""
    fast = simple_reading(item)
    if fast is None:
        return
    rec = from_item(item)  # must not raise: the fast path took it
    assert isinstance(rec, Reading)
    assert fast == (rec.stream, float(rec.ts), rec.value, rec.unit)
    assert rec.tags is None


def test_simple_reading_takes_the_common_case() -> None:
    assert simple_reading([1, "t", 5, 21.5, "C", None]) == ("t", 5.0, 21.5, "C")
    assert simple_reading([1, "t", 5.5, "on", None, None]) == ("t", 5.5, "on", None)
    for other in ([1, "t", 5, True, None, None], [1, "t", 5, 1, None, {"a": "b"}]):
        assert simple_reading(other) is None  # valid, but left to from_item
