"""Save and restore of real machines: vmkit's encrypted state files against plain QEMU migration to a file.

For each guest size (default 256 MiB and 1 GiB) a micro guest boots and fills part of its RAM with
data (``/dev/urandom`` seed replicated in a tmpfs: pages that are neither zero nor compressible by
QEMU's zero-page detection), then, on that same machine, paused, and interleaved ``--repeat`` times:

  save     plain   ``migrate exec:cat > FILE``                   (QEMU 7.2 has no file: URI)
           plain+fsync  the same, plus fsync of FILE             (the durability vmkit guarantees)
           vmkit   ``savestate.save_state``: migrate fd: into a pipe, zstd where it pays, AES-256-GCM
                   chunks written with O_DIRECT, fsync, rename
  restore  plain   new QEMU ``-incoming defer`` + ``migrate-incoming exec:cat FILE``
           vmkit   new QEMU + ``savestate.restore_state`` (authenticates the header, checks the
                   machine, then the stream chunk by chunk)

Both sides use the same migration settings (``max-bandwidth`` unlimited: the default 128 MiB/s
would throttle both alike) and wait for QEMU's MIGRATION event. QEMU refuses to migrate a paused
machine twice, so it runs for a moment between two saves. Restores include launching QEMU on both
sides; the plain file is read from the page cache (``cat > FILE`` left it there), vmkit's from the
disk (its O_DIRECT writes bypass the page cache; the restore asks the kernel to read it ahead
while QEMU starts). Prints a table and the ratios; the file sizes are those of the last round.

    .venv/bin/python benchmarks/save_bench.py [--sizes 256,1024] [--repeat 9] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from _table import med_best, print_table, ratio, settle
from vmkit.config import MachineConfig, parse_config
from vmkit.host.images import micro
from vmkit.host.images.store import Image, ImageStore
from vmkit.runtime.machine import VirtualMachine, VmEvent
from vmkit.state import key as keys
from vmkit.state import savestate

REPO = Path(__file__).resolve().parent.parent


def image() -> Image:
    cache = os.environ.get("VMKIT_IMAGE_CACHE") or str(REPO / ".cache" / "images")
    return micro.build_micro(ImageStore(Path(cache)))


def config(img: Image, mib: int) -> MachineConfig:
    fill = mib // 2 if mib <= 256 else mib * 5 // 8  # MiB of data put in the guest's RAM
    seed = min(64, fill)
    cmd = (f"dd if=/dev/urandom of=/tmp/seed bs=1M count={seed} 2>/dev/null && "
           f"i=0; while [ $i -lt {fill // seed} ]; do cat /tmp/seed; i=$((i+1)); done > /tmp/fill && "
           "rm /tmp/seed && sync && free -m")
    return parse_config({
        "name": f"bench{mib}",
        "memory": f"{mib}M",
        "boot": {"kernel": str(img.kernel), "initrd": str(img.initrd),
                 "cmdline": micro.guest_cmdline(img.manifest.cmdline, run=cmd)},
        "network": None,
        "entropy": True,
        "readiness": {"serial_marker": micro.READY_MARKER, "timeout": 120},
    })


async def migration_done(vm: VirtualMachine, q: asyncio.Queue[VmEvent]) -> None:
    while True:
        ev = await q.get()
        if ev.kind == "qmp" and ev.detail.get("event") == "MIGRATION":
            status = ev.detail["data"]["status"]
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise SystemExit(f"migration {status}: {await vm.execute('query-migrate')}")


async def prepare(vm: VirtualMachine) -> None:
    await vm.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    await vm.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})


async def plain_save(vm: VirtualMachine, path: Path, *, fsync: bool) -> None:
    await prepare(vm)
    async with vm.subscribe() as q:
        await vm.execute("migrate", {"uri": f"exec:cat > {path}"})
        await migration_done(vm, q)
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


async def vmkit_save(vm: VirtualMachine, path: Path) -> None:
    await savestate.save_state(vm, path)


async def plain_restore(cfg: MachineConfig, work: Path, path: Path) -> None:
    async with VirtualMachine(cfg, work) as vm:
        await vm.start(incoming=True)
        await prepare(vm)
        async with vm.subscribe() as q:
            await vm.execute("migrate-incoming", {"uri": f"exec:cat {path}"})
            await migration_done(vm, q)
        await vm.stop()


async def vmkit_restore(cfg: MachineConfig, work: Path, path: Path) -> None:
    async with VirtualMachine(cfg, work) as vm:
        await savestate.restore_state(vm, path)
        await vm.stop()


async def timed(fn: Callable[[], Awaitable[None]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def bench_size(img: Image, mib: int, repeat: int, d: Path) -> dict[str, object]:
    cfg = config(img, mib)
    plain_file, vmkit_file = d / f"plain-{mib}.bin", d / f"vmkit-{mib}.vmstate"
    times: dict[str, list[float]] = {k: [] for k in ("save plain", "save plain+fsync", "save vmkit",
                                                     "restore plain", "restore vmkit")}
    async with VirtualMachine(cfg, d / f"vm-{mib}") as vm:
        await vm.start()
        await vm.wait_ready()
        m = await asyncio.wait_for(vm.serial.wait_for_regex(r"^VMKIT-RUN-END rc=(\d+)"), 600)
        if m.group(1) != "0":
            raise SystemExit(f"filling the guest's memory failed:\n{vm.serial.tail_text(20)}")
        await vm.pause()

        async def between() -> None:  # QEMU migrates a paused machine only once: let it run a moment
            await vm.resume()
            await vm.pause()

        cases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("save plain", lambda: plain_save(vm, plain_file, fsync=False)),
            ("save plain+fsync", lambda: plain_save(vm, plain_file, fsync=True)),
            ("save vmkit", lambda: vmkit_save(vm, vmkit_file)),
        ]
        for i in range(repeat):
            for name, fn in cases[i % 3:] + cases[: i % 3]:  # rotate the order: no case always goes first
                (vmkit_file if name.endswith("vmkit") else plain_file).unlink(missing_ok=True)
                await between()
                times[name].append(await timed(fn))
                settle(plain_file, vmkit_file)
        await vm.stop()
    # restore the files of the last round (the same idle guest, a moment apart)
    for i in range(repeat):
        order = ["plain", "vmkit"] if i % 2 == 0 else ["vmkit", "plain"]
        for which in order:
            if which == "plain":
                times["restore plain"].append(await timed(lambda: plain_restore(cfg, d / "r-plain", plain_file)))
            else:
                times["restore vmkit"].append(await timed(lambda: vmkit_restore(cfg, d / "r-vmkit", vmkit_file)))
    return {"mib": mib, "times": times, "plain_bytes": plain_file.stat().st_size,
            "vmkit_bytes": vmkit_file.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024", help="guest RAM sizes in MiB, comma-separated")
    ap.add_argument("--repeat", type=int, default=9, help="runs per case (the host disk's speed varies)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    args = ap.parse_args()
    img = image()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="vmkit-save-bench-") as tmp:
        os.environ["VMKIT_HOME"] = str(Path(tmp) / "home")  # a throw-away state key
        keys.load_or_create_key()
        results = [asyncio.run(bench_size(img, int(s), args.repeat, Path(tmp))) for s in args.sizes.split(",")]

    print(f"QEMU migration of a paused micro guest with filled RAM; {args.repeat} runs per case, median (best)")
    print("the host's page-cache writes vary a lot when other work runs on it: compare the best times too")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows: list[list[object]] = []
    for r in results:
        times: dict[str, list[float]] = r["times"]  # type: ignore[assignment]
        mib = f"{r['mib']}M"
        payload_mib = int(r["plain_bytes"]) / (1 << 20)  # type: ignore[call-overload]
        for name, samples in times.items():
            med, best = med_best(samples)
            base = "save plain" if name.startswith("save") else "restore plain"
            vs = ratio(samples, times[base]) if name.endswith("vmkit") else ""
            rows.append([mib, name, f"{med:.3f} ({best:.3f})", f"{payload_mib / med:.0f}", vs])
        rows.append([mib, "save vmkit / plain+fsync", "", "", ratio(times["save vmkit"], times["save plain+fsync"])])
    print_table(["guest", "case", "seconds", "MiB/s", "vs plain"], rows, left=2)
    print()
    sizes = []
    for r in results:
        pb, vb = int(r["plain_bytes"]), int(r["vmkit_bytes"])  # type: ignore[call-overload]
        sizes.append([f"{r['mib']}M", pb, vb, f"{vb / pb:.4f}x"])
    print_table(["guest", "plain file (B)", "vmkit file (B)", "vmkit / plain"], sizes)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
