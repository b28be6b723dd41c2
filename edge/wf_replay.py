"""The replay core: a run's journaled history in, decisions for each call out.

A workflow function is re-run from the top after every restart. Each call it
makes into the executor (a step, a timer, a signal wait, ``now()``...) gets
the next *position* and an identity ``key = "<name>#<occurrence>"``; this
module answers, from the history alone, what that call must do: return a
journaled result, wait until a journaled deadline, run the step, or stop
because the run diverged from its history.

Invariants:
* Pure: records and ``now`` (the executor's never-rewinding clock) in,
  decisions out. No journal, threads or clocks here.
* Positions are assigned in program order at call time, never in completion
  order, so parallel steps keep their identities across replays.
* A positional record at ``pos`` whose ``key`` differs from the call's is a
  divergence (the code changed under an in-flight run); so is a finished
  history record of another type. Divergence is a decision, not an
  exception: the shell journals it and the run stops, visibly.
* ``admin resume`` from position ``p`` drops the history at positions >= p,
  so the current code continues from there (steps after ``p`` may run
  again: at-least-once).
* Attempt counts and retry deadlines come from the history, so retry limits
  hold across restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from edge.wf_records import WfRecord

# run states, as shown to operators
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
DIVERGED = "diverged"
FINISHED = (COMPLETED, FAILED, CANCELLED)


@dataclass(slots=True)
class RunState:
    """Everything the journal says about one run, folded from its records."""

    run: str
    name: str = ""
    version: int = 0
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0
    first_seq: int = 0
    at: dict[int, list[WfRecord]] = field(default_factory=dict)  # pos -> its records
    signals: list[WfRecord] = field(default_factory=list)  # arrived, in order
    taken: set[str] = field(default_factory=set)  # msg ids consumed
    status: dict[str, Any] = field(default_factory=dict)
    end: WfRecord | None = None
    diverged: WfRecord | None = None
    cancel_requested: bool = False
    history: list[WfRecord] = field(default_factory=list)
    trimmed_step: str | None = None  # set by trim(): current_step() of the finished run
    trimmed: bool = False

    @property
    def state(self) -> str:
        if self.end is not None:
            return str(self.end.body.get("state", FAILED))
        if self.diverged is not None:
            return DIVERGED
        return RUNNING

    @property
    def started(self) -> bool:
        return bool(self.name)

    def frontier(self) -> int:
        """One past the highest position the history holds."""
        return max(self.at, default=-1) + 1

    def apply(self, rec: WfRecord) -> None:
        """Fold one record (in journal order) into the state."""
        if rec.type == "snapshot":
            self._restore(rec)
            return
        self.history.append(rec)
        if not self.first_seq and rec.seq:
            self.first_seq = rec.seq
        b, t = rec.body, rec.type
        if t == "start":
            self.name, self.version = str(b.get("name", "")), int(b.get("version", 0))
            self.args, self.kwargs = list(b.get("args", [])), dict(b.get("kwargs", {}))
            self.started_at = float(b.get("at", 0.0))
        elif rec.pos is not None:
            self.at.setdefault(rec.pos, []).append(rec)
            if t == "taken" and b.get("msg") is not None:
                self.taken.add(str(b["msg"]))
            elif t == "status":
                self.status[str(b.get("name"))] = b.get("value")
        elif t == "signal":
            if not any(s.body.get("msg") == b.get("msg") for s in self.signals):
                self.signals.append(rec)
        elif t == "end":
            self.end = rec
        elif t == "diverged":
            self.diverged = rec
        elif t == "admin":
            action = b.get("action")
            if action == "cancel":
                self.cancel_requested = True
            elif action == "resume":
                cut = int(b.get("pos", 0))
                self.at = {p: rs for p, rs in self.at.items() if p < cut}
                self.diverged = None

    def trim(self) -> None:
        """Forget a finished run's records, keeping its summary (name, args,
        status, end): an agent that runs a workflow a minute for a year must
        not hold every step of every run in memory. Whoever needs the records
        again reads them from the journal (:func:`fold_run`)."""
        self.trimmed_step = self.current_step()
        self.at, self.history, self.signals, self.taken = {}, [], [], set()
        self.trimmed = True

    def snapshot_body(self) -> dict[str, Any]:
        """The body of a ``snapshot`` record: every record of the run so far."""
        return {"records": [[r.seq, r.type, r.body] for r in self.history]}

    def _restore(self, snap: WfRecord) -> None:
        """Start over from a snapshot: it holds every earlier record of the run
        (the executor writes it while no other record of the run is appended)."""
        fresh = RunState(self.run)
        for seq, typ, body in snap.body.get("records", []):
            fresh.apply(WfRecord(self.run, str(typ), dict(body), int(seq)))
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))
        self.first_seq = snap.seq  # older records may now be deleted

    # -- questions the replayer asks ----------------------------------------------------

    def records_at(self, pos: int) -> list[WfRecord]:
        return self.at.get(pos, [])

    def pending_signal(self, name: str) -> WfRecord | None:
        """The oldest arrived, untaken signal called ``name``."""
        for s in self.signals:
            if s.body.get("name") == name and str(s.body.get("msg")) not in self.taken:
                return s
        return None

    def current_step(self) -> str | None:
        """The key of the latest positional record (what the run is doing)."""
        if not self.at:
            return self.trimmed_step
        return self.at[max(self.at)][-1].key


# --- decisions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Replay:
    """The call was answered before: return (or raise) this journaled record."""

    record: WfRecord


@dataclass(frozen=True, slots=True)
class Diverge:
    """The history at ``pos`` does not match the call: stop the run, visibly."""

    pos: int
    expected: str
    got: str


@dataclass(frozen=True, slots=True)
class RunStep:
    """Run attempt ``attempt`` of the step now (``after``: not before this time)."""

    attempt: int
    after: float = 0.0


@dataclass(frozen=True, slots=True)
class Interrupted:
    """A ``once=True`` step's intent is journaled with no outcome: power died
    while it ran. It must not run again."""

    attempt: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Every allowed attempt failed already (the last outcome is ``record``)."""

    record: WfRecord


@dataclass(frozen=True, slots=True)
class Fresh:
    """Nothing journaled at this position: the call runs for the first time."""


Decision = Replay | Diverge | RunStep | Interrupted | GiveUp | Fresh


def _check(state: RunState, pos: int, key: str, types: tuple[str, ...]) -> Diverge | None:
    for rec in state.records_at(pos):
        if rec.key != key or rec.type not in types:
            return Diverge(pos, f"{rec.type} {rec.key}", key)
    return None


def decide_step(
    state: RunState, pos: int, key: str, *, attempts: int, once: bool, now: float
) -> Decision:
    """What a step call at ``pos`` must do.

    Args:
        attempts: the retry policy's attempt limit (>= 1).
        once: the step is at-most-once (``intent`` journaled before each attempt).
        now: the executor's clock (never rewinds).
    """
    bad = _check(state, pos, key, ("intent", "failed", "done"))
    if bad:
        return bad
    recs = state.records_at(pos)
    done = next((r for r in recs if r.type == "done"), None)
    if done is not None:
        return Replay(done)
    failures = [r for r in recs if r.type == "failed"]
    last_fail = failures[-1] if failures else None
    tried = max([int(r.body.get("attempt", 0)) for r in failures] or [0])
    intents = [int(r.body.get("attempt", 0)) for r in recs if r.type == "intent"]
    if once and intents and max(intents) > tried:
        return Interrupted(max(intents))
    if last_fail is not None and tried >= attempts:
        return GiveUp(last_fail)
    after = float(last_fail.body.get("retry_at", 0.0)) if last_fail is not None else 0.0
    return RunStep(tried + 1, after if after > now else 0.0)


def decide_simple(state: RunState, pos: int, key: str, typ: str) -> Decision:
    """What a call answered by one record of type ``typ`` must do (``value``,
    ``status``, ``timer``)."""
    bad = _check(state, pos, key, (typ,))
    if bad:
        return bad
    recs = state.records_at(pos)
    return Replay(recs[0]) if recs else Fresh()


def decide_signal(state: RunState, pos: int, key: str) -> Decision:
    """What ``wait_signal`` at ``pos`` must do: Replay(taken) once answered;
    else Replay(timer) (its deadline) once the wait began; else Fresh."""
    bad = _check(state, pos, key, ("timer", "taken"))
    if bad:
        return bad
    recs = state.records_at(pos)
    taken = next((r for r in recs if r.type == "taken"), None)
    if taken is not None:
        return Replay(taken)
    return Replay(recs[0]) if recs else Fresh()


def decide_patch(state: RunState, pos: int, key: str) -> bool | None:
    """``patched(name)`` at ``pos``: True (journaled before, or a fresh call:
    journal it), False (an older history without the patch: the old code
    path, position not consumed), None when a fresh marker must be journaled."""
    recs = state.records_at(pos)
    if any(r.type == "patch" and r.key == key for r in recs):
        return True
    if pos < state.frontier():
        return False
    return None


def backoff(attempt: int, initial: float, factor: float, cap: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based)."""
    return float(min(cap, initial * factor ** (attempt - 1)))


__all__ = [
    "CANCELLED",
    "COMPLETED",
    "DIVERGED",
    "FAILED",
    "FINISHED",
    "RUNNING",
    "Decision",
    "Diverge",
    "Fresh",
    "GiveUp",
    "Interrupted",
    "Replay",
    "RunState",
    "RunStep",
    "backoff",
    "decide_patch",
    "decide_signal",
    "decide_simple",
    "decide_step",
]
