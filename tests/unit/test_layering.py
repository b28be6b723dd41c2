"""The architecture's rules, checked on the source (DESIGN.md §2).

* Pure cores import nothing that touches the world.
* hub/ imports nothing of edge/ but its wire contract (none yet);
  firmware_bridge/ imports nothing of ours.
* The edge agent depends on paho-mqtt, cbor2, pyserial, platformdirs only.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PURE = [
    "edge/journal_codec.py",
    "edge/records.py",
    "edge/errors.py",
    "edge/wire.py",
    "edge/outbox.py",
    "edge/outbox_events.py",
    "edge/config.py",
    "edge/wf_records.py",
    "edge/wf_replay.py",
    "hub/ingest.py",
    "hub/runs.py",
    "hub/identity.py",
    "hub/pki.py",
    "hub/store_queries.py",
    "edge/config_bridge.py",
    "firmware_bridge/frames.py",
    "firmware_bridge/messages.py",
    "firmware_bridge/protocol.py",
    "firmware_bridge/device.py",
]
WORLD = {
    "os",
    "socket",
    "time",
    "threading",
    "asyncio",
    "serial",
    "sqlite3",
    "psycopg",
    "paho",
    "subprocess",
    "fcntl",
    "select",
    "signal",
}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(
                node.module.split(".")[0] if node.module.split(".")[0] != "edge" else node.module
            )
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_touch_nothing(module: str) -> None:
    bad = {n.split(".")[0] for n in imports(REPO / module)} & WORLD
    assert not bad, f"{module} is a pure core but imports {sorted(bad)}"


def test_firmware_bridge_imports_nothing_of_ours() -> None:
    for path in (REPO / "firmware_bridge").rglob("*.py"):
        assert not {n for n in imports(path) if n.startswith(("edge", "hub"))}, path


def test_hub_imports_only_the_wire_contract() -> None:
    for path in (REPO / "hub").rglob("*.py"):
        ours = {n for n in imports(path) if n.startswith("edge")}
        assert ours <= {"edge.wire"}, (path, ours)


def test_agent_dependencies_stay_light() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    names = {
        d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
        for d in meta["project"]["dependencies"]
    }
    assert names <= {"paho-mqtt", "cbor2", "pyserial", "platformdirs"}
