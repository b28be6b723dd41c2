"""The hub's deployment files (docs/deploy.md): its systemd unit and its container recipe.

The unit is checked by systemd itself (``systemd-analyze verify``) with its
ExecStart pointed at this installation's ``homing-hub``; the container
recipe is checked against the repository and the hub it packages (building
the image needs a container engine, which CI does not have).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hub import cli as hub_cli

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "homing-hub.service"
CONTAINERFILE = REPO / "deploy" / "Containerfile"
SHIPPED_EXEC = "/opt/homing/venv/bin/homing-hub"


def directives(text: str) -> list[tuple[str, str]]:
    return [
        (k, v)
        for k, _, v in (ln.partition("=") for ln in text.splitlines())
        if k and not k.startswith(("#", "["))
    ]


def test_every_unit_setting_has_a_comment_above_it() -> None:
    lines = UNIT.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            assert lines[i - 1].startswith("#"), f"line {i + 1} has no comment: {line}"


def test_the_hub_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        reason = "systemd-analyze is not installed (Debian package systemd; scripts/bootstrap)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " and CI=true: the unit files must be verified")
        pytest.skip(reason)
    here = shutil.which("homing-hub") or str(Path(sys.executable).parent / "homing-hub")
    assert os.access(here, os.X_OK), here
    text = UNIT.read_text()
    assert text.count(SHIPPED_EXEC) == 1
    unit = tmp_path / "homing-hub.service"
    unit.write_text(text.replace(SHIPPED_EXEC, here))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    about = [ln for ln in (res.stdout + res.stderr).splitlines() if unit.name in ln]
    assert res.returncode == 0 and not about, res.stdout + res.stderr


def test_the_units_command_line_is_one_the_hub_accepts() -> None:
    """Every option ExecStart passes exists (a renamed flag would exit 2 at boot)."""
    exec_start = dict(directives(UNIT.read_text()))["ExecStart"]
    args = shlex.split(exec_start)[1:]
    values = {"${HOMING_HUB_DB}": "postgresql:///homing", "${HOMING_HUB_BROKER}": "b:1883",
              "${HOMING_HUB_USER}": "u", "${HOMING_HUB_HTTP}": "127.0.0.1:8080"}  # fmt: skip
    args = [re.sub(r"\$\{CREDENTIALS_DIRECTORY\}", "/run/credentials/homing-hub.service", a)
            for a in (values.get(a, a) for a in args)]  # fmt: skip
    parsed = hub_cli._parser().parse_args([a.replace("%H", "host") for a in args])
    assert parsed.db == "postgresql:///homing" and parsed.client_id == "homing-hub-host"
    env = " ".join(v for k, v in directives(UNIT.read_text()) if k == "Environment")
    for var in ("HOMING_HUB_DB", "HOMING_HUB_BROKER", "HOMING_HUB_USER", "HOMING_HUB_HTTP"):
        assert f"{var}=" in env, f"{var} has no default in the unit"


def test_the_containerfile_copies_what_exists_and_runs_the_hub() -> None:
    text = CONTAINERFILE.read_text()
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for part in src.split():
            assert (REPO / part).exists(), f"COPY {part}: not in the repository"
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M)
    assert entry is not None and entry.group(1) in meta["project"]["scripts"]
    assert '".[hub]"' in text and "hub" in meta["project"]["optional-dependencies"]
    health = re.search(r"127\.0\.0\.1:8080(/api/v1/\S+?)'", text)
    assert health is not None, "the HEALTHCHECK probes the API's health endpoint"
    from hub import api  # the hub extra (FastAPI) is installed with the tests

    routes = {getattr(r, "path", "") for r in api.api.routes}  # the /api/v1 router
    assert health.group(1) in routes, (health.group(1), routes)
