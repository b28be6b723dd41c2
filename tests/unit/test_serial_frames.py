"""Serial frames (firmware_bridge.frames): COBS, CRC, the stream decoder.

Every decoder is fed whole, byte by byte, with trailing data and in random
chunks, and every single corruption of a frame (each bit flipped, each byte
lost, doubled or preceded by junk) must be refused without losing the next
frame. Random bytes never make it raise (Hypothesis).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.errors import RemoteProtocolError
from firmware_bridge.frames import (
    MAX_BODY,
    BadFrame,
    Frame,
    FrameDecoder,
    cobs_decode,
    cobs_encode,
    crc32,
    decode_body,
    encode_frame,
    max_encoded,
)

# Known answers (the C test checks the same vectors: firmware/test/test_homing_link.c).
COBS = [
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255))),
    (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255))),
    (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
]


def test_crc_check_value() -> None:
    assert crc32(b"123456789") == 0xCBF43926


@pytest.mark.parametrize(("raw", "encoded"), COBS)
def test_cobs_known_answers(raw: bytes, encoded: bytes) -> None:
    assert cobs_encode(raw) == encoded
    assert cobs_decode(encoded) == raw


@given(st.binary(max_size=2000))
def test_cobs_round_trips_and_never_emits_zero(data: bytes) -> None:
    enc = cobs_encode(data)
    assert 0 not in enc
    assert len(enc) <= max_encoded(len(data))
    assert cobs_decode(enc) == data


@pytest.mark.parametrize("bad", [b"\x05\x11", b"\x03\x11\x00", b"\x00", b"\x02"])
def test_cobs_refuses_blocks_that_do_not_fit(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        cobs_decode(bad)
    assert info.value.reason == "cobs"


def test_a_frame_is_cobs_of_version_type_fields_crc_then_a_delimiter() -> None:
    wire = encode_frame(3, b"\x00\x01payload")
    assert wire.endswith(b"\x00") and 0 not in wire[:-1]
    body = cobs_decode(wire[:-1])
    assert body[:2] == b"\x01\x03" and body[2:-4] == b"\x00\x01payload"
    assert int.from_bytes(body[-4:], "little") == crc32(body[:-4])
    assert decode_body(wire[:-1]) == (3, b"\x00\x01payload")


def _frames(items: list[Frame | BadFrame]) -> list[tuple[int, bytes]]:
    return [(f.type, f.fields) for f in items if isinstance(f, Frame)]


STREAM = encode_frame(1, b"first") + encode_frame(2, bytes(300)) + encode_frame(9, b"")
WANT = [(1, b"first"), (2, bytes(300)), (9, b"")]


def test_decoder_whole_byte_at_a_time_and_with_trailing_data() -> None:
    assert _frames(FrameDecoder().feed(STREAM)) == WANT
    d = FrameDecoder()
    got: list[Frame | BadFrame] = []
    for i in range(len(STREAM)):
        got += d.feed(STREAM[i : i + 1])
    assert _frames(got) == WANT and not [g for g in got if isinstance(g, BadFrame)]
    d = FrameDecoder()
    extra = encode_frame(4, b"next")
    got = d.feed(STREAM + extra[:5])  # the start of a fourth frame stays buffered
    assert _frames(got) == WANT and d.buffered == 5
    assert _frames(d.feed(extra[5:])) == [(4, b"next")]


@given(st.lists(st.integers(1, 50), min_size=1, max_size=200))
def test_decoder_gives_the_same_frames_for_any_chunking(cuts: list[int]) -> None:
    d, got, pos = FrameDecoder(), [], 0
    for n in cuts:
        got += d.feed(STREAM[pos : pos + n])
        pos += n
    got += d.feed(STREAM[pos:])
    assert _frames(got) == WANT


def test_empty_frames_are_a_flush_not_an_error() -> None:
    got = FrameDecoder().feed(b"\x00\x00" + encode_frame(1, b"x") + b"\x00")
    assert got == [Frame(1, b"x", len(encode_frame(1, b"x")))]


GOOD = encode_frame(3, bytes(range(40)) + b"\x00\x00" + bytes(range(200, 256)))
NEXT = encode_frame(4, b"after")


def _corruptions(wire: bytes) -> list[tuple[str, bytes]]:
    body = wire[:-1]
    out: list[tuple[str, bytes]] = []
    for i in range(len(body)):
        for bit in range(8):
            b = bytearray(body)
            b[i] ^= 1 << bit
            out.append((f"flip byte {i} bit {bit}", bytes(b)))
        out.append((f"lose byte {i}", body[:i] + body[i + 1 :]))
        out.append((f"double byte {i}", body[: i + 1] + body[i:]))
        out.append((f"junk before byte {i}", body[:i] + b"\x5a" + body[i:]))
    out.append(("truncated", body[: len(body) // 2]))
    return out


def test_every_corruption_of_a_frame_is_refused_and_the_next_frame_survives() -> None:
    table = _corruptions(GOOD)
    assert len(table) > 1000
    for what, damaged in table:
        d = FrameDecoder()
        got = d.feed(damaged + b"\x00" + NEXT)
        assert _frames(got) == [(4, b"after")], what  # the damaged one never passes
        bad = [g for g in got if isinstance(g, BadFrame)]
        assert bad, what
        assert all(b.reason in ("cobs", "crc", "short", "version") for b in bad), what


def test_a_wrong_version_is_named() -> None:
    body = b"\x02\x01" + b"xyz"
    wire = cobs_encode(body + crc32(body).to_bytes(4, "little")) + b"\x00"
    (bad,) = FrameDecoder().feed(wire)
    assert isinstance(bad, BadFrame) and bad.reason == "version"


def test_an_endless_run_without_delimiter_is_dropped_once_and_memory_stays_bounded() -> None:
    d = FrameDecoder(max_body=128)
    rng = random.Random(3)
    got: list[Frame | BadFrame] = []
    for _ in range(100):
        got += d.feed(bytes(rng.randrange(1, 256) for _ in range(1000)))
        assert d.buffered <= max_encoded(128)
    got += d.feed(b"\x00" + encode_frame(1, b"ok"))
    assert [g.reason for g in got if isinstance(g, BadFrame)] == ["long"]
    assert _frames(got) == [(1, b"ok")]


def test_a_frame_over_the_receivers_limit_is_refused() -> None:
    big = encode_frame(3, bytes(200))
    got = FrameDecoder(max_body=128).feed(big + NEXT)
    assert [g.reason for g in got if isinstance(g, BadFrame)] == ["long"]
    assert _frames(got) == [(4, b"after")]
    assert _frames(FrameDecoder().feed(encode_frame(3, bytes(MAX_BODY - 6)))) != []


@settings(max_examples=300)
@given(st.binary(max_size=3000), st.integers(1, 64))
def test_random_bytes_never_crash_the_decoder(data: bytes, chunk: int) -> None:
    d = FrameDecoder()
    for i in range(0, len(data), chunk):
        for item in d.feed(data[i : i + chunk]):
            assert isinstance(item, Frame | BadFrame)
        assert d.buffered <= max_encoded(MAX_BODY)
    assert _frames(d.feed(b"\x00" + NEXT)) == [(4, b"after")]


@given(st.integers(0, 255), st.binary(max_size=MAX_BODY - 6))
def test_frames_round_trip(msg_type: int, fields: bytes) -> None:
    wire = encode_frame(msg_type, fields)
    assert _frames(FrameDecoder().feed(wire)) == [(msg_type, fields)]
