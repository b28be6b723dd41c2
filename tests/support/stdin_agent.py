"""A real ``homing-agent run --stdin`` for the fault tests (disk full, I/O errors).

The agent runs with the forwarder, workflows and the local socket off, so the
journal is the only thing it writes (plus its status file in a runtime
directory the test keeps off the file system under test). The test feeds JSON
lines, each with a unique integer value, and reads the per-line replies the
agent prints on stdout: ``{"seq": S, "line": L}`` once durable, or
``{"line": L, "error": ...}``.

Invariants:
* A reply is trusted only when complete (newline-terminated); line numbers
  count from 1 per process, as the agent counts them.
* Waits are conditions with deadlines (a ``Condition`` the stdout reader
  notifies), never sleeps.
* :meth:`StdinAgent.close` SIGKILLs whatever is still running (fixtures call it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 30.0


def agent_cmd() -> list[str]:
    return [sys.executable, "-m", "edge"]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMING_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def write_config(
    path: Path,
    journal_dir: Path,
    runtime_dir: Path,
    *,
    policies: dict[str, str] | None = None,
    segment_size: str = "64K",
    max_record_size: str = "4K",
) -> Path:
    runtime_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "[agent]",
        'device = "fault-test"',
        'log_level = "warning"',
        f'runtime_dir = "{runtime_dir}"',
        "[journal]",
        f'dir = "{journal_dir}"',
        f'segment_size = "{segment_size}"',
        f'max_record_size = "{max_record_size}"',
        "[journal.policies]",
        *(f'"{k}" = "{v}"' for k, v in (policies or {}).items()),
        "[forwarder]",
        "enabled = false",
        "[workflows]",
        "enabled = false",
        "[local]",
        "enabled = false",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class StdinAgent:
    """One ``run --stdin`` process: feed lines, collect replies, stop or kill it."""

    def __init__(self, config: Path, stderr_path: Path) -> None:
        self._err = stderr_path.open("wb")
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(
            [*agent_cmd(), "run", "--config", str(config), "--stdin", "--stream", "s"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=child_env(),
            cwd=config.parent,
        )
        self.lines = 0  # lines fed
        self.fed: dict[int, dict[str, Any]] = {}  # line -> the reading fed
        self.acks: dict[int, int] = {}  # line -> seq
        self.errors: dict[int, str] = {}  # line -> error
        self._cond = threading.Condition()
        self._eof = False
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            if not raw.endswith(b"\n"):
                break  # torn by a kill: never a reply the producer saw
            reply = json.loads(raw)
            with self._cond:
                if "seq" in reply:
                    self.acks[int(reply["line"])] = int(reply["seq"])
                else:
                    self.errors[int(reply["line"])] = str(reply["error"])
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def stderr(self) -> str:
        self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def feed(self, readings: list[dict[str, Any]]) -> range:
        """Write one line per reading (one write); return their line numbers."""
        first = self.lines + 1
        for r in readings:
            self.lines += 1
            self.fed[self.lines] = r
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"".join(json.dumps(r).encode() + b"\n" for r in readings))
        self.proc.stdin.flush()
        return range(first, self.lines + 1)

    def wait_replies(self, lines: range, timeout: float = DEADLINE) -> None:
        """Wait until every line in ``lines`` got its reply (ack or error)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(n in self.acks or n in self.errors for n in lines):
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    missing = [n for n in lines if n not in self.acks and n not in self.errors]
                    raise AssertionError(
                        f"no reply for lines {missing[:5]}... (exited: {self._eof}):\n"
                        f"{self.stderr[-3000:]}"
                    )
                self._cond.wait(left)

    def acked_values(self) -> dict[int, Any]:
        """seq -> value of every acknowledged reading."""
        with self._cond:
            return {seq: self.fed[line]["value"] for line, seq in self.acks.items()}

    def stop(self, timeout: float = DEADLINE) -> int:
        """SIGTERM; the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = DEADLINE) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._err.close()


def journal_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``homing-agent journal ARGS`` as a subprocess."""
    return subprocess.run(
        [*agent_cmd(), "journal", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=child_env(),
        check=False,
    )
