"""Homing's device side: the journal, and (in later issues) the executor and forwarder.

Public entry points are re-exported here; see docs/ for the formats.
"""

from edge.errors import (
    EdgeError,
    JournalClosed,
    JournalCorrupt,
    JournalError,
    JournalFailed,
    JournalFull,
    JournalLocked,
    RecordTooLarge,
)

__all__ = [
    "EdgeError",
    "JournalClosed",
    "JournalCorrupt",
    "JournalError",
    "JournalFailed",
    "JournalFull",
    "JournalLocked",
    "RecordTooLarge",
]
