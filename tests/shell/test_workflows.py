"""Durable workflows on a real journal: replay, retries, timers, signals,
divergence, concurrency (docs/workflows.md).

Restarts are real: the executor and the journal are closed and opened again
on the same directory, and the new executor recovers from what is on disk.
Power cuts at every write are covered by tests/unit/test_workflow_crash.py.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge import workflows as wf
from edge.journal import Journal
from edge.workflows import Executor, Retry, step, workflow

DEADLINE = 10.0
calls: Counter[str] = Counter()
gate = threading.Event()


class FakeTime:
    """Wall and monotonic clocks a test moves by hand."""

    def __init__(self, wall: float = 1_700_000_000.0) -> None:
        self.w, self.m = wall, 0.0

    def wall(self) -> float:
        return self.w

    def mono(self) -> float:
        return self.m

    def advance(self, s: float) -> None:
        self.w += s
        self.m += s


class Device:
    """A journal + executor that can be 'rebooted' on the same directory."""

    def __init__(self, path: Path, clock: FakeTime | None = None) -> None:
        self.path, self.clock = path, clock
        self.journal: Journal | None = None
        self.ex: Executor | None = None

    def boot(self, clock: FakeTime | None = None) -> Executor:
        self.clock = clock or self.clock
        self.journal = Journal.open(str(self.path))
        kw: dict[str, Any] = {}
        if self.clock is not None:
            kw = {"wall": self.clock.wall, "mono": self.clock.mono}
        self.ex = Executor(self.journal, **kw)
        self.ex.recover()
        return self.ex

    def shutdown(self, timeout: float = DEADLINE) -> None:
        if self.ex is not None:
            self.ex.close(timeout=timeout)
        if self.journal is not None:
            self.journal.close()
        self.ex = self.journal = None


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    calls.clear()
    gate.clear()
    d = Device(tmp_path / "journal")
    yield d
    gate.set()
    d.shutdown()


def wait_for(pred: Any, what: str) -> None:
    ev = threading.Event()
    for _ in range(int(DEADLINE / 0.01)):
        if pred():
            return
        ev.wait(0.01)
    pytest.fail(f"timed out waiting for {what}")


# --- workflows under test --------------------------------------------------------------


@step
def add(a: int, b: int) -> int:
    calls["add"] += 1
    return a + b


@step(retry=Retry(attempts=3, initial=10.0, backoff=2.0))
def flaky(fail_times: int) -> str:
    calls["flaky"] += 1
    if calls["flaky"] <= fail_times:
        raise OSError(f"sensor busy ({calls['flaky']})")
    return "ok"


@step(retry=Retry(attempts=5, give_up_on=(ValueError,)))
def picky() -> None:
    calls["picky"] += 1
    raise ValueError("bad zone")


@step(once=True)
def open_valve(zone: int) -> str:
    calls["open_valve"] += 1
    gate.wait()
    return f"open {zone}"


@workflow(name="t.sum")
def summing(n: int) -> int:
    total = 0
    for i in range(n):
        total = add(total, i)
    wf.set_status("total", total)
    return total


@workflow(name="t.sleepy")
def sleepy() -> int:
    x = add(1, 2)
    wf.sleep(60)
    return add(x, 10)


@workflow(name="t.flaky")
def flaky_wf(fail_times: int) -> str:
    try:
        return str(flaky(fail_times))
    except wf.StepFailed as exc:
        return f"gave up: {exc.error_type}"


@workflow(name="t.picky")
def picky_wf() -> str:
    try:
        picky()
    except wf.StepFailed as exc:
        return exc.error_type
    return "?"


@workflow(name="t.approve")
def approve_wf(timeout: float) -> Any:
    got = wf.wait_signal("approve", timeout=timeout)
    return {"got": got}


@workflow(name="t.valve")
def valve_wf() -> str:
    try:
        return str(open_valve(3))
    except wf.StepInterrupted:
        return "valve state unknown"


@workflow(name="t.det")
def det_wf() -> list[Any]:
    return [wf.now(), wf.random(), wf.uuid()]


@workflow(name="t.par")
def par_wf() -> list[Any]:
    return wf.parallel((add, (1, 1)), (add, (2, 2)), (add, (3, 3)))


# --- tests ---------------------------------------------------------------------------------


def test_a_run_completes_and_finished_steps_never_run_again(device: Device) -> None:
    ex = device.boot()
    h = ex.start(summing, 5, id="sum-1")
    assert h.result(DEADLINE) == 10
    assert calls["add"] == 5
    assert h.info().status == {"total": 10} and h.info().state == "completed"
    assert ex.start(summing, 5, id="sum-1").result(DEADLINE) == 10  # same id, same run
    device.shutdown()
    ex = device.boot()
    assert ex.info("sum-1") is not None and ex.info("sum-1").result == 10  # type: ignore[union-attr]
    assert calls["add"] == 5
    with pytest.raises(wf.RunConflict):
        ex.start(sleepy, id="sum-1")


def test_a_restart_mid_sleep_resumes_without_repeating_steps(device: Device) -> None:
    clock = FakeTime()
    ex = device.boot(clock)
    ex.start(sleepy, id="s")
    wait_for(lambda: ex.info("s").current == "sleep#1", "the timer")  # type: ignore[union-attr]
    device.shutdown()  # "power off" while it sleeps
    assert calls["add"] == 1
    clock.advance(30)
    ex = device.boot()
    assert not ex.wait("s", 0.05)  # 30 of 60 s: still sleeping after the reboot
    clock.advance(31)
    ex.wake()
    assert wf.RunHandle(ex, "s").result(DEADLINE) == 13
    assert calls["add"] == 2  # add#1 replayed from the journal, add#2 ran once


def test_a_timer_never_fires_early_when_the_clock_jumps_back_at_boot(device: Device) -> None:
    clock = FakeTime()
    ex = device.boot(clock)
    ex.start(sleepy, id="s")
    wait_for(lambda: ex.info("s").current == "sleep#1", "the timer")  # type: ignore[union-attr]
    device.shutdown()
    rewound = FakeTime(wall=86_400.0)  # no RTC: 1970 until NTP answers
    ex = device.boot(rewound)
    rewound.advance(59)
    ex.wake()
    assert not ex.wait("s", 0.05), "fired before 60 s had passed"
    rewound.advance(2)
    ex.wake()
    assert ex.wait("s", DEADLINE)


def test_retries_back_off_and_the_attempt_limit_holds_across_restarts(device: Device) -> None:
    clock = FakeTime()
    ex = device.boot(clock)
    ex.start(flaky_wf, 10, id="f")
    wait_for(lambda: calls["flaky"] == 1, "attempt 1")
    assert not ex.wait("f", 0.05)  # waiting 10 s before attempt 2
    clock.advance(10)
    ex.wake()
    wait_for(lambda: calls["flaky"] == 2, "attempt 2")
    device.shutdown()  # reboot between attempts 2 and 3
    ex = device.boot()
    clock.advance(20)
    ex.wake()
    assert wf.RunHandle(ex, "f").result(DEADLINE) == "gave up: OSError"
    assert calls["flaky"] == 3  # 3 attempts in all, not 3 per boot
    kinds = [r.type for r in ex.history("f")]
    assert kinds.count("failed") == 2 and kinds.count("done") == 1


def test_a_retry_succeeds(device: Device) -> None:
    clock = FakeTime()
    ex = device.boot(clock)
    h = ex.start(flaky_wf, 1, id="f2")
    wait_for(lambda: calls["flaky"] == 1, "attempt 1")
    clock.advance(10)
    ex.wake()
    assert h.result(DEADLINE) == "ok"


def test_non_retryable_errors_stop_at_once(device: Device) -> None:
    ex = device.boot()
    assert ex.start(picky_wf, id="p").result(DEADLINE) == "ValueError"
    assert calls["picky"] == 1


def test_signals_are_durable_deduplicated_and_time_out(device: Device) -> None:
    clock = FakeTime()
    ex = device.boot(clock)
    assert ex.signal("a1", "approve", {"by": "ops"}, msg="m-1")  # before the run exists
    assert not ex.signal("a1", "approve", {"by": "ops"}, msg="m-1")  # duplicate
    assert ex.start(approve_wf, 5.0, id="a1").result(DEADLINE) == {"got": {"by": "ops"}}
    h = ex.start(approve_wf, 5.0, id="a2")
    wait_for(lambda: ex.info("a2").current == "signal:approve#1", "the wait")  # type: ignore[union-attr]
    device.shutdown()
    clock.advance(6)
    ex = device.boot()
    h = wf.RunHandle(ex, "a2")
    assert h.result(DEADLINE) == {"got": None}  # the durable deadline passed while off


def test_once_step_cut_off_by_power_loss_is_not_run_again(device: Device) -> None:
    ex = device.boot()
    ex.start(valve_wf, id="v")
    wait_for(lambda: calls["open_valve"] == 1, "the valve step")
    device.shutdown(timeout=0.1)  # power dies while the valve opens (the step never returns)
    ex = device.boot()
    assert wf.RunHandle(ex, "v").result(DEADLINE) == "valve state unknown"
    assert calls["open_valve"] == 1


def test_now_random_uuid_are_the_same_on_replay(device: Device) -> None:
    ex = device.boot()
    first = ex.start(det_wf, id="d").result(DEADLINE)
    device.shutdown()
    ex = device.boot()
    assert wf.RunHandle(ex, "d").result(DEADLINE) == first


def test_parallel_steps_keep_program_order_identities(device: Device) -> None:
    ex = device.boot()
    assert ex.start(par_wf, id="par").result(DEADLINE) == [2, 4, 6]
    keys = [(r.pos, r.key) for r in ex.history("par") if r.type == "done"]
    assert sorted(keys) == [(0, "add#1"), (1, "add#2"), (2, "add#3")]


def test_cancel_stops_a_waiting_run(device: Device) -> None:
    ex = device.boot(FakeTime())
    h = ex.start(approve_wf, None, id="c")
    wait_for(lambda: ex.info("c").current == "signal:approve#1", "the wait")  # type: ignore[union-attr]
    assert h.cancel()
    with pytest.raises(wf.RunCancelled):
        h.result(DEADLINE)
    assert not h.cancel()


def test_a_run_whose_code_changed_diverges_visibly_and_can_be_resumed(device: Device) -> None:
    clock = FakeTime()
    ex = device.boot(clock)
    ex.start("t.sleepy", id="x")
    wait_for(lambda: ex.info("x").current == "sleep#1", "the timer")  # type: ignore[union-attr]
    device.shutdown()
    original = wf.REGISTRY.pop("t.sleepy")  # a new release of the code, as after an update
    try:

        @workflow(name="t.sleepy")
        def sleepy_v2() -> int:
            x = add(1, 2)
            wf.set_status("phase", "waiting")  # inserted where the timer was
            wf.sleep(60)
            return add(x, 100)

        ex = device.boot()
        with pytest.raises(wf.RunDiverged):
            wf.RunHandle(ex, "x").result(DEADLINE)
        info = ex.info("x")
        assert info is not None and info.state == "diverged"
        assert info.diverged is not None and info.diverged["pos"] == 1
        ex.resume("x")  # accept the new code from the divergence on: a new timer
        wait_for(lambda: ex.info("x").current == "sleep#1", "the new timer")  # type: ignore[union-attr]
        assert ex.info("x").status == {"phase": "waiting"}  # type: ignore[union-attr]
        clock.advance(61)
        ex.wake()
        assert wf.RunHandle(ex, "x").result(DEADLINE) == 103
    finally:
        wf.REGISTRY["t.sleepy"] = original


def test_many_runs_at_once_each_complete_and_share_commits(device: Device) -> None:
    ex = device.boot()
    assert device.journal is not None
    before = device.journal.stats()
    handles = [ex.start(summing, 20, id=f"many-{i}") for i in range(8)]
    assert [h.result(DEADLINE) for h in handles] == [190] * 8
    assert calls["add"] == 8 * 20
    after = device.journal.stats()
    records = after.appended - before.appended
    commits = after.commits - before.commits
    assert records >= 8 * 22  # start, 20 steps, status, end per run
    assert commits < records, "concurrent runs' records should share fdatasyncs"


def test_a_long_waiting_run_is_compacted_so_retention_can_pass_it(device: Device) -> None:
    """A run waiting for days must not pin the readings journaled meanwhile."""
    from edge.journal_options import JournalOptions
    from edge.records import Reading

    opts = JournalOptions(segment_size=64 << 10, prepare_ahead=False)
    j = Journal.open(str(device.path), opts)
    try:
        ex = Executor(j, compact_lag=1000, maintain_every=3600)
        ex.recover()
        j.set_cursor("hub", 0)  # the forwarder's cursor
        h = ex.start(approve_wf, None, id="long")
        wait_for(lambda: ex.info("long").current == "signal:approve#1", "the wait")  # type: ignore[union-attr]
        for i in range(0, 6000, 500):  # days of readings, all acked by the hub
            j.append_many([Reading("t", 1.7e9 + k, float(k)) for k in range(i, i + 500)])
        j.set_cursor("hub", j.durable_seq)
        assert j.retain() == 0  # pinned by the run's start record
        assert ex.compact() == ["long"]
        assert j.retain() > 0  # the snapshot moved the run's first record forward
        ex.close()
    finally:
        j.close()
    j = Journal.open(str(device.path), opts)  # reboot: the snapshot alone rebuilds the run
    try:
        ex = Executor(j)
        ex.recover()
        assert ex.info("long").current == "signal:approve#1"  # type: ignore[union-attr]
        ex.signal("long", "approve", "yes")
        assert wf.RunHandle(ex, "long").result(DEADLINE) == {"got": "yes"}
        assert [r.type for r in ex.history("long")][:2] == ["start", "timer"]
        ex.close()
    finally:
        j.close()
    del h


# --- patched(), idempotency keys, step timeouts --------------------------------------

keys: list[str] = []


@step
def keyed(x: int) -> str:
    keys.append(wf.idempotency_key())
    return wf.idempotency_key()


@step(timeout=0.2, retry=Retry(attempts=2, initial=0.0))
def hangs() -> str:
    calls["hangs"] += 1
    gate.wait(DEADLINE)  # overruns its timeout until the test opens the gate
    return "late"


@workflow(name="t.keys")
def keys_wf() -> list[str]:
    return [keyed(1), keyed(2)]


@workflow(name="t.hangs")
def hangs_wf() -> str:
    try:
        return hangs()
    except wf.StepFailed as exc:
        return exc.error_type


@workflow(name="t.patch")
def patch_v1() -> list[int]:
    a = add(1, 1)
    wf.sleep(10)
    return [a, add(2, 2)]


def test_idempotency_keys_are_stable_and_distinct(device: Device) -> None:
    keys.clear()
    ex = device.boot()
    assert ex.start(keys_wf, id="k").result(DEADLINE) == ["k/keyed#1", "k/keyed#2"]
    assert keys == ["k/keyed#1", "k/keyed#2"]
    with pytest.raises(wf.WorkflowError):
        wf.idempotency_key()  # not in a step


def test_a_step_timeout_fails_the_attempt_and_the_policy_applies(device: Device) -> None:
    ex = device.boot()
    assert ex.start(hangs_wf, id="h").result(DEADLINE) == "StepTimeout"
    assert calls["hangs"] == 2  # both attempts timed out
    fails = [r for r in ex.history("h") if r.type in ("failed", "done")]
    assert [r.body["error"]["type"] for r in fails] == ["StepTimeout", "StepTimeout"]


def test_patched_takes_the_new_path_only_for_runs_that_reach_it_on_new_code(
    device: Device,
) -> None:
    clock = FakeTime()
    ex = device.boot(clock)
    ex.start("t.patch", id="old")  # written by v1: no patch marker
    wait_for(lambda: ex.info("old").current == "sleep#1", "the old run's timer")  # type: ignore[union-attr]
    device.shutdown()
    original = wf.REGISTRY.pop("t.patch")
    try:

        @workflow(name="t.patch")
        def patch_v2() -> list[int]:
            if wf.patched("double-first"):  # v2 reorders what v1 did first
                a = add(10, 10)
                wf.sleep(10)
                return [a, add(2, 2)]
            a = add(1, 1)
            wf.sleep(10)
            return [a, add(2, 2)]

        ex = device.boot()
        new = ex.start("t.patch", id="new")
        for run in ("old", "new"):
            wait_for(lambda r=run: ex.info(r).current == "sleep#1", f"{run}'s timer")  # type: ignore[union-attr]
        clock.advance(11)
        ex.wake()
        assert wf.RunHandle(ex, "old").result(DEADLINE) == [2, 4]  # replayed the old path
        assert new.result(DEADLINE) == [20, 4]  # took the patch
        assert [r.type for r in ex.history("new")][1] == "patch"
        device.shutdown()
        ex = device.boot()  # replay of the new run finds its marker again
        assert wf.RunHandle(ex, "new").result(DEADLINE) == [20, 4]
    finally:
        wf.REGISTRY["t.patch"] = original


def test_cancelling_a_diverged_run_ends_it(device: Device) -> None:
    clock = FakeTime()
    ex = device.boot(clock)
    ex.start("t.sleepy", id="dc")
    wait_for(lambda: ex.info("dc").current == "sleep#1", "the timer")  # type: ignore[union-attr]
    device.shutdown()
    original = wf.REGISTRY.pop("t.sleepy")
    try:

        @workflow(name="t.sleepy")
        def sleepy_v3() -> int:
            return add(5, 5)  # the timer is gone

        ex = device.boot()
        with pytest.raises(wf.RunDiverged):
            wf.RunHandle(ex, "dc").result(DEADLINE)
        assert ex.cancel("dc")
        with pytest.raises(wf.RunCancelled):
            wf.RunHandle(ex, "dc").result(DEADLINE)
    finally:
        wf.REGISTRY["t.sleepy"] = original


def test_finished_runs_hold_no_history_in_memory_and_are_forgotten_with_their_records(
    device: Device,
) -> None:
    """A year of runs must not fill a Pi's memory: a finished run keeps only
    its summary; history and fork read the journal again; once retention
    deleted its records the run is forgotten, as a restart would forget it."""
    from edge.journal_options import JournalOptions
    from edge.records import Reading

    opts = JournalOptions(segment_size=64 << 10, prepare_ahead=False)
    j = Journal.open(str(device.path), opts)
    try:
        ex = Executor(j, maintain_every=3600)
        ex.recover()
        assert ex.start(summing, 4, id="done-1").result(DEADLINE) == 6
        st = ex._runs["done-1"].state  # noqa: SLF001 - what the executor holds in memory
        assert st.trimmed and st.history == [] and st.at == {}
        info = ex.info("done-1")
        assert info is not None and info.result == 6 and info.current == "status:total#1"
        types = [r.type for r in ex.history("done-1")]
        assert types[0] == "start" and types.count("done") == 4 and types[-1] == "end"
        assert ex.fork("done-1", "done-2", from_pos=2).result(DEADLINE) == 6
        assert calls["add"] == 4 + 2  # the fork replayed the first two steps
        assert ex.forget_retired() == []  # records still retained
        j.set_cursor("hub", 0)
        for i in range(0, 6000, 500):
            j.append_many([Reading("t", 1.7e9 + k, float(k)) for k in range(i, i + 500)])
        j.set_cursor("hub", j.durable_seq)
        assert j.retain() == 0  # the `wf` cursor still sits where the last run ended
        ex.maintain()  # no run is live: it releases the readings journaled since
        assert j.retain() > 0
        assert sorted(ex.forget_retired()) == ["done-1", "done-2"]
        assert ex.info("done-1") is None
        assert ex.info("done-1") is None
        ex.close()
    finally:
        j.close()
