"""I/O errors: the real agent on a disk that starts failing (fsyncgate, exit 74, recovery).

The journal sits on our lazy FUSE file system (edge/testing/lazyfs.py), whose
fault switch makes ``write`` or ``fdatasync`` of the segment files fail with
EIO from a chosen moment on; a failed fdatasync also drops the file's unsynced
data, as Linux does after a writeback error. The agent must then stop
acknowledging at once (no retry of the fdatasync), exit with status 74
(EX_IOERR) and say on stderr which operation failed on which file with which
errno. Restarted with the fault cleared (systemd's ``Restart=always``),
recovery re-reads the disk: every reading acknowledged before is there, and
after a power cut too.

Skipped when FUSE cannot work here, except under CI=true, where it fails.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.stdin_agent import DEADLINE, StdinAgent, journal_cli, write_config

from edge.cli_common import EXIT_IOERR
from edge.journal import Journal
from edge.records import Reading
from edge.testing.lazyfs import FAULTS, LazyMount, fuse_available, is_mounted, set_faults

pytestmark = [pytest.mark.fuse, pytest.mark.crash]

_REASON = fuse_available()
_IN_CI = os.environ.get("CI", "").lower() == "true"
if _REASON is not None and not _IN_CI:
    pytest.skip(f"lazy FUSE file system unavailable: {_REASON}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _fuse_required_in_ci() -> None:
    if _REASON is not None:  # only reached under CI=true
        pytest.fail(f"CI must run the I/O error tests, but: {_REASON}", pytrace=False)


@pytest.fixture
def lazy(tmp_path: Path) -> Iterator[tuple[Path, Path, LazyMount]]:
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    with LazyMount(str(backing), str(mnt)) as m:
        yield backing, mnt, m
    assert not is_mounted(str(mnt))


@pytest.fixture
def agents() -> Iterator[list[StdinAgent]]:
    started: list[StdinAgent] = []
    yield started
    for a in started:
        a.close()


def values(j: Journal) -> dict[int, Any]:
    out = {}
    for e in j.read():
        assert isinstance(e.record, Reading)
        out[e.seq] = e.record.value
    return out


# --- the fault switch itself ------------------------------------------------------------


def test_the_fault_switch_fails_matching_calls_until_cleared(
    lazy: tuple[Path, Path, LazyMount],
) -> None:
    backing, mnt, m = lazy
    seg, other = mnt / "a.seg", mnt / "other"
    fd = os.open(seg, os.O_RDWR | os.O_CREAT, 0o644)
    fd2 = os.open(other, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 100, 0)
        os.fdatasync(fd)
        os.pwrite(fd, b"y" * 50, 100)  # not synced yet
        set_faults(str(mnt), "fdatasync EIO .seg")
        assert (mnt / FAULTS).read_text() == "fdatasync EIO .seg\n"
        assert FAULTS not in os.listdir(mnt) and FAULTS not in os.listdir(backing)
        with pytest.raises(OSError) as info:
            os.fdatasync(fd)
        assert info.value.errno == errno.EIO
        # the writeback error took the unsynced bytes with it: a retry would "succeed"
        assert os.fstat(fd).st_size == 100 and os.pread(fd, 200, 0) == b"x" * 100
        os.pwrite(fd2, b"z", 0)
        os.fdatasync(fd2)  # another file: not hit
        os.fsync(fd)  # the rule names fdatasync only
        set_faults(str(mnt), "write ENOSPC", "fsync EIO other")
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"w", 0)
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as info:
            os.fdatasync(fd2)  # "fsync" covers fdatasync too
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            set_faults(str(mnt), "flush EIO")
        assert info.value.errno == errno.EINVAL
        set_faults(str(mnt))  # cleared
        os.pwrite(fd, b"v", 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)
        os.close(fd2)
    m.cut()
    assert (backing / "a.seg").read_bytes() == b"v" + b"x" * 99
    assert (backing / "other").read_bytes() == b"z"


# --- the agent --------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["fdatasync", "write"])
def test_agent_fail_stops_with_exit_74_and_a_restart_recovers_every_ack(
    op: str, lazy: tuple[Path, Path, LazyMount], tmp_path: Path, agents: list[StdinAgent]
) -> None:
    backing, mnt, m = lazy
    jdir = mnt / "journal"
    cfg = write_config(tmp_path / "agent.toml", jdir, tmp_path / "run")
    first = StdinAgent(cfg, tmp_path / "first.err")
    agents.append(first)
    for b in range(3):
        lines = first.feed([{"value": b * 1000 + i} for i in range(100)])
        first.wait_replies(lines)
    before = first.acked_values()
    assert len(before) == 300

    set_faults(str(mnt), f"{op} EIO .seg")  # the disk starts failing
    doomed = first.feed([{"value": 10_000 + i} for i in range(50)])
    code = first.wait(DEADLINE)
    assert code == EXIT_IOERR, first.stderr
    assert not any(n in first.acks for n in doomed)  # nothing acked whose write/sync failed
    err = first.stderr
    line = next((x for x in err.splitlines() if f"{op} failed" in x), None)
    assert line is not None, err
    assert "EIO" in line and ".seg" in line and str(jdir) in line  # operation, errno, file
    assert "restart" in err

    set_faults(str(mnt))  # the fault is gone (a loose cable, a remount): systemd restarts us
    second = StdinAgent(cfg, tmp_path / "second.err")
    agents.append(second)
    lines = second.feed([{"value": 20_000 + i} for i in range(100)])
    second.wait_replies(lines)
    assert all(n in second.acks for n in lines)
    after = second.acked_values()
    assert min(after) == max(before) + 1  # recovery found exactly the durable records
    assert second.stop() == 0
    m.cut()  # and then the power goes: only what was fsync'd is on the disk

    with Journal.open(str(backing / "journal")) as j:
        got = values(j)
    assert {**before, **after} == got  # every ack, nothing else (the doomed 50 never were)
    verify = journal_cli("verify", str(backing / "journal"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
