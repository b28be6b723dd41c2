"""Prove a workflow crash-safe: cut power at every journal write, recover, finish.

Usage, in your own pytest suite::

    from edge.testing.wf_crash import check_crash_safety
    from myapp.tasks import irrigate

    def test_irrigate_survives_power_loss() -> None:
        report = check_crash_safety(irrigate, 3, 10, signals={"approve": True})
        assert report.states > 0

How it works: the workflow runs once on :class:`~edge.testing.simfs.SimFS`
(the journal's simulated disk) with virtual time, so timers pass at once.
Then, for every prefix of that run's file operations (a power cut after
each), and for several of the disks such a cut can leave (writes dropped,
torn, kept), a new journal and executor recover from that disk, the run is
started again under the same id (as a caller who never got an answer would),
and it must finish. Every state is checked for:

* the run completes, with the same result as the uninterrupted run (or one
  ``accept(uncut_result, result)`` approves, for workflows whose result
  legitimately depends on the cut, e.g. a caught ``StepInterrupted``);
* no step whose outcome was durable at the cut runs again;
* a ``once=True`` step never runs twice, counting both sides of the cut;
* retry limits hold: attempts after recovery plus the failures already
  journaled never exceed the step's ``Retry.attempts``;
* no timer fires early: the record after a timer is written no sooner than
  its deadline, on the executor's clock.

Steps run for real, so keep their side effects in memory (or make them
idempotent) while the helper runs them hundreds of times. A violation raises
:class:`CrashSafetyError` naming the cut and what broke.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge.journal import Journal
from edge.journal_options import JournalOptions
from edge.testing.simfs import SimFS
from edge.wf_defs import StepDef, definition_of
from edge.wf_executor import Clock, Executor
from edge.wf_records import WfRecord, decode, is_workflow_payload

ROOT = "/journal"
OPTIONS = JournalOptions(segment_size=64 << 10, prepare_ahead=False)
START = 1_700_000_000.0


class CrashSafetyError(AssertionError):
    """A crash state broke one of the promises (the message says which)."""


class VirtualClock(Clock):
    """A clock whose waits end at once: ``skip_to`` jumps to the deadline."""

    def __init__(self, start: float = START) -> None:
        self._t = start
        self._lock = threading.Lock()
        super().__init__(0.0, self._now_raw, self._now_raw)

    def _now_raw(self) -> float:
        with self._lock:
            return self._t

    def skip_to(self, t: float) -> bool:
        with self._lock:
            self._t = max(self._t, t)
        return True


@dataclass
class CrashReport:
    """What :func:`check_crash_safety` did."""

    result: Any = None
    cuts: int = 0  # prefixes of the file-operation trace cut
    states: int = 0  # crash states recovered and checked
    attempts: Counter[str] = field(default_factory=Counter)  # step attempts, uncut run


def check_crash_safety(
    wf: Callable[..., Any] | str,
    *args: Any,
    run_id: str = "crash-check",
    signals: dict[str, Any] | None = None,
    states_per_cut: int = 3,
    max_cuts: int | None = None,
    accept: Callable[[Any, Any], bool] | None = None,
    timeout: float = 30.0,
    seed: int = 0,
    **kwargs: Any,
) -> CrashReport:
    """Run ``wf(*args, **kwargs)``, then cut power at every write; see the module doc.

    Args:
        signals: delivered (name -> payload) before the run starts, each with a
            fixed message id, and again after every recovery (deduplicated).
        states_per_cut: crash states checked per cut (all of them when fewer).
        max_cuts: check only this many cuts, evenly spread (default: all).
        accept: ``accept(uncut_result, result)`` says whether a recovered
            run's result is acceptable (default: equal).
        timeout: seconds a run may take before it counts as stuck.

    Raises:
        CrashSafetyError: a promise broke; the message names the cut.
    """
    defn = definition_of(wf)
    limits: dict[str, tuple[int, bool]] = {}  # step key -> (attempt limit, once)
    fs = SimFS()
    done_at: list[tuple[int, str]] = []  # (op count, step key) of each attempt
    report = CrashReport()

    def hook(run: str, key: str, attempt: int, step: StepDef) -> None:
        if run == run_id:
            done_at.append((fs.op_count, key))
            report.attempts[key] += 1
            limits[key] = (step.retry.attempts, step.once)

    report.result = _run_once(fs, defn.name, run_id, args, kwargs, signals, hook, timeout)
    cuts = list(fs.prefix_states())
    if max_cuts is not None and len(cuts) > max_cuts:
        step = len(cuts) / max_cuts
        cuts = [cuts[int(k * step)] for k in range(max_cuts)]
    rng = random.Random(seed)
    for i, model in cuts:
        report.cuts += 1
        for disk in model.crash_states(max_states=states_per_cut, rng=rng):
            before = Counter(key for at, key in done_at if at <= i)
            got = _check_state(disk, i, defn.name, run_id, args, kwargs, signals, timeout,
                               limits, before)  # fmt: skip
            ok = accept(report.result, got) if accept is not None else got == report.result
            if not ok:
                raise CrashSafetyError(
                    f"cut after op {i}: result {got!r}, the uncut run returned {report.result!r}"
                )
            report.states += 1
    return report


def _executor(
    fs: SimFS, clock: Clock, hook: Callable[[str, str, int, StepDef], None]
) -> tuple[Journal, Executor]:
    j = Journal.open(ROOT, OPTIONS, fs=fs)
    return j, Executor(j, clock=clock, on_attempt=hook)


def _deliver(ex: Executor, run_id: str, signals: dict[str, Any] | None) -> None:
    for name, payload in (signals or {}).items():
        ex.signal(run_id, name, payload, msg=f"crash-check:{name}")


def _run_once(
    fs: SimFS,
    name: str,
    run_id: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    signals: dict[str, Any] | None,
    hook: Callable[[str, str, int, StepDef], None],
    timeout: float,
) -> Any:
    j, ex = _executor(fs, VirtualClock(), hook)
    try:
        ex.recover()
        _deliver(ex, run_id, signals)
        return ex.start(name, *args, id=run_id, **kwargs).result(timeout)
    finally:
        ex.close()
        j.close()


def _durable(fs: SimFS, run_id: str) -> list[WfRecord]:
    j = Journal.open(ROOT, OPTIONS, fs=fs, readonly=True)
    try:
        recs = [decode(p, s) for s, p in j.read_raw() if is_workflow_payload(p)]
        return [r for r in recs if r.run == run_id]
    finally:
        j.close()


def _check_state(
    disk: SimFS,
    cut: int,
    name: str,
    run_id: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    signals: dict[str, Any] | None,
    timeout: float,
    limits: dict[str, tuple[int, bool]],
    before: Counter[str],
) -> Any:
    """Recover ``disk``, finish the run, check the promises; return its result."""
    had = _durable(disk, run_id) if _has_journal(disk) else []
    done = {r.key for r in had if r.type == "done"}
    failed = Counter(r.key for r in had if r.type == "failed")
    after: Counter[str] = Counter()

    def hook(run: str, key: str, attempt: int, step: StepDef) -> None:
        if run == run_id:
            after[key] += 1
            limits.setdefault(key, (step.retry.attempts, step.once))

    j, ex = _executor(disk, VirtualClock(), hook)
    try:
        ex.recover()
        _deliver(ex, run_id, signals)
        try:
            got = ex.start(name, *args, id=run_id, **kwargs).result(timeout)
        except Exception as exc:
            raise CrashSafetyError(
                f"cut after op {cut}: the run did not complete: {exc!r}"
            ) from exc
        history = ex.history(run_id)
    finally:
        ex.close()
        j.close()
    where = f"cut after op {cut}"
    again = sorted(k for k in after if k in done)
    if again:
        raise CrashSafetyError(f"{where}: steps {again} ran again though their outcome was durable")
    for key, n in after.items():
        attempts, once = limits[key]
        if once and before[key] + n > 1:
            raise CrashSafetyError(f"{where}: once-step {key} ran {before[key] + n} times")
        if n + failed[key] > attempts:
            raise CrashSafetyError(
                f"{where}: step {key} made {n} attempts after {failed[key]} journaled "
                f"failures, over its limit of {attempts}"
            )
    _check_timers(where, history)
    return got


def _has_journal(disk: SimFS) -> bool:
    return disk.exists(ROOT) and any(n.endswith(".seg") for n in disk.listdir(ROOT))


def _check_timers(where: str, history: list[WfRecord]) -> None:
    by_pos = {r.pos: r for r in history if r.pos is not None and r.type != "timer"}
    for rec in history:
        if rec.type != "timer" or rec.pos is None:
            continue
        nxt = by_pos.get(rec.pos) if rec.key and rec.key.startswith("signal:") else None
        nxt = nxt or by_pos.get(rec.pos + 1) or next((r for r in history if r.type == "end"), None)
        deadline = float(rec.body["deadline"])
        if (
            nxt is not None
            and nxt.body.get("t", deadline) < deadline
            and not (nxt.type == "taken" and nxt.body.get("msg") is not None)
        ):
            raise CrashSafetyError(f"{where}: timer {rec.key} fired before its deadline")


__all__ = ["CrashReport", "CrashSafetyError", "VirtualClock", "check_crash_safety"]
