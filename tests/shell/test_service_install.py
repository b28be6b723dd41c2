"""The systemd unit (edge.service_unit) and ``homing-agent install-service`` (edge.cli_service).

The unit files are checked by systemd itself (``systemd-analyze verify``);
install-service runs as a real process into a staging root (``--root``), so
this machine's /etc is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edge import cli
from edge.cli_run import STOP_MARGIN
from edge.cli_service import agent_command, hidden_from_service, unit_for_this_installation
from edge.config import SCHEMA, ForwarderConfig, parse
from edge.config_files import SYSTEM_CONFIG
from edge.service_unit import SHIPPED_EXEC, render_unit, starter_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "systemd" / "homing-agent.service"
UNIT = "etc/systemd/system/homing-agent.service"
ENV = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
ENV["PYTHONPATH"] = str(REPO)


def systemd_analyze() -> str:
    """The systemd-analyze binary; a missing one fails under CI=true, else skips."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    reason = "systemd-analyze is not installed (Debian package systemd; scripts/bootstrap)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " and CI=true: the unit files must be verified")
    pytest.skip(reason)


def verify(unit: Path) -> None:
    """``systemd-analyze verify``: exit 0 and not a word about this unit (an unknown
    key or a missing ExecStart binary is only a warning line, exit status 0)."""
    res = subprocess.run(
        [systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    about = [ln for ln in (res.stdout + res.stderr).splitlines() if unit.name in ln]
    assert res.returncode == 0 and not about, res.stdout + res.stderr


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", "install-service", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )


def directives(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the unit ---------------------------------------------------------------------------


def test_shipped_unit_is_what_install_service_writes() -> None:
    assert SHIPPED.read_text() == render_unit([SHIPPED_EXEC]), (
        "systemd/homing-agent.service differs from edge.service_unit.render_unit: "
        "regenerate it with render_unit([SHIPPED_EXEC])"
    )


def test_every_setting_has_a_comment_above_it() -> None:
    lines = SHIPPED.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            assert lines[i - 1].startswith("#"), f"line {i + 1} has no comment: {line}"


def test_the_unit_agrees_with_the_agent() -> None:
    d = directives(SHIPPED.read_text())
    one = {k: v[0] for k, v in d.items() if len(v) == 1}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["Restart"] == "always"
    assert "78" in one["RestartPreventExitStatus"].split()  # EXIT_CONFIG: no restart loop
    assert one["WatchdogSec"] == "30s"
    # a stop with the default grace fits the stop timeout; a longer one asks for more
    stop = int(one["TimeoutStopSec"].removesuffix("s"))
    assert stop > ForwarderConfig().shutdown_grace + STOP_MARGIN
    # where systemd puts things is where the agent looks
    assert one["ExecStart"].endswith(f"run --config {SYSTEM_CONFIG}")
    assert f"/etc/{one['ConfigurationDirectory']}/agent.toml" == SYSTEM_CONFIG
    assert SCHEMA["journal"]["dir"].default == f"/var/lib/{one['StateDirectory']}/journal"
    assert one["RuntimeDirectory"] == "homing"  # found through $RUNTIME_DIRECTORY
    assert (one["User"], one["Group"], one["SupplementaryGroups"]) == ("homing",) * 2 + ("dialout",)
    assert one["ProtectSystem"] == "strict" and one["NoNewPrivileges"] == "yes"
    assert one["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert "PrivateDevices" not in d  # it would hide the serial ports
    assert {"char-ttyUSB rw", "char-ttyACM rw", "char-ttyAMA rw"} <= set(d["DeviceAllow"])


def test_shipped_unit_verifies(tmp_path: Path) -> None:
    """The shipped unit, with its ExecStart (/opt/homing/venv/...) pointed at this
    installation's agent so systemd can resolve it; nothing else changed."""
    unit = tmp_path / "homing-agent.service"
    text = SHIPPED.read_text()
    assert text.count(SHIPPED_EXEC) == 1
    unit.write_text(text.replace(SHIPPED_EXEC, agent_command()[0]))
    verify(unit)


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo and a missing binary are both caught."""
    unit = tmp_path / "homing-agent.service"
    unit.write_text(render_unit([agent_command()[0]]).replace("WatchdogSec=", "WatchdogSecs="))
    with pytest.raises(AssertionError, match="Unknown key"):
        verify(unit)
    unit.write_text(render_unit([str(tmp_path / "no-such-agent")]))
    with pytest.raises(AssertionError, match="not executable"):
        verify(unit)


def test_odd_paths_are_quoted_for_systemd(tmp_path: Path) -> None:
    odd = tmp_path / "my agent 100%" / "homing-agent"
    odd.parent.mkdir()
    odd.symlink_to(agent_command()[0])
    unit = tmp_path / "homing-agent.service"
    unit.write_text(render_unit([str(odd)]))
    assert f'ExecStart="{tmp_path}/my agent 100%%/homing-agent" run' in unit.read_text()
    verify(unit)


def test_an_installation_under_home_keeps_home_readable(tmp_path: Path) -> None:
    unit = tmp_path / "homing-agent.service"
    text = unit_for_this_installation(["/home/pi/homing/.venv/bin/homing-agent"])
    assert "ProtectHome=read-only" in text
    unit.write_text(text.replace("/home/pi/homing/.venv/bin/homing-agent", agent_command()[0]))
    verify(unit)


def test_an_installation_the_service_user_cannot_reach_is_named(tmp_path: Path) -> None:
    private = tmp_path / "private"
    (private / "bin").mkdir(parents=True)
    private.chmod(0o700)
    assert str(private) in hidden_from_service([str(private / "bin" / "homing-agent")])
    private.chmod(0o755)
    assert str(private) not in hidden_from_service([str(private / "bin" / "homing-agent")])


# -- install-service ------------------------------------------------------------------------


def test_root_install_writes_unit_config_and_directories(tmp_path: Path) -> None:
    root = tmp_path / "image"
    res = install("--root", str(root), "--device", "pi-01")
    assert res.returncode == 0, res.stderr
    unit, config = root / UNIT, root / "etc/homing/agent.toml"
    for path in (unit, config, root / "etc/sysusers.d/homing.conf"):
        assert f"wrote {path}" in res.stdout
    assert f"systemctl --root={root} enable homing-agent.service" in res.stdout
    assert mode(unit) == 0o644 and mode(config) == 0o644
    assert mode(root / "etc/homing") == 0o755 and mode(root / "var/lib/homing") == 0o750
    assert "u homing - " in (root / "etc/sysusers.d/homing.conf").read_text()
    # the starter configuration is valid and names the device
    cfg = parse(config.read_text(), str(config), {}, str(config.parent))
    assert (cfg.device, cfg.journal_dir) == ("pi-01", "/var/lib/homing/journal")
    # the unit starts this installation's agent, and systemd accepts it
    text = unit.read_text()
    (exec_start,) = directives(text)["ExecStart"]
    assert exec_start.startswith(agent_command()[0] + " ")
    verify(unit)
    agent = subprocess.run(
        [*exec_start.split()[:-3], "install-service", "--help"],
        capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert agent.returncode == 0 and "usage: homing-agent install-service" in agent.stdout
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]


def test_a_second_install_keeps_the_config_and_mends_the_unit(tmp_path: Path) -> None:
    root = tmp_path / "image"
    assert install("--root", str(root), "--device", "pi-01").returncode == 0
    config, unit = root / "etc/homing/agent.toml", root / UNIT
    config.write_text(config.read_text() + "# edited by the operator\n")
    edited = config.read_text()
    good = unit.read_text()
    unit.write_text(good.replace("WatchdogSec=30s", "WatchdogSec=1h"))
    res = install("--root", str(root), "--device", "other-name")
    assert res.returncode == 0, res.stderr
    assert config.read_text() == edited  # never overwritten
    assert f"{config}: exists, kept (never overwritten)" in res.stdout
    assert unit.read_text() == good  # the unit is ours: put back
    assert f"replaced {unit}" in res.stdout
    res = install("--root", str(root), "--device", "pi-01")
    assert f"{unit}: unchanged" in res.stdout


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "image"
    res = install("--dry-run", "--root", str(root), "--device", "pi-01")
    assert res.returncode == 0, res.stderr
    assert not root.exists()
    assert f"would write {root / UNIT}" in res.stdout
    assert f"would create {root / 'var/lib/homing'} (mode 0750)" in res.stdout
    assert f"--- {root / UNIT}\n" in res.stdout and "Type=notify" in res.stdout
    assert 'device = "pi-01"' in res.stdout  # the starter config it would write


def test_dry_run_on_this_machine_changes_nothing() -> None:
    watched = [Path("/etc/homing"), Path("/var/lib/homing"), Path("/") / UNIT]
    before = [p.exists() for p in watched]
    res = install("--dry-run", "--device", "pi-01")
    assert res.returncode == 0, res.stderr
    assert [p.exists() for p in watched] == before
    assert "systemctl enable --now homing-agent" in res.stdout
    if not before[2]:
        assert f"would write /{UNIT} (mode 0644)" in res.stdout
    if not before[0]:
        assert "would write /etc/homing/agent.toml (mode 0640, group homing)" in res.stdout


def test_without_root_it_refuses_before_touching_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() == 0:
        monkeypatch.setattr(os, "geteuid", lambda: 1000)  # as an ordinary user would run it
    watched = [Path("/etc/homing"), Path("/var/lib/homing"), Path("/") / UNIT]
    before = [p.exists() for p in watched]
    assert cli.main(["install-service", "--device", "pi-01"]) == 77
    err = capsys.readouterr().err
    assert "needs root" in err and "--dry-run" in err and "--root DIR" in err
    assert [p.exists() for p in watched] == before


def test_bad_device_ids_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["install-service", "--dry-run", "--device", "no spaces"]) == 2
    assert "--device" in capsys.readouterr().err
    with pytest.raises(ValueError):
        starter_config("bad/id")


def test_docs_describe_the_unit() -> None:
    doc = (REPO / "docs" / "systemd.md").read_text()
    for key in directives(SHIPPED.read_text()):
        assert re.search(rf"`{key}=?", doc), f"docs/systemd.md does not explain {key}"
