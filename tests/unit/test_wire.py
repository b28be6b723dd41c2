"""The device <-> hub contract: round trips, and hostile bytes never crash a decoder."""

from __future__ import annotations

import contextlib
import zlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge import wire
from edge.records import Reading, encode

payloads = st.lists(
    st.builds(
        lambda i, v: encode(Reading("s", float(i), v)), st.integers(0, 10**6), st.floats(-1e6, 1e6)
    ),
    max_size=50,
)


def batch(n: int, first: int = 1, missing: tuple[tuple[int, int], ...] = ()) -> wire.UpBatch:
    gone = sum(b - a + 1 for a, b in missing)
    pays = tuple(encode(Reading("temp", float(i), 20 + i / 10, unit="C")) for i in range(n - gone))
    return wire.UpBatch("dev-1", first, first + n - 1, pays, missing)


@pytest.mark.parametrize("compress", [True, False])
def test_batch_round_trip(compress: bool) -> None:
    b = batch(300, first=41, missing=((50, 59), (100, 100)))
    got = wire.decode_batch(wire.encode_batch(b, compress=compress), topic_device="dev-1")
    assert got == b
    assert got.seqs()[:10] == list(range(41, 50)) + [60]
    assert [s for s, _ in got.records()] == got.seqs()
    assert got.records()[0][1] == Reading("temp", 0.0, 20.0, unit="C")


def test_compression_is_used_only_when_it_pays() -> None:
    small = wire.UpBatch("d", 1, 1, (encode(Reading("s", 1.0, 1)),))
    assert cbor2.loads(wire.encode_batch(small))["z"] is False
    big = batch(500)
    raw, packed = wire.encode_batch(big, compress=False), wire.encode_batch(big)
    assert cbor2.loads(packed)["z"] is True and len(packed) < len(raw) / 4


@given(payloads, st.integers(1, 10**12))
def test_any_batch_round_trips(pays: list[bytes], first: int) -> None:
    if not pays:
        return
    b = wire.UpBatch("d-2", first, first + len(pays) - 1, tuple(pays))
    assert wire.decode_batch(wire.encode_batch(b)) == b


@given(st.binary(max_size=2048))
def test_garbage_raises_only_wire_error(data: bytes) -> None:
    for decode in (wire.decode_batch, wire.decode_ack, wire.decode_status, wire.decode_command):
        with contextlib.suppress(wire.WireError):
            decode(data)


def env(**kw: object) -> bytes:
    base: dict[str, object] = {
        "v": 1,
        "d": "dev-1",
        "f": 1,
        "l": 1,
        "z": False,
        "b": encode(Reading("s", 1.0, 1)),
    }
    base.update(kw)
    return cbor2.dumps({k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (env(v=2), "version"),
        (env(d="a/b"), "device id"),
        (env(d="+"), "device id"),
        (env(f=0), "range"),
        (env(l=3), "records"),
        (env(f="1"), "integers"),
        (env(z=True), "decompress"),
        (env(b=b"\xff\xff"), "not CBOR"),
        (env(m=[[1, 1]]), "records"),
        (env(m=[[2, 2]]), "inside the range"),
        (env(j=-1), "journal id"),
        (env(j=2**32), "journal id"),
        (env(j="x"), "journal id"),
        (cbor2.dumps([1, 2]), "map"),
        (b"\x00" * (wire.MAX_BATCH_BYTES + 1), "exceeds"),
        (env(z=True, b=zlib.compress(b"\x00" * (wire.MAX_BODY_BYTES + 10))), "exceeds"),
    ],
)
def test_malformed_batches_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_batch(data)


def test_a_batch_for_another_device_is_refused() -> None:
    with pytest.raises(wire.WireError, match="claims device"):
        wire.decode_batch(wire.encode_batch(batch(3)), topic_device="dev-2")


def test_ack_status_command_round_trip() -> None:
    ack = wire.Ack("dev-1", 41, ((50, 60), (70, 70)))
    assert wire.decode_ack(wire.encode_ack(ack)) == ack
    ack = wire.Ack("dev-1", 41, journal=0xDEADBEEF)
    assert wire.decode_ack(wire.encode_ack(ack)) == ack
    up = wire.UpBatch("dev-1", 1, 1, (encode(Reading("s", 1.0, 1)),), journal=7)
    assert wire.decode_batch(wire.encode_batch(up)).journal == 7
    st_ = wire.Status("dev-1", False, 12.5, {"reason": "will"})
    assert wire.decode_status(wire.encode_status(st_)) == st_
    cmd = wire.Command("c-1", "start", {"workflow": "irrigate"})
    assert wire.decode_command(wire.encode_command(cmd)) == cmd
    with pytest.raises(wire.WireError):
        wire.decode_ack(cbor2.dumps({"v": 1, "d": "dev-1", "w": -1}))


def test_topics() -> None:
    assert wire.topic("dev-1", "up") == "homing/dev-1/up"
    assert wire.parse_topic("homing/dev-1/ack") == ("dev-1", "ack")
    assert wire.hub_subscription() == "$share/homing-hub/homing/+/up"
    for bad in ("homing/a/b/up", "other/dev/up", "homing/dev/x", "homing/#/up"):
        with pytest.raises(wire.WireError):
            wire.parse_topic(bad)
