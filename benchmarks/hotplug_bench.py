"""vCPU and memory hot-plug on the Debian guest: how long from `vmkit set --cpus/--memory` to the guest
seeing it, against the alternative (stop the machine and boot it again with the new size).

One debian-12 machine (1 vCPU, max_cpus 4; 1 GiB booted, max_memory 2 GiB) is started, then:

  cpus up     1 -> 2 -> 3 -> 4   ``Instance.set_cpus``: device_add; the guest sees it when ``nproc`` says so
                                 (its udev rule brings the new CPU online)
  cpus down   4 -> 3 -> 2 -> 1   under TCG vmkit offlines the surplus vCPU in the guest through its agent
                                 (``guest-set-vcpus``; QEMU 7.2 corrupts its heap on device_del); seen when
                                 ``nproc`` says so; the table names the method each result gave
  cpus again  1 -> 2 -> 3        the offlined vCPUs brought back online in the guest (``guest-online``)
  memory up   1G -> 1.25G -> 1.5G -> 1.75G   ``Instance.set_memory`` (virtio-mem); seen when the guest's
                                 MemTotal has moved by at least 90 % of the step
  memory down 1.75G -> 1.5G -> 1.25G -> 1G   the guest unplugs (memory onlined movable)
  restart     (baseline, ``--restart``) stop the machine, set --cpus 2 in vm.yaml, start it: until
                                 ``nproc`` answers 2 — what a change costs without hot-plug

Each step is one repetition; `set` is the API call's own time, `seen` until the guest shows the new size
(polled through the guest agent every 0.2 s). Target: seen <= 5 s. Prints a table and the ratio against
the restart.

    .venv/bin/python benchmarks/hotplug_bench.py [--restart | --no-restart]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import vmkit
from _table import print_table
from vmkit.api.models import CpusResult
from vmkit.client.sync import Instance

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def nproc(inst: Instance) -> int:
    return int(inst.exec(["nproc"]).stdout)


def mem_total(inst: Instance) -> int:
    for line in inst.exec(["cat", "/proc/meminfo"]).stdout.decode().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) << 10
    raise RuntimeError("no MemTotal in /proc/meminfo")


def until(check: Callable[[], bool], limit: float = 120.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > limit:
            raise TimeoutError("the guest did not see the change")
        time.sleep(0.2)
    return time.monotonic() - start


def timed(change: Callable[[], object], seen: Callable[[], bool]) -> tuple[float, float]:
    start = time.monotonic()
    change()
    called = time.monotonic() - start
    return called, called + until(seen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--restart", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the baseline: stop, change vm.yaml, boot again")
    args = ap.parse_args()
    os.environ.setdefault("VMKIT_IMAGE_CACHE", str(REPO / ".cache" / "images"))
    with tempfile.TemporaryDirectory(prefix="vmkit-hotplug-bench-") as home:
        os.environ["VMKIT_HOME"] = home
        client = vmkit.Client()
        inst = client.create("bench", image="debian-12", cpus=1, max_cpus=4, memory="1G", max_memory="2G")
        t = time.monotonic()
        inst.start()
        print(f"booted in {time.monotonic() - t:.0f} s; load: {os.getloadavg()[0]:.1f}", file=sys.stderr)
        rows: dict[str, list[tuple[float, float]]] = {}
        methods: dict[str, set[str]] = {}
        try:
            for label, counts in (("cpus up (+1)", (2, 3, 4)), ("cpus down (-1)", (3, 2, 1)),
                                  ("cpus up again (+1)", (2, 3))):
                for n in counts:
                    result: list[CpusResult] = []
                    rows.setdefault(label, []).append(timed(lambda n=n, result=result: result.append(inst.set_cpus(n)),
                                                            lambda n=n: nproc(inst) == n))
                    methods.setdefault(label, set()).add(result[0].method)
            step = 256 * MiB
            for sign, label in ((1, "memory up (+256M)"), (-1, "memory down (-256M)")):
                for _ in range(3):
                    before = mem_total(inst)
                    target = inst.stats().memory_bytes + (inst.stats().memory_plugged_bytes or 0) + sign * step
                    rows.setdefault(label, []).append(timed(
                        lambda target=target: inst.set_memory(target, timeout=30),
                        lambda before=before, sign=sign: sign * (mem_total(inst) - before) >= 0.9 * step))
            restart: float | None = None
            if args.restart:
                start = time.monotonic()
                inst.stop()
                inst.set_cpus(2)
                inst.start()
                until(lambda: nproc(inst) == 2, 600)
                restart = time.monotonic() - start
        finally:
            inst.delete(force=True)
    table = []
    for label, samples in rows.items():
        seen = [s for _, s in samples]
        how = f": {', '.join(sorted(methods[label]))}" if label in methods else ""
        table.append([label + how, len(samples), f"{statistics.median(c for c, _ in samples):.2f}",
                      f"{statistics.median(seen):.2f}", f"{max(seen):.2f}", "yes" if max(seen) <= 5 else "NO",
                      f"{restart / statistics.median(seen):.0f}x" if restart else "-"])
    if restart is not None:
        table.append(["restart (stop, boot with 2 vCPUs)", 1, "-", f"{restart:.2f}", f"{restart:.2f}", "-", "1x"])
    print_table(["change", "n", "set (s, median)", "seen (s, median)", "seen (s, max)", "<= 5 s",
                 "restart / seen"], table)
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
