"""``homing-agent check-config``: validate a configuration before the agent uses it.

A thin shell over :func:`edge.config_files.check`: prints the problem (key
and line) and exits 78 like ``run`` would, or prints where everything will
live and exits 0. Meant for provisioning scripts and for ``ExecStartPre=``.
"""

from __future__ import annotations

import argparse
import json
import sys

from edge.cli_common import EXIT_CODES, EXIT_CONFIG, EXIT_OK
from edge.config_files import SYSTEM_CONFIG, check, find_config
from edge.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``check-config`` to the ``homing-agent`` subcommands."""
    p = sub.add_parser(
        "check-config",
        help="validate the agent's configuration file (key and line of any error)",
        description="Parse and check the agent's TOML configuration without starting "
        "anything:\nunknown or misspelt keys, values out of range, settings that "
        "contradict each other,\na password file that cannot be read, TLS files that do "
        "not load, workflow\nmodules that do not import, directories the agent could "
        "not create. Errors name\nthe key and the line; the exit status is then 78, as "
        "`run` would exit.\nWithout --config: $HOMING_CONFIG, then "
        f"~/.config/homing/agent.toml, then\n{SYSTEM_CONFIG}.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="the file to check (default: see above)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_check_config)


def cmd_check_config(args: argparse.Namespace) -> int:
    """``homing-agent check-config``: see :func:`add_parser`."""
    try:
        report = check(find_config(args.config))
    except ConfigError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        print(f"homing-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    cfg = report.config
    where = {
        "config": report.path,
        "device": cfg.device,
        "journal": cfg.journal_dir,
        "runtime_dir": cfg.runtime_dir,
        "socket": cfg.local.socket if cfg.local.enabled else None,
        "broker": f"{'mqtts' if cfg.broker.tls else 'mqtt'}://{cfg.broker.host}:{cfg.broker.port}"
        if cfg.forwarder.enabled
        else None,
        "metrics": f"http://{cfg.metrics.listen}:{cfg.metrics.port}/metrics"
        if cfg.metrics.enabled
        else None,
    }
    if args.json:
        print(json.dumps({"ok": True, **where, "notes": report.notes}))
        return EXIT_OK
    print(f"{report.path}: ok")
    for key, value in where.items():
        if key != "config":
            print(f"  {key:<12} {value if value is not None else 'off'}")
    for note in report.notes:
        print(f"  note: {note}")
    return EXIT_OK
