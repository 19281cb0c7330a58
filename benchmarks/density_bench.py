"""Density: N identical idle Debian guests with KSM (kernel same-page merging) off, then on.

The guests boot one after another (cold: a warm template's clones would share its pages through the
page cache before KSM starts; ``--warm`` measures them) with KSM off (``run=2`` first: nothing of theirs is merged) and
idle until QEMU's resident memory is steady. Then ``vmkit host ksm on`` (``run=1``,
``pages_to_scan=500``, or ``--pages-to-scan``) and the benchmark watches for ``--duration`` seconds
(the target is >= 30 % of their combined memory shared within 15 minutes):

- host memory per guest: the proportional set size (Pss in /proc/PID/smaps_rollup) of each QEMU: a
  page KSM merged between k guests counts 1/k in each (RSS would count it k times);
- what QEMU's RSS is made of (/proc/PID/smaps): the guest's RAM (the anonymous mapping of exactly
  its memory size: all KSM can merge) and, under TCG, the translated-code cache (the rwx mappings;
  QEMU 7.2's default tb-size is 1 GiB: hundreds of MiB per busy guest that no guest page is in);
- merged: the guests' pages KSM merged (/proc/PID/ksm_merging_pages) as a share of their combined
  resident guest RAM, and of their combined RSS, with KSM off;
- KSM's CPU cost: ksmd's CPU time (/proc/PID/stat of the kernel thread) over the time watched;
- at the end, the most KSM could merge: every non-zero page of the guests' RAM is hashed (read
  through /proc/PID/mem) and the pages whose content appears more than once are counted.

``vmkit host ksm on`` turns the kernel's ``smart_scan`` off (kernels 6.7+), as this benchmark does.

KSM is host-wide: other programs' mergeable memory is scanned too, and its settings are put back
as they were at the end.

    .venv/bin/python benchmarks/density_bench.py [--guests 3] [--memory 1024] [--duration 900] [--every 30]
                                                 [--pages-to-scan N] [--tcg-cache SIZE] [--warm]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections import Counter
from pathlib import Path

from _guests import MiB, debian, load, scratch_home, settle_rss
from _table import print_table
from vmkit.host import ksm
from vmkit.runtime import migration
from vmkit.runtime.balloon import cpu_seconds
from vmkit.runtime.qemu import dirtysync

PAGE = os.sysconf("SC_PAGE_SIZE")


def pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) << 10
    return 0


def merging(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/ksm_merging_pages").read_text()) * PAGE
    except (FileNotFoundError, ValueError):
        return 0


def ksmd_pid() -> int:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "ksmd":
                    return int(d.name)
            except OSError:
                continue
    raise SystemExit("no ksmd kernel thread: this kernel has no KSM")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    return 0


def is_guest_ram(size: int, perms: str, memory: int) -> bool:
    """Whether a mapping of QEMU's is the guest's RAM: read-write, not executable (TCG's code buffer is
    rwx), of the guest's memory size, or 8 KiB more on TCG with QEMU < 9.0 (vmkit.runtime.qemu.dirtysync)."""
    return perms == "rw-p" and size in (memory, memory + dirtysync.RAM_PAD)


def split(pid: int, memory: int) -> tuple[int, int]:
    """(resident guest RAM, resident TCG code cache) of QEMU ``pid``, from its smaps."""
    ram = tcg = 0
    perms, size = "", 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            perms = head[1]
        elif head[0] == "Size:":
            size = int(head[1]) << 10
        elif head[0] == "Rss:":
            if is_guest_ram(size, perms, memory):
                ram += int(head[1]) << 10
            elif perms == "rwxp":
                tcg += int(head[1]) << 10
    return ram, tcg


def snapshot(pids: list[int], memory: int) -> tuple[int, int, int, int, int]:
    parts = [split(p, memory) for p in pids]
    return (sum(rss(p) for p in pids), sum(pss(p) for p in pids), sum(merging(p) for p in pids),
            sum(r for r, _ in parts), sum(t for _, t in parts))


def guest_ram_hashes(pid: int, memory: int) -> list[int]:
    """The hash of every non-zero page of QEMU ``pid``'s guest RAM (its mapping of exactly ``memory``
    bytes, read through /proc/PID/mem; pages never touched read as zeros and are left out)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        span, perms = line.split()[:2]
        lo, hi = (int(x, 16) for x in span.split("-"))
        if is_guest_ram(hi - lo, perms, memory):
            with open(f"/proc/{pid}/mem", "rb") as fh:
                fh.seek(lo)
                digest = migration.page_hashes(fh, hi - lo)
            zero = migration.page_hashes(io.BytesIO(bytes(PAGE)))
            step = migration.DIGEST_BYTES
            return [int.from_bytes(digest[i:i + step], "little") for i in range(0, len(digest), step)
                    if digest[i:i + step] != zero]
    return []


def identical(pids: list[int], memory: int) -> tuple[int, int]:
    """(pages with content, pages whose content another page of these guests also holds): what KSM could
    merge at most. Taken with the guests paused would be exact; they are idle, so it is close."""
    seen = Counter(h for pid in pids for h in guest_ram_hashes(pid, memory))
    return sum(seen.values()), sum(n for n in seen.values() if n > 1)


def write_knob(name: str, value: int) -> None:
    (ksm.SYSFS / name).write_text(f"{value}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guests", type=int, default=3, help="how many identical guests")
    ap.add_argument("--memory", type=int, default=1024, help="each guest's memory in MiB")
    ap.add_argument("--duration", type=float, default=900.0, help="seconds to watch with KSM on (target: 15 min)")
    ap.add_argument("--every", type=float, default=30.0, help="seconds between two readings")
    ap.add_argument("--pages-to-scan", type=int, default=ksm.PAGES_TO_SCAN,
                    help="KSM's pages per wake-up (`vmkit host ksm on --pages-to-scan`): fewer costs ksmd less CPU "
                         "and merges later")
    ap.add_argument("--tcg-cache", metavar="SIZE", default=None,
                    help="the guests' tcg_cache (QEMU's tb-size under TCG, e.g. 128M; default QEMU's 1G)")
    ap.add_argument("--warm", action="store_true",
                    help="restore the guests from the image's warm template (instant start) instead of booting them: "
                         "clones already share the template's pages through the page cache, KSM only sees their copies")
    args = ap.parse_args()
    before = ksm.status()
    ksmd = ksmd_pid()
    rows: list[list[object]] = []
    try:
        write_knob("run", ksm.RUN_UNMERGE)
        with scratch_home("vmkit-density-") as client:
            fields = {"tcg_cache": args.tcg_cache} if args.tcg_cache else {}
            insts, boots = [], []
            for i in range(args.guests):
                t0 = time.monotonic()
                insts.append(debian(client, f"d{i}", memory=f"{args.memory}M", cold=not args.warm, **fields))
                boots.append(time.monotonic() - t0)
            for inst in insts:
                settle_rss(inst, window=15)
            pids = [int(inst.status().qemu_pid or 0) for inst in insts]
            write_knob("run", ksm.RUN_STOP)
            memory = args.memory * MiB
            r0, p0, _, ram0, tcg0 = snapshot(pids, memory)
            combined, combined_ram = r0, ram0 or r0  # (no mapping of the guest's size found: RSS)
            n = args.guests
            rows.append(["off", "0", f"{r0 / n / MiB:.0f}", f"{ram0 / n / MiB:.0f}", f"{tcg0 / n / MiB:.0f}",
                         f"{p0 / n / MiB:.0f}", "0", "0.0 %", "0.0 %", "0.0", "-"])
            ksm.enable(pages_to_scan=args.pages_to_scan)
            start, cpu0 = time.monotonic(), cpu_seconds(ksmd)
            reached: float | None = None
            while (elapsed := time.monotonic() - start) < args.duration:
                time.sleep(min(args.every, max(0.0, args.duration - elapsed)))
                elapsed = time.monotonic() - start
                r, p, m, ram, tcg = snapshot(pids, memory)
                cpu = cpu_seconds(ksmd) - cpu0
                share = m / combined_ram
                if reached is None and share >= 0.30:
                    reached = elapsed
                rows.append(["on", f"{elapsed:.0f}", f"{r / n / MiB:.0f}", f"{ram / n / MiB:.0f}",
                             f"{tcg / n / MiB:.0f}", f"{p / n / MiB:.0f}", f"{m / MiB:.0f}", f"{100 * share:.1f} %",
                             f"{100 * m / combined:.1f} %", f"{cpu:.1f}", f"{100 * cpu / elapsed:.1f} %"])
            pages, dup = identical(pids, memory)
            for inst in insts:
                inst.stop(force=True)
    finally:  # KSM as it was
        if before.smart_scan is not None:
            write_knob("smart_scan", before.smart_scan)
        write_knob("pages_to_scan", before.pages_to_scan)
        write_knob("sleep_millisecs", before.sleep_millisecs)
        write_knob("run", before.run)
    how = "restored from the warm template" if args.warm else "booted (cold)"
    print(f"{args.guests} identical idle Debian guests of {args.memory} MiB, {how}; KSM off, then on "
          f"(pages_to_scan={args.pages_to_scan}, sleep_millisecs={ksm.SLEEP_MILLISECS}, smart_scan="
          f"{'n/a' if before.smart_scan is None else int(ksm.SMART_SCAN)}) for {args.duration:.0f} s")
    print(f"tcg_cache {args.tcg_cache or 'QEMU default (1G)'}; `vmkit start` to agent answering, median of the "
          f"{args.guests} guests: {statistics.median(boots):.1f} s")
    print(f"with KSM off: combined RSS {combined / MiB:.0f} MiB, of which guest RAM {combined_ram / MiB:.0f} MiB; "
          "target: >= 30 % of the guest RAM merged within 15 min")
    print(load())
    print_table(["KSM", "seconds", "RSS/guest", "guest RAM", "TCG cache", "host/guest (Pss)", "merged MiB",
                 "of guest RAM", "of RSS", "ksmd CPU s", "ksmd CPU"], rows, left=1)
    print("(MiB per guest unless said otherwise)")
    verdict = f"reached after {reached:.0f} s" if reached is not None else f"not reached in {args.duration:.0f} s"
    print(f">= 30 % merged: {verdict}")
    print(f"at the end, {pages * PAGE / MiB:.0f} MiB of the guests' RAM held data (non-zero pages), and "
          f"{dup * PAGE / MiB:.0f} MiB ({100 * dup / max(pages, 1):.1f} %) of it had its content in another page of "
          "these guests: the most KSM could merge")


if __name__ == "__main__":
    main()
