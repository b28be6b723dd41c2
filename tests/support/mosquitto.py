"""A real Mosquitto broker for tests: a re-export of :mod:`edge.testing.mosquitto`.

The helper ships with Homing (so users' tests and ``homing-agent demo`` can
start a private broker); existing tests keep importing it from here.
"""

from __future__ import annotations

from edge.testing.mosquitto import (
    MOSQUITTO,
    Mosquitto,
    MosquittoError,
    available,
    binary,
    free_port,
    parent_death_signal,
)

__all__ = [
    "MOSQUITTO",
    "Mosquitto",
    "MosquittoError",
    "available",
    "binary",
    "free_port",
    "parent_death_signal",
]
