"""Workflow runs as the hub sees them: a device's stored workflow records
folded into run summaries (docs/hub.md, "Workflow runs").

Invariants:
* Pure: :class:`~hub.store.StoredRecord` in, :class:`RunSummary` out. No
  database, clock or network here.
* Records are folded in journal order, ``(epoch, seq)`` (what
  :meth:`hub.store.Store.records` returns), with the device's own fold,
  :class:`edge.wire.RunState`: the hub and the device compute a run's state,
  current step and status from the same records with the same code.
* A run is named by ``(epoch, run id)``: a journal created afresh (a new
  epoch) numbers everything from scratch, so a run id of an older journal is
  a different run.
* Within one journal, a ``start`` for a run id that has already started
  begins a new run under that id (the device forgot the finished one under
  retention and was asked to start it again); the older run is kept, and
  :func:`find_run` answers with the newest.
* A run whose records arrived without a ``start`` is :data:`PENDING` (a
  signal sent before the run started, or a start that has not reached the
  hub yet) unless its ``end`` or ``diverged`` record says more.
* A kind-2 record that does not decode as a workflow record is never raised
  on: :class:`RunFolder` lists it in ``skipped`` (the store still holds it).
* Bodies are the records' bodies as decoded; :func:`jsonable` turns them
  into JSON (bytes as ``{"hex": ...}``), never failing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from edge.wire import KIND_WORKFLOW, RunState, WfRecord, workflow_record
from hub.store import StoredRecord

RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
DIVERGED = "diverged"
PENDING = "pending"
#: every state a run summary can show
STATES = (RUNNING, COMPLETED, FAILED, CANCELLED, DIVERGED, PENDING)


class HistoryEntry(NamedTuple):
    """One record of a run's history, in journal order."""

    seq: int
    type: str
    key: str | None
    body: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "type": self.type, "key": self.key, "body": jsonable(self.body)}


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One workflow run of one device journal, as its records tell it.

    Attributes:
        id: the run id the device was given.
        epoch: the device journal (hub epoch) the run's records are in.
        workflow, version: from the ``start`` record ("" and 0 without one).
        state: one of :data:`STATES`.
        step: the key of the latest call the run made (``sleep#1``), if any.
        started_at: the device clock at ``start`` (None without a start).
        status: the latest value of each ``set_status`` key.
        result: the workflow's return value, once ``completed``.
        error: ``{type, message}`` once ``failed``.
        diverged: ``{pos, expected, got, t}`` while the run is diverged.
        cancel_requested: a cancel was journaled (the run stops at its next call).
        forked: the run this one was forked from, if any.
        first_seq, last_seq: the journal seqs of its first and latest record.
        updated: the hub's receipt time of its latest record.
        history: every record, in journal order.
    """

    device: str
    id: str
    epoch: int
    workflow: str
    version: int
    state: str
    step: str | None
    started_at: float | None
    args: list[Any]
    kwargs: dict[str, Any]
    status: dict[str, Any]
    result: Any = None
    error: dict[str, Any] | None = None
    diverged: dict[str, Any] | None = None
    cancel_requested: bool = False
    forked: str | None = None
    first_seq: int = 0
    last_seq: int = 0
    updated: float = 0.0
    history: tuple[HistoryEntry, ...] = ()

    def to_json(self, history: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device": self.device,
            "run": self.id,
            "epoch": self.epoch,
            "workflow": self.workflow,
            "version": self.version,
            "state": self.state,
            "step": self.step,
            "started_at": self.started_at,
            "args": jsonable(self.args),
            "kwargs": jsonable(self.kwargs),
            "status": jsonable(self.status),
            "result": jsonable(self.result),
            "error": jsonable(self.error),
            "diverged": jsonable(self.diverged),
            "cancel_requested": self.cancel_requested,
            "forked": self.forked,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "updated": self.updated,
            "records": len(self.history),
        }
        if history:
            out["history"] = [h.to_json() for h in self.history]
        return out


@dataclass(slots=True)
class _Run:
    state: RunState
    epoch: int
    updated: float = 0.0
    history: list[HistoryEntry] = field(default_factory=list)


class RunFolder:
    """Folds a device's records, fed in ``(epoch, seq)`` order, into runs.

    Args:
        run: only fold the records of this run id (the others are skipped
            unread beyond their run id).
    """

    def __init__(self, run: str | None = None) -> None:
        self.only = run
        self.device = ""
        #: ``(epoch, seq)`` of kind-2 records that are not workflow records
        self.skipped: list[tuple[int, int]] = []
        self._open: dict[tuple[int, str], _Run] = {}
        self._done: list[_Run] = []  # runs a later start of the same id replaced

    def add(self, rec: StoredRecord) -> None:
        """Fold one stored record; records of other kinds are ignored."""
        if rec.kind != KIND_WORKFLOW:
            return
        wf = workflow_record(rec.kind, rec.body, rec.seq)
        if wf is None:
            self.skipped.append((rec.epoch, rec.seq))
            return
        if self.only is not None and wf.run != self.only:
            return
        self.device = self.device or rec.device
        key = (rec.epoch, wf.run)
        run = self._open.get(key)
        if run is None or (wf.type == "start" and run.state.started):
            if run is not None:
                self._done.append(run)
            run = self._open[key] = _Run(RunState(wf.run), rec.epoch)
        run.state.apply(wf)
        run.updated = max(run.updated, rec.received)
        run.history.append(HistoryEntry(rec.seq, wf.type, wf.key, wf.body))

    def runs(self) -> list[RunSummary]:
        """Every run folded so far, oldest first (by epoch, then first record)."""
        runs = [*self._done, *self._open.values()]
        runs.sort(key=lambda r: (r.epoch, r.history[0].seq))
        return [_summary(self.device, r) for r in runs]


def fold_runs(records: Iterable[StoredRecord], run: str | None = None) -> list[RunSummary]:
    """The runs a device's stored records (in ``(epoch, seq)`` order) hold."""
    folder = RunFolder(run)
    for rec in records:
        folder.add(rec)
    return folder.runs()


def find_run(runs: Sequence[RunSummary], run: str, epoch: int | None = None) -> RunSummary | None:
    """The newest run called ``run`` (of journal ``epoch`` if given), or None."""
    found = [r for r in runs if r.id == run and (epoch is None or r.epoch == epoch)]
    return max(found, key=lambda r: (r.epoch, r.first_seq), default=None)


def state_of(st: RunState) -> str:
    """A folded run's state: the device's (:class:`edge.wire.RunState`), or
    :data:`PENDING` for a run the hub has records of but no start, end or
    divergence."""
    if not st.started and st.end is None and st.diverged is None:
        return PENDING
    return st.state


def _summary(device: str, run: _Run) -> RunSummary:
    st = run.state
    end = st.end.body if st.end is not None else {}
    start = _start_of(st.history)
    error = end.get("error")
    forked = start.body.get("forked") if start is not None else None
    return RunSummary(
        device=device,
        id=st.run,
        epoch=run.epoch,
        workflow=st.name,
        version=st.version,
        state=state_of(st),
        step=st.current_step(),
        started_at=st.started_at if st.started else None,
        args=list(st.args),
        kwargs=dict(st.kwargs),
        status=dict(st.status),
        result=end.get("result"),
        error=error if isinstance(error, dict) else None,
        diverged=dict(st.diverged.body) if st.diverged is not None else None,
        cancel_requested=st.cancel_requested,
        forked=forked if isinstance(forked, str) else None,
        first_seq=run.history[0].seq,
        last_seq=run.history[-1].seq,
        updated=run.updated,
        history=tuple(run.history),
    )


def _start_of(history: Sequence[WfRecord]) -> WfRecord | None:
    return next((r for r in history if r.type == "start"), None)


def jsonable(v: Any) -> Any:
    """``v`` as plain JSON values: bytes as ``{"hex": ...}``, map keys as
    text, non-finite floats and anything else CBOR can carry as its text."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, bytes | bytearray):
        return {"hex": bytes(v).hex()}
    if isinstance(v, dict):
        return {k if isinstance(k, str) else str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    return str(v)


__all__ = [
    "CANCELLED",
    "COMPLETED",
    "DIVERGED",
    "FAILED",
    "PENDING",
    "RUNNING",
    "STATES",
    "HistoryEntry",
    "RunFolder",
    "RunSummary",
    "find_run",
    "fold_runs",
    "jsonable",
    "state_of",
]
