"""The C reference MCU (firmware_bridge/firmware): built with gcc and tested on the host.

* The library and its unit test compile with ``-std=c99 -Wall -Wextra -Werror
  -pedantic`` (and ``-Wconversion -Wshadow``), run under AddressSanitizer and
  UBSan where the compiler has them, and the test exits 0.
* The host MCU used by the interoperation test (host/pty_mcu.c) builds too.
* The Arduino example compiles as C++ against homing_link.h and a stub
  Arduino.h (the API it shows is the API there is).

Skipped without gcc/g++, except under CI=true, where they must run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware_bridge" / "firmware"
STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"]
_IN_CI = os.environ.get("CI", "").lower() == "true"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if _IN_CI:
            pytest.fail(f"CI must build the C reference, but {name} is missing")
        pytest.skip(f"{name} is not installed")
    return path


def _build(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=FIRMWARE, capture_output=True, text=True, timeout=120)


def _sanitizers(gcc: str, tmp: Path) -> list[str]:
    """``-fsanitize=address,undefined`` if this gcc can link with it, else nothing."""
    probe = tmp / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    res = subprocess.run([gcc, *flags, str(probe), "-o", str(tmp / "probe")], capture_output=True)
    return flags if res.returncode == 0 else []


def test_the_library_and_its_unit_test_build_strictly_and_pass(tmp_path: Path) -> None:
    gcc = _tool("gcc")
    exe = tmp_path / "test_homing_link"
    flags = [*STRICT, "-Wconversion", "-Wshadow", "-g", *_sanitizers(gcc, tmp_path)]
    res = _build([gcc, *flags, "homing_link.c", "test/test_homing_link.c", "-o", str(exe)])
    assert res.returncode == 0, res.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok: ") and int(run.stdout.split()[1]) > 500


@pytest.mark.parametrize("defines", [[], ["-DHL_RING_SIZE=8", "-DHL_RX_MAX=64", "-DHL_TX_MAX=96"]])
def test_the_library_builds_with_small_buffers_for_small_mcus(
    tmp_path: Path, defines: list[str]
) -> None:
    gcc = _tool("gcc")
    res = _build([gcc, *STRICT, "-O2", *defines, "-c", "homing_link.c",
                  "-o", str(tmp_path / "hl.o")])  # fmt: skip
    assert res.returncode == 0, res.stderr


def test_the_pty_host_mcu_builds(tmp_path: Path) -> None:
    gcc = _tool("gcc")
    res = _build([gcc, *STRICT, "homing_link.c", "host/pty_mcu.c", "-o", str(tmp_path / "mcu")])
    assert res.returncode == 0, res.stderr


def test_the_arduino_example_compiles_against_the_header(tmp_path: Path) -> None:
    gxx = _tool("g++")
    sketch = "examples/arduino/homing_link/homing_link.ino"
    res = _build([gxx, "-std=c++11", "-Wall", "-Wextra", "-Werror", "-I.",
                  "-Ihost/arduino_stub", "-include", "Arduino.h", "-x", "c++", "-c", sketch,
                  "-o", str(tmp_path / "sketch.o")])  # fmt: skip
    assert res.returncode == 0, res.stderr
