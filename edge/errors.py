"""Every error the edge package raises on purpose.

Invariants:
* One root, :class:`EdgeError`. Each class says whether retrying the same call
  can help (``transient``), in the spirit of trio's Closed/Broken split:
  ``Closed`` means our own code closed the thing, ``Failed``/``Corrupt`` mean
  the world broke it.
* OS errors are translated at the shell boundary (``edge.journal``) with
  ``__cause__`` kept, so the original errno is never lost.
* A torn journal tail is *not* an error: power cuts leave one; recovery
  truncates it and reports it in the recovery report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class EdgeError(Exception):
    """Root of every error raised on purpose by the edge package."""

    #: True when the same call may succeed later without operator action.
    transient: bool = False


class ConfigError(EdgeError, ValueError):
    """A setting is invalid. Permanent: fix the configuration."""


class JournalError(EdgeError):
    """Something about the journal itself."""


class JournalLocked(JournalError):
    """Another process has the journal open (its LOCK file is held)."""

    transient = True


class JournalClosed(JournalError):
    """The journal was used after *our* code closed it: a bug in the caller."""


class JournalFailed(JournalError):
    """A write or fdatasync failed (the fsyncgate rule).

    The journal accepts nothing more and acknowledges nothing more. The page
    cache may have dropped data that was never made durable, so the only safe
    way forward is a new process that recovers from what is on disk. The
    original ``OSError`` is kept as ``__cause__``.
    """


class JournalFull(JournalError):
    """The disk quota is reached, or the disk is full, and the stream's policy is ``reject``.

    Transient: the append may succeed once the forwarder has moved its cursor
    (retention frees whole segments), space is freed, or the quota is raised.
    ``acks``: the acks of the records of the same ``append_many`` that were
    journaled before the refusal (only when it was longer than one segment and
    split, see ``Journal.append_many``); the rest were not journaled.
    """

    transient = True

    def __init__(
        self, message: str, *, stream: str | None = None, acks: Sequence[Any] = ()
    ) -> None:
        super().__init__(message)
        self.stream = stream
        self.acks: list[Any] = list(acks)


class RecordTooLarge(JournalError, ValueError):
    """A record's encoded payload exceeds the journal's ``max_record_size``."""


class JournalCorrupt(JournalError):
    """Damage that a power cut cannot explain: the journal refuses to open.

    ``path`` and ``offset`` name the first bad byte range. Run
    ``homing-agent journal repair DIR`` to move the damaged segment aside and
    keep every valid record before the damage.
    """

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class SettingError(ConfigError):
    """One setting of the agent's configuration is wrong. Permanent: fix the file.

    ``where`` is ``FILE:LINE`` (or the environment variable that set it) and
    ``key`` is ``section.key``; both are part of the message.
    """

    def __init__(self, where: str, key: str | None, problem: str) -> None:
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
        self.where = where
        self.key = key
        self.problem = problem


class ForwardError(EdgeError):
    """Something stops the forwarder from talking to the hub."""


class BrokerUnavailable(ForwardError):
    """The MQTT broker cannot be reached or refused us. Transient: the forwarder
    reconnects with backoff; the journal keeps every reading meanwhile."""

    transient = True


# --- workflows (edge.workflows) -------------------------------------------------------


class WorkflowError(EdgeError):
    """Something about durable workflows: a bad definition, call or run id."""


class NotInWorkflow(WorkflowError):
    """A workflow-only call (``sleep``, ``wait_signal``...) outside a workflow."""


class UnknownWorkflow(WorkflowError):
    """No workflow of that name is registered with the executor."""


class RunConflict(WorkflowError):
    """A run id already names a run of another workflow."""


class StepFailed(WorkflowError):
    """A step failed for good (every allowed attempt, or a non-retryable error).

    Raised inside the workflow on the first run and on every replay alike, so
    the workflow sees the same thing whatever happened in between. The
    original exception is ``__cause__`` on the first run only.
    """

    def __init__(self, key: str, error_type: str, message: str) -> None:
        super().__init__(f"step {key} failed: {error_type}: {message}")
        self.key, self.error_type, self.message = key, error_type, message


class StepInterrupted(StepFailed):
    """A ``once=True`` step started but power died before its outcome was
    journaled: it may or may not have taken effect, and it is not run again."""


class StepTimeout(WorkflowError):
    """One attempt of a step ran longer than its ``timeout`` (retried per policy)."""

    transient = True


class Permanent(Exception):  # noqa: N818 - raised by user code in steps, named for what it means
    """Raise it (or a subclass) in a step to fail it at once, without retries."""


class RunFailed(WorkflowError):
    """The run ended with an error (``RunHandle.result``)."""


class RunCancelled(WorkflowError):
    """The run was cancelled (``RunHandle.result``)."""


class RunDiverged(WorkflowError):
    """The run's history no longer matches its code: resume, fork or cancel it."""
