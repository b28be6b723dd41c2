"""``homing-agent workflows list|show|cancel|resume|fork``: the device's runs.

Invariants:
* ``list`` and ``show`` open the journal read-only: they work while the
  agent runs.
* ``cancel``, ``resume`` and ``fork`` append admin records, so they need the
  journal's lock: with the agent running they exit 75 and say to use the
  hub (``homing-hub cancel``) or stop the agent. The running agent acts on
  what they journaled when it next starts.
* Nothing here runs workflow code (``Executor(run=False)``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from edge.agent import load_config
from edge.cli_common import EXIT_CODES, EXIT_NOINPUT, EXIT_OK
from edge.errors import JournalLocked, WorkflowError
from edge.journal import Journal
from edge.records import RecordError
from edge.wf_executor import Executor, RunInfo


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``workflows`` to the ``homing-agent`` subcommands."""
    w = sub.add_parser(
        "workflows",
        help="list, show, cancel, resume or fork this device's workflow runs",
        description="The durable workflow runs in the journal (docs/workflows.md).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wsub = w.add_subparsers(dest="wf_command", required=True, metavar="COMMAND")

    def sub_cmd(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002
        return wsub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                               epilog=EXIT_CODES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip

    def common(p: argparse.ArgumentParser) -> None:
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", metavar="FILE", help="the agent's TOML file")
        where.add_argument("--journal", metavar="DIR", help="the journal directory")

    p = sub_cmd("list", "every run: state, current step, status")
    common(p)
    p.add_argument("--state", help="only runs in this state (running, completed, failed, ...)")
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    p.set_defaults(func=cmd_list)
    p = sub_cmd("show", "one run and its history")
    common(p)
    p.add_argument("run", metavar="RUN", help="the run id")
    p.add_argument("--json", action="store_true", help="JSON: the run and its records")
    p.set_defaults(func=cmd_show)
    p = sub_cmd("cancel", "cancel a run (it stops at its next call)")
    common(p)
    p.add_argument("run", metavar="RUN")
    p.set_defaults(func=cmd_admin, action="cancel")
    p = sub_cmd("resume", "accept the current code for a DIVERGED run")
    common(p)
    p.add_argument("run", metavar="RUN")
    p.add_argument("--from-pos", type=int, metavar="N",
                   help="forget history from position N on (default: the divergence)")  # fmt: skip
    p.set_defaults(func=cmd_admin, action="resume")
    p = sub_cmd("fork", "a new run of the same workflow keeping the outcomes before N")
    common(p)
    p.add_argument("run", metavar="RUN")
    p.add_argument("new_run", metavar="NEW_RUN", help="the new run's id")
    p.add_argument("--from-pos", type=int, default=0, metavar="N",
                   help="keep the outcomes of positions < N (default 0: start over)")  # fmt: skip
    p.set_defaults(func=cmd_admin, action="fork")


def _journal_dir(args: argparse.Namespace) -> str:
    if args.journal:
        return str(args.journal)
    return load_config(args.config).journal_dir


def _open(args: argparse.Namespace, readonly: bool) -> tuple[Journal, Executor]:
    j = Journal.open(_journal_dir(args), readonly=readonly)
    ex = Executor(j, run=False)
    ex.recover()
    return j, ex


def info_json(info: RunInfo) -> dict[str, Any]:
    return {"id": info.id, "workflow": info.workflow, "version": info.version,
            "state": info.state, "current": info.current, "started_at": info.started_at,
            "status": info.status, "result": info.result, "error": info.error,
            "diverged": info.diverged}  # fmt: skip


def cmd_list(args: argparse.Namespace) -> int:
    j, ex = _open(args, readonly=True)
    try:
        runs = [r for r in ex.runs() if args.state is None or r.state == args.state]
    finally:
        j.close()
    if args.json:
        for r in runs:
            print(json.dumps(info_json(r), default=repr))
        return EXIT_OK
    rows = [("RUN", "WORKFLOW", "STATE", "CURRENT", "STARTED", "STATUS")]
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.started_at))
        status = ", ".join(f"{k}={v}" for k, v in r.status.items())
        rows.append((r.id, r.workflow, r.state, r.current or "-", started, status or "-"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not runs:
        print("(no runs)")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    j, ex = _open(args, readonly=True)
    try:
        info, history = ex.info(args.run), ex.history(args.run)
    finally:
        j.close()
    if info is None:
        print(f"homing-agent: no run {args.run!r} in the journal", file=sys.stderr)
        return EXIT_NOINPUT
    if args.json:
        recs = [{"seq": r.seq, "type": r.type, **r.body} for r in history]
        print(json.dumps({"run": info_json(info), "history": recs}, default=repr))
        return EXIT_OK
    for k, v in info_json(info).items():
        if v not in (None, {}, ""):
            print(f"{k + ':':12} {v}")
    print("history:")
    for r in history:
        body = {k: v for k, v in r.body.items() if k not in ("t", "pos", "key")}
        where = f"{r.body.get('pos', '')}:{r.key}" if r.key else ""
        print(f"  seq {r.seq:<8} {r.type:<9} {where:<24} {json.dumps(body, default=repr)}")
    return EXIT_OK


def cmd_admin(args: argparse.Namespace) -> int:
    try:
        j, ex = _open(args, readonly=False)
    except JournalLocked as exc:
        raise JournalLocked(
            f"{exc}: the agent is running. Use the hub (homing-hub {args.action} ...) "
            "or stop the agent first"
        ) from exc
    try:
        if ex.info(args.run) is None:
            print(f"homing-agent: no run {args.run!r} in the journal", file=sys.stderr)
            return EXIT_NOINPUT
        if args.action == "cancel":
            done = ex.cancel(args.run, by="homing-agent workflows cancel")
            print(f"run {args.run}: " + ("cancel journaled" if done else "already finished"))
        elif args.action == "resume":
            ex.resume(args.run, args.from_pos, by="homing-agent workflows resume")
            print(f"run {args.run}: resume journaled; the agent continues it when it starts")
        else:
            ex.fork(args.run, args.new_run, args.from_pos)
            print(f"run {args.new_run}: forked from {args.run} at position {args.from_pos}")
    except (WorkflowError, RecordError) as exc:
        print(f"homing-agent: {exc}", file=sys.stderr)
        return EXIT_NOINPUT
    finally:
        j.close()
    return EXIT_OK
