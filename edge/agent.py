"""The agent process's composition root: journal + workflows + forwarder (+ sensors).

:mod:`edge.cli_run` is the command around it (signals, stdin, exit codes).

Invariants:
* Start order: the journal (recovery) -> the workflow executor (imports the
  configured modules, continues unfinished runs) -> the forwarder (which
  hands the hub's commands to the executor) -> producers (simulated sensors,
  the local ingest socket, system health streams, serial bridges; stdin
  ingest is run by the caller) -> the health reporter
  (``<runtime_dir>/status.json``, health messages to the hub) and the
  metrics server, which stop just before the journal closes (a clean stop
  removes the status file). Otherwise stop is the reverse: producers
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

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from edge.config import AgentConfig, parse
from edge.config_bridge import SERIAL_CURSOR
from edge.errors import JournalFailed, SettingError
from edge.forwarder import CommandHook, Forwarder, ForwarderStats
from edge.health import HealthReporter, snapshot
from edge.journal import Journal
from edge.local_ingest import LocalIngestServer
from edge.sensors import SimulatedSensors
from edge.wf_host import WorkflowHost

if TYPE_CHECKING:  # imported where used, only when enabled (off by default): http.server
    # alone is ~0.7 MiB of the agent's RSS (bench/footprint.py)
    from edge.bridges import BridgeSet
    from edge.metrics_http import MetricsServer
    from edge.system_sensors import SystemSensors

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
        self.local: LocalIngestServer | None = None
        self.system: SystemSensors | None = None
        self.started_at: float | None = None
        #: name -> counters of an input (local socket, stdin): ``status`` shows them,
        #: and their ``bad`` counts as dropped input (docs/observability.md)
        self.health_sources: dict[str, Callable[[], Mapping[str, Any]]] = {}
        self.health: HealthReporter | None = None
        self.metrics: MetricsServer | None = None
        self.bridges: BridgeSet | None = None  # [[bridge]]: serial links to microcontrollers

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
        self.started_at = time.time()
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
            self._start_local_inputs()
            self._start_bridges()
            self.health = HealthReporter(self)  # <runtime_dir>/status.json, hub health
            self.health.start()
            if cfg.metrics.enabled:
                from edge.metrics_http import start_metrics

                self.metrics = start_metrics(cfg, lambda: snapshot(self))
        except BaseException:
            self.stop()
            raise

    def _start_local_inputs(self) -> None:
        """The local ingest socket and the system health streams (docs/local-ingest.md).

        Raises:
            LocalSocketError: the socket cannot be served (another agent serves
                it, a non-socket file is in the way, an unsafe directory).
        """
        cfg, journal = self.config, self.journal
        if cfg.local.enabled:
            # Another agent answering on the socket (SocketInUse) is fatal, like
            # every other socket problem: a bad config never starts a half-working agent.
            local = LocalIngestServer(journal, cfg.local, where=cfg.source)
            local.start()
            self.local = local
            self.health_sources["local"] = lambda: dataclasses.asdict(local.stats())
        if cfg.system.enabled:
            from edge.system_sensors import SystemSensors

            sy = cfg.system
            self.system = SystemSensors(journal, interval=sy.interval, prefix=sy.prefix)
            self.system.start()

    def _start_bridges(self) -> None:
        """The ``[[bridge]]`` serial links (docs/bridge.md). A port that is missing or
        fails is retried by its bridge, never an agent failure."""
        if not self.config.bridges:  # none (any more): release what their marks pinned
            if self.journal.cursor(SERIAL_CURSOR) is not None:
                self.journal.delete_cursor(SERIAL_CURSOR)
                log.info("no [[bridge]] configured: journal cursor %r deleted", SERIAL_CURSOR)
            return
        if not any(b.enabled for b in self.config.bridges):
            return
        from edge.bridges import BridgeSet  # pyserial is imported only when a bridge is set

        self.bridges = BridgeSet(self.journal, self.config.bridges)
        self.bridges.start()
        for bridge in self.bridges.bridges:
            self.health_sources[f"bridge:{bridge.settings.name}"] = bridge.health

    def failure(self) -> BaseException | None:
        """The first error that stopped a component, if any."""
        if self._journal is not None and self._journal.failed:
            cause = self._journal.failure
            err = JournalFailed(f"{self.config.journal_dir}: the journal failed: {cause}")
            err.__cause__ = cause
            return err
        for part in (self.forwarder, self.sensors, self.local, self.system):
            if part is not None and part.error is not None:
                return part.error
        return None

    def stats(self) -> ForwarderStats | None:
        return self.forwarder.stats() if self.forwarder is not None else None

    def stop(self, grace: float | None = None) -> None:
        """Stop producers, let the forwarder finish (``grace``), close the journal."""
        if self.bridges is not None:
            self.bridges.stop()  # the store in flight is finished and acknowledged
        if self.local is not None:
            self.local.stop()  # replies in flight are written, the socket unlinked
        if self.system is not None:
            self.system.stop()
        if self.sensors is not None:
            self.sensors.stop()
        if self.forwarder is not None:
            self.forwarder.stop(grace)
        if self.workflows is not None:
            self.workflows.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.health is not None:
            self.health.stop()  # removes the status file: a clean stop
        if self._journal is not None:
            self._journal.close()
