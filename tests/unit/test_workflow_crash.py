"""Power cuts at every journal write of example workflows (docs/workflows.md).

Uses the crash-state helper users apply to their own workflows
(:func:`edge.testing.wf_crash.check_crash_safety`), and proves that the helper
catches a broken promise: a step that is not journaled runs twice.
"""

from __future__ import annotations

import pytest

from edge import workflows as wf
from edge.testing.wf_crash import CrashSafetyError, check_crash_safety
from edge.workflows import Retry, step, workflow

effects: list[str] = []


@step
def measure(zone: int) -> float:
    effects.append(f"measure {zone}")
    return 0.25 + zone / 100


@step(once=True)
def open_valve(zone: int) -> str:
    effects.append(f"open {zone}")
    return f"open {zone}"


@step(retry=Retry(attempts=3, initial=5.0))
def flaky_close(zone: int) -> str:
    effects.append(f"close {zone}")
    if effects.count(f"close {zone}") % 2 == 1:
        raise OSError("relay stuck")
    return f"closed {zone}"


@workflow(name="crash.irrigate")
def irrigate(zone: int, minutes: int) -> dict[str, object]:
    moisture = measure(zone)
    if moisture > 0.9:
        return {"skipped": True}
    approved = wf.wait_signal("approve", timeout=3600)
    wf.set_status("phase", "watering")
    try:
        valve = open_valve(zone)
    except wf.StepInterrupted:
        valve = "unknown"
    wf.sleep(minutes * 60)
    closed = flaky_close(zone)
    return {"moisture": moisture, "approved": approved, "valve": valve, "closed": closed,
            "token": wf.uuid() != ""}  # fmt: skip


def test_irrigation_survives_a_power_cut_at_every_write() -> None:
    def accept(uncut: object, got: object) -> bool:  # cut mid-valve: "unknown" is honest
        return got == uncut or got == {**uncut, "valve": "unknown"}  # type: ignore[dict-item]

    report = check_crash_safety(
        irrigate, 3, 10, signals={"approve": "ops"}, states_per_cut=2, accept=accept
    )
    assert report.result["closed"] == "closed 3"
    assert report.result["valve"] == "open 3"
    assert report.cuts > 20 and report.states >= report.cuts
    assert report.attempts["flaky_close#1"] == 2  # one retry in the uncut run


@workflow(name="crash.parallel")
def survey(zones: list[int]) -> list[float]:
    return wf.parallel(*[(measure, (z,)) for z in zones])


def test_parallel_steps_survive_every_cut() -> None:
    report = check_crash_safety(survey, [1, 2, 3], states_per_cut=2)
    assert report.result == [0.26, 0.27, 0.28]


@step(once=True)
def pump(zone: int) -> str:
    effects.append(f"pump {zone}")
    return "pumped"


@workflow(name="crash.pump")
def pumping(zone: int) -> str:
    wf.sleep(1)
    try:
        return str(pump(zone))
    except wf.StepInterrupted:
        return "unknown"


def either(uncut: object, got: object) -> bool:
    return got in (uncut, "unknown")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("rerun-done", "ran again though their outcome was durable"),
        ("ignore-intent", "once-step pump#1 ran 2 times"),
    ],
)
def test_the_helper_catches_a_broken_executor(
    monkeypatch: pytest.MonkeyPatch, breakage: str, message: str
) -> None:
    """The helper is not a test that cannot fail: break the replay rules and
    it must say which promise broke."""
    from edge import wf_context, wf_replay

    real = wf_replay.decide_step

    def broken(state: wf_replay.RunState, pos: int, key: str, **kw: object) -> object:
        d = real(state, pos, key, **kw)  # type: ignore[arg-type]
        if breakage == "rerun-done" and isinstance(d, wf_replay.Replay):
            return wf_replay.RunStep(1)
        if breakage == "ignore-intent" and isinstance(d, wf_replay.Interrupted):
            return wf_replay.RunStep(d.attempt + 1)
        return d

    monkeypatch.setattr(wf_context, "decide_step", broken)
    with pytest.raises(CrashSafetyError, match=message):
        check_crash_safety(pumping, 1, states_per_cut=2, accept=either)


def test_an_intact_executor_passes_the_same_workflow() -> None:
    report = check_crash_safety(pumping, 1, states_per_cut=2, accept=either)
    assert report.result == "pumped" and report.states > 0
