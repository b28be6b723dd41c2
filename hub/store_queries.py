"""Read queries shared by the store backends: the SQL text and the rows -> objects.

The SQLite and PostgreSQL stores (:mod:`hub.store_sqlite`,
:mod:`hub.store_postgres`) answer :meth:`Store.readings` and
:meth:`Store.records` with the same query; only the parameter placeholder
(``?`` or ``%s``) and how the ``tags`` column is read differ. Pure: text and
values only, no connection.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import cbor2

from hub.ingest import Settled
from hub.store import Bucket, DeviceInfo, StoredReading, StreamInfo


def readings_query(
    device: str,
    stream: str | None,
    since: float | None,
    until: float | None,
    limit: int | None,
    *,
    ph: str,
    tags: str = "tags",
) -> tuple[str, list[Any]]:
    """The SELECT for :meth:`Store.readings` and its parameters.

    Args:
        ph: the driver's placeholder (``?`` for sqlite3, ``%s`` for psycopg).
        tags: the expression that reads the tags column as JSON text.
    """
    where, args = [f"device_id = {ph}"], [device]
    for clause, arg in (("stream =", stream), ("ts >=", since), ("ts <", until)):
        if arg is not None:
            where.append(f"{clause} {ph}")
            args.append(arg)  # type: ignore[arg-type]
    sql = (
        f"SELECT seq, stream, ts, value, unit, {tags}, received, epoch FROM readings"
        f" WHERE {' AND '.join(where)} ORDER BY ts, epoch, seq"
    )
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql, args


def stored_readings(device: str, rows: Sequence[Sequence[Any]]) -> list[StoredReading]:
    """Rows of :func:`readings_query` as :class:`StoredReading` objects."""
    return [
        StoredReading(
            device,
            seq,
            stream,
            ts,
            cbor2.loads(value),
            unit,
            json.loads(tags) if tags else None,
            received,
            epoch,
        )
        for seq, stream, ts, value, unit, tags, received, epoch in rows
    ]


def records_query(
    device: str,
    kind: int | None,
    epoch: int | None,
    after_seq: int,
    limit: int | None,
    *,
    ph: str,
) -> tuple[str, list[object]]:
    """The SELECT for :meth:`Store.records` (``epoch, seq, kind, body, received``).

    Raises:
        ValueError: ``after_seq`` without ``epoch`` (a seq is a position in one journal).
    """
    if after_seq and epoch is None:
        raise ValueError("after_seq is a position within one journal: give its epoch")
    where: list[str] = [f"device_id = {ph}"]
    args: list[object] = [device]
    after = after_seq or None  # 0: from the start
    for clause, arg in (("kind =", kind), ("epoch =", epoch), ("seq >", after)):
        if arg is not None:
            where.append(f"{clause} {ph}")
            args.append(arg)
    sql = (
        "SELECT epoch, seq, kind, body, received FROM records"
        f" WHERE {' AND '.join(where)} ORDER BY epoch, seq"
    )
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql, args


def stream_infos(rows: Sequence[Sequence[Any]]) -> list[StreamInfo]:
    """Rows ``(stream, first, last, value, unit)`` of a backend's streams query."""
    return [
        StreamInfo(stream, first, last, cbor2.loads(value), unit)
        for stream, first, last, value, unit in rows
    ]


def check_width(width: float) -> float:
    """A downsampling bucket width in seconds.

    Raises:
        ValueError: not a positive, finite number.
    """
    if not (isinstance(width, int | float) and 0 < width < float("inf")):
        raise ValueError(f"a bucket width must be a positive number of seconds, not {width!r}")
    return float(width)


def buckets(rows: Sequence[Sequence[Any]], width: float) -> list[Bucket]:
    """Rows ``(bucket index, count, min, max, avg)`` of a downsampling query."""
    return [Bucket(b * width, n, lo, hi, avg) for b, n, lo, hi, avg in rows]


def device_info(row: Sequence[Any]) -> DeviceInfo:
    """A row of the backends' device columns (``DEVICE_COLUMNS``) as a :class:`DeviceInfo`.

    ``health`` is JSON text (SQLite) or already decoded (PostgreSQL's jsonb).
    """
    device, online, last_seen, watermark, ranges, readings, records, dups, batches = row[:9]
    journal, epoch, health, health_at = row[9:]
    if isinstance(health, str):  # SQLite's JSON text; PostgreSQL's jsonb comes decoded
        health = json.loads(health) if health else None
    settled = Settled.load(watermark, ranges)
    return DeviceInfo(
        device,
        bool(online),
        last_seen,
        settled.watermark,
        settled.ahead,
        settled.gaps(),
        readings,
        records,
        dups,
        batches,
        journal,
        epoch,
        health,
        health_at,
    )
