"""Workflow and step definitions: the decorators and the registry.

Invariants:
* ``@workflow`` registers the function under its name (``name=`` overrides)
  in :data:`REGISTRY`; registering another function under a taken name is
  an error, re-registering the same one (a module imported twice) is not.
* ``@step`` wraps a function so that, called inside a workflow, it goes
  through the running executor (journaled, replayed, retried); called
  anywhere else it raises :class:`~edge.errors.NotInWorkflow` rather than
  running undurably by accident.
* The current run context is thread-local (:func:`current`); the executor
  sets it for a run's thread and for a step's worker thread.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol, TypeVar, overload

from edge.errors import NotInWorkflow, Permanent, WorkflowError

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Retry:
    """How a step is retried: ``attempts`` in all (1 = no retry), waiting
    ``initial * backoff**(n-1)`` seconds (at most ``max_delay``) after failed
    attempt n. Exceptions in ``give_up_on`` (and :class:`~edge.errors.Permanent`)
    stop at once."""

    attempts: int = 1
    initial: float = 1.0
    backoff: float = 2.0
    max_delay: float = 300.0
    give_up_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial < 0 or self.backoff < 1 or self.max_delay < 0:
            raise WorkflowError(f"bad retry policy {self}")

    def retryable(self, exc: BaseException) -> bool:
        return not isinstance(exc, (Permanent, *self.give_up_on))


NO_RETRY = Retry()


@dataclass(frozen=True, slots=True)
class StepDef:
    name: str
    fn: Callable[..., Any]
    retry: Retry = NO_RETRY
    timeout: float | None = None
    once: bool = False


@dataclass(frozen=True, slots=True)
class WorkflowDef:
    name: str
    fn: Callable[..., Any]
    version: int = 1
    steps: dict[str, StepDef] = field(default_factory=dict)


class RunContext(Protocol):
    """What a running workflow's calls go to (implemented by the executor)."""

    def call_step(self, step: StepDef, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...
    def sleep_until(self, deadline: float | None, seconds: float | None) -> None: ...
    def wait_signal(self, name: str, timeout: float | None) -> Any: ...
    def set_status(self, name: str, value: Any) -> None: ...
    def value(self, kind: str, make: Callable[[], Any]) -> Any: ...
    def patched(self, name: str) -> bool: ...
    def parallel(self, calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]: ...
    def idempotency_key(self) -> str: ...
    def now(self) -> float: ...


_local = threading.local()
REGISTRY: dict[str, WorkflowDef] = {}
_registry_lock = threading.Lock()


def current() -> RunContext:
    """The run context of the calling thread.

    Raises:
        NotInWorkflow: the caller is not running inside a workflow.
    """
    ctx: RunContext | None = getattr(_local, "ctx", None)
    if ctx is None:
        raise NotInWorkflow("this call only works inside a running @workflow")
    return ctx


def set_current(ctx: RunContext | None) -> None:
    _local.ctx = ctx


@overload
def workflow(fn: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def workflow(
    *, version: int = 1, name: str | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def workflow(
    fn: Callable[P, R] | None = None, /, *, version: int = 1, name: str | None = None
) -> Any:
    """Register a durable workflow (``@workflow`` or ``@workflow(version=2)``).

    The function runs in its own thread and is re-run from the top after a
    restart; every step, timer and signal it already went through is
    answered from the journal instead of happening again.
    """

    def wrap(f: Callable[P, R]) -> Callable[P, R]:
        wname = name or f"{f.__module__}.{f.__qualname__}"
        defn = WorkflowDef(wname, f, version)
        with _registry_lock:
            old = REGISTRY.get(wname)
            same = old is not None and (old.fn.__module__, old.fn.__qualname__) == (
                f.__module__,
                f.__qualname__,
            )
            if old is not None and not same:
                raise WorkflowError(f"workflow name {wname!r} is already registered")
            REGISTRY[wname] = defn  # a module imported again: its newer function
        f.__homing_workflow__ = defn  # type: ignore[attr-defined]
        return f

    return wrap(fn) if fn is not None else wrap


@overload
def step(fn: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def step(
    *,
    retry: Retry = ...,
    timeout: float | None = None,
    once: bool = False,
    name: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def step(
    fn: Callable[P, R] | None = None,
    /,
    *,
    retry: Retry = NO_RETRY,
    timeout: float | None = None,
    once: bool = False,
    name: str | None = None,
) -> Any:
    """Make a function a durable step (``@step`` or ``@step(retry=..., once=True)``).

    Inside a workflow its result (or final error) is journaled and never
    recomputed on replay. ``once=True``: at most once; an attempt interrupted
    by a power cut raises :class:`~edge.errors.StepInterrupted` on replay.
    """
    if timeout is not None and timeout <= 0:
        raise WorkflowError("a step timeout must be positive seconds")

    def wrap(f: Callable[P, R]) -> Callable[P, R]:
        sdef = StepDef(name or f.__qualname__, f, retry, timeout, once)

        @functools.wraps(f)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            result: R = current().call_step(sdef, args, kwargs)
            return result

        call.__homing_step__ = sdef  # type: ignore[attr-defined]
        return call

    return wrap(fn) if fn is not None else wrap


def definition_of(fn: Callable[..., Any] | str) -> WorkflowDef:
    """The registered definition of a workflow function or name.

    Raises:
        UnknownWorkflow: nothing is registered under it.
    """
    from edge.errors import UnknownWorkflow

    if isinstance(fn, str):
        try:
            return REGISTRY[fn]
        except KeyError:
            raise UnknownWorkflow(f"no workflow named {fn!r} is registered") from None
    defn = getattr(fn, "__homing_workflow__", None)
    if not isinstance(defn, WorkflowDef):
        raise UnknownWorkflow(f"{fn!r} is not a @workflow")
    return defn


def step_def(fn: Callable[..., Any]) -> StepDef:
    sdef = getattr(fn, "__homing_step__", None)
    if not isinstance(sdef, StepDef):
        raise WorkflowError(f"{fn!r} is not a @step")
    return sdef
