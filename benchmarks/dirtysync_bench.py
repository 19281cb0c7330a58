#!/usr/bin/env python3
"""What vmkit's RAM pad costs a live migration under TCG on QEMU before 9.0, and where: QEMU's own
trace of its dirty-bitmap syncs (``migration_bitmap_sync_start``/``_end``, with ``-msg timestamp=on``)
for the same idle micro guest migrated between two local QEMUs, its RAM as configured (the fast
sync path, which loses pages on such a QEMU: vmkit.runtime.qemu.dirtysync) and padded by 8 KiB (the
correct page-by-page path vmkit uses).

Each migration has three syncs: the first when the migration starts (every page of the guest is
still marked dirty for migration since its RAM was allocated, so the page-by-page path clears and
resets the TLB page by page: the longest), one when the remaining data fell under the threshold,
and the last with the guest stopped (part of QEMU's downtime). QEMU runs the first two holding its
big lock, so a guest whose devices need that lock (its network, its timers) stalls meanwhile; the
first is what benchmarks/migrate_bench.py sees as the longest silence of a padded guest.

    python benchmarks/dirtysync_bench.py [--memory 1G] [--runs 3] [--qemu-dir DIR]

``--qemu-dir`` runs another QEMU build: ``DIR/qemu-system-x86_64``, for example a script that runs
QEMU 10.0 from bookworm-backports unpacked in /opt/q10 (``apt-get download
qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports
qemu-system-data/bookworm-backports``, then ``dpkg-deb -x`` each into /opt/q10)::

    #!/bin/sh
    QEMU_MODULE_DIR=/nonexistent exec /opt/q10/usr/bin/qemu-system-x86_64 \
        -L /opt/q10/usr/share/qemu -L /usr/share/seabios "$@"

There (QEMU 9.0 and later) the fast path is correct, so the first row is what a migration costs.

Needs the micro image (VMKIT_IMAGE_CACHE or ./.cache/images) and qemu-system-x86_64.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _guests import qmp_connect
from _table import print_table

REPO = Path(__file__).resolve().parent.parent
PAD_KIB = 8
TRACE = re.compile(r"^\d+@(\d+\.\d+):(migration_bitmap_sync_start|migration_bitmap_sync_end|"
                   r"migration_completion_vm_stop)")


QEMU = ["qemu-system-x86_64"]
"""The QEMU command: the host's, or --qemu-dir's."""


def qemu(image: Path, memory: str, workdir: Path, side: str, extra: list[str]) -> subprocess.Popen[bytes]:
    argv = [*QEMU, "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "1",
            "-m", memory, "-nodefaults", "-no-user-config", "-display", "none", "-kernel", str(image / "vmlinuz"),
            "-initrd", str(image / "initrd.img"), "-append", "console=ttyS0 quiet", "-msg", "timestamp=on",
            "-qmp", f"unix:{workdir / side}.qmp,server=on,wait=off", *extra]
    err = (workdir / f"{side}.trace").open("wb")
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


async def migrate(workdir: Path, port: int) -> dict[str, int]:
    qmp = await qmp_connect(workdir / "src.qmp")
    await asyncio.sleep(3)  # the guest boots and settles (idle from then on)
    await qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    while True:
        info = await qmp.execute("query-migrate")
        assert isinstance(info, dict)
        if info["status"] in ("completed", "failed", "cancelled"):
            break
        await asyncio.sleep(0.02)
    await qmp.disconnect()
    if info["status"] != "completed":
        raise RuntimeError(f"the migration ended {info['status']}: {info.get('error-desc', '')}")
    return {"total": int(info["total-time"]), "setup": int(info["setup-time"]), "downtime": int(info["downtime"])}


def syncs(trace: Path) -> list[float]:
    """Milliseconds of each dirty-bitmap sync in a QEMU trace, in order."""
    out, start = [], None
    for line in trace.read_text(errors="replace").splitlines():
        m = TRACE.match(line)
        if not m:
            continue
        if m.group(2) == "migration_bitmap_sync_start":
            start = float(m.group(1))
        elif m.group(2) == "migration_bitmap_sync_end" and start is not None:
            out.append((float(m.group(1)) - start) * 1000)
            start = None
    return out


def one(image: Path, memory: str, port: int) -> tuple[dict[str, int], list[float]]:
    with tempfile.TemporaryDirectory(prefix="dsync-") as d:
        work = Path(d)
        trace = ["-trace", "migration_bitmap_sync_*", "-trace", "migration_completion_vm_stop"]
        src = qemu(image, memory, work, "src", trace)
        dst = qemu(image, memory, work, "dst", ["-incoming", f"tcp:127.0.0.1:{port}"])
        try:
            figures = asyncio.run(migrate(work, port))
        finally:
            for p in (src, dst):
                p.kill()
                p.wait(10)
        return figures, syncs(work / "src.trace")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="1G", help="the guest's RAM as configured (M or G)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--qemu-dir", type=Path, metavar="DIR",
                        help="run DIR/qemu-system-x86_64 (another QEMU build, or a script that runs one)")
    args = parser.parse_args()
    if args.qemu_dir is not None:
        QEMU[:] = [str(args.qemu_dir / "qemu-system-x86_64")]
    image = Path(os.environ.get("VMKIT_IMAGE_CACHE", REPO / ".cache" / "images")) / "micro"
    if not (image / "vmlinuz").exists():
        print(f"no micro image in {image}: build it with `vmkit image build micro`", file=sys.stderr)
        return 2
    size, unit = int(args.memory[:-1]), args.memory[-1].upper()
    kib = size << (20 if unit == "G" else 10)
    cases = [(f"{args.memory} as configured (fast sync path: loses pages before QEMU 9.0)", f"{kib}K"),
             (f"{args.memory} + {PAD_KIB} KiB (vmkit's pad: page by page, correct)", f"{kib + PAD_KIB}K")]
    version = subprocess.run([*QEMU, "--version"], capture_output=True, text=True).stdout
    print(f"# idle micro guest, 1 vCPU, TCG, {args.runs} runs per case, medians; {version.splitlines()[0]}; "
          f"load {os.getloadavg()[0]:.2f}")
    rows = []
    port = 47000 + os.getpid() % 1000
    for label, memory in cases:
        results = []
        for _ in range(args.runs):
            results.append(one(image, memory, port))
            port += 1
            time.sleep(0.5)
        med = {k: statistics.median(r[0][k] for r in results) for k in ("total", "setup", "downtime")}
        per_sync = [statistics.median(r[1][i] for r in results if len(r[1]) > i) for i in range(3)]
        rows.append([label, f"{med['total']:.0f}", f"{med['setup']:.0f}", f"{med['downtime']:.0f}",
                     *(f"{ms:.1f}" for ms in per_sync)])
    print_table(["RAM", "total ms", "setup ms", "downtime ms", "1st sync ms (start)", "2nd sync ms (threshold)",
                 "last sync ms (stopped)"], rows)
    print(f"# load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
