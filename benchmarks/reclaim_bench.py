"""Memory given back to the host: a 1 GiB Debian guest allocates 512 MiB and frees it again; how long
until QEMU's resident memory on the host is back within 64 MiB of where it started.

vmkit's machines have a virtio-balloon with free page reporting (``free-page-reporting=on``): the
guest tells QEMU which pages it freed, and QEMU gives them back to the host. The real alternative is
a machine without it (``balloon: false`` in vm.yaml, what plain QEMU, Lima or UTM give you): freed
guest memory stays resident on the host until the guest happens to reuse it. Both run the same
guest; each case boots its own machine.

    .venv/bin/python benchmarks/reclaim_bench.py [--alloc 512] [--memory 1024] [--wait 60] [--cases on,off]
"""

from __future__ import annotations

import argparse
import time

from _guests import MiB, debian, load, scratch_home, settle_rss
from _table import print_table

SLACK = 64 * MiB


def allocate_and_free(mib: int) -> str:
    """A guest command: fill ``mib`` MiB with non-zero bytes (every page touched), hold a moment, exit."""
    return (f"import time; x = b'\\x01' * ({mib} << 20); time.sleep(2); "
            f"print(open('/proc/meminfo').read().split(chr(10))[2])")


def run_case(reporting: bool, alloc: int, memory: int, wait: float) -> list[object]:
    with scratch_home("vmkit-reclaim-") as client:
        inst = debian(client, "reclaim", memory=f"{memory}M", balloon=reporting)
        base = settle_rss(inst)
        res = inst.exec(["python3", "-c", allocate_and_free(alloc)], timeout=300)
        if res.exit_code != 0:
            raise SystemExit(f"the allocation failed in the guest: {res.stderr.decode()}")
        freed_at = time.monotonic()
        peak = inst.stats().host_rss_bytes
        back: float | None = None
        rss = peak
        while time.monotonic() - freed_at < wait:
            rss = inst.stats().host_rss_bytes
            if rss <= base + SLACK:
                back = time.monotonic() - freed_at
                break
            time.sleep(0.25)
        inst.stop(force=True)
    name = "balloon + free page reporting (vmkit)" if reporting else "no balloon (balloon: false)"
    verdict = f"{back:.1f}" if back is not None else f"not within {wait:.0f}"
    ok = "yes" if back is not None and back <= 10 else "no"
    return [name, f"{base / MiB:.0f}", f"{peak / MiB:.0f}", f"{rss / MiB:.0f}", f"{(rss - base) / MiB:+.0f}",
            verdict, ok]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alloc", type=int, default=512, help="MiB the guest allocates and frees")
    ap.add_argument("--memory", type=int, default=1024, help="the guest's memory in MiB")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the RSS to come back")
    ap.add_argument("--cases", default="on,off", help="on: vmkit's balloon with free page reporting; off: none")
    args = ap.parse_args()
    rows = [run_case(c == "on", args.alloc, args.memory, args.wait) for c in args.cases.split(",")]
    print(f"A {args.memory} MiB Debian guest allocates {args.alloc} MiB (every page written) and frees it;")
    print(f"QEMU's RSS on the host, until it is back within {SLACK // MiB} MiB of the idle figure (target <= 10 s)")
    print(load())
    print_table(["case", "idle RSS MiB", "peak MiB", "end MiB", "end - idle", "seconds back", "<= 10 s"], rows)


if __name__ == "__main__":
    main()
