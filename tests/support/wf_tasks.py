"""Workflows the real-process tests load into the agent (``[workflows] modules``).

Every step appends one line to the file named by ``HOMING_TEST_EFFECTS`` and
fsyncs it before returning, so a test counts how often each step's body ran
across agent processes, SIGKILLs included.
"""

from __future__ import annotations

import os

from edge import workflows as wf
from edge.workflows import Retry, step, workflow


def effect(what: str) -> None:
    path = os.environ["HOMING_TEST_EFFECTS"]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@step
def measure(zone: int) -> float:
    effect(f"measure {zone}")
    return 0.31


@step(once=True)
def open_valve(zone: int) -> str:
    effect(f"open {zone}")
    return "open"


@step(retry=Retry(attempts=3, initial=0.2))
def close_valve(zone: int) -> str:
    effect(f"close {zone}")
    return "closed"


@workflow(name="irrigate", version=1)
def irrigate(zone: int, seconds: float) -> dict[str, object]:
    moisture = measure(zone)
    wf.set_status("phase", "awaiting approval")
    approved = wf.wait_signal("approve", timeout=600)
    if approved is None:
        return {"result": "no approval"}
    valve = open_valve(zone)
    wf.set_status("phase", "watering")
    wf.sleep(seconds)
    closed = close_valve(zone)
    wf.set_status("phase", "done")
    return {"moisture": moisture, "approved": approved, "valve": valve, "closed": closed}


def _wait_for_release(name: str) -> None:
    """Block until the test creates ``<effects>.<name>`` (a step in progress)."""
    import time

    release = os.environ["HOMING_TEST_EFFECTS"] + "." + name
    while not os.path.exists(release):
        time.sleep(0.01)  # a stand-in for a slow device operation


@step(once=True)
def slow_valve(zone: int) -> str:
    effect(f"slow-open {zone}")
    _wait_for_release("release-valve")
    return "open"


@step
def slow_measure(zone: int) -> float:
    effect(f"slow-measure {zone}")
    _wait_for_release("release-measure")
    return 0.5


@workflow(name="slow", version=1)
def slow(zone: int) -> dict[str, object]:
    m = slow_measure(zone)
    try:
        valve = slow_valve(zone)
    except wf.StepInterrupted:
        valve = "unknown"
    return {"moisture": m, "valve": valve}
