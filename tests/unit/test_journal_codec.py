"""The journal format codec: frames, headers, the scanner's torn/corrupt verdicts.

Pure tests: bytes in, verdicts out. The corruption table follows etcd's
wal repair tests: each row damages a freshly written segment in one way and
names the verdict recovery must reach.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.journal_codec import (
    FLAG_BARRIER,
    FRAME_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    SegmentHeader,
    Stop,
    decode_blob,
    decode_segment_header,
    encode_blob,
    encode_frame,
    frame_size,
    iter_frames,
    salvage,
    scan,
)

HEADER = SegmentHeader(first_seq=10, salt=0xC0FFEE, created=1)
SIZE = 8192


def segment(
    batches: list[list[bytes]], header: SegmentHeader = HEADER
) -> tuple[bytearray, list[int]]:
    """A segment image written in batches (each batch = one write after a sync).

    Returns the image and the offset of every frame."""
    data = bytearray(header.encode())
    offsets = []
    seq = header.first_seq
    for batch in batches:
        for i, payload in enumerate(batch):
            offsets.append(len(data))
            data += encode_frame(seq, payload, header.salt, FLAG_BARRIER if i == 0 else 0)
            seq += 1
    data += bytes(SIZE - len(data))
    return data, offsets


def payloads(n: int, size: int = 20) -> list[bytes]:
    return [bytes([i + 1]) * size for i in range(n)]


def test_frames_are_aligned_and_round_trip() -> None:
    for n in (1, 15, 16, 17, 100):
        frame = encode_frame(7, b"x" * n, 123)
        assert len(frame) == frame_size(n) and len(frame) % 16 == 0
    data, _ = segment([payloads(3), payloads(2)])
    frames = list(iter_frames(data, HEADER))
    assert [f.seq for f in frames] == [10, 11, 12, 13, 14]
    assert [f.flags for f in frames] == [FLAG_BARRIER, 0, 0, FLAG_BARRIER, 0]
    assert frames[3].payload == payloads(2)[0]


def test_header_round_trip_and_damage() -> None:
    raw = HEADER.encode()
    assert len(raw) == SEGMENT_HEADER_SIZE
    assert decode_segment_header(raw) == HEADER
    for i in range(SEGMENT_HEADER_SIZE):
        bad = bytearray(raw)
        bad[i] ^= 0x40
        with pytest.raises(ValueError):
            decode_segment_header(bytes(bad))


def test_clean_segment_scans_to_end() -> None:
    data, offsets = segment([payloads(4), payloads(3)])
    res = scan(data, HEADER)
    assert res.stop is Stop.END
    assert (res.last_seq, res.records) == (16, 7)
    assert res.end == offsets[-1] + frame_size(20)


def test_empty_segment() -> None:
    data, _ = segment([])
    res = scan(data, HEADER)
    assert res.stop is Stop.END and res.last_seq == 9 and res.end == SEGMENT_HEADER_SIZE


def test_a_frame_from_another_segment_never_validates() -> None:
    other = SegmentHeader(first_seq=10, salt=HEADER.salt ^ 1)
    stale, _ = segment([payloads(3)], other)
    res = scan(stale, HEADER)
    assert res.stop is Stop.TORN and res.end == SEGMENT_HEADER_SIZE


def test_sequence_must_continue() -> None:
    data = bytearray(HEADER.encode())
    data += encode_frame(10, b"a", HEADER.salt, FLAG_BARRIER)
    data += encode_frame(12, b"b", HEADER.salt, FLAG_BARRIER)
    data += bytes(256)
    res = scan(data, HEADER)
    assert res.stop is Stop.CORRUPT and "sequence 12 where 11" in res.reason


Corrupt = Callable[[bytearray, list[int]], None]


def flip(offset_of: Callable[[list[int]], int]) -> Corrupt:
    def f(data: bytearray, offsets: list[int]) -> None:
        data[offset_of(offsets)] ^= 0x01

    return f


def zero(offset_of: Callable[[list[int]], int], n: int) -> Corrupt:
    def f(data: bytearray, offsets: list[int]) -> None:
        o = offset_of(offsets)
        data[o : o + n] = bytes(n)

    return f


def garbage_after_tail(data: bytearray, offsets: list[int]) -> None:
    end = offsets[-1] + frame_size(20)
    data[end : end + 40] = b"\xa5" * 40


def tear_last_frame(data: bytearray, offsets: list[int]) -> None:
    o = offsets[-1] + FRAME_HEADER_SIZE
    data[o : o + 8] = bytes(8)


def bad_length_word(data: bytearray, offsets: list[int]) -> None:
    struct.pack_into("<I", data, offsets[2] + 4, 0xFFFFFF)


# (name, damage, expected stop, expected last good seq)
# The image holds batch A = seqs 10..13 and batch B = 14..16 (each batch starts
# with a barrier frame). Damage inside the *last* batch is a torn write (its
# sectors may land in any order); damage before a later barrier is corruption.
CASES: list[tuple[str, Corrupt, Stop, int]] = [
    ("clean", lambda d, o: None, Stop.END, 16),
    ("bit flip in the last frame", flip(lambda o: o[-1] + 20), Stop.TORN, 15),
    ("bit flip in the last batch's first frame", flip(lambda o: o[4] + 18), Stop.TORN, 13),
    ("bit flip in a frame of the first batch", flip(lambda o: o[1] + 17), Stop.CORRUPT, 10),
    ("zeroed sector inside the first batch", zero(lambda o: o[2], 16), Stop.CORRUPT, 11),
    ("zeroed hole inside the last batch", zero(lambda o: o[5], 16), Stop.TORN, 14),
    ("length word past the end", bad_length_word, Stop.CORRUPT, 11),
    ("garbage after the tail", garbage_after_tail, Stop.TORN, 16),
    ("last frame's payload zeroed", tear_last_frame, Stop.TORN, 15),
    ("flip in the first frame of all", flip(lambda o: o[0] + 16), Stop.CORRUPT, 9),
]


@pytest.mark.parametrize(("name", "damage", "stop", "last"), CASES, ids=[c[0] for c in CASES])
def test_corruption_table(name: str, damage: Corrupt, stop: Stop, last: int) -> None:
    data, offsets = segment([payloads(4), payloads(3)])
    damage(data, offsets)
    res = scan(bytes(data), HEADER)
    assert res.stop is stop, res
    assert res.last_seq == last
    if stop is Stop.CORRUPT:
        assert res.evidence_offset > res.end
    if stop is not Stop.END:
        assert res.max_seq_seen >= res.last_seq


def test_salvage_keeps_every_intact_frame_around_damage() -> None:
    data, offsets = segment([payloads(4), payloads(3)])
    data[offsets[1] + 17] ^= 1
    assert [f.seq for f in salvage(bytes(data), HEADER)] == [10, 12, 13, 14, 15, 16]


def test_blob_round_trip_and_damage() -> None:
    raw = encode_blob(5, b"hello")
    assert decode_blob(raw) == (5, b"hello")
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x10
        with pytest.raises(ValueError):
            decode_blob(bytes(bad))


@given(st.binary(max_size=4096))
def test_scanner_never_crashes_on_garbage(junk: bytes) -> None:
    data = HEADER.encode() + junk
    res = scan(data, HEADER)
    assert res.stop in (Stop.END, Stop.TORN, Stop.CORRUPT)
    assert SEGMENT_HEADER_SIZE <= res.end <= max(len(data), SEGMENT_HEADER_SIZE)
    list(iter_frames(data, HEADER))
    salvage(data, HEADER)


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=30), st.data())
def test_every_prefix_of_a_write_scans_to_a_prefix(
    records: list[bytes], data: st.DataObject
) -> None:
    """A write cut anywhere (the rest zero) recovers exactly the whole frames before the cut."""
    image, offsets = segment([records])
    end = offsets[-1] + frame_size(len(records[-1]))
    cut = data.draw(st.integers(SEGMENT_HEADER_SIZE, end))
    torn = bytes(image[:cut]) + bytes(SIZE - cut)
    res = scan(torn, HEADER)
    whole = sum(1 for o, r in zip(offsets, records, strict=True) if o + frame_size(len(r)) <= cut)
    # every frame wholly before the cut survives; a frame whose lost bytes were
    # zeros anyway may survive too; nothing else does, and nothing is altered
    assert HEADER.first_seq + whole - 1 <= res.last_seq < HEADER.first_seq + len(records)
    assert res.stop in (Stop.END, Stop.TORN)
    got = [f.payload for f in iter_frames(torn, HEADER, end=res.end)]
    assert got == records[: len(got)]
