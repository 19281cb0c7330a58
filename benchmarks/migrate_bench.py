#!/usr/bin/env python3
"""Live migration between two hosts of scripts/lab.sh: vmkit against the same migration driven with
plain QMP, and the correctness check (every memory page compared after each migration).

    python benchmarks/migrate_bench.py                 # the table (micro guest, 256 MiB)
    python benchmarks/migrate_bench.py --memory 1G
    python benchmarks/migrate_bench.py --check 10      # correctness mode: 10 runs per case, bad pages counted

Cases: an idle guest and one dirtying memory (two busybox loops rewriting 16 MiB tmpfs files), live
pre-copy, auto-converge, post-copy, the safe (paused) copy vmkit picks for 2 TCG vCPUs, and plain QMP
(two bare QEMUs, `migrate` and `query-migrate` by hand; with 2 vCPUs it shows what QEMU 7.2's lost
dirty tracking does). Every run is checked: source and target RAM hashed page by page after completion.
A vmkit `--live` run whose check found lost pages is undone and redone paused: its method reads
`paused(redone)`, and the bad pages column counts the final copy.

Needs root (the lab's network namespaces). Brings the lab up if it is down, and down again after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from vmkit.config import parse_size  # noqa: E402
from vmkit.host.images import micro  # noqa: E402
from vmkit.runtime import migration  # noqa: E402

LAB = Path(os.environ.get("VMKIT_LAB_DIR", "/tmp/vmklab"))
TARGET_NS, TARGET_ADDR = "vmklab1", "10.231.0.11"
TARGET = f"ssh://root@{TARGET_ADDR}"
DIRTIER = ("mkdir -p /d && mount -t tmpfs -o size=100m tmpfs /d && head -c 16m /dev/urandom > /d/a && "
           "head -c 16m /dev/zero > /d/z && for i in 1 2; do (while :; do cat /d/a > /d/b$i; cat /d/z > /d/b$i; "
           "done) & done; echo DIRTIER-UP")


def lab_up() -> bool:
    """Bring the lab up unless it is; True if this run did."""
    if (LAB / "ssh_config").exists():
        return False
    subprocess.run([str(REPO / "scripts" / "lab.sh"), "up", "2"], check=True, stdout=subprocess.DEVNULL)
    return True


def vmkit(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMKIT_HOME": str(home), "VMKIT_SSH_CONFIG": str(LAB / "ssh_config"),
           "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "vmkit.cli.main", *args], capture_output=True, text=True,
                          env=env, check=check, timeout=900)


def cmdline(dirty: bool) -> str:
    return "vmkit.counter=1" + (" " + micro.run_parameter(DIRTIER) if dirty else "")


def run_vmkit(home: Path, name: str, memory: str, cpus: int, dirty: bool, flags: list[str]) -> dict[str, Any]:
    vmkit("create", name, "--image", "micro", "--memory", memory, "--cpus", str(cpus), "--cmdline",
          cmdline(dirty), home=home)
    try:
        vmkit("start", name, home=home)
        if dirty:
            vmkit("console", name, "--log", "--until", "DIRTIER-UP", "--timeout", "120", home=home)
            time.sleep(2)
        t0 = time.monotonic()
        res = vmkit("migrate", name, TARGET, "--verify", "--json", *flags, home=home, check=False)
        wall = time.monotonic() - t0
        if res.returncode != 0:
            return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:100], "wall_s": wall}
        out = json.loads(res.stdout)
        rep = out["report"]
        redone = any("done again with the guest paused" in n for n in out["notes"])
        return {"wall_s": wall, "total_ms": rep["total_time_ms"], "downtime_ms": rep["downtime_ms"],
                "paused_ms": rep["paused_ms"], "rounds": rep["rounds"], "mib": rep["transferred_bytes"] / 2**20,
                "method": rep["method"] + ("(redone)" if redone else ""), "bad": out["bad_pages"]}
    finally:
        vmkit("--host", TARGET, "delete", "--force", name, home=home, check=False)
        vmkit("delete", "--force", name, home=home, check=False)


# -- plain QMP ------------------------------------------------------------------------------------------
async def _qmp(path: str) -> Any:
    from qemu.qmp import QMPClient

    c = QMPClient("bench")
    for _ in range(200):
        try:
            await c.connect(path)
            return c
        except (OSError, Exception):
            await asyncio.sleep(0.05)
    raise RuntimeError(f"no QMP at {path}")


def _hash_file(path: Path) -> bytes:
    out = bytearray()
    with path.open("rb") as fh:
        while chunk := fh.read(4096 * 256):
            for off in range(0, len(chunk), 4096):
                out += hashlib.blake2b(chunk[off:off + 4096], digest_size=8).digest()
    return bytes(out)


async def plain_qmp(work: Path, memory: str, cpus: int, dirty: bool) -> dict[str, Any]:
    """The same migration with two bare QEMUs and QMP by hand (no vmkit)."""
    img = Path(os.environ.get("VMKIT_IMAGE_CACHE", REPO / ".cache" / "images")) / "micro"
    mem_mib = parse_size(memory) >> 20
    base = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-M", "q35", "-cpu", "max", "-m", str(mem_mib),
            "-smp", str(cpus), "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"),
            "-append", f"console=ttyS0 panic=-1 quiet {cmdline(dirty)}", "-display", "none", "-nodefaults",
            "-no-user-config"]
    port = random.randint(20000, 60000)  # in the target's namespace: nothing else listens there
    src_log, dst_log = work / "src.log", work / "dst.log"
    src_argv = [*base, "-serial", f"file:{src_log}", "-qmp", f"unix:{work}/src.qmp,server=on,wait=off"]
    dst_argv = ["ip", "netns", "exec", TARGET_NS, *base, "-serial", f"file:{dst_log}", "-qmp",
                f"unix:{work}/dst.qmp,server=on,wait=off", "-incoming", f"tcp:{TARGET_ADDR}:{port}",
                "-S"]  # the target stays paused after the migration, so that its memory can be compared
    src = subprocess.Popen(src_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
    dst = subprocess.Popen(dst_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
    try:
        s_qmp, d_qmp = await _qmp(f"{work}/src.qmp"), await _qmp(f"{work}/dst.qmp")
        marker = "DIRTIER-UP" if dirty else "VMKIT-READY"
        for _ in range(1200):
            if src_log.exists() and marker in src_log.read_text(errors="replace"):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        await s_qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        t0 = time.monotonic()
        await s_qmp.execute("migrate", {"uri": f"tcp:{TARGET_ADDR}:{port}"})
        info: dict[str, Any] = {}
        while True:
            info = await s_qmp.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() - t0 > 300:
                await s_qmp.execute("migrate_cancel")
            await asyncio.sleep(0.25)
        wall = time.monotonic() - t0
        if info.get("status") != "completed":
            return {"error": f"plain QMP: {info.get('status')}", "wall_s": wall}
        for _ in range(200):  # the target has all of it once its own status says so
            if (await d_qmp.execute("query-migrate")).get("status") == "completed":
                break
            await asyncio.sleep(0.02)
        size = mem_mib << 20
        await s_qmp.execute("pmemsave", {"val": 0, "size": size, "filename": str(work / "src.mem")})
        await d_qmp.execute("pmemsave", {"val": 0, "size": size, "filename": str(work / "dst.mem")})
        bad = migration.bad_pages(_hash_file(work / "src.mem"), _hash_file(work / "dst.mem"))
        ram = info.get("ram", {})
        await s_qmp.disconnect()
        await d_qmp.disconnect()
        return {"wall_s": wall, "total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
                "paused_ms": info.get("downtime"), "rounds": ram.get("dirty-sync-count"),
                "mib": ram.get("transferred", 0) / 2**20, "method": "live (plain QMP)", "bad": len(bad)}
    finally:
        for p in (src, dst):
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
            p.wait(10)
        for f in ("src.mem", "dst.mem"):
            with contextlib.suppress(FileNotFoundError):
                (work / f).unlink()


CASES: list[tuple[str, int, bool, list[str] | None]] = [
    # label, vCPUs, dirtier, vmkit flags (None: plain QMP)
    ("idle, vmkit --live (verified)", 1, False, ["--live"]),
    ("idle, vmkit default (paused here)", 1, False, []),
    ("idle, plain QMP live", 1, False, None),
    ("dirtying, vmkit --live (verified)", 1, True, ["--live"]),
    ("dirtying, vmkit default (paused here)", 1, True, []),
    ("dirtying, plain QMP live", 1, True, None),
    ("dirtying, --live --auto-converge", 1, True, ["--live", "--auto-converge"]),
    ("dirtying, --postcopy", 1, True, ["--live", "--postcopy"]),
    ("dirtying 2 vCPUs, vmkit default (paused)", 2, True, []),
    ("dirtying 2 vCPUs, plain QMP live", 2, True, None),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--runs", type=int, default=1, help="runs per case (the table shows medians)")
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="correctness mode: N runs of the dirtying cases, bad pages counted")
    ap.add_argument("--only", default="", help="run only cases whose label contains this")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces): run as root", file=sys.stderr)
        return 2
    brought = lab_up()
    home = Path(tempfile.mkdtemp(prefix="vmkit-mbench-"))
    work = Path(tempfile.mkdtemp(prefix="vmkit-mqmp-"))
    runs = args.check or args.runs
    cases = [c for c in CASES if args.only in c[0] and (not args.check or c[2])]
    try:
        print(f"# migrate_bench: micro guest, {args.memory}, {runs} run(s) per case; load: "
              f"{Path('/proc/loadavg').read_text().split()[:3]}")
        hdr = (f"{'case':40} {'method':18} {'total ms':>9} {'QEMU downtime':>13} {'paused ms':>9} {'rounds':>6} "
               f"{'MiB':>6} {'wall s':>7} {'bad pages':>9}")
        print(hdr)
        print("-" * len(hdr))
        medians: dict[str, float] = {}
        for label, cpus, dirty, flags in cases:
            results = []
            for i in range(runs):
                name = f"mb{i}"
                r = (run_vmkit(home, name, args.memory, cpus, dirty, flags) if flags is not None
                     else asyncio.run(plain_qmp(work, args.memory, cpus, dirty)))
                results.append(r)
            ok = [r for r in results if "error" not in r]
            errs = [r["error"] for r in results if "error" in r]
            if not ok:
                print(f"{label:40} failed: {errs[0]}")
                continue

            def med(k: str, rows: list[dict[str, Any]] = ok) -> float:
                vals = [float(r[k]) for r in rows if r.get(k) is not None]
                return statistics.median(vals) if vals else float("nan")

            bad = [int(r["bad"]) for r in ok]
            shown = "/".join(map(str, bad)) if runs <= 5 else f"{sum(b > 0 for b in bad)}/{len(bad)} runs bad"
            medians[label] = med("total_ms")
            methods = "/".join(str(r["method"]) for r in ok) if runs <= 3 else ok[0]["method"]
            print(f"{label:40} {methods:18} {med('total_ms'):9.0f} {med('downtime_ms'):13.0f} "
                  f"{med('paused_ms'):9.0f} {med('rounds'):6.0f} {med('mib'):6.0f} {med('wall_s'):7.1f} "
                  f"{shown:>9}" + (f"  ({len(errs)} failed: {errs[0]})" if errs else ""))
        for a, b in (("idle, vmkit --live (verified)", "idle, plain QMP live"),
                     ("dirtying, vmkit --live (verified)", "dirtying, plain QMP live")):
            if a in medians and b in medians and medians[b]:
                ratio = medians[a] / medians[b]
                print(f"ratio vmkit/plain QMP, QEMU total time ({a.split(',')[0]} live): {ratio:.2f}x")
        print(f"# load after: {Path('/proc/loadavg').read_text().split()[:3]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        if brought:
            subprocess.run([str(REPO / "scripts" / "lab.sh"), "down"], check=False, stdout=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
