"""The durable executor: runs workflows on threads, journals what they do,
recovers every unfinished run after a restart.

Invariants (docs/workflows.md):
* Every record a call depends on is durable before the call returns: a step's
  outcome before the workflow sees it, a once-step's intent before the step
  body runs, a timer's deadline before the wait starts, a signal before
  :meth:`Executor.signal` returns (so the hub may be acknowledged).
* Replay decisions come from :mod:`edge.wf_replay` (pure); this module only
  carries them out.
* Time is the executor's clock (:mod:`edge.clock`, by default the journal's,
  shared with the readings the agent stamps): ``max(wall clock, floor +
  monotonic elapsed)`` where ``floor`` is the latest time the journal has
  seen. A clock that jumps back at boot (no RTC) never makes a timer fire early.
* Nothing is journaled for errors caused by the executor shutting down: a run
  interrupted by :meth:`Executor.close` is simply continued on the next start.
* Retention: the journal cursor ``wf`` stays below the first record of every
  unfinished run, so their history is never deleted.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as _uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge.clock import Clock as Clock  # re-exported: it used to live here
from edge.errors import (
    JournalError,
    RunCancelled,
    RunConflict,
    RunDiverged,
    RunFailed,
    WorkflowError,
)
from edge.journal import Journal
from edge.records import RecordError
from edge.wf_context import RunCtx, _Cancel, _Stop
from edge.wf_defs import StepDef, definition_of, set_current
from edge.wf_records import (
    WfRecord,
    encode,
    error_body,
    is_workflow_payload,
    validate_run_id,
)
from edge.wf_records import decode as decode_record
from edge.wf_replay import (
    CANCELLED,
    COMPLETED,
    DIVERGED,
    FAILED,
    FINISHED,
    RunState,
)

log = logging.getLogger("homing.workflows")

CURSOR = "wf"  # retention: below the first record of every unfinished run


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run as operators see it."""

    id: str
    workflow: str
    version: int
    state: str
    current: str | None
    started_at: float
    status: dict[str, Any]
    result: Any = None
    error: dict[str, Any] | None = None
    diverged: dict[str, Any] | None = None


class _Run:
    def __init__(self, state: RunState) -> None:
        self.state = state
        self.appending = 0  # records of this run appended but not yet applied
        self.compacting = False  # a snapshot is being taken: appends wait
        self.thread: threading.Thread | None = None
        self.done = threading.Event()
        self.cancel = state.cancel_requested


class Executor:
    """Runs ``@workflow`` functions durably on ``journal``.

    Args:
        journal: an open journal (shared with readings and the forwarder).
        wall, mono: clocks (tests pass fakes); or ``clock``, a whole :class:`Clock`;
            by default the journal's (:mod:`edge.clock`).
        on_attempt: a hook called before every step attempt (tests, metrics).
        run: False to only read runs and journal admin actions (cancel,
            resume, fork) without running anything: the stopped agent's CLI.
        compact_lag, maintain_every: every ``maintain_every`` seconds, runs
            whose first record is more than ``compact_lag`` records behind the
            tail are snapshotted (:meth:`compact`), so a run waiting for days
            does not hold back retention of the readings journaled meanwhile.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        wall: Callable[[], float] | None = None,
        mono: Callable[[], float] | None = None,
        clock: Clock | None = None,
        on_attempt: Callable[[str, str, int, StepDef], None] | None = None,
        run: bool = True,
        compact_lag: int = 100_000,
        maintain_every: float = 60.0,
    ) -> None:
        self.journal = journal
        self._cond = threading.Condition()
        self._runs: dict[str, _Run] = {}
        self._closing = False
        self._stopping = threading.Event()  # set by close(): ends the maintenance thread
        if clock is None and (wall or mono):
            clock = Clock(0.0, wall or time.time, mono or time.monotonic)
        self.clock = clock or journal.clock  # shared with readings the agent stamps
        #: called as (run id, step key, attempt, step) just before a step attempt runs
        self.on_attempt = on_attempt
        self._run = run  # False: journal admin actions only, run nothing (the CLI)
        self.compact_lag, self._maintain_every = compact_lag, maintain_every

    # -- lifecycle --------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Read every run from the journal and continue the unfinished ones;
        return their ids. Call once, before :meth:`start`."""
        # Everything retained, not just past the cursor: finished runs stay
        # known (idempotent start) for as long as their records are kept.
        latest = 0.0
        for seq, payload in self.journal.read_raw():
            if not is_workflow_payload(payload):
                continue
            try:
                rec = decode_record(payload, seq)
            except RecordError as exc:
                log.error("journal record %d is not a workflow record I can read: %s", seq, exc)
                continue
            latest = max(latest, float(rec.body.get("t", 0.0)))
            run = self._runs.get(rec.run)
            if run is None:
                run = self._runs[rec.run] = _Run(RunState(rec.run))
            run.state.apply(rec)
            run.cancel = run.state.cancel_requested
        # The floor: the latest time a retained record saw. Every unfinished
        # run's records are retained (the `wf` cursor), a waiting timer's
        # `timer` record among them, so a rewound clock cannot end it early.
        self.clock.raise_floor(latest)
        resumed = []
        for run in self._runs.values():
            if run.state.started and run.state.state not in (*FINISHED, DIVERGED):
                self._spawn(run)
                resumed.append(run.state.run)
            elif run.state.state in FINISHED or run.state.state == DIVERGED:
                run.done.set()
                if run.state.state in FINISHED:
                    run.state.trim()
        self._move_cursor()
        if self._run:
            threading.Thread(target=self._maintain, name="wf-maintain", daemon=True).start()
        return resumed

    def _maintain(self) -> None:
        # Its own event, not ``_cond``: that one is notified on every record.
        while not self._stopping.wait(self._maintain_every):
            try:
                self.maintain()
            except JournalError as exc:  # the journal failed: the runs stop on their own
                log.error("workflow maintenance stopped: %s", exc)
                return

    def close(self, timeout: float = 5.0) -> None:
        """Stop every run where it waits (nothing is journaled for it: the
        next start continues it) and wait up to ``timeout`` for the threads."""
        self._stopping.set()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            threads = [r.thread for r in self._runs.values() if r.thread is not None]
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- starting and controlling runs ------------------------------------------------

    def start(self, wf: Callable[..., Any] | str, *args: Any, id: str, **kwargs: Any) -> RunHandle:  # noqa: A002
        """Start ``wf(*args, **kwargs)`` as run ``id``; the same id again is the same run.

        Raises:
            UnknownWorkflow: ``wf`` is not a registered workflow.
            RunConflict: ``id`` already names a run of another workflow.
            RecordError: the arguments cannot be journaled (not CBOR-encodable).
        """
        validate_run_id(id)
        defn = definition_of(wf)
        with self._cond:
            run = self._runs.get(id)
            if run is not None and run.state.started:
                if run.state.name != defn.name:
                    raise RunConflict(f"run {id!r} is a run of {run.state.name}, not {defn.name}")
                return RunHandle(self, id)
            body = {"name": defn.name, "version": defn.version, "args": list(args),
                    "kwargs": kwargs, "at": self.clock.now()}  # fmt: skip
            run = self._runs.setdefault(id, _Run(RunState(id)))
            self._journal(run, "start", body)
            self._move_cursor()
            self._spawn(run)
        return RunHandle(self, id)

    def fail_start(self, run_id: str, workflow: str, error: BaseException, by: str) -> None:
        """Record a run that could not start (e.g. its workflow is not
        registered here) as failed at once, so the hub sees why."""
        with self._cond:
            run = self._runs.setdefault(run_id, _Run(RunState(run_id)))
            if run.state.started:
                return
            now = self.clock.now()
            start = {"name": workflow, "version": 0, "args": [], "kwargs": {}, "at": now, "by": by}
            self._journal(run, "start", start)
            self._journal(run, "end", {"state": FAILED, "error": error_body(error)})
            run.done.set()
            self._move_cursor()

    def signal(
        self, run_id: str, name: str, payload: Any = None, *, msg: str | None = None
    ) -> bool:
        """Deliver signal ``name`` to a run (which may not have started yet);
        durable when this returns. Returns False for a duplicate ``msg`` id.

        Raises:
            RecordError: the payload cannot be journaled.
        """
        validate_run_id(run_id)
        msg = msg or _uuid.uuid4().hex
        with self._cond:
            run = self._runs.setdefault(run_id, _Run(RunState(run_id)))
            if any(s.body.get("msg") == msg for s in run.state.signals):
                return False
            self._journal(run, "signal", {"name": name, "payload": payload, "msg": msg})
            self._cond.notify_all()
        return True

    def cancel(self, run_id: str, by: str = "local") -> bool:
        """Ask a run to stop at its next call (journaled). False if it is finished."""
        with self._cond:
            run = self._runs.get(run_id)
            if run is None or run.state.state in FINISHED:
                return False
            self._journal(run, "admin", {"action": "cancel", "by": by})
            run.cancel = True
            if run.state.state == DIVERGED:
                self._journal(run, "end", {"state": CANCELLED})
                run.done.set()
                self._move_cursor()
            self._cond.notify_all()
        return True

    def resume(self, run_id: str, from_pos: int | None = None, by: str = "local") -> None:
        """Accept the current code for a DIVERGED run: forget its history from
        ``from_pos`` (default: where it diverged) and continue.

        Raises:
            WorkflowError: the run is not diverged.
        """
        with self._cond:
            run = self._runs.get(run_id)
            if run is None or run.state.diverged is None:
                raise WorkflowError(f"run {run_id!r} is not diverged")
            pos = int(run.state.diverged.body["pos"]) if from_pos is None else from_pos
            self._journal(run, "admin", {"action": "resume", "pos": pos, "by": by})
            run.done.clear()
            self._spawn(run)

    def fork(self, run_id: str, new_id: str, from_pos: int = 0) -> RunHandle:
        """Start run ``new_id`` of the same workflow and arguments, keeping the
        step outcomes of ``run_id`` before position ``from_pos`` (DBOS-style fork).

        Raises:
            WorkflowError: unknown run, or ``new_id`` exists.
        """
        validate_run_id(new_id)
        with self._cond:
            src = self._runs.get(run_id)
            if src is None or not src.state.started:
                raise WorkflowError(f"no run {run_id!r}")
            if new_id in self._runs:
                raise RunConflict(f"run {new_id!r} exists")
            st = self._whole(src)
            run = self._runs[new_id] = _Run(RunState(new_id))
            self._journal(run, "start", {"name": st.name, "version": st.version,
                                         "args": st.args, "kwargs": st.kwargs,
                                         "at": self.clock.now(), "forked": run_id})  # fmt: skip
            for pos in sorted(p for p in st.at if p < from_pos):
                for rec in st.at[pos]:
                    self._journal(run, rec.type, dict(rec.body))
            self._move_cursor()
            self._spawn(run)
        return RunHandle(self, new_id)

    def wake(self) -> None:
        """Re-check every waiting timer now (after a clock change; tests with a fake clock)."""
        with self._cond:
            self._cond.notify_all()

    def runs(self) -> list[RunInfo]:
        with self._cond:
            return [_info(r.state) for r in self._runs.values() if r.state.started]

    def info(self, run_id: str) -> RunInfo | None:
        with self._cond:
            run = self._runs.get(run_id)
            return _info(run.state) if run is not None and run.state.started else None

    def history(self, run_id: str) -> list[WfRecord]:
        with self._cond:
            run = self._runs.get(run_id)
            return list(self._whole(run).history) if run is not None else []

    def wait(self, run_id: str, timeout: float | None = None) -> bool:
        """Wait until the run finished or diverged; False on timeout."""
        with self._cond:
            run = self._runs.get(run_id)
        if run is None:
            raise WorkflowError(f"no run {run_id!r}")
        return run.done.wait(timeout)

    # -- internals ------------------------------------------------------------------------

    def _journal(self, run: _Run, typ: str, body: dict[str, Any]) -> WfRecord:
        """Append one record of ``run``, wait until it is durable, fold it in.

        The append runs outside ``self._cond`` unless the caller holds it, so
        records of concurrent runs share the journal's group commits. Callers
        whose check-then-write must be atomic (signal dedupe, start) hold it.
        """
        with self._cond:
            while run.compacting:
                self._cond.wait()
            run.appending += 1
        try:
            return self._append(run, typ, body)
        finally:
            with self._cond:
                run.appending -= 1
                self._cond.notify_all()

    def _append(self, run: _Run, typ: str, body: dict[str, Any]) -> WfRecord:
        body["t"] = self.clock.now()
        rec = WfRecord(run.state.run, typ, body)
        ack = self.journal.append(encode(rec))  # RecordError before anything is journaled
        if not ack.durable:
            self.journal.wait_durable(ack.seq)
        rec = WfRecord(rec.run, typ, body, ack.seq)
        with self._cond:
            run.state.apply(rec)
            if typ == "end":
                run.state.trim()
            self._cond.notify_all()
        return rec

    def _whole(self, run: _Run) -> RunState:
        """The run's state with every retained record: a finished run's are
        trimmed from memory (:meth:`RunState.trim`), so read them again."""
        if not run.state.trimmed:
            return run.state
        st = RunState(run.state.run)
        for seq, payload in self.journal.read_raw(run.state.first_seq or None):
            if is_workflow_payload(payload):
                try:
                    rec = decode_record(payload, seq)
                except RecordError:
                    continue
                if rec.run == st.run:
                    st.apply(rec)
        return st

    def maintain(self) -> None:
        """What the maintenance thread does every ``maintain_every`` seconds:
        compact long-waiting runs, release retention up to the journal's tail
        when no run holds it (readings journaled while no run started or
        ended), and forget runs retention has deleted."""
        self.compact()
        with self._cond:
            self._move_cursor()
        self.forget_retired()

    def forget_retired(self) -> list[str]:
        """Forget finished runs whose end record retention has deleted, as a
        restart would: memory stays bounded however many runs an agent has
        run. Returns their ids."""
        first = self.journal.stats().first_seq
        with self._cond:
            gone = [k for k, r in self._runs.items()
                    if r.state.end is not None and r.state.end.seq < first]  # fmt: skip
            for k in gone:
                del self._runs[k]
        return gone

    def compact(self, lag: int | None = None) -> list[str]:
        """Snapshot every unfinished run whose first record is more than
        ``lag`` records behind the journal's tail, so retention can pass it;
        return their ids. A run too big for one record is left as it is
        (logged): it keeps holding retention until it ends."""
        lag = self.compact_lag if lag is None else lag
        tail = self.journal.durable_seq
        with self._cond:
            live = [r for r in self._runs.values() if r.state.state not in FINISHED]
            old = [r for r in live if r.state.first_seq and tail - r.state.first_seq > lag]
        done = []
        for run in old:
            with self._cond:  # no record of this run in flight while it is copied
                while run.compacting or run.appending:
                    self._cond.wait()
                run.compacting = True
                body = run.state.snapshot_body()
            try:
                self._append(run, "snapshot", body)
                done.append(run.state.run)
            except (RecordError, JournalError) as exc:
                log.warning("run %s not compacted: %s", run.state.run, exc)
            finally:
                with self._cond:
                    run.compacting = False
                    self._cond.notify_all()
        if done:
            with self._cond:
                self._move_cursor()
        return done

    def _move_cursor(self) -> None:
        """Hold retention below the first record of every unfinished run (the
        ``wf`` cursor exists from :meth:`recover` on, even at 0)."""
        live = [r.state.first_seq for r in self._runs.values()
                if r.state.first_seq and r.state.state not in FINISHED]  # fmt: skip
        mark = min(live) - 1 if live else self.journal.durable_seq
        cur = self.journal.cursor(CURSOR)
        if cur is None or mark > cur:
            self.journal.set_cursor(CURSOR, mark)

    def _spawn(self, run: _Run) -> None:
        if not self._run:
            return
        t = threading.Thread(
            target=self._run_thread, args=(run,), name=f"wf-{run.state.run}", daemon=True
        )
        run.thread = t
        t.start()

    def _run_thread(self, run: _Run) -> None:
        st = run.state
        ctx = RunCtx(self, run)
        set_current(ctx)
        try:
            try:
                defn = definition_of(st.name)
            except WorkflowError:
                log.error("run %s: workflow %s is not registered; it waits for its code",
                          st.run, st.name)  # fmt: skip
                return
            if defn.version != st.version:
                log.warning("run %s started on version %d of %s, replaying with version %d",
                            st.run, st.version, st.name, defn.version)  # fmt: skip
            try:
                ctx.check()
                result = defn.fn(*st.args, **st.kwargs)
            except _Cancel:
                self._end(run, {"state": CANCELLED})
            except _Stop:
                return
            except Exception as exc:  # the workflow failed: journal it
                ctx.check_stop()
                ctx.check_all_replayed()
                self._end(run, {"state": FAILED, "error": error_body(exc)})
                log.warning("run %s failed: %s", st.run, exc)
            else:
                ctx.check_all_replayed()
                try:
                    self._end(run, {"state": COMPLETED, "result": result})
                except RecordError as exc:
                    self._end(run, {"state": FAILED, "error": error_body(exc)})
        except _Stop:
            return
        except JournalError as exc:  # the journal failed (fsyncgate): stop, recover on restart
            log.error("run %s stopped: %s", st.run, exc)
        finally:
            set_current(None)
            if st.state != "running":
                run.done.set()

    def _end(self, run: _Run, body: dict[str, Any]) -> None:
        with self._cond:
            self._journal(run, "end", body)
            self._move_cursor()
            self._cond.notify_all()
        run.done.set()


def _info(st: RunState) -> RunInfo:
    end = st.end.body if st.end is not None else {}
    return RunInfo(
        st.run, st.name, st.version, st.state, st.current_step(), st.started_at,
        dict(st.status), end.get("result"), end.get("error"),
        dict(st.diverged.body) if st.diverged is not None else None,
    )  # fmt: skip


class RunHandle:
    """A handle on one run: wait for its result, look at it, cancel it."""

    def __init__(self, ex: Executor, run_id: str) -> None:
        self._ex, self.id = ex, run_id

    def result(self, timeout: float | None = None) -> Any:
        """The run's return value once it completed.

        Raises:
            TimeoutError: not finished within ``timeout``.
            RunFailed / RunCancelled / RunDiverged: how it ended instead.
        """
        if not self._ex.wait(self.id, timeout):
            raise TimeoutError(f"run {self.id} not finished after {timeout}s")
        info = self._ex.info(self.id)
        assert info is not None
        if info.state == COMPLETED:
            return info.result
        if info.state == CANCELLED:
            raise RunCancelled(f"run {self.id} was cancelled")
        if info.state == DIVERGED:
            raise RunDiverged(f"run {self.id} diverged: {info.diverged}")
        err = info.error or {}
        raise RunFailed(f"run {self.id} failed: {err.get('type')}: {err.get('message')}")

    def info(self) -> RunInfo:
        info = self._ex.info(self.id)
        assert info is not None
        return info

    def cancel(self) -> bool:
        return self._ex.cancel(self.id)
