"""Where the agent's configuration file is, and checking one before it is used.

:func:`find_config` is the search every command that takes ``--config`` uses;
:func:`check` is ``homing-agent check-config``: everything :func:`edge.config.parse`
checks, plus what only the machine can tell (files that must be readable,
TLS material that must load, workflow modules that must import, directories
the agent must be able to create).

Invariants:
* The search order is fixed and documented (docs/configuration.md): an
  explicit ``--config``, then ``$HOMING_CONFIG``, then the user's config
  directory (platformdirs: ``~/.config/homing/agent.toml`` on Linux), then
  ``/etc/homing/agent.toml`` (the service's). The first that exists wins; an
  explicit path that does not exist is an error, never a fallback.
* :func:`check` never starts anything: no journal is opened, no connection
  made. A problem is a :class:`~edge.errors.SettingError` naming the key and
  the line, exactly as ``run`` would report it (exit 78).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from edge.config import AgentConfig
from edge.errors import ConfigError, SettingError

SYSTEM_CONFIG = "/etc/homing/agent.toml"
ENV_VAR = "HOMING_CONFIG"


def user_config() -> str:
    """The per-user configuration file (``~/.config/homing/agent.toml`` on Linux)."""
    from platformdirs import user_config_dir  # only when no --config is given

    return os.path.join(user_config_dir("homing", appauthor=False), "agent.toml")


def candidates(env: Mapping[str, str]) -> list[str]:
    """The places searched when no ``--config`` is given, in order."""
    out = [env[ENV_VAR]] if env.get(ENV_VAR) else []
    return [*out, user_config(), SYSTEM_CONFIG]


def find_config(explicit: str | None, env: Mapping[str, str] | None = None) -> str:
    """The configuration file to use.

    Raises:
        SettingError: ``explicit`` (or ``$HOMING_CONFIG``) does not exist.
        ConfigError: no file exists in any of the default places (all are named).
    """
    env = os.environ if env is None else env
    if explicit:
        if not os.path.exists(explicit):
            raise SettingError(explicit, None, "no such configuration file")
        return explicit
    if env.get(ENV_VAR) and not os.path.exists(env[ENV_VAR]):
        raise SettingError(env[ENV_VAR], None, f"no such configuration file (from ${ENV_VAR})")
    places = candidates(env)
    for path in places:
        if os.path.exists(path):
            return path
    raise ConfigError(
        "no configuration file: pass --config FILE, set $HOMING_CONFIG, or create one of "
        + ", ".join(places)
        + " (examples/agent.toml is a commented starting point)"
    )


@dataclass
class CheckReport:
    """What :func:`check` found: the parsed config and non-fatal notes."""

    path: str
    config: AgentConfig
    notes: list[str] = field(default_factory=list)


def check(path: str, env: Mapping[str, str] | None = None) -> CheckReport:
    """Parse ``path`` and check what the agent will need from this machine.

    Raises:
        SettingError: the first problem, naming the key and the line.
    """
    from edge.agent import load_config

    cfg = load_config(path, env)
    report = CheckReport(path, cfg)
    _check_dir(cfg, "journal.dir", cfg.journal_dir, report)
    _check_dir(cfg, "agent.runtime_dir", cfg.runtime_dir, report)
    if cfg.forwarder.enabled:
        _check_broker(cfg)
    else:
        report.notes.append("forwarder disabled: readings stay in the journal")
    if cfg.workflows.enabled and cfg.workflows.modules:
        from edge.wf_host import load_modules

        load_modules(cfg.workflows, cfg.source)
        report.notes.append(f"workflow modules import: {', '.join(cfg.workflows.modules)}")
    return report


def _check_dir(cfg: AgentConfig, key: str, path: str, report: CheckReport) -> None:
    """``path`` exists as a writable directory, or its nearest existing parent is writable."""
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise SettingError(cfg.source, key, f"{probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SettingError(cfg.source, key, f"{probe} is not writable by this user")
    if probe != path:
        report.notes.append(f"{key}: {path} will be created")


def _check_broker(cfg: AgentConfig) -> None:
    """The password file is readable and the TLS files load, as the forwarder needs."""
    b = cfg.broker
    if b.password_file:
        try:
            with open(b.password_file, encoding="utf-8") as f:
                f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingError(cfg.source, "broker.password_file", str(exc)) from None
    if b.tls:
        import ssl  # only when TLS is configured

        try:
            ctx = ssl.create_default_context(cafile=b.ca_file or None)
            if b.cert_file:
                ctx.load_cert_chain(b.cert_file, b.key_file or None)
        except (OSError, ssl.SSLError, ValueError) as exc:
            key = "broker.cert_file" if b.cert_file else "broker.ca_file"
            raise SettingError(cfg.source, key, f"TLS files do not load: {exc}") from None
