#!/usr/bin/env python3
"""Should the test command run the tests in parallel? Runs a subset of the suite serially and with
pytest-xdist (``-n N --dist loadfile``, what ``VMKIT_TEST_WORKERS=N bash scripts/test.sh`` does)
and prints the wall time of each, with the host's load average before and after (TCG guests are
CPU-bound: on a busy or small host more workers can be slower).

    .venv/bin/python benchmarks/workers_bench.py [--workers 2] [TEST PATHS...]

Default subset: tests/integration/test_shares.py, test_hotplug.py and test_client.py (micro guests).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import print_table

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ["tests/integration/test_shares.py", "tests/integration/test_hotplug.py",
           "tests/integration/test_client.py"]


def run(paths: list[str], workers: int) -> tuple[float, str, str, str]:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths]
    if workers:
        argv[3:3] = ["-n", str(workers), "--dist", "loadfile"]
    load_before = f"{os.getloadavg()[0]:.1f}"
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    summary = next((ln for ln in reversed(proc.stdout.splitlines()) if re.search(r"passed|failed|error", ln)),
                   f"exit {proc.returncode}")
    for line in proc.stdout.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            print(f"({'-n ' + str(workers) if workers else 'serial'}) {line}")
    return wall, summary.strip("= "), load_before, f"{os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("paths", nargs="*", default=DEFAULT)
    args = parser.parse_args()
    rows: list[list[object]] = []
    walls = {}
    for workers in (0, args.workers):
        wall, summary, before, after = run(args.paths, workers)
        walls[workers] = wall
        rows.append([f"-n {workers}" if workers else "serial", f"{wall:.0f}", before, after, summary])
    rows.append([f"-n {args.workers} / serial", f"{walls[args.workers] / walls[0]:.2f}x", "", "", ""])
    print(f"{' '.join(args.paths)} on {os.cpu_count()} cores: wall seconds; load average (1 min) "
          "before and after each run")
    print_table(["run", "wall s", "load before", "load after", "pytest says"], rows)


if __name__ == "__main__":
    main()
