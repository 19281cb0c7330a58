"""CPU fairness through vmkit's cgroups: weights, a cap, and steal made visible.

Three micro guests, one vCPU each, every one running a busy loop from init (``--run 'while :; do :; done'``),
all on the host's CPUs (this host: 2 cores), in their cgroups ``vmkit/<name>``:

  weights   each guest's share of the CPU the three used together, measured with the cgroup's own CPU
            accounting (cpuacct.usage on v1, cpu.stat usage_usec on v2) over ``--window`` seconds:
            first with no limits (the alternative: what QEMU gets without vmkit's cgroups, equal
            weights, expected 33/33/33 %), then after ``vmkit set --cpu-weight`` 100/100/200 live
            (expected 25/25/50 %; target within 5 points).
  cap       the first guest alone (the others stopped), with weight 10000 so that the rest of a busy
            host does not keep it below the cap: its use of one core without a cap, then with
            ``vmkit set --cpu-max 50`` (target 50 +- 5 %).
  steal     ``vmkit stats``' steal_percent of each guest (read at the start and the end of the weights
            window: the second reading covers the window) against the run-queue wait this script
            measures itself from ``/proc/QEMU/task/TID/schedstat`` of the vCPU threads ("CPU n/TCG")
            over the same window.

The shares are of what the three guests got together: other processes on the host compete with the
``vmkit`` cgroup as a whole, so on a busy host the guests get less CPU in total, but their ratios are
still the weights'. Print the load (``uptime``) with the results: a busy host makes every figure noisy.

    python benchmarks/fairness_bench.py [--window 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vmkit as vmkit_api
from _table import print_table
from vmkit.host import cgroups

GUESTS = ("fair-a", "fair-b", "fair-c")
WEIGHTS = (100, 100, 200)
BUSY = "while :; do :; done"


def vmkit(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "vmkit.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "250"}, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"vmkit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def stats(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(vmkit("stats", name, "--json"))
    return data


def rel_of(name: str) -> str:
    return "/".join(Path(stats(name)["cgroup"]).parts[-2:])


def qemu_pid(home: Path, name: str) -> int:
    return int(json.loads((home / "instances" / name / "state.json").read_text())["qemu_pid"])


def vcpu_wait_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().startswith("CPU "):
            total += int((task / "schedstat").read_text().split()[1])
    return total


def usage_s(driver: cgroups.Driver, rel: str) -> float:
    ns = driver.cpu_usage_ns(rel)
    assert ns is not None
    return ns / 1e9


def measure(driver: cgroups.Driver, home: Path, names: tuple[str, ...], window: float) -> dict[str, dict[str, float]]:
    """CPU seconds per guest (cgroup accounting) over ``window``; and per guest, vmkit's steal against the
    vCPU wait this script reads from schedstat over the same interval: vmkit's steal covers the time since
    its previous reading, so each guest's wait is read right after each of its stats readings (taken
    through the API in this process: a ``vmkit stats`` command per guest took seconds on a loaded host,
    which put the guests' intervals tens of seconds apart, and past the 60 s after which vmkit starts a
    fresh 0.25 s interval)."""
    rels = {n: rel_of(n) for n in names}
    pids = {n: qemu_pid(home, n) for n in names}
    client = vmkit_api.Client(home)
    w0, s0 = {}, {}
    for n in names:
        client.get(n).stats()  # starts vmkit's steal interval
        w0[n], s0[n] = vcpu_wait_ns(pids[n]), time.monotonic()
    t0 = time.monotonic()
    u0 = {n: usage_s(driver, rels[n]) for n in names}
    time.sleep(window)
    u1 = {n: usage_s(driver, rels[n]) for n in names}
    elapsed = time.monotonic() - t0
    out = {}
    for n in names:
        steal = client.get(n).stats().steal_percent
        w1, s1 = vcpu_wait_ns(pids[n]), time.monotonic()
        out[n] = {"cpu_s": u1[n] - u0[n], "elapsed": elapsed, "wait_pct": 100 * (w1 - w0[n]) / 1e9 / (s1 - s0[n]),
                  "steal_pct": float(steal or 0.0)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=20.0, help="seconds per measurement")
    args = parser.parse_args()
    driver = cgroups.detect()
    if driver is None or not driver.controllers:
        raise SystemExit("no cgroup controllers on this host")
    home = Path(tempfile.mkdtemp(prefix="vmkit-fair-"))
    os.environ["VMKIT_HOME"] = str(home)
    print(f"host: {os.cpu_count()} CPUs, {driver.describe()}; load: {subprocess.getoutput('uptime').strip()}")
    try:
        for n in GUESTS:
            vmkit("create", n, "--image", "micro", "--memory", "128M", "--run", BUSY)
        for n in GUESTS:
            vmkit("start", n)
        time.sleep(3)  # past the boot

        equal = measure(driver, home, GUESTS, args.window)
        for n, w in zip(GUESTS, WEIGHTS, strict=True):
            vmkit("set", n, "--cpu-weight", str(w))
        weighted = measure(driver, home, GUESTS, args.window)

        rows = []
        for label, result, weights in (("no limits", equal, (100, 100, 100)), ("weights", weighted, WEIGHTS)):
            total = sum(r["cpu_s"] for r in result.values())
            for n, w in zip(GUESTS, weights, strict=True):
                r = result[n]
                want = 100 * w / sum(weights)
                got = 100 * r["cpu_s"] / total if total else 0.0
                rows.append([label, n, w, f"{want:.1f}", f"{got:.1f}", f"{got - want:+.1f}",
                             f"{100 * r['cpu_s'] / r['elapsed']:.1f}", f"{r['steal_pct']:.1f}", f"{r['wait_pct']:.1f}"])
        print(f"\nweights: shares of the CPU the three guests used together ({args.window:.0f} s windows)")
        print_table(["case", "guest", "weight", "expected %", "share %", "diff pts", "% of a core",
                     "steal (vmkit stats) %", "vCPU wait (schedstat) %"], rows, left=2)

        for n in GUESTS[1:]:
            vmkit("stop", n, "--force")
        vmkit("set", GUESTS[0], "--cpu-weight", "10000")  # the host's other load must not hold it below the cap
        free = measure(driver, home, GUESTS[:1], args.window)[GUESTS[0]]
        vmkit("set", GUESTS[0], "--cpu-max", "50")
        capped = measure(driver, home, GUESTS[:1], args.window)[GUESTS[0]]
        print(f"\ncap: {GUESTS[0]} alone with weight 10000, % of one core ({args.window:.0f} s windows)")
        print_table(["case", "target %", "% of a core", "steal (vmkit stats) %", "vCPU wait (schedstat) %"], [
            ["no cap", "-", f"{100 * free['cpu_s'] / free['elapsed']:.1f}", f"{free['steal_pct']:.1f}",
             f"{free['wait_pct']:.1f}"],
            ["cpu_max 50", "50 +- 5", f"{100 * capped['cpu_s'] / capped['elapsed']:.1f}",
             f"{capped['steal_pct']:.1f}", f"{capped['wait_pct']:.1f}"]])
        print(f"\nload after: {subprocess.getoutput('uptime').strip()}")
    finally:
        for n in GUESTS:
            subprocess.run([sys.executable, "-m", "vmkit.cli.main", "stop", n, "--force"], capture_output=True,
                           timeout=120)


if __name__ == "__main__":
    main()
