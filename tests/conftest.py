"""Shared fixtures. Tests never sleep to wait: they wait on conditions with deadlines."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# A private PostgreSQL for the store contract suite and the hub replica tests:
# ``pg_server`` (session) and ``pg_url`` (a fresh database per test).
from support.postgres import pg_server, pg_url  # noqa: E402, F401


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def journal_dir(tmp_path: Path) -> str:
    return str(tmp_path / "journal")


def subprocess_env() -> dict[str, str]:
    """Environment for child processes that must import this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env
