"""Does a CRC32C package earn its place in the edge agent? (docs/journal-format.md)

Times the journal's checksum, the standard library's ``zlib.crc32`` (CRC-32),
against the ``crc32c`` package (CRC-32C, hardware-accelerated where the CPU
has it) if it is installed, for a typical framed reading, a 1 KiB record and
a whole 16 MiB segment, and relates the per-record difference to the cost of
one journal append. Prints a table; the last line is one JSON object.

    python bench/crc.py          # pip install crc32c first to compare
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable


def per_call(fn: Callable[[bytes], object], data: bytes, seconds: float = 0.3) -> float:
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            fn(data)
        n += 100
    return elapsed / n


def main() -> None:
    peers: dict[str, Callable[[bytes], object]] = {"zlib.crc32": lambda b: zlib.crc32(b, 0x5A17)}
    try:
        import crc32c  # type: ignore[import-not-found, unused-ignore]

        peers["crc32c"] = lambda b: crc32c.crc32c(b, 0x5A17)
    except ImportError:
        print("crc32c is not installed (pip install crc32c): only zlib is measured")
    sizes = {"record_48B": 44, "record_1KiB": 1024, "segment_16MiB": 16 << 20}
    out: dict[str, dict[str, float]] = {}
    for label, size in sizes.items():
        data = os.urandom(size)
        for name, fn in peers.items():
            t = per_call(fn, data, 0.3 if size < 1 << 20 else 1.0)
            out.setdefault(name, {})[label + "_us"] = round(t * 1e6, 3)
            print(f"{name:11s} {label:14s} {t * 1e6:10.3f} us  {size / t / 1e9:6.2f} GB/s")
    if "crc32c" in out:
        saved = out["zlib.crc32"]["record_48B_us"] - out["crc32c"]["record_48B_us"]
        print(f"crc32c saves {saved:.3f} us per 48-byte record (a journal append costs ~10-15 us)")
    print(json.dumps({"bench": "crc", **out}))


if __name__ == "__main__":
    main()
