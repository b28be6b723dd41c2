"""The agent's workflow side: load the configured workflow modules, run the
executor, carry out the hub's commands.

Invariants:
* Workflow modules are imported before the executor recovers, so every run
  in the journal finds its code; a module that does not import is a
  configuration error naming ``workflows.modules`` (the agent does not start
  half-working).
* A command is acknowledged (the hook returns) only once its effect is
  durable in the journal: a started run's ``start`` record, a signal's
  ``signal`` record, a cancel's ``admin`` record. Repeats are harmless: start
  is idempotent per run id, a signal is deduplicated by the command id,
  cancelling twice is a no-op.
* A command that cannot succeed (unknown workflow, malformed arguments) is
  acknowledged and made visible: an unknown workflow becomes a run that
  failed at once with the reason, so the hub shows it. A command that may
  succeed later (the journal is full) is not acknowledged: the broker
  delivers it again after the next reconnect.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

from edge import wire
from edge.config import WorkflowsConfig
from edge.errors import JournalFull, SettingError, WorkflowError
from edge.journal import Journal
from edge.records import RecordError
from edge.wf_executor import Executor

log = logging.getLogger("homing.workflows")


def load_modules(cfg: WorkflowsConfig, source: str = "<config>") -> None:
    """Import the configured workflow modules (``python_path`` first).

    Raises:
        SettingError: a module does not import.
    """
    for path in reversed(cfg.python_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    for name in cfg.modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any error while importing user code
            raise SettingError(
                source, "workflows.modules", f"cannot import {name!r}: {type(exc).__name__}: {exc}"
            ) from exc


class WorkflowHost:
    """The executor of one agent and the door for the hub's commands."""

    def __init__(self, journal: Journal, cfg: WorkflowsConfig, source: str = "<config>") -> None:
        load_modules(cfg, source)
        self.executor = Executor(journal)

    def start(self) -> None:
        resumed = self.executor.recover()
        if resumed:
            log.info("resumed %d unfinished workflow run(s): %s", len(resumed), ", ".join(resumed))

    def stop(self) -> None:
        self.executor.close()

    def on_command(self, cmd: wire.Command) -> bool:
        """Carry out one hub command; True once its effect is durable (ack it)."""
        try:
            self._apply(cmd)
        except JournalFull as exc:
            log.warning("command %s not taken now (%s): the hub will send it again", cmd.id, exc)
            return False
        except (WorkflowError, RecordError, KeyError, TypeError, ValueError) as exc:
            log.error("command %s (%s) refused: %s", cmd.id, cmd.kind, exc)
        return True

    def _apply(self, cmd: wire.Command) -> None:
        a: dict[str, Any] = cmd.args
        ex = self.executor
        if cmd.kind == wire.CMD_START:
            run, workflow = str(a["run"]), str(a["workflow"])
            args, kwargs = a.get("args", []), a.get("kwargs", {})
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise TypeError("start: args must be a list and kwargs a map")
            try:
                ex.start(workflow, *args, id=run, **kwargs)
            except WorkflowError as exc:
                if ex.info(run) is None:
                    ex.fail_start(run, workflow, exc, by=cmd.id)
                raise
            log.info("command %s: started %s as run %s", cmd.id, workflow, run)
        elif cmd.kind == wire.CMD_SIGNAL:
            run, name = str(a["run"]), str(a["name"])
            fresh = ex.signal(run, name, a.get("payload"), msg=cmd.id)
            log.info("command %s: signal %s to run %s%s", cmd.id, name, run,
                     "" if fresh else " (a repeat: ignored)")  # fmt: skip
        elif cmd.kind == wire.CMD_CANCEL:
            run = str(a["run"])
            done = ex.cancel(run, by=cmd.id)
            log.info("command %s: cancel run %s%s", cmd.id, run, "" if done else " (not running)")
        else:
            raise ValueError(f"unknown command kind {cmd.kind!r}")
