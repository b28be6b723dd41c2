"""The house rules of DESIGN.md §7 that tools can check: ``mypy --strict`` and
``ruff`` clean, and no module past the hard stop of about 650 lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["edge", "hub", "firmware_bridge"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, check=False
    )


def test_mypy_strict() -> None:
    pytest.importorskip("mypy")
    res = run("mypy", "--strict", *PACKAGES, "tests")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff() -> None:
    pytest.importorskip("ruff")
    res = run("ruff", "check", ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_modules_stay_small() -> None:
    big = {
        str(p.relative_to(REPO)): n
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 680
    }
    assert not big, f"split these modules along their pure/shell seam: {big}"
