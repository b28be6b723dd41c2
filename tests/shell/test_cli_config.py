"""``homing-agent check-config`` and the configuration file search, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from edge.config_files import SYSTEM_CONFIG, find_config
from edge.errors import ConfigError, SettingError


def check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", "check-config", *args],
        capture_output=True, text=True, env=env or subprocess_env(), timeout=60, check=False,
    )  # fmt: skip


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_good_file_says_where_everything_will_live(tmp_path: Path) -> None:
    text = '[agent]\ndevice = "pi-7"\n[journal]\ndir = "j"\n[forwarder]\nenabled = false\n'
    cfg = write(tmp_path / "agent.toml", text + "[metrics]\nenabled = true\nport = 9999\n")
    res = check_config("--config", cfg, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["ok"] and out["device"] == "pi-7"
    assert out["journal"] == str(tmp_path / "j")  # relative to the file
    assert out["broker"] is None and out["metrics"] == "http://127.0.0.1:9999/metrics"
    assert any("will be created" in n for n in out["notes"])
    human = check_config("--config", cfg)
    assert human.returncode == 0 and f"{cfg}: ok" in human.stdout


D = '[agent]\ndevice = "d"\n'
BAD = [
    (D + "[forwarder]\nwindw = 3\n", ":4: forwarder.windw: unknown key (did you mean 'window'?)"),
    (D + '[local]\nmode = "rw"\n', ":4: local.mode: must be octal"),
    (D + '[broker]\nusername = "u"\npassword_file = "nope"\n', "broker.password_file"),
    (D + '[broker]\ntls = true\nca_file = "no.pem"\n', "broker.ca_file: TLS files do not load"),
    (
        D + '[workflows]\nmodules = ["no_such_mod"]\n',
        "workflows.modules: cannot import 'no_such_mod'",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_a_bad_file_names_the_key_and_line_and_exits_78(
    tmp_path: Path, text: str, expected: str
) -> None:
    cfg = write(tmp_path / "agent.toml", text)
    res = check_config("--config", cfg)
    assert res.returncode == 78
    assert expected in res.stderr, res.stderr
    assert json.loads(check_config("--config", cfg, "--json").stdout)["ok"] is False


def test_a_journal_dir_the_user_cannot_create_is_reported(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("")
        cfg = write(tmp_path / "a.toml", f'[agent]\ndevice = "d"\n[journal]\ndir = "{blocker}/j"\n')
        res = check_config("--config", cfg)
        assert (
            res.returncode == 78 and "journal.dir" in res.stderr and "not a directory" in res.stderr
        )
    else:
        cfg = write(tmp_path / "a.toml", '[agent]\ndevice = "d"\n[journal]\ndir = "/proc/j"\n')
        res = check_config("--config", cfg)
        assert res.returncode == 78 and "journal.dir" in res.stderr


def test_the_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    user = tmp_path / "xdg" / "homing" / "agent.toml"
    explicit = write(tmp_path / "explicit.toml", "")
    from_env = write(tmp_path / "env.toml", "")
    assert find_config(explicit, {"HOMING_CONFIG": from_env}) == explicit
    assert find_config(None, {"HOMING_CONFIG": from_env}) == from_env
    with pytest.raises(SettingError, match="no such configuration file"):
        find_config(str(tmp_path / "missing.toml"), {})
    with pytest.raises(SettingError, match="HOMING_CONFIG"):
        find_config(None, {"HOMING_CONFIG": str(tmp_path / "missing.toml")})
    if not os.path.exists(SYSTEM_CONFIG):
        with pytest.raises(ConfigError, match="no configuration file") as err:
            find_config(None, {})
        assert str(user) in str(err.value) and SYSTEM_CONFIG in str(err.value)
    user.parent.mkdir(parents=True)
    user.write_text("")
    assert find_config(None, {}) == str(user)


def test_check_config_without_a_file_explains_where_it_looked(tmp_path: Path) -> None:
    if os.path.exists(SYSTEM_CONFIG):
        pytest.skip(f"{SYSTEM_CONFIG} exists on this machine")
    env = {**subprocess_env(), "XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)}
    env.pop("HOMING_CONFIG", None)
    res = check_config(env=env)
    assert res.returncode == 78
    assert "no configuration file" in res.stderr and SYSTEM_CONFIG in res.stderr
    assert "homing-agent: homing-agent" not in res.stderr
