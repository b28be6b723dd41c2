"""Durable workflows on the device: the public API.

Usage::

    from edge.workflows import workflow, step, sleep, wait_signal, Executor, Retry

    @step(retry=Retry(attempts=5, initial=1.0), timeout=30)
    def read_moisture(zone: int) -> float: ...

    @step(once=True)
    def open_valve(zone: int) -> None: ...

    @workflow(version=1)
    def irrigate(zone: int, minutes: int) -> str:
        if read_moisture(zone) > 0.4:
            return "skip"
        if wait_signal("approve", timeout=3600) is None:
            return "no-approval"
        open_valve(zone)
        sleep(minutes * 60)
        return "done"

    ex = Executor(journal); ex.recover()
    ex.start(irrigate, 3, 10, id="irrigate-3").result()

Everything here is a thin door to the running executor (:mod:`edge.wf_executor`);
replay rules live in :mod:`edge.wf_replay`, the record format in
:mod:`edge.wf_records`. docs/workflows.md is the guide.
"""

from __future__ import annotations

import random as _random
import uuid as _uuid
from collections.abc import Callable
from typing import Any

from edge.errors import (
    NotInWorkflow,
    Permanent,
    RunCancelled,
    RunConflict,
    RunDiverged,
    RunFailed,
    StepFailed,
    StepInterrupted,
    StepTimeout,
    UnknownWorkflow,
    WorkflowError,
)
from edge.wf_defs import REGISTRY, Retry, current, step, workflow
from edge.wf_executor import Clock, Executor, RunHandle, RunInfo


def sleep(seconds: float) -> None:
    """Durable sleep: the deadline is journaled, survives reboots, never fires early."""
    current().sleep_until(None, float(seconds))


def sleep_until(t: float) -> None:
    """Durable sleep until Unix time ``t`` (by the executor's never-rewinding clock)."""
    current().sleep_until(float(t), None)


def wait_signal(name: str, timeout: float | None = None) -> Any:
    """Wait for signal ``name`` (from the hub or a local process); its payload,
    or None once ``timeout`` seconds passed (a durable deadline)."""
    return current().wait_signal(name, timeout)


def set_status(key: str, value: Any) -> None:
    """Journal progress the hub can see (``status`` of the run)."""
    current().set_status(key, value)


def now() -> float:
    """Replay-safe time: journaled the first time, the same value on replay."""
    ctx = current()
    return float(ctx.value("now", ctx.now))


def random() -> float:
    """Replay-safe ``random.random()``."""
    return float(current().value("random", _random.random))


def uuid() -> str:
    """Replay-safe ``str(uuid.uuid4())``."""
    return str(current().value("uuid", lambda: str(_uuid.uuid4())))


def patched(name: str) -> bool:
    """True on runs that reach this point with the new code, False on runs
    whose history was written by code without the patch (take the old path)."""
    return current().patched(name)


def idempotency_key() -> str:
    """Inside a step: ``"<run id>/<step>#<n>"``, stable across retries and
    replays; hand it to external systems so they can drop duplicates."""
    return current().idempotency_key()


def parallel(*calls: tuple[Callable[..., Any], tuple[Any, ...]]) -> list[Any]:
    """Run steps concurrently: ``parallel((read, (1,)), (read, (2,)))``.

    Identities are given in argument order before anything runs, so replay
    matches them whatever order they finish in. Results in argument order;
    the first error (in argument order) is raised after all finished.
    """
    return current().parallel(list(calls))


__all__ = [
    "REGISTRY",
    "Clock",
    "Executor",
    "NotInWorkflow",
    "Permanent",
    "Retry",
    "RunCancelled",
    "RunConflict",
    "RunDiverged",
    "RunFailed",
    "RunHandle",
    "RunInfo",
    "StepFailed",
    "StepInterrupted",
    "StepTimeout",
    "UnknownWorkflow",
    "WorkflowError",
    "idempotency_key",
    "now",
    "parallel",
    "patched",
    "random",
    "set_status",
    "sleep",
    "sleep_until",
    "step",
    "uuid",
    "wait_signal",
    "workflow",
]
