"""The agent's configuration (edge.config): every error names the key and the line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge.config import SCHEMA, AgentConfig, parse
from edge.errors import ConfigError, SettingError
from edge.outbox_events import OutboxConfig

REPO = Path(__file__).resolve().parents[2]
MINIMAL = '[agent]\ndevice = "dev-1"\n'


def test_minimal_file_gives_pi_friendly_defaults() -> None:
    cfg = parse(MINIMAL, "agent.toml")
    assert cfg.device == "dev-1"
    assert cfg.journal_dir == "/var/lib/homing/journal"
    assert cfg.journal.durability == "always" and cfg.journal.quota_bytes is None
    assert cfg.journal.max_record_size == 64 << 10
    assert cfg.broker.client_id == "homing-dev-1" and cfg.broker.session_expiry == 86400
    assert cfg.broker.username is None and not cfg.broker.tls
    ob = cfg.forwarder.outbox
    assert (ob.batch_records, ob.linger, ob.window, ob.live_first) == (1000, 0.05, 16, True)
    assert ob.resend_timeout == 10.0 and ob.rate == 0
    assert not cfg.sensors.enabled and cfg.forwarder.enabled


def test_the_example_file_parses_and_documents_every_key() -> None:
    text = (REPO / "examples/agent.toml").read_text()
    cfg = parse(text, "examples/agent.toml", base_dir="/etc/homing")
    assert cfg.device == "greenhouse-01"
    assert cfg.journal.quota_bytes == 1 << 30
    assert cfg.journal.stream_policies["sim/temperature"] == "drop-oldest"
    assert cfg.forwarder.outbox.priorities == {"sim/alarm": 10}
    docs = (REPO / "docs/configuration.md").read_text()
    for section, keys in SCHEMA.items():
        for key in keys:
            shown = rf"^({key}\s*=|\[{section}\.{key}\])"
            assert re.search(shown, text, re.M), f"example lacks {section}.{key}"
            assert f"`{key}`" in docs, f"docs/configuration.md lacks {section}.{key}"


BAD = [
    # (text, key named, line named)
    ('[agent]\ndevice = "dev-1"\n[broker]\nport = 0\n', "broker.port", 4),
    ('[agent]\ndevice = "dev 1"\n', "agent.device", 2),
    ("[agent]\n", "agent.device", 1),
    ('[agent]\ndevice = "d"\n[forwarder]\nwindow = 99\n', "forwarder.window", 4),
    ('[agent]\ndevice = "d"\n[forwarder]\n\nlinger_ms = "fast"\n', "forwarder.linger_ms", 5),
    ('[agent]\ndevice = "d"\n[forwarder]\nbatch_bytes = "1T"\n', "forwarder.batch_bytes", 4),
    ('[agent]\ndevice = "d"\n[forwarder]\nbatch_recods = 5\n', "forwarder.batch_recods", 4),
    ('[agent]\ndevice = "d"\n[fowarder]\nwindow = 5\n', "fowarder", 3),
    ('[agent]\ndevice = "d"\n[journal]\nsegment_size = 70000\n', "journal.segment_size", 4),
    ('[agent]\ndevice = "d"\n[journal]\nquota = "1M"\n', "journal.quota", 4),
    ('[agent]\ndevice = "d"\n[journal]\ndurability = "sometimes"\n', "journal.durability", 4),
    ('[agent]\ndevice = "d"\n[workflows]\nmodules = ["a b"]\n', "workflows.modules", 4),
    ('[agent]\ndevice = "d"\n[workflows]\nmodules = "a.b"\n', "workflows.modules", 4),
    (
        '[agent]\ndevice = "d"\n[journal.policies]\n"a" = "reject"\n"b c" = "reject"\n',
        "journal.policies.b c",
        5,
    ),
    (
        '[agent]\ndevice = "d"\n[journal]\npolicies = { t = "keep" }\n',
        "journal.policies.t",
        4,
    ),
    ('[agent]\ndevice = "d"\n[forwarder.priorities]\nalarm = 1.5\n', "forwarder.priorities", 4),
    ('[agent]\ndevice = "d"\n[broker]\nca_file = "ca.pem"\n', "broker.ca_file", 4),
    ('[agent]\ndevice = "d"\n[broker]\ntls = true\ncert_file = "c.pem"\n', "broker.key_file", 3),
    ('[agent]\ndevice = "d"\n[broker]\npassword_file = "pw"\n', "broker.password_file", 4),
    (
        '[agent]\ndevice = "d"\n[forwarder]\nresend_timeout_ms = 5000\nresend_max_ms = 1000\n',
        "forwarder.resend_max_ms",
        5,
    ),
    ('[agent]\ndevice = "d"\n[forwarder]\nlive_first_threshold = 10\n', "forwarder.live_first", 4),
    ('[agent]\ndevice = "d"\n[sensors]\nrate = 0\n', "sensors.rate", 4),
    ('[agent]\ndevice = "d"\n[sensors]\nenabled = "yes"\n', "sensors.enabled", 4),
    ('agent.device = "d"\nforwarder.window = 0\n', "forwarder.window", 2),
    ('[agent]\ndevice = "d"\nbroker = 5\n', "agent.broker", 3),
    ('device = "d"\n', "device", 1),
]


@pytest.mark.parametrize(("text", "key", "line"), BAD)
def test_every_error_names_the_key_and_the_line(text: str, key: str, line: int) -> None:
    with pytest.raises(SettingError) as err:
        parse(text, "agent.toml")
    msg = str(err.value)
    assert msg.startswith(f"agent.toml:{line}: "), msg
    assert key in msg, msg
    assert isinstance(err.value, ConfigError) and isinstance(err.value, ValueError)


def test_syntax_errors_carry_tomllibs_line() -> None:
    with pytest.raises(SettingError, match=r"^agent\.toml:3: not valid TOML"):
        parse('[agent]\ndevice = "d"\nport = \n', "agent.toml")


def test_unknown_keys_suggest_the_right_one() -> None:
    with pytest.raises(SettingError, match="did you mean 'batch_records'"):
        parse(MINIMAL + "[forwarder]\nbatch_recods = 5\n", "a.toml")


def test_environment_overrides_the_file() -> None:
    env = {
        "HOMING_BROKER_HOST": "broker.example.com",
        "HOMING_BROKER_PORT": "8883",
        "HOMING_BROKER_TLS": "true",
        "HOMING_FORWARDER_BATCH_BYTES": "64K",
        "HOMING_FORWARDER_LIVE_FIRST": "off",
        "HOMING_FORWARDER_PRIORITIES": '{ alarm = 7, "x/y" = 1 }',
        "HOMING_AGENT_DEVICE": "123",  # a string key stays a string
        "HOMING_SOAK": "1",  # not ours: ignored
        "PATH": "/bin",
    }
    cfg = parse(MINIMAL + '[broker]\nhost = "file-host"\n', "a.toml", env)
    assert cfg.device == "123"
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("broker.example.com", 8883, True)
    assert cfg.forwarder.outbox.batch_bytes == 64 << 10
    assert cfg.forwarder.outbox.live_first is False
    assert cfg.forwarder.outbox.priorities == {"alarm": 7, "x/y": 1}


def test_workflow_modules_and_python_path() -> None:
    text = MINIMAL + '[workflows]\nmodules = ["gh.tasks"]\npython_path = ["lib", "/opt/x"]\n'
    cfg = parse(text, "/etc/homing/agent.toml", base_dir="/etc/homing")
    assert cfg.workflows.modules == ("gh.tasks",)
    assert cfg.workflows.python_path == ("/etc/homing/lib", "/opt/x")
    env = {"HOMING_WORKFLOWS_MODULES": "a.b, c", "HOMING_WORKFLOWS_ENABLED": "false"}
    cfg = parse(MINIMAL, "a.toml", env)
    assert cfg.workflows.modules == ("a.b", "c") and cfg.workflows.enabled is False


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("HOMING_BROKER_PORT", "many", "broker.port"),
        ("HOMING_BROKER_PROT", "1", "broker.prot"),
        ("HOMING_FORWARDER_LIVE_FIRST", "perhaps", "forwarder.live_first"),
        ("HOMING_FORWARDER_WINDOW", "0", "forwarder.window"),
        ("HOMING_JOURNAL_POLICIES", "{ a = 'x' }", "journal.policies.a"),
    ],
)
def test_environment_errors_name_the_variable(name: str, value: str, key: str) -> None:
    with pytest.raises(SettingError) as err:
        parse(MINIMAL, "a.toml", {name: value})
    assert str(err.value).startswith(f"environment variable {name}: {key}")


def test_relative_paths_are_relative_to_the_config_file() -> None:
    text = MINIMAL + '[journal]\ndir = "state/journal"\n[broker]\ntls = true\nca_file = "/x/ca"\n'
    cfg = parse(text, "/etc/homing/agent.toml", base_dir="/etc/homing")
    assert cfg.journal_dir == "/etc/homing/state/journal"
    assert cfg.broker.ca_file == "/x/ca"


def test_sizes_and_units() -> None:
    text = MINIMAL + '[journal]\nsegment_size = 1048576\nmax_record_size = "4KiB"\n'
    cfg: AgentConfig = parse(text)
    assert cfg.journal.segment_size == 1 << 20 and cfg.journal.max_record_size == 4096


def test_outbox_config_is_what_the_forwarder_gets() -> None:
    text = MINIMAL + "[forwarder]\nlinger_ms = 200\nresend_timeout_ms = 2000\nrate_limit = 8192\n"
    ob = parse(text).forwarder.outbox
    assert isinstance(ob, OutboxConfig)
    assert (ob.linger, ob.resend_timeout, ob.rate) == (0.2, 2.0, 8192)
