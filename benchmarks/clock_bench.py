"""Guest clock under CPU oversubscription, with and without vmkit's periodic clock fix-up.

One Debian guest with twice as many vCPUs as the host has cores runs a busy loop on every vCPU for
``--duration`` seconds (the target: < 1 s drift over 30 minutes with the fix-up). Its clock is read
against the host's every ``--every`` seconds (``date +%s.%N`` through the guest agent; of three
readings the one with the shortest round trip, whose half is the reading's uncertainty). Two cases,
each on a freshly booted machine:

  off  ``clock_sync: {enabled: false}``: nothing corrects the guest's clock while it runs
  on   vmkit's default: the supervisor checks the clock every ``clock_sync.interval`` s (30) through
       the agent and sets it when it is off by more than ``clock_sync.threshold`` s (0.25)

Drift is the change of the offset (guest - host) from the first reading; the table shows the last
and the largest. The target is checked on the drift without the fix-up, and with it on the offset
itself after the first reading (a guest comes out of its boot up to a second off, the RTC's
resolution; the fix-up's first correction of that would otherwise count as drift).

With ``--together`` both cases run at the same time, one guest each with as many vCPUs as the host
has cores (so twice as many busy vCPUs as cores on the host, as before): the two see the same load,
and the run takes half as long.

    .venv/bin/python benchmarks/clock_bench.py [--duration 1800] [--every 60] [--cases off,on] [--vcpus N] [--together]
"""

from __future__ import annotations

import argparse
import os
import time

import vmkit
from _guests import debian, load, scratch_home
from _table import print_table
from vmkit.errors import VmkitError

BUSY = ("for i in $(seq $(nproc)); do setsid nice -n 19 sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 & "
        "done; nproc")
"""A busy loop on every vCPU, at the lowest priority: the vCPUs are always busy for the host, and the guest
agent (which reads the clock) still gets its turn in the guest."""


def offset(inst: vmkit.Instance) -> tuple[float, float]:
    """(guest - host, uncertainty) in seconds: the best of three readings."""
    best: tuple[float, float] | None = None
    for attempt in range(6):
        if best is not None and attempt >= 3:
            break
        t0 = time.time()
        try:
            res = inst.exec(["date", "+%s.%N"], timeout=60)
        except VmkitError as exc:  # the agent starved for a moment: read again
            print(f"  (reading failed: {exc.message})", flush=True)
            continue
        t1 = time.time()
        guest = float(res.stdout.decode().strip())
        reading = (guest - (t0 + t1) / 2, (t1 - t0) / 2)
        if best is None or reading[1] < best[1]:
            best = reading
    if best is None:
        raise SystemExit("the guest agent did not answer six times in a row")
    return best


class Case:
    """One machine's readings: its first offset, the drift since then, the worst of both."""

    def __init__(self, inst: vmkit.Instance, fixup: bool, vcpus: str) -> None:
        self.inst, self.fixup = inst, fixup
        print(f"{self.label}: busy loops on {vcpus} vCPUs", flush=True)
        self.first, self.worst_unc = offset(inst)
        self.worst = self.last = 0.0
        self.largest = abs(self.first)
        self.largest_later = 0.0
        """The largest |offset| after the first reading: with the fix-up, the guest's error once it had its
        first chance to correct a clock that came out of the boot off (by the RTC's whole seconds)."""

    @property
    def label(self) -> str:
        return "on" if self.fixup else "off"

    def read(self, at: float) -> None:
        off, unc = offset(self.inst)
        self.last = off - self.first
        self.worst_unc = max(self.worst_unc, unc)
        self.largest = max(self.largest, abs(off))
        self.largest_later = max(self.largest_later, abs(off))
        if abs(self.last) > abs(self.worst):
            self.worst = self.last
        print(f"  {self.label:>3} {at:7.0f} s  offset {off:+.3f} s  drift {self.last:+.3f} s"
              f"  (+-{unc:.3f})", flush=True)

    @property
    def error(self) -> float:
        """What the target (< 1 s) is checked on: without the fix-up the drift (the boot's first offset
        is not the run's doing), with it the offset itself once it has had a chance to act."""
        return self.largest_later if self.fixup else abs(self.worst)

    def row(self, duration: float) -> list[object]:
        fixes = sum(1 for e in (self.inst.directory / "supervisor.log").read_text().splitlines()
                    if "guest clock was" in e)
        return ["vmkit clock fix-up" if self.fixup else "none (clock_sync off)", f"{duration:.0f}",
                f"{self.first:+.3f}", f"{self.last:+.3f}", f"{self.worst:+.3f}", f"{self.largest:.3f}",
                f"{self.largest_later:.3f}", f"{self.worst_unc:.3f}", fixes, f"{self.error:.3f}",
                "yes" if self.error < 1.0 else "no"]


def run_cases(fixups: list[bool], vcpus: int, duration: float, every: float) -> list[list[object]]:
    """Machines for ``fixups`` booted in one home, all busy at once for ``duration`` seconds, read in turn."""
    with scratch_home("vmkit-clock-") as client:
        insts = [debian(client, f"clock-{'on' if f else 'off'}", memory="1G", cpus=vcpus, clock_sync={"enabled": f})
                 for f in fixups]
        cases = [Case(inst, f, inst.exec(["sh", "-c", BUSY], timeout=60).stdout.decode().strip())
                 for inst, f in zip(insts, fixups, strict=True)]
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < duration:
            time.sleep(min(every, max(0.0, duration - elapsed)))
            for case in cases:
                case.read(time.monotonic() - start)
        rows = [case.row(duration) for case in cases]
        for inst in insts:
            inst.stop(force=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of busy loops per case (target: 30 min)")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between two readings")
    ap.add_argument("--cases", default="off,on", help="off: no fix-up; on: vmkit's periodic fix-up")
    ap.add_argument("--vcpus", type=int, default=None, help="each guest's vCPUs (default: twice the host's "
                    "cores, or with --together the host's cores: the guests together have twice as many)")
    ap.add_argument("--together", action="store_true", help="run the cases side by side (one guest each, at the "
                    "same time: same conditions, half the time) instead of one after the other")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    fixups = [c == "on" for c in args.cases.split(",")]
    vcpus = args.vcpus or (cores if args.together else 2 * cores)
    if args.together:
        rows = run_cases(fixups, vcpus, args.duration, args.every)
        how = f"{len(fixups)} Debian guests side by side, {vcpus} busy vCPUs each"
    else:
        rows = [row for f in fixups for row in run_cases([f], vcpus, args.duration, args.every)]
        how = f"a Debian guest with {vcpus} busy vCPUs, one case after the other"
    print()
    print(f"{how}: {len(fixups if args.together else fixups[:1]) * vcpus} busy vCPUs on {cores} host CPUs, "
          f"{args.duration:.0f} s per case; offsets are guest - host (negative: behind)")
    print(load())
    print("error: without the fix-up the largest drift from the first reading; with it the largest |offset| "
          "after the first reading (the fix-up corrects the offset the boot left, which shows as drift)")
    print_table(["fix-up", "seconds", "first offset", "drift at end", "largest drift", "largest |offset|",
                 "|offset| later", "+- (worst)", "fixes", "error", "< 1 s"], rows)


if __name__ == "__main__":
    main()
