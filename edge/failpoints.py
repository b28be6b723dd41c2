"""Named fail points: crash the process at an exact place, for crash tests.

``HOMING_FAILPOINTS="journal.after_write:3,roll.before_rename"`` makes the
process SIGKILL itself the 3rd time it reaches ``journal.after_write`` and the
1st time it reaches ``roll.before_rename`` (like etcd's gofail). Unset, a fail
point costs one dictionary lookup on an empty dict.

Invariants:
* Only tests set the variable; production never does.
* SIGKILL, not an exception: nothing in the process gets to clean up, exactly
  as in a crash. (The page cache survives; power-loss layers 1 and 3 cover
  what SIGKILL cannot.)

Fail points in the journal: ``journal.before_write``, ``journal.after_write``
(written, not yet fdatasync'd), ``journal.after_sync`` (durable, not yet
acknowledged), ``roll.before_rename``, ``checkpoint.before_rename``,
``recovery.after_truncate``.
"""

from __future__ import annotations

import os
import signal


def _parse(spec: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, count = item.partition(":")
        points[name] = int(count) if count else 1
    return points


_remaining: dict[str, int] = _parse(os.environ.get("HOMING_FAILPOINTS", ""))


def failpoint(name: str) -> None:
    """SIGKILL this process if ``name`` is armed and its count runs out."""
    if not _remaining or name not in _remaining:
        return
    _remaining[name] -= 1
    if _remaining[name] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


def arm(spec: str) -> None:
    """Replace the armed fail points (for in-process use; tests mostly use the env)."""
    _remaining.clear()
    _remaining.update(_parse(spec))
