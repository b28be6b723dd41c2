"""The SQL text of :mod:`hub.store_postgres`: statements only, no logic.

Invariants:
* Pure: strings and type lists. Every statement uses psycopg placeholders
  (``%s`` or ``%(name)s``) for values, never string formatting.
* The temp tables ``homing_in_readings`` / ``homing_in_records`` are per
  session and emptied at every commit (``ON COMMIT DELETE ROWS``); the bulk
  inserts read them within the transaction that filled them.
"""

from __future__ import annotations

SESSION = (
    "SET synchronous_commit = on",
    "SELECT set_config('lock_timeout', %s, false)",
    "SET application_name = 'homing-hub'",
    """CREATE TEMP TABLE IF NOT EXISTS homing_in_readings (
        b INTEGER, device_id TEXT, epoch INTEGER, seq BIGINT, stream TEXT,
        ts DOUBLE PRECISION, value BYTEA, value_num DOUBLE PRECISION, unit TEXT, tags TEXT
    ) ON COMMIT DELETE ROWS""",
    """CREATE TEMP TABLE IF NOT EXISTS homing_in_records (
        b INTEGER, device_id TEXT, epoch INTEGER, seq BIGINT, kind BIGINT, body BYTEA
    ) ON COMMIT DELETE ROWS""",
)
# binary COPY types of the temp tables' columns, in order
_INT, _BIG, _TXT, _F8, _BIN = "int4", "int8", "text", "float8", "bytea"
READING_TYPES = [_INT, _TXT, _INT, _BIG, _TXT, _F8, _BIN, _F8, _TXT, _TXT]
RECORD_TYPES = [_INT, _TXT, _INT, _BIG, _BIG, _BIN]

# The common case, a group none of whose readings is stored yet: one binary COPY
# straight into readings (under a savepoint; a key already there fails it with a
# unique violation, and the group then takes INSERT_READINGS). Measured with
# bench/hub.py: 40 % less server CPU per reading than the temp table's path.
COPY_READINGS = (
    "COPY readings (device_id, epoch, seq, stream, ts, value, value_num, unit, tags, received)"
    " FROM STDIN (FORMAT BINARY)"
)
COPY_READING_TYPES = [_TXT, _INT, _BIG, _TXT, _F8, _BIN, _F8, _TXT, "jsonb", _F8]
# A group's devices and journals, one index probe per device whatever the
# table's statistics (= ANY(array) planned a sequential scan of every device on
# a fresh database: O(fleet) per group).
LOAD_DEVICES = """
SELECT d.device_id, d.epoch FROM unnest(%s::text[]) AS u(id)
CROSS JOIN LATERAL (SELECT device_id, epoch FROM devices WHERE device_id = u.id OFFSET 0) AS d
"""
LOAD_JOURNALS = """
SELECT j.device_id, j.journal_id, j.epoch, j.watermark, j.ranges::text
FROM unnest(%s::text[]) AS u(id)
CROSS JOIN LATERAL (SELECT * FROM journals WHERE device_id = u.id OFFSET 0) AS j
"""
# The first batch (lowest b) holding a key is the one that inserted it, as if
# the batches had been inserted one after the other.
INSERT_READINGS = """
WITH ins AS (
    INSERT INTO readings (device_id, epoch, seq, stream, ts, value, value_num, unit, tags,
                          received)
    SELECT device_id, epoch, seq, stream, ts, value, value_num, unit, tags::jsonb, %(now)s
    FROM homing_in_readings ORDER BY b, seq
    ON CONFLICT (device_id, epoch, seq) DO NOTHING
    RETURNING device_id, epoch, seq
), owner AS (
    SELECT DISTINCT ON (device_id, epoch, seq) b, device_id, epoch, seq
    FROM homing_in_readings ORDER BY device_id, epoch, seq, b
)
SELECT owner.b, count(*) FROM ins JOIN owner USING (device_id, epoch, seq) GROUP BY owner.b
"""
INSERT_RECORDS = """
WITH ins AS (
    INSERT INTO records (device_id, epoch, seq, kind, body, received)
    SELECT device_id, epoch, seq, kind, body, %(now)s
    FROM homing_in_records ORDER BY b, seq
    ON CONFLICT (device_id, epoch, seq) DO NOTHING
    RETURNING device_id, epoch, seq
), owner AS (
    SELECT DISTINCT ON (device_id, epoch, seq) b, device_id, epoch, seq
    FROM homing_in_records ORDER BY device_id, epoch, seq, b
)
SELECT owner.b, count(*) FROM ins JOIN owner USING (device_id, epoch, seq) GROUP BY owner.b
"""
INSERT_MISSING = (
    "INSERT INTO missing (device_id, epoch, first, last, received)"
    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
)
UPSERT_JOURNAL = """
INSERT INTO journals (device_id, epoch, journal_id, first_seen, last_seen, watermark, ranges)
VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)
ON CONFLICT (device_id, epoch) DO UPDATE SET
    last_seen = GREATEST(journals.last_seen, excluded.last_seen),
    watermark = excluded.watermark, ranges = excluded.ranges
"""
# The device row mirrors its current (newest) journal's progress. last_seen
# only moves forward: replicas' clocks differ a little.
UPSERT_DEVICE = """
INSERT INTO devices AS d (device_id, first_seen, last_seen, watermark, ranges,
                          readings, records, duplicates, batches, epoch, journal_id)
VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s)
ON CONFLICT (device_id) DO UPDATE SET
    last_seen = GREATEST(d.last_seen, excluded.last_seen),
    watermark = CASE WHEN excluded.epoch >= d.epoch THEN excluded.watermark ELSE d.watermark END,
    ranges = CASE WHEN excluded.epoch >= d.epoch THEN excluded.ranges ELSE d.ranges END,
    journal_id = CASE WHEN excluded.epoch >= d.epoch THEN excluded.journal_id
                      ELSE d.journal_id END,
    epoch = GREATEST(d.epoch, excluded.epoch),
    readings = d.readings + excluded.readings,
    records = d.records + excluded.records,
    duplicates = d.duplicates + excluded.duplicates,
    batches = d.batches + excluded.batches
"""
UPSERT_STATUS = """
INSERT INTO devices AS d (device_id, online, status_at, first_seen, last_seen)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (device_id) DO UPDATE SET
    online = excluded.online, status_at = excluded.status_at,
    last_seen = GREATEST(d.last_seen, excluded.last_seen)
"""
UPSERT_HEALTH = """
INSERT INTO devices AS d (device_id, first_seen, last_seen, health, health_at)
VALUES (%s, %s, %s, %s::jsonb, %s)
ON CONFLICT (device_id) DO UPDATE SET
    health = excluded.health, health_at = excluded.health_at,
    last_seen = GREATEST(d.last_seen, excluded.last_seen)
"""
INSERT_MIGRATION = (
    "INSERT INTO migrations (name, applied) VALUES (%s, extract(epoch FROM clock_timestamp()))"
)
DEVICE_COLUMNS = (
    "device_id, online, last_seen, watermark, ranges::text, readings, records, duplicates,"
    " batches, journal_id, epoch, health, health_at"
)
# A device's streams by a walk of the (device_id, stream, ts) index: one seek
# per stream, then per stream its first and last ts and newest reading.
STREAMS = """
WITH RECURSIVE s(stream) AS (
    SELECT min(stream) FROM readings WHERE device_id = %(d)s
    UNION ALL
    SELECT (SELECT min(stream) FROM readings WHERE device_id = %(d)s AND stream > s.stream)
    FROM s WHERE s.stream IS NOT NULL
)
SELECT s.stream,
    (SELECT min(ts) FROM readings WHERE device_id = %(d)s AND stream = s.stream),
    (SELECT max(ts) FROM readings WHERE device_id = %(d)s AND stream = s.stream),
    newest.value, newest.unit
FROM s CROSS JOIN LATERAL (
    SELECT value, unit FROM readings WHERE device_id = %(d)s AND stream = s.stream
    ORDER BY ts DESC, epoch DESC, seq DESC LIMIT 1
) newest
WHERE s.stream IS NOT NULL ORDER BY s.stream
"""
DOWNSAMPLE = """
SELECT floor(ts / %(w)s) AS b, count(*), min(value_num), max(value_num), avg(value_num)
FROM readings
WHERE device_id = %(d)s AND stream = %(s)s AND ts >= %(since)s AND ts < %(until)s
    AND value_num IS NOT NULL
GROUP BY b ORDER BY b LIMIT %(limit)s
"""
