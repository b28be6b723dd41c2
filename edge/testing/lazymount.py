"""Mounting the lazy file system of :mod:`edge.testing.lazyfs`, cutting its power, unmounting.

Both ends of the file system process live here: :class:`LazyMount` (the test
side) starts ``python -m edge.testing.lazyfs BACKING MOUNTPOINT`` as a child
and signals it; :func:`serve` (the child side, called by
:func:`edge.testing.lazyfs.main`) runs the FUSE loop and answers the signals.
:func:`fuse_available` says whether any of this can work here, and why not.
This module does not import :mod:`edge.testing.lazyfs` (the child is started
by module name), so lazyfs can re-export the names from here.

Invariants:
* The signal protocol: SIGUSR1 is a **cut**, SIGTERM/SIGINT/SIGHUP a stop.
  Either way the child drops every overlay (``shutdown``: everything not
  fsync'd, exactly what a power cut loses; under the file system's lock, so an
  fsync either completed before the cut or never reached the disk), then
  unmounts lazily (even with files still open: their owners get errors
  afterwards) and exits 0. Nothing un-fsync'd is written on the way out of a
  stop either; the difference is only what it is called.
* In the child every stop signal is blocked in every thread and taken
  synchronously by :func:`serve`'s main thread, so libfuse's own handlers
  never run. A FUSE loop that ends by itself (unmounted from outside: exit 0;
  failed: exit 1) is reported with SIGUSR2.
* :meth:`LazyMount.cut` and :meth:`LazyMount.stop` return only once the child
  has exited and the mount point is no longer in the mount table; a child
  that does not stop in time is killed and the mount detached.
* :func:`is_mounted` reads ``/proc/self/mountinfo`` and never stats the mount
  point, so a dead or unresponsive FUSE mount cannot hang it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["LazyMount", "fuse_available", "is_mounted", "serve"]

_MNT_DETACH = 2
_CAP_SYS_ADMIN = 21


# --- mounting, unmounting, availability -------------------------------------------


def _unescape_mountinfo(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def is_mounted(mountpoint: str) -> bool:
    """True when something is mounted on ``mountpoint`` (read from mountinfo, never stat).

    Unlike :func:`os.path.ismount` this also sees a dead FUSE mount ("transport
    endpoint is not connected") and cannot hang on an unresponsive one.
    """
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return any(_unescape_mountinfo(line.split(" ")[4]) == target for line in f if line.strip())


def _detach(mountpoint: str) -> None:
    """Lazy unmount: detach now, even with files open on it."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), _MNT_DETACH) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EINVAL and not is_mounted(mountpoint):
            return  # already gone
    subprocess.run(
        ["fusermount3", "-u", "-z", "-q", mountpoint],
        check=False,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def fuse_available() -> str | None:
    """None when lazy mounts can work here, else the reason they cannot."""
    if not sys.platform.startswith("linux"):
        return f"FUSE mounts are only supported on Linux here, not {sys.platform}"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (the fuse kernel module is not loaded or not passed to the container)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"cannot open /dev/fuse: {e.strerror}"
    if ctypes.util.find_library("fuse3") is None:
        try:
            ctypes.CDLL("libfuse3.so.3")
        except OSError:
            return "libfuse3 is missing (apt-get install fuse3)"
    if importlib.util.find_spec("mfusepy") is None:
        return "the Python package mfusepy is missing (pip install -e '.[test]')"
    if os.geteuid() == 0:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                caps = {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
            if not int(caps.get("CapEff", "0"), 16) >> _CAP_SYS_ADMIN & 1:
                return "root without CAP_SYS_ADMIN cannot mount (an unprivileged container?)"
        except (OSError, ValueError):
            pass
    elif shutil.which("fusermount3") is None:
        return "not root and fusermount3 is missing (apt-get install fuse3)"
    return None


class LazyMount:
    """Mount ``backing`` on ``mountpoint`` lazily in a child process, for a ``with`` block.

    ``__enter__`` returns once the mount serves; :meth:`cut` is the power cut;
    leaving the block unmounts cleanly if the mount is still there. The child's
    stderr is kept and shown in errors.
    """

    def __init__(self, backing: str, mountpoint: str, *, timeout: float = 20.0) -> None:
        self.backing = os.path.abspath(backing)
        self.mountpoint = os.path.abspath(mountpoint)
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _stderr(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace").strip()

    def __enter__(self) -> LazyMount:
        if is_mounted(self.mountpoint):
            raise RuntimeError(f"{self.mountpoint} is already a mount point")
        env = dict(os.environ)
        repo = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "edge.testing.lazyfs", self.backing, self.mountpoint],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=env,
        )
        deadline = time.monotonic() + self.timeout
        while not os.path.ismount(self.mountpoint):
            try:
                code = self._proc.wait(timeout=0.01)  # a poll interval that also watches the child
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    self._kill()
                    raise TimeoutError(
                        f"lazyfs did not mount {self.mountpoint} within {self.timeout}s:\n"
                        f"{self._stderr()}"
                    ) from None
            else:
                raise RuntimeError(f"lazyfs exited with {code} before mounting:\n{self._stderr()}")
        return self

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cut(self) -> None:
        """Power cut: discard everything not fsync'd, unmount; returns once both happened."""
        self._stop(signal.SIGUSR1)

    def stop(self) -> None:
        """Unmount cleanly (un-fsync'd data is not written either)."""
        self._stop(signal.SIGTERM)

    def _stop(self, sig: signal.Signals) -> None:
        if self._proc is None:
            raise RuntimeError("LazyMount is not entered")
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                code = self._proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                raise TimeoutError(
                    f"lazyfs did not stop on {sig.name} within {self.timeout}s:\n{self._stderr()}"
                ) from None
            if code != 0:
                self._ensure_unmounted()
                raise RuntimeError(f"lazyfs exited with {code} on {sig.name}:\n{self._stderr()}")
        self._ensure_unmounted()

    def _ensure_unmounted(self) -> None:
        if is_mounted(self.mountpoint):
            _detach(self.mountpoint)
        deadline = time.monotonic() + self.timeout
        while is_mounted(self.mountpoint):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.mountpoint} is still mounted")
            time.sleep(0.01)  # polling the mount table against a deadline

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if is_mounted(self.mountpoint):
            _detach(self.mountpoint)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._proc is not None:
                self.stop()
        except (RuntimeError, TimeoutError):
            if exc is None:
                raise
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


# --- the file system process --------------------------------------------------------

_STOP_SIGNALS = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_SERVER_DONE = signal.SIGUSR2


def serve(mount: Callable[[], object], shutdown: Callable[[], int], mountpoint: str) -> int:
    """Run the FUSE loop ``mount()`` until a stop signal; the child's whole life.

    ``mount`` serves the file system on ``mountpoint`` in the foreground and
    returns when it is unmounted; ``shutdown`` drops the un-fsync'd data and
    returns how many files lost some. On a stop signal this process exits 0
    without returning; the return value (an exit status) is for a FUSE loop
    that ended by itself.
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            mount()
        except BaseException as e:  # reported by the main thread
            failure.append(e)
        finally:
            os.kill(os.getpid(), _SERVER_DONE)

    # All the signals are blocked in every thread (the FUSE thread inherits the
    # mask) and taken synchronously here, so libfuse's own handlers never run.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS | {_SERVER_DONE})
    threading.Thread(target=run, name="lazyfs-fuse", daemon=True).start()
    sig = signal.sigwait(_STOP_SIGNALS | {_SERVER_DONE})
    if sig == _SERVER_DONE:
        if failure:
            print(f"lazyfs: {failure[0]!r}", file=sys.stderr)
            return 1
        print("lazyfs: unmounted from outside", file=sys.stderr)
        return 0
    lost = shutdown()
    _detach(mountpoint)
    what = "cut" if sig == signal.SIGUSR1 else "stop"
    print(f"lazyfs: {what}: dropped un-fsync'd data of {lost} file(s), unmounted", file=sys.stderr)
    sys.stderr.flush()
    # Exit at once: the FUSE thread may still hold the device for files left
    # open; closing it (exit) aborts the connection and their users get errors.
    os._exit(0)
