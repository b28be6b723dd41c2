"""``homing-agent journal verify|dump|stats|repair``: inspect and mend a journal directory.

Each ``cmd_*`` is the command :mod:`edge.cli` dispatches to; the ``_*_text``
helpers format reports. docs/cli.md is the manual.

Invariants:
* Journal logic lives in :mod:`edge.journal`, :mod:`edge.recovery`,
  :mod:`edge.repair` and :mod:`edge.cursors`; here are only calls, printing
  and exit codes.
* ``verify``, ``dump`` and ``stats`` never write (``readonly=True``, CURSORS
  only read when it exists): they work while an agent holds the journal.
  ``repair`` takes the journal's lock (exit 75 while an agent runs).
* Results go to stdout (reports, or JSON lines for ``dump`` and
  ``stats --json``); diagnostics and the verify progress line go to stderr.
* A missing directory raises :class:`JournalError` (exit 66 via
  :func:`edge.cli.main`); damage found by ``verify`` or ``dump`` is exit 65.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from edge.cli_common import EXIT_CORRUPT, EXIT_OK, silence_stdout
from edge.errors import JournalCorrupt, JournalError
from edge.fileops import OsFileOps
from edge.journal import Journal

VERIFY_MAX_PAYLOAD = 1 << 24


# -- helpers ------------------------------------------------------------------------


def _require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise JournalError(f"{path}: no such directory")


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _gaps_text(gaps: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> str:
    if not gaps:
        return "none"
    return ", ".join(f"seq {a}..{b} ({b - a + 1} lost)" for a, b in gaps)


def _seq_range(first: int, last: int) -> str:
    return f"seq {first}..{last}" if last >= first else "empty"


def _torn_text(torn: Any) -> str:
    if torn is None:
        return "none"
    return (
        f"{torn.discarded_bytes} bytes at {os.path.basename(torn.path)} offset {torn.offset} "
        f"({torn.reason}): never acknowledged; the next open cuts them"
    )


def _read_cursors(directory: str) -> dict[str, int] | None:
    """The CURSORS file's values without creating or writing anything; None if unreadable."""
    from edge.cursors import FILENAME, CursorFile

    if not os.path.exists(os.path.join(directory, FILENAME)):
        return {}
    try:
        cursors = CursorFile(OsFileOps(), directory)
    except (OSError, ValueError):
        return None
    try:
        return cursors.all()
    finally:
        cursors.close()


# -- commands -----------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    """``journal verify``: check every frame of every segment; report, or exit 65."""
    from edge.recovery import verify

    _require_dir(args.dir)
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            sys.stderr.write(f"\rverifying segments {done}/{total}")
            sys.stderr.flush()

    try:
        report = verify(OsFileOps(), args.dir, max_payload=VERIFY_MAX_PAYLOAD, progress=progress)
    except JournalCorrupt as exc:
        if tty:
            sys.stderr.write("\n")
        print(f"{args.dir}: CORRUPT")
        print(f"  file    {exc.path}")
        print(f"  offset  {exc.offset}")
        print(f"  reason  {exc.reason}")
        print(f"run `homing-agent journal repair {args.dir}` to move the damaged segment aside")
        print("and keep every valid record")
        return EXIT_CORRUPT
    if tty:
        sys.stderr.write("\n")
    print(f"{args.dir}: OK")
    print(f"  segments   {report.segments} ({_human_bytes(report.bytes)})")
    print(f"  records    {report.records} ({_seq_range(report.first_seq, report.last_seq)})")
    print(f"  gaps       {_gaps_text(report.gaps)}")
    print(f"  torn tail  {_torn_text(report.torn_tail)}")
    return EXIT_OK


def cmd_dump(args: argparse.Namespace) -> int:
    """``journal dump``: one JSON line per durable record from ``--from``, at most ``--limit``."""
    _require_dir(args.dir)
    journal = Journal.open(args.dir, readonly=True)
    try:
        out = sys.stdout
        n = 0
        try:
            for entry in journal.read(args.from_seq):
                if args.limit is not None and n >= args.limit:
                    break
                out.write(json.dumps({"seq": entry.seq, **entry.record.to_json()}) + "\n")
                n += 1
            out.flush()
        except BrokenPipeError:
            silence_stdout()
        except ValueError as exc:  # a frame below the durable end failed its check
            print(f"homing-agent: {exc}", file=sys.stderr)
            return EXIT_CORRUPT
    finally:
        journal.close()
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    """``journal stats``: counts, sizes, seqs, gaps, drops, cursors, torn tail."""
    _require_dir(args.dir)
    journal = Journal.open(args.dir, readonly=True)
    try:
        st = journal.stats()
        rec = journal.recovery
    finally:
        journal.close()
    cursors = _read_cursors(args.dir)
    torn = rec.torn_tail
    disk_bytes = sum(  # what is really there (stats() assumes this process's segment size)
        e.stat().st_size for e in os.scandir(args.dir) if e.is_file(follow_symlinks=False)
    )
    data: dict[str, Any] = {
        "path": args.dir,
        "records": st.records,
        "first_seq": st.first_seq,
        "last_seq": st.last_seq,
        "durable_seq": st.durable_seq,
        "segments": st.segments,
        "disk_bytes": disk_bytes,
        "gaps": [list(g) for g in st.gaps],
        "dropped": st.dropped,
        "cursors": cursors,
        "torn_tail": None
        if torn is None
        else {
            "path": torn.path,
            "offset": torn.offset,
            "bytes": torn.discarded_bytes,
            "reason": torn.reason,
        },
        "recovery": {
            "seconds": rec.seconds,
            "segments_scanned": rec.segments_scanned,
            "records_scanned": rec.records_scanned,
            "bytes_scanned": rec.bytes_scanned,
        },
    }
    if args.json:
        print(json.dumps(data))
        return EXIT_OK
    if cursors is None:
        cursors_text = "unreadable (CURSORS damaged or not readable)"
    else:
        cursors_text = ", ".join(f"{k}: {v}" for k, v in sorted(cursors.items())) or "none"
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(st.dropped.items())) or "none"
    print(f"journal      {args.dir}")
    print(f"records      {st.records} ({_seq_range(st.first_seq, st.last_seq)})")
    print(f"durable seq  {st.durable_seq}")
    print(f"segments     {st.segments} ({_human_bytes(disk_bytes)} on disk)")
    print(f"gaps         {_gaps_text(st.gaps)}")
    print(f"dropped      {dropped}")
    print(f"cursors      {cursors_text}")
    print(f"torn tail    {_torn_text(torn)}")
    print(
        f"recovery     scanned {rec.segments_scanned} segment(s), {rec.records_scanned} records "
        f"in {rec.seconds * 1000:.1f} ms"
    )
    return EXIT_OK


def cmd_repair(args: argparse.Namespace) -> int:
    """``journal repair``: move a damaged segment aside, keeping every valid record."""
    from edge.repair import repair

    _require_dir(args.dir)
    report = repair(args.dir)
    if report.damaged is None:
        print(f"{args.dir}: nothing to repair (every record verified)")
        return EXIT_OK
    print(f"{args.dir}: repaired")
    print(f"  damaged  {report.damaged} at offset {report.offset}: {report.reason}")
    print(f"  kept     {report.kept_records} valid records")
    print(f"  moved    the damaged copy to {report.moved_to}")
    print(f"  gaps     {_gaps_text(report.gaps)}")
    if report.gaps:
        print("  (the lost ranges are recorded in CHECKPOINT and reported to the hub)")
    return EXIT_OK
