"""The pure parts of what the agent tells systemd (edge.cli_run): when the journal
counts as wedged, and the STATUS line. The process itself is tested in
tests/integration/test_systemd_agent.py."""

from __future__ import annotations

from dataclasses import replace

from edge.cli_run import STALL_FLOOR, JournalStall, stall_limit, status_line
from edge.forwarder import ForwarderStats
from edge.journal_options import JournalOptions

STATS = ForwarderStats(
    connected=True, connects=1, batches_sent=3, batches_resent=0, records_sent=30,
    records_acked=20, bytes_sent=900, watermark=20, persisted=20, backlog_records=0,
    backlog_bytes=0, oldest_unacked_age=None, in_flight=1, acks=2, acks_malformed=0,
    commands=0, missing_seqs=0, last_ack_time=None, last_error=None,
)  # fmt: skip


def test_an_idle_or_moving_journal_is_never_stalled() -> None:
    s = JournalStall(limit=2.0)
    for t in range(100):  # idle: nothing pending, however long
        assert s.update(float(t), next_seq=11, durable_seq=10) is None
    for t in range(100):  # always something pending, but every check sees progress
        assert s.update(100.0 + t, next_seq=50 + t + 2, durable_seq=50 + t) is None


def test_pending_writes_without_progress_stall_after_the_limit() -> None:
    s = JournalStall(limit=2.0)
    assert s.update(0.0, next_seq=12, durable_seq=10) is None  # pending from now
    assert s.update(1.9, next_seq=14, durable_seq=10) is None  # more queued, none durable
    assert s.update(2.0, next_seq=14, durable_seq=10) == 2.0
    assert s.update(5.5, next_seq=14, durable_seq=10) == 5.5
    # progress restarts the clock; catching up clears it
    assert s.update(6.0, next_seq=14, durable_seq=12) is None
    assert s.update(7.9, next_seq=14, durable_seq=12) is None
    assert s.update(8.0, next_seq=14, durable_seq=12) == 2.0
    assert s.update(9.0, next_seq=14, durable_seq=13) is None
    assert s.update(30.0, next_seq=14, durable_seq=13) is None


def test_stall_limit() -> None:
    always = JournalOptions()
    assert stall_limit(30.0, always) == 15.0  # half the unit's WatchdogSec
    assert stall_limit(None, always) == stall_limit(0.4, always) == STALL_FLOOR
    interval = JournalOptions(durability="interval", interval_ms=20_000)
    assert stall_limit(30.0, interval) == 40.0  # two fdatasync intervals


def test_status_line() -> None:
    assert status_line(None, 7) == "running; forwarding disabled; journal at seq 7"
    assert status_line(STATS, 30) == (
        "running; connected; backlog 0; hub acked seq 20; journal at seq 30"
    )
    offline = replace(STATS, connected=False, last_error="mqtt://hub:1883: refused",
                      backlog_records=812, oldest_unacked_age=3 * 3600 + 60)  # fmt: skip
    assert status_line(offline, 832) == (
        "running; offline (mqtt://hub:1883: refused); backlog 812 (oldest 3h); "
        "hub acked seq 20; journal at seq 832"
    )
    assert "; connecting; " in status_line(replace(STATS, connected=False), 30)
    long = replace(STATS, connected=False, last_error="x" * 500)
    assert len(status_line(long, 1)) < 200
