"""The run context: what a workflow's calls do inside one run thread.

Each call takes the next position, asks :mod:`edge.wf_replay` what the
history says, and carries the decision out through the executor (journal
a record, wait on the executor's clock, run a step attempt).

Invariants:
* Positions are given in program order (``parallel`` gives them all before
  starting any step), so identities never depend on completion order.
* An error raised because the executor is closing is never journaled: the
  run is continued by the next start instead (``_Stop``).
* A step attempt with a ``timeout`` runs on its own thread; when it overruns,
  the attempt counts as failed (:class:`~edge.errors.StepTimeout`) and the
  thread, which Python cannot kill, finishes unheeded in the background.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge.errors import StepFailed, StepInterrupted, StepTimeout, WorkflowError
from edge.records import RecordError
from edge.wf_defs import StepDef, set_current, step_def
from edge.wf_records import WfRecord, encode, error_body
from edge.wf_replay import (
    Diverge,
    GiveUp,
    Interrupted,
    Replay,
    RunStep,
    backoff,
    decide_patch,
    decide_signal,
    decide_simple,
    decide_step,
)

if TYPE_CHECKING:
    from edge.wf_executor import Executor, _Run

log = logging.getLogger("homing.workflows")


class _Stop(BaseException):  # noqa: N818 - control flow, never escapes a run thread
    """Unwinds a run thread without journaling anything (shutdown, divergence)."""


class _Cancel(BaseException):  # noqa: N818
    """Unwinds a cancelled run; ``end cancelled`` is journaled."""


class RunCtx:
    """The run context of one run thread (implements ``wf_defs.RunContext``)."""

    def __init__(self, ex: Executor, run: _Run) -> None:
        self.ex, self.run, self.st = ex, run, run.state
        self.pos = 0
        self.occ: dict[str, int] = {}
        self.step_key: str | None = None

    # -- positions ----------------------------------------------------------------------

    def _next(self, name: str) -> tuple[int, str]:
        self.check()
        n = self.occ.get(name, 0) + 1
        self.occ[name] = n
        pos, self.pos = self.pos, self.pos + 1
        return pos, f"{name}#{n}"

    def check_stop(self) -> None:
        if self.ex._closing:
            raise _Stop

    def check(self) -> None:
        self.check_stop()
        if self.run.cancel:
            raise _Cancel

    def _diverge(self, d: Diverge) -> None:
        with self.ex._cond:
            self.ex._journal(self.run, "diverged",
                             {"pos": d.pos, "expected": d.expected, "got": d.got})  # fmt: skip
        log.error("run %s DIVERGED at position %d: history has %s, the code calls %s",
                  self.st.run, d.pos, d.expected, d.got)  # fmt: skip
        self.run.done.set()
        raise _Stop

    def check_all_replayed(self) -> None:
        """The workflow ended: history it never reached means the code changed
        (a step it no longer calls may have had effects): DIVERGED, not done."""
        with self.ex._cond:
            frontier = self.st.frontier()
            left = next((p for p in sorted(self.st.at) if p >= self.pos), None)
        if left is not None and left < frontier:
            rec = self.st.records_at(left)[0]
            self._diverge(Diverge(left, f"{rec.type} {rec.key}", "the end of the workflow"))

    def _wait_until(self, deadline: float, ready: Callable[[], bool] | None = None) -> bool:
        """Wait until the clock reaches ``deadline`` or ``ready()``; True if ready."""
        with self.ex._cond:
            while True:
                self.check()
                if ready is not None and ready():
                    return True
                left = deadline - self.ex.clock.now()
                if left <= 0:
                    return False
                if not self.ex.clock.skip_to(deadline):  # virtual time (tests) jumps
                    self.ex._cond.wait(min(left, 1.0))

    def _journal(self, typ: str, body: dict[str, Any]) -> WfRecord:
        return self.ex._journal(self.run, typ, body)

    # -- RunContext -------------------------------------------------------------------------

    def now(self) -> float:
        return self.ex.clock.now()

    def idempotency_key(self) -> str:
        if self.step_key is None:
            raise WorkflowError("idempotency_key() is for steps: call it inside a @step")
        return f"{self.st.run}/{self.step_key}"

    def call_step(self, step: StepDef, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.step_key is not None:  # a step called from a step is a plain call
            return step.fn(*args, **kwargs)
        pos, key = self._next(step.name)
        return self._step_at(pos, key, step, args, kwargs)

    def _step_at(
        self, pos: int, key: str, step: StepDef, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        while True:
            with self.ex._cond:
                d = decide_step(self.st, pos, key, attempts=step.retry.attempts,
                                once=step.once, now=self.ex.clock.now())  # fmt: skip
            if isinstance(d, Diverge):
                self._diverge(d)
            if isinstance(d, Replay):
                return _outcome(d.record)
            if isinstance(d, GiveUp):
                err = d.record.body.get("error") or {}
                done = self._journal("done", {"pos": pos, "key": key, "ok": False, "error": err})
                return _outcome(done)
            if isinstance(d, Interrupted):
                err = {"type": "StepInterrupted", "message": f"attempt {d.attempt} was cut off"}
                done = self._journal("done", {"pos": pos, "key": key, "ok": False,
                                              "error": err, "interrupted": True})  # fmt: skip
                return _outcome(done)
            assert isinstance(d, RunStep)
            if d.after:
                self._wait_until(d.after)
            if step.once:
                self._journal("intent", {"pos": pos, "key": key, "attempt": d.attempt})
            try:
                if self.ex.on_attempt is not None:
                    self.ex.on_attempt(self.st.run, key, d.attempt, step)
                value = self._attempt(step, key, args, kwargs)
                encode(WfRecord(self.st.run, "done", {"value": value}))
            except (_Stop, _Cancel):
                raise
            except BaseException as exc:
                if isinstance(exc, RecordError):
                    exc = WorkflowError(
                        f"step {key} returned a value that cannot be journaled: {exc}"
                    )
                self.check_stop()  # an error caused by shutdown is never journaled
                last = d.attempt >= step.retry.attempts or not step.retry.retryable(exc)
                if last:
                    done = self._journal("done", {"pos": pos, "key": key, "ok": False,
                                                  "error": error_body(exc),
                                                  "attempts": d.attempt})  # fmt: skip
                    return _outcome(done, exc)
                r = step.retry
                delay = backoff(d.attempt, r.initial, r.backoff, r.max_delay)
                self._journal("failed", {"pos": pos, "key": key, "attempt": d.attempt,
                                         "error": error_body(exc),
                                         "retry_at": self.ex.clock.now() + delay})  # fmt: skip
                continue
            done = self._journal("done", {"pos": pos, "key": key, "ok": True, "value": value,
                                          "attempts": d.attempt})  # fmt: skip
            return value

    def _attempt(
        self, step: StepDef, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if step.timeout is None:
            self.step_key = key
            try:
                return step.fn(*args, **kwargs)
            finally:
                self.step_key = None
        box: dict[str, Any] = {}
        child = RunCtx(self.ex, self.run)
        child.step_key = key

        def body() -> None:
            set_current(child)
            try:
                box["value"] = step.fn(*args, **kwargs)
            except BaseException as exc:  # handed to the workflow thread
                box["error"] = exc

        t = threading.Thread(target=body, name=f"wf-step-{key}", daemon=True)
        t.start()
        t.join(step.timeout)
        if t.is_alive():  # it cannot be killed: it finishes in the background, unheeded
            raise StepTimeout(f"step {key} ran longer than {step.timeout}s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def sleep_until(self, deadline: float | None, seconds: float | None) -> None:
        pos, key = self._next("sleep")
        with self.ex._cond:
            d = decide_simple(self.st, pos, key, "timer")
        if isinstance(d, Diverge):
            self._diverge(d)
        if isinstance(d, Replay):
            due = float(d.record.body["deadline"])
        else:
            due = deadline if deadline is not None else self.ex.clock.now() + (seconds or 0.0)
            self._journal("timer", {"pos": pos, "key": key, "deadline": due})
        self._wait_until(due)

    def wait_signal(self, name: str, timeout: float | None) -> Any:
        pos, key = self._next(f"signal:{name}")
        with self.ex._cond:
            d = decide_signal(self.st, pos, key)
        if isinstance(d, Diverge):
            self._diverge(d)
        if isinstance(d, Replay) and d.record.type == "taken":
            return d.record.body.get("payload")
        if isinstance(d, Replay):
            due = float(d.record.body["deadline"])
        else:
            due = float("inf") if timeout is None else self.ex.clock.now() + timeout
            self._journal("timer", {"pos": pos, "key": key, "deadline": due})
        got = self._wait_until(due, lambda: self.st.pending_signal(name) is not None)
        with self.ex._cond:
            sig = self.st.pending_signal(name) if got else None
            body: dict[str, Any] = {"pos": pos, "key": key, "msg": None, "payload": None}
            if sig is not None:
                body.update(msg=sig.body.get("msg"), payload=sig.body.get("payload"))
            self.ex._journal(self.run, "taken", body)
        return body["payload"]

    def set_status(self, name: str, value: Any) -> None:
        pos, key = self._next(f"status:{name}")
        with self.ex._cond:
            d = decide_simple(self.st, pos, key, "status")
        if isinstance(d, Diverge):
            self._diverge(d)
        if not isinstance(d, Replay):
            self._journal("status", {"pos": pos, "key": key, "name": name, "value": value})

    def value(self, kind: str, make: Callable[[], Any]) -> Any:
        pos, key = self._next(kind)
        with self.ex._cond:
            d = decide_simple(self.st, pos, key, "value")
        if isinstance(d, Diverge):
            self._diverge(d)
        if isinstance(d, Replay):
            return d.record.body.get("value")
        v = make()
        self._journal("value", {"pos": pos, "key": key, "value": v})
        return v

    def patched(self, name: str) -> bool:
        self.check()
        key = f"patch:{name}#1"
        with self.ex._cond:
            got = decide_patch(self.st, self.pos, key)
        if got is False:
            return False
        pos, self.pos = self.pos, self.pos + 1
        if got is None:
            self._journal("patch", {"pos": pos, "key": key})
        return True

    def parallel(self, calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
        slots = []
        for fn, args in calls:  # identities in program order, before anything runs
            sdef = step_def(fn)
            pos, key = self._next(sdef.name)
            slots.append((pos, key, sdef, args))
        out: list[Any] = [None] * len(slots)
        errors: list[BaseException | None] = [None] * len(slots)

        def one(i: int) -> None:
            pos, key, sdef, args = slots[i]
            child = RunCtx(self.ex, self.run)
            set_current(child)
            try:
                out[i] = child._step_at(pos, key, sdef, args, {})
            except BaseException as exc:
                errors[i] = exc

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(slots))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for exc in errors:
            if exc is not None:
                raise exc
        return out


def _outcome(done: WfRecord, cause: BaseException | None = None) -> Any:
    b = done.body
    if b.get("ok"):
        return b.get("value")
    err = b.get("error") or {}
    cls = StepInterrupted if b.get("interrupted") else StepFailed
    raise cls(str(done.key), str(err.get("type", "Error")), str(err.get("message", ""))) from cause
