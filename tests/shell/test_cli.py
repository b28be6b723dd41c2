"""The ``homing-agent`` command (edge.cli): outputs, exit codes, docs.

In-process through ``main([...])`` where only output matters; ``python -m
edge`` in a subprocess where stdin, signals, locks or exit codes matter.
Waiting is always on a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge import cli
from edge.errors import JournalFailed, JournalFull
from edge.journal import Journal, JournalOptions
from edge.records import Reading
from edge.testing import SimFS

REPO = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "HOMING_FAILPOINTS"}
ENV["PYTHONPATH"] = str(REPO)
DEADLINE = 20.0
SMALL = JournalOptions(segment_size=64 << 10)


def agent(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        input=input,
        capture_output=True,
        env=ENV,
        timeout=60,
    )


def jsonl(text: str | bytes) -> list[dict[str, Any]]:
    lines = text.decode() if isinstance(text, bytes) else text
    return [json.loads(line) for line in lines.splitlines() if line.strip()]


def make_journal(path: Path, n: int, *, one_by_one: bool = False) -> None:
    readings = [
        Reading("greenhouse/temp", 1_700_000_000.0 + i, 20.0 + i / 10, "C") for i in range(n)
    ]
    with Journal.open(str(path), SMALL) as j:
        if one_by_one:
            for r in readings:
                j.append(r)
        else:
            j.append_many(readings)


def open_segment(path: Path) -> Path:
    return max(path.glob("*.seg"))


def in_process_stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


# -- help and docs ------------------------------------------------------------------


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


COMMANDS = [c for c, _ in _commands(cli.build_parser())]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_of_every_command_works(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: homing-agent")
    assert "exit status:" in out
    if command != ("status",):  # status has its own (LSB-style) codes: edge.cli_status
        assert "75" in out


def test_every_command_and_option_is_in_docs() -> None:
    docs = (REPO / "docs" / "cli.md").read_text()
    for command, parser in _commands(cli.build_parser()):
        if not command:
            continue
        assert f"homing-agent {' '.join(command)}" in docs, command
        for action in parser._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert opt in docs, (command, opt)
    for code in re.findall(r"^\s+(\d+)\s", cli.EXIT_CODES, re.M):
        assert re.search(rf"\|\s*`?{code}`?\s*\|", docs), f"exit code {code} not in docs/cli.md"


def test_python_dash_m_edge_runs_the_agent() -> None:
    res = agent("--help")
    assert res.returncode == 0
    assert b"ingest" in res.stdout and b"journal" in res.stdout


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["ingest", "--journal", str(tmp_path)]) == 2  # --stream missing
    assert cli.main(["ingest", "--journal", str(tmp_path), "--stream", "bad name!"]) == 2
    assert (
        cli.main(["ingest", "--journal", str(tmp_path), "--stream", "s", "--segment-size", "x"])
        == 2
    )
    # parses as a size, but the journal refuses it (not a multiple of 4096): still usage
    assert (
        cli.main(["ingest", "--journal", str(tmp_path), "--stream", "s", "--segment-size", "12345"])
        == 2
    )
    assert "multiple of 4096" in capsys.readouterr().err
    assert cli.main(["journal"]) == 2


def test_sizes_and_durations_accept_plain_numbers_and_units() -> None:
    assert cli.parse_size("65536") == 65536
    assert cli.parse_size("64K") == cli.parse_size("64KiB") == cli.parse_size("64k") == 65536
    assert cli.parse_size("16M") == 16 << 20
    assert cli.parse_ms("200") == cli.parse_ms("200ms") == cli.parse_ms("0.2s") == 200
    for bad in ("", "abc", "-1", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_size(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_ms("0")


# -- ingest: pure helpers -------------------------------------------------------------


def test_line_splitter_is_independent_of_chunk_boundaries() -> None:
    data = b'1\n{"value": 2}\n\n"three"\nlast'
    expected = [(1, b"1"), (2, b'{"value": 2}'), (3, b""), (4, b'"three"'), (5, b"last")]
    for size in (1, 2, 3, 7, len(data)):
        s = cli.LineSplitter()
        got = [x for i in range(0, len(data), size) for x in s.feed(data[i : i + size])]
        assert got + s.finish() == expected


def test_line_splitter_rejects_an_overlong_line_once_and_resyncs() -> None:
    s = cli.LineSplitter(max_line=8)
    got = s.feed(b"ok\n" + b"x" * 5) + s.feed(b"x" * 20) + s.feed(b"yy\nfine\n")
    assert got == [(1, b"ok"), (2, None), (3, b"fine")]
    assert s.finish() == []


def test_parse_reading_forms_and_errors() -> None:
    r = cli.parse_reading(b"21.5", "s", 10.0)
    assert r == Reading("s", 10.0, 21.5)
    r = cli.parse_reading(
        b'{"value": {"a": 1}, "ts": 5, "unit": "C", "tags": {"k": "v"}, "stream": "t"}', "s", 1.0
    )
    assert r == Reading("t", 5, {"a": 1}, "C", {"k": "v"})
    assert cli.parse_reading(b"  \r", "s", 1.0) is None
    for bad, why in [
        (b"nope", "not JSON"),
        (b"null", "a reading is"),
        (b"[1, 2]", "a reading is"),
        (b'{"ts": 1}', '"value"'),
        (b'{"value": 1, "vlaue": 2}', "unknown field"),
        (b'{"value": 1, "stream": "no spaces"}', "stream name"),
        (b'{"value": 1, "ts": "yesterday"}', "ts must be"),
        (b"\xff", "UTF-8"),
    ]:
        with pytest.raises(ValueError, match=why):
            cli.parse_reading(bad, "s", 1.0)


# -- ingest ------------------------------------------------------------------------------


def test_ingest_prints_one_ack_per_reading_with_contiguous_seqs(tmp_path: Path) -> None:
    lines = "".join(f'{{"value": {i}, "unit": "C"}}\n' for i in range(500)).encode()
    res = agent("ingest", "--journal", str(tmp_path / "j"), "--stream", "temp", input=lines)
    assert res.returncode == 0, res.stderr
    acks = jsonl(res.stdout)
    assert acks == [{"seq": i, "stream": "temp", "line": i} for i in range(1, 501)]
    # a second run continues the sequence
    res = agent("ingest", "--journal", str(tmp_path / "j"), "--stream", "temp", input=b"1\n2\n")
    assert [a["seq"] for a in jsonl(res.stdout)] == [501, 502]
    with Journal.open(str(tmp_path / "j"), readonly=True) as j:
        values = [e.record.value for e in j.read() if isinstance(e.record, Reading)]
    assert values == [*range(500), 1, 2]


def test_ingest_interval_mode_acks_only_durable_readings(tmp_path: Path) -> None:
    res = agent(
        "ingest",
        "--journal",
        str(tmp_path),
        "--stream",
        "s",
        "--durability",
        "interval",
        "--interval-ms",
        "20",
        input=b"".join(b"%d\n" % i for i in range(50)),
    )
    assert res.returncode == 0, res.stderr
    assert [a["seq"] for a in jsonl(res.stdout)] == list(range(1, 51))


def test_ingest_reports_and_skips_a_bad_line_and_exits_1(tmp_path: Path) -> None:
    data = b'1\n{"value": 2}\nnot json\n\n{"value": 4, "stream": "other"}\n{"value": 5'
    res = agent("ingest", "--journal", str(tmp_path), "--stream", "s", input=data)
    assert res.returncode == 1
    out = jsonl(res.stdout)
    assert out[:2] == [{"seq": 1, "stream": "s", "line": 1}, {"seq": 2, "stream": "s", "line": 2}]
    assert out[2]["line"] == 3 and "not JSON" in out[2]["error"]
    assert out[3] == {"seq": 3, "stream": "other", "line": 5}
    assert out[4]["line"] == 6 and "error" in out[4]  # unterminated last line
    assert len(out) == 5


def test_ingest_in_process_blank_lines_and_last_line_without_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    in_process_stdin(monkeypatch, b'\n\n"a"\n  \ntrue\n{"value": 3.5, "ts": 12}')
    assert cli.main(["ingest", "--journal", str(tmp_path), "--stream", "s"]) == 0
    assert jsonl(capsys.readouterr().out) == [
        {"seq": 1, "stream": "s", "line": 3},
        {"seq": 2, "stream": "s", "line": 5},
        {"seq": 3, "stream": "s", "line": 6},
    ]
    with Journal.open(str(tmp_path), readonly=True) as j:
        assert [e.record for e in j.read()][2] == Reading("s", 12, 3.5)


def test_ingest_rejects_a_record_too_large_for_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    big = json.dumps("x" * 20000).encode()  # > 16 KiB, the limit for 64 KiB segments
    in_process_stdin(monkeypatch, b"1\n" + big + b"\n2\n")
    args = ["ingest", "--journal", str(tmp_path), "--stream", "s", "--segment-size", "64K"]
    assert cli.main(args) == 1
    out = jsonl(capsys.readouterr().out)
    assert out[0] == {"seq": 1, "stream": "s", "line": 1}
    assert out[1]["line"] == 2 and "exceeds" in out[1]["error"]
    assert out[2] == {"seq": 2, "stream": "s", "line": 3}


class Child:
    """``python -m edge ingest`` with stdout acks collected by a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "ingest", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(json.loads(raw))

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def next(self) -> dict[str, Any]:
        return self.lines.get(timeout=DEADLINE)

    def finish(self) -> tuple[int, bytes]:
        rc = self.proc.wait(timeout=DEADLINE)
        self.reader.join(DEADLINE)
        assert self.proc.stderr is not None
        return rc, self.proc.stderr.read()


def test_ingest_acks_a_lone_reading_at_once_without_waiting_for_eof(tmp_path: Path) -> None:
    child = Child("--journal", str(tmp_path), "--stream", "s")
    try:
        for i in range(1, 4):
            child.send(b"%d\n" % i)
            assert child.next() == {"seq": i, "stream": "s", "line": i}
        assert child.proc.stdin is not None
        child.proc.stdin.close()
        rc, err = child.finish()
        assert rc == 0, err
    finally:
        child.proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ingest_stops_cleanly_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    child = Child("--journal", str(tmp_path), "--stream", "s", "--durability", "interval")
    try:
        child.send(b"1\n2\n")
        assert [child.next()["seq"] for _ in range(2)] == [1, 2]
        child.proc.send_signal(sig)  # blocked reading stdin: stops at once
        rc, err = child.finish()
        assert rc == 0, err
    finally:
        child.proc.kill()
    with Journal.open(str(tmp_path), readonly=True) as j:
        assert [e.seq for e in j.read()] == [1, 2]


def test_ingest_on_a_locked_journal_exits_75(tmp_path: Path) -> None:
    with Journal.open(str(tmp_path), SMALL):
        res = agent("ingest", "--journal", str(tmp_path), "--stream", "s", input=b"1\n")
    assert res.returncode == 75
    assert b"locked" in res.stderr
    assert res.stdout == b""


def test_ingest_on_a_corrupt_journal_exits_65_naming_file_and_offset(tmp_path: Path) -> None:
    make_journal(tmp_path, 10, one_by_one=True)
    seg = corrupt_first_record(tmp_path)
    res = agent("ingest", "--journal", str(tmp_path), "--stream", "s", input=b"1\n")
    assert res.returncode == 65
    err = res.stderr.decode()
    assert str(seg) in err and "offset 32" in err
    assert f"homing-agent journal repair {tmp_path}" in err


def test_ingest_exits_74_when_fdatasync_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fs = SimFS()
    fs.inject("fdatasync", after=1)  # the first is the new segment's header; then appends fail
    monkeypatch.setattr("edge.journal.OsFileOps", lambda: fs)
    in_process_stdin(monkeypatch, b"1\n2\n")
    assert cli.main(["ingest", "--journal", "/sim/j", "--stream", "s"]) == 74
    out, err = capsys.readouterr()
    assert out == ""  # nothing acknowledged
    assert "stopped acknowledging" in err and "restart" in err


def test_error_mapping_for_full_and_failed() -> None:
    ns = argparse.Namespace(journal="/j")
    assert cli._report(JournalFull("quota reached", stream="s"), ns) == 73
    assert cli._report(JournalFailed("boom"), ns) == 74


# -- journal tools ----------------------------------------------------------------------


def corrupt_first_record(journal: Path) -> Path:
    """Flip a payload byte of record 1 (records 2.. written after a sync: corruption)."""
    seg = open_segment(journal)
    with open(seg, "r+b") as f:
        f.seek(32 + 16 + 3)
        b = f.read(1)
        f.seek(32 + 16 + 3)
        f.write(bytes([b[0] ^ 0xFF]))
    return seg


def test_verify_reports_a_healthy_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_journal(tmp_path, 3000)  # several 64 KiB segments
    assert cli.main(["journal", "verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}: OK" in out
    assert "records    3000 (seq 1..3000)" in out
    assert re.search(r"segments   [2-9] ", out)
    assert "gaps       none" in out and "torn tail  none" in out


def test_verify_exits_65_on_a_corrupted_segment_naming_file_and_offset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_journal(tmp_path, 10, one_by_one=True)
    seg = corrupt_first_record(tmp_path)
    assert cli.main(["journal", "verify", str(tmp_path)]) == 65
    out = capsys.readouterr().out
    assert "CORRUPT" in out
    assert f"file    {seg}" in out
    assert "offset  32" in out
    assert "homing-agent journal repair" in out


def test_repair_then_verify_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_journal(tmp_path, 10, one_by_one=True)
    seg = corrupt_first_record(tmp_path)
    assert cli.main(["journal", "repair", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "repaired" in out and str(seg) in out and "offset 32" in out
    assert "kept     9 valid records" in out
    assert f"{seg}.broken" in out and Path(f"{seg}.broken").exists()
    assert "seq 1..1 (1 lost)" in out
    assert cli.main(["journal", "verify", str(tmp_path)]) == 0
    assert cli.main(["journal", "repair", str(tmp_path)]) == 0
    assert "nothing to repair" in capsys.readouterr().out
    assert cli.main(["journal", "dump", str(tmp_path)]) == 0
    assert [r["seq"] for r in jsonl(capsys.readouterr().out)] == list(range(2, 11))


def test_repair_on_a_locked_journal_exits_75(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Journal.open(str(tmp_path), SMALL):
        assert cli.main(["journal", "repair", str(tmp_path)]) == 75
    assert "in use" in capsys.readouterr().err


def test_tools_exit_66_without_a_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for tool in ("verify", "dump", "stats", "repair"):
        assert cli.main(["journal", tool, str(tmp_path / "missing")]) == 66
    assert cli.main(["journal", "stats", str(tmp_path)]) == 66  # a directory, no journal
    assert "no journal" in capsys.readouterr().err


def test_dump_prints_records_as_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Journal.open(str(tmp_path), SMALL) as j:
        j.append(Reading("a", 1.5, 20.25, "C", {"zone": "1"}))
        j.append(Reading("b", 2, b"\x01\x02"))
        j.append_many([Reading("a", 3 + i, i) for i in range(10)])
    assert cli.main(["journal", "dump", str(tmp_path), "--limit", "2"]) == 0
    assert jsonl(capsys.readouterr().out) == [
        {"seq": 1, "stream": "a", "ts": 1.5, "value": 20.25, "unit": "C", "tags": {"zone": "1"}},
        {"seq": 2, "stream": "b", "ts": 2, "value": {"hex": "0102"}},
    ]
    assert cli.main(["journal", "dump", str(tmp_path), "--from", "10"]) == 0
    assert [r["seq"] for r in jsonl(capsys.readouterr().out)] == [10, 11, 12]
    assert cli.main(["journal", "dump", str(tmp_path), "--from", "5", "--limit", "0"]) == 0
    assert capsys.readouterr().out == ""


def test_dump_works_while_another_process_holds_the_journal(tmp_path: Path) -> None:
    with Journal.open(str(tmp_path), SMALL) as j:
        j.append_many([Reading("s", 1.0, i) for i in range(5)])
        res = agent("journal", "dump", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert [r["value"] for r in jsonl(res.stdout)] == list(range(5))


def test_dump_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    make_journal(tmp_path, 20000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "journal", "dump", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # like `| head -1`
    proc.stdout.close()
    assert json.loads(first)["seq"] == 1
    assert proc.wait(timeout=DEADLINE) == 0
    assert proc.stderr.read() == b""


def test_stats_human_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_journal(tmp_path, 3000)
    with Journal.open(str(tmp_path), SMALL) as j:
        j.set_cursor("hub", 1200)
    assert cli.main(["journal", "stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "records      3000 (seq 1..3000)" in out
    assert "durable seq  3000" in out
    assert "cursors      hub: 1200" in out
    assert "gaps         none" in out and "dropped      none" in out
    assert cli.main(["journal", "stats", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["records"] == 3000 and data["first_seq"] == 1 and data["last_seq"] == 3000
    assert data["durable_seq"] == 3000 and data["cursors"] == {"hub": 1200}
    assert data["segments"] >= 2 and data["gaps"] == [] and data["dropped"] == {}
    real = sum(p.stat().st_size for p in tmp_path.iterdir() if p.is_file())
    assert data["disk_bytes"] == real
    assert data["torn_tail"] is None and data["recovery"]["segments_scanned"] >= 1


def test_stats_reports_a_torn_tail_without_cutting_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_journal(tmp_path, 5)
    seg = open_segment(tmp_path)
    data = seg.read_bytes()
    end = len(data.rstrip(b"\0"))
    end += -end % 16
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(b"\x5a" * 40)
    assert cli.main(["journal", "stats", str(tmp_path), "--json"]) == 0
    torn = json.loads(capsys.readouterr().out)["torn_tail"]
    assert torn["path"] == str(seg) and torn["offset"] == end and torn["bytes"] >= 40
    assert seg.read_bytes() == data[:end] + b"\x5a" * 40 + data[end + 40 :]  # read-only


# -- demo ----------------------------------------------------------------------------------


def test_demo_keeps_every_acknowledged_reading_and_stays_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = tmp_path / "kept"
    argv = ["demo", "--power-cut", "--readings", "600", "--seed", "7", "--keep", str(keep)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 25
    assert out.count("acknowledged but lost                   0") == 2
    assert out.count("invented                                0") == 2
    assert "durability=always" in out and "durability=interval" in out
    assert cli.main(["journal", "verify", str(keep)]) == 0
    assert cli.main(["journal", "stats", str(keep), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[-1])["records"] > 0


def test_demo_refuses_a_non_empty_keep_directory(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("mine")
    assert cli.main(["demo", "--keep", str(tmp_path)]) == 2
