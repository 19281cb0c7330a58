#!/usr/bin/env python3
"""Foreign binaries in a guest (``binfmt: [aarch64]``): what the first run of an aarch64 program costs
against repeated runs of the same program, and against the same program built for the guest's own
architecture (x86-64, run natively by the guest).

An x86-64 debian-12 guest is made with ``binfmt: [aarch64]`` (vmkit copies qemu-user-static's
interpreter in and registers it with binfmt_misc), then Debian's ``busybox-static`` for arm64 and for
amd64 are copied in. Inside the guest, a shell times each run with ``date +%s%N`` (no agent round
trip in the figure): the program file is read once beforehand (page cache warm), then run
``--repeat`` + 1 times. The first run is the first time that program is ever executed in the guest.

Workloads: ``true`` (start-up only: the interpreter loads and translates the code it runs),
``sh loop`` (a busybox shell loop: the same few blocks over and over) and ``sha256sum`` of a
4 MiB file.

QEMU's user mode has **no persistent translation cache**: each process translates the code it runs
into its own in-memory cache, which is thrown away when it exits. A repeated run is not faster than
the first, except for what the guest kernel caches (pages). Apple's Rosetta keeps translations on
disk (its daemon's AOT cache) and reuses them across processes; vmkit's binfmt cannot.

    .venv/bin/python benchmarks/binfmt_bench.py [--repeat 5] [--loop 20000]   (full: --repeat 10 --loop 100000)
    .venv/bin/python benchmarks/binfmt_bench.py --quick                        (repeat 2, loop 2000)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _guests import load, scratch_home
from _table import print_table
from vmkit.host.images import debpkg

# $1: program, $2: runs, rest: the program's arguments. Prints one duration (ns) per line.
TIMER = r"""prog=$1; runs=$2; shift 2
cat "$prog" > /dev/null
i=0
while [ $i -lt "$runs" ]; do
    t0=$(date +%s%N); "$prog" "$@" > /dev/null; t1=$(date +%s%N)
    echo $((t1 - t0))
    i=$((i + 1))
done
"""


def busyboxes(work: Path) -> dict[str, Path]:
    """Debian's busybox-static for arm64 and amd64, unpacked on the host."""
    out = {}
    for arch, suffix in (("aarch64", ":arm64"), ("x86_64", "")):
        debs = debpkg.download([f"busybox-static{suffix}"], work / arch)
        root = debpkg.extract(next(iter(debs.values())).path, work / arch / "root")
        out[arch] = root / "bin" / "busybox"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="runs after the first (default 5)")
    ap.add_argument("--loop", type=int, default=20000, help="iterations of the shell loop (default 20000)")
    ap.add_argument("--quick", action="store_true", help="repeat 2, loop 2000: check that it works")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.loop = 2, 2000
    workloads = {
        "true": ["true"],
        "sh loop": ["sh", "-c", f'i=0; while [ $i -lt {args.loop} ]; do i=$((i+1)); done'],
        "sha256sum 4 MiB": ["sha256sum", "/tmp/bench-data"],
    }
    with tempfile.TemporaryDirectory(prefix="binfmt-bench-") as tmp, scratch_home("binfmt-bench-") as client:
        programs = busyboxes(Path(tmp))
        print(f"booting an x86-64 debian-12 guest with binfmt: [aarch64] ({load()})", flush=True)
        inst = client.create("bf", image="debian-12", binfmt=["aarch64"])
        inst.start(timeout=900)
        inst.exec(["/bin/sh", "-c", "head -c 4194304 /dev/urandom > /tmp/bench-data"])
        rows = []
        for wname, argv in workloads.items():
            timings: dict[str, list[float]] = {}
            for arch, local in programs.items():
                # one copy per workload: each row's first run is that file's first execution
                remote = f"/tmp/{arch}-{len(rows)}/busybox"
                inst.exec(["/bin/mkdir", "-p", remote.rsplit("/", 1)[0]])
                inst.copy_in(local, remote)
                inst.exec(["/bin/chmod", "0755", remote])
                res = inst.exec(["/bin/sh", "-c", TIMER, "sh", remote, str(args.repeat + 1), *argv], timeout=1800)
                if res.exit_code != 0:
                    print(f"{arch} {wname} failed: {res.stderr.decode(errors='replace')}", file=sys.stderr)
                    return 1
                timings[arch] = [int(x) / 1e6 for x in res.stdout.decode().split()]
            a, x = timings["aarch64"], timings["x86_64"]
            a_rep, x_rep = statistics.median(a[1:]), statistics.median(x[1:])
            rows.append([wname, f"{a[0]:.1f}", f"{a_rep:.1f}", f"{a[0] / a_rep:.2f}x",
                         f"{x[0]:.1f}", f"{x_rep:.1f}", f"{a_rep / x_rep:.1f}x"])
        print()
        print_table(["workload", "aarch64 first ms", "aarch64 repeat ms (median)", "first/repeat",
                     "x86-64 first ms", "x86-64 repeat ms", "aarch64/x86-64"], rows)
        print()
        print("QEMU user mode keeps no translation cache between processes: every run of the aarch64 program "
              "translates its code afresh, so a repeated run can gain only from what the guest kernel caches "
              "(the program's pages), never from translation. Rosetta's daemon caches translations on disk "
              "across processes; QEMU has nothing like it. Few repeats on a loaded host are noisy: use the "
              "full-length command in the module docstring for figures.")
        print(f"({load()}; the guest itself runs under TCG on this host)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
