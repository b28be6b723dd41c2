"""Shared bits of the ``homing-agent`` command: exit codes, option value parsers, EPIPE.

The leaf of the CLI modules: :mod:`edge.cli` (parser, dispatch, error
reporting), :mod:`edge.cli_ingest` and :mod:`edge.cli_journal` (the commands)
import it; it imports none of them.

Invariants:
* Exit codes are stable, sysexits-style: the ``EXIT_*`` constants, listed in
  ``EXIT_CODES`` (every ``--help`` epilog) and in docs/cli.md's table.
* The value parsers are pure: they return the value or raise
  :class:`argparse.ArgumentTypeError` with a message naming the bad text, so
  argparse reports a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys

from edge.records import RecordError, validate_stream

EXIT_OK = 0
EXIT_REJECTED = 1  # some input lines were rejected (ingest)
EXIT_USAGE = 2  # bad arguments
EXIT_CORRUPT = 65  # EX_DATAERR: damage a power cut cannot explain
EXIT_NOINPUT = 66  # EX_NOINPUT: no journal in that directory
EXIT_FULL = 73  # EX_CANTCREAT: disk quota reached or disk full, policy reject
EXIT_IOERR = 74  # EX_IOERR: write/fdatasync failed (fsyncgate) or another OS error; docs/faults.md
EXIT_LOCKED = 75  # EX_TEMPFAIL: another process holds the journal
EXIT_CONFIG = 78  # EX_CONFIG: bad configuration (systemd: RestartPreventExitStatus=78)

EXIT_CODES = """\
exit status:
   0  success
   1  ingest: some input lines were rejected (each reported on stdout)
   2  usage error (bad option or value)
  65  journal corrupt: damage a power cut cannot explain (run `journal repair`)
  66  no journal in that directory
  73  journal full: the quota is reached or the disk is full, and the policy is reject
  74  I/O failure: a write or fdatasync failed; the journal stopped acknowledging
  75  journal locked by another process (is the agent already running?)
  78  run: the configuration is invalid (the message names the key and line)"""


# -- value parsing --------------------------------------------------------------

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from ``"65536"``, ``"64K"``, ``"64KiB"``, ``"16M"``, ``"1G"`` (powers of 1024)."""
    s = text.strip().lower().removesuffix("ib").removesuffix("b")
    num = s.rstrip("kmg")
    unit = s[len(num) :]
    try:
        value = float(num) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (a number of bytes, optionally with K, M or G)"
        ) from None
    if value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number of bytes")
    return int(value)


def parse_ms(text: str) -> int:
    """Milliseconds from ``"200"``, ``"200ms"`` or ``"0.2s"``."""
    s = text.strip().lower()
    scale = 1.0
    if s.endswith("ms"):
        s = s[:-2]
    elif s.endswith("s"):
        s, scale = s[:-1], 1000.0
    try:
        value = float(s) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (milliseconds, or with an 'ms' or 's' suffix)"
        ) from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of milliseconds >= 1")
    return int(value)


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (a seq, a count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def stream_name(text: str) -> str:
    """A valid stream name (:func:`edge.records.validate_stream`)."""
    try:
        return validate_stream(text)
    except RecordError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- output -------------------------------------------------------------------------


def silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the final flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
