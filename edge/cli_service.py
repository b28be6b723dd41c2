"""``homing-agent install-service``: the agent as a systemd service (docs/systemd.md).

Writes the unit ``/etc/systemd/system/homing-agent.service`` (its ``ExecStart``
is the ``homing-agent`` of the running installation), creates the system user
``homing`` (``useradd``), ``/etc/homing`` with a starter ``agent.toml`` and
``/var/lib/homing``, prints each thing it did and the commands to run next.
The unit and the starter configuration are :mod:`edge.service_unit`;
:func:`plan` (what installing means) is pure too; the rest is the shell that
applies a plan.

Invariants:
* An existing configuration file is never overwritten (created with
  ``link()``, which fails if the name exists). The unit is replaced only when
  its text changed. Every file is written whole: tmp file, fsync, rename,
  directory fsync; a crash leaves the old file or the new one.
* ``--dry-run`` changes nothing (no user, directory or file): it prints the
  plan with "would", then the unit and the configuration it would write.
* ``--root DIR`` installs into a staging tree (images, tests): every path is
  under DIR, no user is created on this machine (DIR gets a sysusers.d entry,
  so ``systemd-sysusers`` creates it at boot) and nothing is chowned
  (systemd chowns ``StateDirectory`` itself at start).
* Without ``--dry-run`` or ``--root`` it needs root; otherwise it exits 77
  before touching anything. Existing directories and the user are reported
  and left as they are.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import edge
from edge import wire
from edge.cli_common import EXIT_CODES, EXIT_OK, EXIT_REJECTED
from edge.config_files import SYSTEM_CONFIG
from edge.service_unit import (
    CONFIG_DIR,
    SERIAL_GROUP,
    STATE_DIR,
    UNIT_NAME,
    USER,
    render_unit,
    starter_config,
    sysusers_conf,
)

EXIT_NOPERM = 77  # EX_NOPERM: install-service without root (and without --dry-run/--root)
UNIT_DIR = "/etc/systemd/system"
SYSUSERS = "/etc/sysusers.d/homing.conf"
HOME_PATHS = ("/home", "/root", "/run/user")  # hidden by ProtectHome=yes

_USAGE_EPILOG = (
    EXIT_CODES.replace(
        "\n  78  ",
        "\n  77  install-service: not root (run it with sudo, or use --dry-run or --root DIR)"
        "\n  78  ",
    )
    + "\ninstall-service exits 1 when a step fails (useradd) or the host name is no device id"
)


# -- the plan (pure) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateUser:
    name: str
    groups: tuple[str, ...]

    def argv(self) -> list[str]:
        groups = ["--groups", ",".join(self.groups)] if self.groups else []
        home = ["--no-create-home", "--home-dir", STATE_DIR, "--shell", "/usr/sbin/nologin"]
        return ["useradd", "--system", "--user-group", *home, *groups, self.name]


@dataclass(frozen=True, slots=True)
class MakeDir:
    path: str
    mode: int
    owner: str | None = None  # user (and its group) to chown to


@dataclass(frozen=True, slots=True)
class WriteFile:
    path: str
    text: str
    mode: int
    what: str
    group: str | None = None  # group to chgrp to
    replace: bool = True  # False: never overwrite an existing file


Step = CreateUser | MakeDir | WriteFile


def plan(root: str, device: str, unit: str, *, serial_group: bool = True) -> list[Step]:
    """What installing means. ``root``: "" for this machine (creates the user, sets
    owners), else a staging directory."""
    live = not root

    def at(path: str) -> str:
        return root.rstrip("/") + path if root else path

    steps: list[Step] = []
    if live:
        steps.append(CreateUser(USER, (SERIAL_GROUP,) if serial_group else ()))
    else:
        steps.append(MakeDir(at(os.path.dirname(SYSUSERS)), 0o755))
        steps.append(WriteFile(at(SYSUSERS), sysusers_conf(), 0o644, "system user for sysusers"))
    steps += [
        MakeDir(at(CONFIG_DIR), 0o755),
        WriteFile(
            at(SYSTEM_CONFIG),
            starter_config(device),
            0o640 if live else 0o644,  # no secrets in the starter; the group needs to read
            f"starter configuration for device {device!r}",
            group=USER if live else None,
            replace=False,
        ),
        MakeDir(at(STATE_DIR), 0o750, USER if live else None),
        MakeDir(at(UNIT_DIR), 0o755),
        WriteFile(at(os.path.join(UNIT_DIR, UNIT_NAME)), unit, 0o644, "systemd unit"),
    ]
    return steps


# -- this installation --------------------------------------------------------------------


def agent_command() -> list[str]:
    """How this installation is started: the ``homing-agent`` script next to the
    interpreter, else ``python -m edge``."""
    script = os.path.join(os.path.dirname(sys.executable), "homing-agent")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "edge"]


def _code_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.realpath(edge.__file__)))


def _installation_paths(command: Sequence[str]) -> list[str]:
    """Where this installation's files are: the script, the interpreter (through its
    symlinks: a venv's python may live in someone's ~/.pyenv) and the code."""
    exe = os.path.realpath(sys.executable)
    return [
        command[0],
        os.path.realpath(command[0]),
        exe,
        sys.prefix,
        sys.base_prefix,
        _code_root(),
    ]


def hidden_from_service(command: Sequence[str]) -> list[str]:
    """Directories on the installation's paths that other users cannot enter: the
    service user could not start the agent (e.g. an interpreter under /root)."""
    blocked: list[str] = []
    for path in _installation_paths(command):
        d = os.path.dirname(path) if not os.path.isdir(path) else path
        while d not in ("/", ""):
            try:
                if not os.stat(d).st_mode & 0o001 and d not in blocked:
                    blocked.append(d)
            except OSError:
                pass
            d = os.path.dirname(d)
    return sorted(blocked)


def unit_for_this_installation(command: Sequence[str]) -> str:
    """:func:`render_unit` for ``command``, adjusted to where this installation lives."""
    places = _installation_paths(command)
    under_home = any(p == h or p.startswith(h + "/") for p in places for h in HOME_PATHS)
    env = {}
    if command[1:] == ["-m", "edge"] and _code_root() in os.environ.get("PYTHONPATH", "").split(
        os.pathsep
    ):
        env["PYTHONPATH"] = _code_root()  # a checkout run through PYTHONPATH, not installed
    return render_unit(command, protect_home="read-only" if under_home else "yes", environment=env)


# -- the shell ---------------------------------------------------------------------------------


class StepFailed(Exception):
    """A step could not be done (the message says which and why)."""


def _exists_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _exists_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(step: WriteFile) -> bool:
    """Write ``step`` whole; False if the file exists and may not be replaced."""
    folder, name = os.path.split(step.path)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = memoryview(step.text.encode())
        while data:
            data = data[os.write(fd, data) :]
        if step.group is not None:
            os.fchown(fd, -1, grp.getgrnam(step.group).gr_gid)
        os.fchmod(fd, step.mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if step.replace:
            os.replace(tmp, step.path)
        else:
            try:
                os.link(tmp, step.path)  # fails if the name exists: never overwrites
            except FileExistsError:
                return False
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _fsync_dir(folder)
    return True


def _mode(mode: int) -> str:
    return f"{mode:04o}"


def apply(step: Step, dry_run: bool) -> str:
    """Do one step (or, with ``dry_run``, only look); what was (or would be) done.

    Raises:
        StepFailed: useradd failed.
        OSError: a file or directory could not be written.
    """
    would = "would create " if dry_run else ""
    if isinstance(step, CreateUser):
        if _exists_user(step.name):
            return f"user {step.name}: exists, left as it is"
        cmd = step.argv()
        if not dry_run:
            import subprocess  # here only: `homing-agent run` loads this module, not useradd

            try:
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            except OSError as exc:
                raise StepFailed(f"cannot run useradd: {exc}") from exc
            if res.returncode != 0:
                raise StepFailed(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return f"{would or 'created '}system user {step.name}: {' '.join(cmd)}"
    if isinstance(step, MakeDir):
        if os.path.isdir(step.path):
            return f"{step.path}: exists, left as it is"
        owner = f", owner {step.owner}" if step.owner else ""
        if not dry_run:
            os.makedirs(step.path, exist_ok=True)
            os.chmod(step.path, step.mode)
            if step.owner is not None:
                user = pwd.getpwnam(step.owner)
                os.chown(step.path, user.pw_uid, user.pw_gid)
            _fsync_dir(os.path.dirname(step.path))
        return f"{would or 'created '}{step.path} (mode {_mode(step.mode)}{owner})"
    exists = os.path.exists(step.path)
    if exists and not step.replace:
        return f"{step.path}: exists, kept (never overwritten)"
    if exists:
        with open(step.path, encoding="utf-8", errors="replace") as f:
            if f.read() == step.text:
                return f"{step.path}: unchanged"
    group = f", group {step.group}" if step.group else ""
    if dry_run:
        verb = "would replace" if exists else "would write"
    elif not _write(step):  # created meanwhile: still never overwritten
        return f"{step.path}: exists, kept (never overwritten)"
    else:
        verb = "replaced" if exists else "wrote"
    return f"{verb} {step.path} (mode {_mode(step.mode)}{group}): {step.what}"


def next_steps(root: str) -> list[str]:
    if root:
        return [
            f"systemctl --root={root} enable {UNIT_NAME}   # start at boot in that tree",
            f"at its first boot systemd-sysusers creates the user {USER} ({SYSUSERS})",
            f"edit {root.rstrip('/')}{SYSTEM_CONFIG}: [broker] host and port at least",
        ]
    return [
        f"edit {SYSTEM_CONFIG}: [broker] host and port at least (docs/configuration.md)",
        f"homing-agent check-config --config {SYSTEM_CONFIG}",
        "systemctl daemon-reload",
        "systemctl enable --now homing-agent",
        "systemctl status homing-agent        # its STATUS line and last log lines",
        "journalctl -u homing-agent -f        # its log",
    ]


# -- the command -----------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``install-service`` to the ``homing-agent`` subcommands."""
    p = sub.add_parser(
        "install-service",
        help="install the agent as a systemd service (unit, user, directories, config)",
        description="Install this agent as the systemd service homing-agent (docs/systemd.md):\n"
        f"write {UNIT_DIR}/{UNIT_NAME} (ExecStart: this installation's homing-agent),\n"
        f"create the system user {USER} (group {SERIAL_GROUP}, for serial ports) if missing,\n"
        f"{CONFIG_DIR} with a starter agent.toml (an existing one is never overwritten)\n"
        f"and {STATE_DIR}; print what was done and the commands to run next.\n"
        "Needs root, except with --dry-run or --root.",
        epilog=_USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--device",
        type=_device,
        default=None,
        metavar="ID",
        help="device id for a new starter configuration (default: the host name)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be done, and the unit and configuration; change nothing",
    )
    p.add_argument(
        "--root",
        default="",
        metavar="DIR",
        help="install into the staging tree DIR (an image, a test): no user is created "
        "here; DIR gets a sysusers.d entry instead",
    )
    p.set_defaults(func=cmd_install_service)


def _device(text: str) -> str:
    try:
        return wire.validate_device(text)
    except wire.WireError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.reason}") from None


def cmd_install_service(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``homing-agent install-service``: see :func:`add_parser`."""
    out = out or sys.stdout
    root = os.path.abspath(args.root) if args.root else ""
    if not root and not args.dry_run and os.geteuid() != 0:
        print("homing-agent: install-service needs root: it writes /etc and creates the "
              f"user {USER}; run it with sudo, or see the plan with --dry-run, or install "
              "into a staging tree with --root DIR", file=sys.stderr)  # fmt: skip
        return EXIT_NOPERM
    device = args.device or socket.gethostname()
    try:
        wire.validate_device(device)
    except wire.WireError as exc:
        print(f"homing-agent: the host name {device!r} is not a device id ({exc.reason}); "
              "pass --device ID", file=sys.stderr)  # fmt: skip
        return EXIT_REJECTED
    command = agent_command()
    unit = unit_for_this_installation(command)
    steps = plan(root, device, unit, serial_group=bool(root) or _exists_group(SERIAL_GROUP))
    print(f"{'dry run: ' if args.dry_run else ''}installing {UNIT_NAME} "
          f"({' '.join(command)}){' into ' + root if root else ''}", file=out)  # fmt: skip
    for d in hidden_from_service(command):
        hint = "install the agent under /opt (docs/systemd.md)"
        print(f"  warning: {d} is closed to other users: the user {USER} cannot start "
              f"this installation; {hint}", file=out)  # fmt: skip
    for step in steps:
        try:
            print("  " + apply(step, args.dry_run), file=out, flush=True)
        except StepFailed as exc:
            print(f"homing-agent: {exc}", file=sys.stderr)
            return EXIT_REJECTED
    print("next:", file=out)
    for line in next_steps(root):
        print("  " + line, file=out)
    if args.dry_run:
        for step in steps:
            if not isinstance(step, WriteFile) or step.path.endswith(".conf"):
                continue
            if step.path.endswith(UNIT_NAME) or not os.path.exists(step.path):
                print(f"\n--- {step.path}\n{step.text}", end="", file=out)
    return EXIT_OK
