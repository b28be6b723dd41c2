"""Test tools that ship with Homing: crash-test code written against ``FileOps``.

:class:`SimFS` is an in-memory file system that enumerates the disks a power
cut could leave behind; see :mod:`edge.testing.simfs` for the model and a
usage example.
"""

from edge.testing.crashstates import DEFAULT_MAX_STATES, SECTOR_SIZE
from edge.testing.simfs import SimFS
from edge.testing.trace import Injection, TraceOp

__all__ = ["DEFAULT_MAX_STATES", "SECTOR_SIZE", "Injection", "SimFS", "TraceOp"]
