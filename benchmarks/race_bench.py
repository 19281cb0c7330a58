"""How often tests fail when the host is busy: CI's 2-core machine runs two test workers, each booting guests,
and races in vmkit (or in a test) show up there that an idle machine hides.

Each test given (a pytest node id, relative to the checkout) runs ``--runs`` times, one after another, as a
fresh ``pytest`` process, while ``--busy`` processes spin on the CPU (default: one per core). ``--repo DIR``
runs another checkout's tests against its own ``src`` (e.g. a ``git worktree`` of an older commit, to show
that a fix changed something). It prints, per test, how many runs passed and failed.

    python benchmarks/race_bench.py --runs 15 \\
        "tests/unit/test_warm_receiver.py::test_the_next_command_is_served_by_a_child_of_the_warm_receiver"

The integration tests need the micro image: set ``VMKIT_IMAGE_CACHE`` as for the other benchmarks.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from _table import as_installed, print_table

REPO = Path(__file__).resolve().parents[1]


def revision(repo: Path) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def run_once(repo: Path, test: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(repo / "src")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=repo,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="+", help="pytest node ids, relative to the checkout")
    parser.add_argument("--runs", type=int, default=10, help="runs of each test (default 10)")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1,
                        help="processes spinning on the CPU meanwhile (default: one per core; 0: none)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose tests and src run")
    args = parser.parse_args()
    if args.runs < 1 or args.busy < 0:
        parser.error("--runs must be at least 1 and --busy at least 0")
    repo = args.repo.resolve()
    as_installed(repo / "src")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    rows = []
    try:
        for test in args.tests:
            codes = [run_once(repo, test) for _ in range(args.runs)]
            rows.append((test.rsplit("::", 1)[-1], args.runs, codes.count(0), codes.count(1),
                         len(codes) - codes.count(0) - codes.count(1)))
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    print(f"checkout {repo} at {revision(repo)}; {args.busy} busy process(es) on {os.cpu_count()} core(s)")
    print_table(["test", "runs", "passed", "failed", "errors"], rows)


if __name__ == "__main__":
    main()
