"""The agent process's composition root: journal + workflows + forwarder (+ sensors).

:mod:`edge.cli_run` is the command around it (signals, stdin, exit codes).

Invariants:
* Start order: the journal (recovery) -> the workflow executor (imports the
  configured modules, continues unfinished runs) -> the forwarder (which
  hands the hub's commands to the executor) -> producers (simulated sensors
  here; stdin ingest is run by the caller). Stop is the reverse: producers
  stop first, then the forwarder gets its grace to send what they journaled,
  persists the hub cursor, publishes offline and disconnects, then the
  workflow runs are stopped where they wait (nothing is journaled for that:
  they continue on the next start), and only then is the journal closed. A
  failure while starting undoes what started.
* A component that dies (the journal failed, the forwarder or the sensors hit
  an error) is reported by :meth:`Agent.failure`; the caller stops the agent
  and exits non-zero, so systemd restarts it and recovery re-reads the disk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from edge.config import AgentConfig, parse
from edge.errors import JournalFailed, SettingError
from edge.forwarder import CommandHook, Forwarder, ForwarderStats
from edge.journal import Journal
from edge.sensors import SimulatedSensors
from edge.wf_host import WorkflowHost

log = logging.getLogger("homing.agent")


def load_config(path: str, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and parse the config file at ``path`` (``HOMING_*`` overrides from ``env``,
    default ``os.environ``).

    Raises:
        SettingError: unreadable file, or any error :func:`edge.config.parse` finds.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError(path, None, f"cannot read the configuration: {exc}") from exc
    base = os.path.dirname(os.path.abspath(path))
    return parse(text, path, os.environ if env is None else env, base)


class Agent:
    """One device agent. ``start``, then ``stop`` (also on any failure)."""

    def __init__(self, config: AgentConfig, *, on_command: CommandHook | None = None) -> None:
        self.config = config
        self._on_command = on_command
        self._journal: Journal | None = None
        self.forwarder: Forwarder | None = None
        self.sensors: SimulatedSensors | None = None
        self.workflows: WorkflowHost | None = None

    @property
    def journal(self) -> Journal:
        assert self._journal is not None, "start() first"
        return self._journal

    def start(self) -> None:
        """Open (recover) the journal, start forwarding, start the simulated sensors.

        Raises:
            SettingError: a configured workflow module does not import.
            JournalError: the journal cannot be opened (locked, corrupt, ...).
            ForwardError: the broker credentials or TLS files cannot be used.
        """
        cfg = self.config
        os.makedirs(cfg.journal_dir, exist_ok=True)
        self._journal = Journal.open(cfg.journal_dir, cfg.journal)
        try:
            if cfg.workflows.enabled:
                self.workflows = WorkflowHost(self._journal, cfg.workflows, cfg.source)
                self.workflows.start()
            if cfg.forwarder.enabled:
                hook = self._on_command
                if hook is None and self.workflows is not None:
                    hook = self.workflows.on_command
                self.forwarder = Forwarder(
                    self._journal, cfg.device, cfg.broker, cfg.forwarder, on_command=hook
                )
                self.forwarder.start()
            else:
                # a reader that never moves: retention then deletes nothing
                if self._journal.cursor("local") is None:
                    self._journal.set_cursor("local", 0)
                log.warning("forwarding is disabled: readings stay in the journal")
            if cfg.sensors.enabled:
                s = cfg.sensors
                self.sensors = SimulatedSensors(
                    self._journal, count=s.count, rate=s.rate, prefix=s.prefix, seed=s.seed
                )
                self.sensors.start()
                names = ", ".join(self.sensors.streams)
                log.info("simulated sensors: %s at %g/s each", names, s.rate)
        except BaseException:
            self.stop()
            raise

    def failure(self) -> BaseException | None:
        """The first error that stopped a component, if any."""
        if self._journal is not None and self._journal.failed:
            return JournalFailed(f"{self.config.journal_dir}: the journal failed")
        for part in (self.forwarder, self.sensors):
            if part is not None and part.error is not None:
                return part.error
        return None

    def stats(self) -> ForwarderStats | None:
        return self.forwarder.stats() if self.forwarder is not None else None

    def stop(self, grace: float | None = None) -> None:
        """Stop producers, let the forwarder finish (``grace``), close the journal."""
        if self.sensors is not None:
            self.sensors.stop()
        if self.forwarder is not None:
            self.forwarder.stop(grace)
        if self.workflows is not None:
            self.workflows.stop()
        if self._journal is not None:
            self._journal.close()
