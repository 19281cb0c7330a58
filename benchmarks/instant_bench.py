"""Instant start: new Debian machines cloned from a warm template vs cold-booted, and their host memory.

- start: ``vmkit start`` (``Instance.start``) until the machine is ready with its new hostname: for a
  clone that is when start returns (restore, agent, identity, clock); for a cold boot start returns
  when the agent answers, and the benchmark then waits until the guest's hostname is the machine's
  name. Same image, memory and vCPUs; the cold machine is created the same way and started with
  ``cold=True`` (``vmkit start --cold``). Medians and best of ``--runs``.
- memory: 1, 4 and 8 idle clones of one template vs as many cold-booted guests; after ``--settle``
  seconds the sum over their QEMUs of the proportional set size (Pss in /proc/PID/smaps_rollup: a
  page shared by k processes counts 1/k in each) and of the RSS.

The template is made first if the image has no current one (``vmkit image warm``, untimed).

    .venv/bin/python benchmarks/instant_bench.py [--image debian-12] [--memory 1G] [--runs 5] [--counts 1,4,8]
    .venv/bin/python benchmarks/instant_bench.py --quick     # 1 run each, memory with 2 guests
    .venv/bin/python benchmarks/instant_bench.py --profile --runs 5   # where a warm start's time goes

``--profile`` runs only warm starts and prints the median of each phase: in the calling process until
the supervisor process exists, the supervisor's own start until ``POST /v1/start``, then the phases the
supervisor reports (QEMU started, device state loaded, resumed, the identity script, which also sets the
clock), each step of the identity script as the guest timed it (its /proc/uptime at each step's start; "shell":
from the shell's start, as its /proc/PID/stat says, to its first step) and the
rest of the script's time (the agent starting the shell, the host's polls), the way back to the caller, and the
``hostname`` check.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import vmkit
from _guests import MiB, edit_config, load, scratch_home
from _table import med_best, print_table


def proc_mem(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of one process in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        fields[key.rstrip(":")] = int(value) << 10
    return fields.get("Pss", 0), fields.get("Rss", 0)


def patient(inst: vmkit.Instance, *, cold: bool) -> vmkit.Instance:
    """A cold machine waits up to 1800 s for its first boot (8 at once on a loaded host take longer than
    the default 300 s); a clone keeps the template's layout (the readiness timeout is not part of it)."""
    if cold:
        edit_config(inst, readiness={**inst.config.readiness.model_dump(), "timeout": 1800.0})
    return inst


def ready_with_hostname(inst: vmkit.Instance, *, cold: bool, timeout: float = 900.0) -> float:
    """Seconds from ``start`` until the guest answers with its own hostname."""
    began = time.monotonic()
    result = inst.start(cold=cold, timeout=timeout)
    if not cold and result.template is None:
        raise SystemExit(f"{inst.name} did not start from the template: {result.fallback}")
    while time.monotonic() - began < timeout:
        if inst.exec(["hostname"]).stdout.decode().strip() == inst.name:
            return time.monotonic() - began
        time.sleep(0.2)
    raise SystemExit(f"{inst.name}: hostname never became {inst.name}")


NETWORK = "ibench"


def nics(args: argparse.Namespace) -> dict[str, object]:
    """``--network``: the machines' one NIC is on a vmkit nat network (``vmkit create --network NETWORK``)."""
    return {"networks": [NETWORK]} if args.network else {}


def profile(client: vmkit.Client, args: argparse.Namespace) -> None:
    """Where the seconds of a warm start go (medians over ``--runs``)."""
    runs: list[dict[str, float]] = []
    for i in range(args.runs):
        inst = client.create(f"p{i}", image=args.image, memory=args.memory, cpus=args.cpus, **nics(args))
        began = time.time()
        result = inst.start(timeout=900)
        returned = time.time()
        if result.template is None:
            raise SystemExit(f"{inst.name} did not start from the template: {result.fallback}")
        if inst.exec(["hostname"]).stdout.decode().strip() != inst.name:
            raise SystemExit(f"{inst.name}: the hostname is not {inst.name} when start returns")
        checked = time.time()
        t = result.template
        phases: dict[str, float] = t["phases"]
        row = {"caller, until the supervisor process exists": t["process_started"] - began,
               "supervisor start-up, until POST /v1/start": t["began_at"] - t["process_started"]}
        row.update(phases)
        row.update({f"  of which, side by side: {k}": v for k, v in t.get("parallel", {}).items()})
        steps: dict[str, float] = t.get("identity_steps", {})
        row.update({f"  identity script in the guest: {k}": v for k, v in steps.items()})
        if steps:
            rest = t["personalize_seconds"] - sum(steps.values())
            row["  identity script: the rest (the agent starting the shell, polls)"] = rest
        row["back to the caller"] = returned - t["began_at"] - sum(phases.values())
        row["hostname check (vmkit exec)"] = checked - returned
        row["total"] = checked - began
        runs.append(row)
        inst.stop(force=True)
        inst.delete(force=True)
    print_table(["phase of a warm start", "median s", "min s", "max s"],
                [[k, f"{statistics.median(r[k] for r in runs):.3f}", f"{min(r[k] for r in runs):.3f}",
                  f"{max(r[k] for r in runs):.3f}"] for k in runs[0]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="debian-12")
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--counts", default="1,4,8", help="how many idle guests to measure memory with")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds the guests idle before memory is read")
    ap.add_argument("--quick", action="store_true", help="1 run each, memory with 2 guests")
    ap.add_argument("--profile", action="store_true", help="only warm starts: the median time of each phase")
    ap.add_argument("--network", action="store_true", help="the machines' one NIC on a vmkit nat network (start "
                    "and profile; root): a clone's start then includes its DHCP lease")
    args = ap.parse_args()
    runs, counts = (1, [2]) if args.quick else (args.runs, [int(c) for c in args.counts.split(",")])
    print(f"# instant start: {args.image}, {args.memory}, {args.cpus} vCPU; {load()}")
    with scratch_home("vmkit-instant-") as client:
        tpl, made = client.warm_image(args.image, memory=args.memory, cpus=args.cpus)
        print(f"# template {tpl.path} ({'made now' if made else 'current'}; its boot took {tpl.boot_seconds:.0f} s)")
        if args.network:
            client.create_network(NETWORK, mode="nat")
        try:
            bench(client, args, runs, counts)
        finally:
            if args.network:
                for inst in client.list():
                    inst.delete(force=True)
                client.delete_network(NETWORK, force=True)


def bench(client: vmkit.Client, args: argparse.Namespace, runs: int, counts: list[int]) -> None:
    """The profile, or the start times and the memory."""
    if args.profile:
        profile(client, args)
        return
    warm_s: list[float] = []
    cold_s: list[float] = []
    for i in range(runs):
        for cold, samples in ((False, warm_s), (True, cold_s)):
            inst = client.create(f"{'c' if cold else 'w'}{i}", image=args.image, memory=args.memory,
                                 cpus=args.cpus, **nics(args))
            samples.append(ready_with_hostname(patient(inst, cold=cold), cold=cold))
            inst.stop(force=True)
            inst.delete(force=True)
    (wm, wb), (cm, cb) = med_best(warm_s), med_best(cold_s)
    print_table(["start to ready with its hostname", "median s", "best s", "runs"],
                [["warm (cloned from the template)", f"{wm:.2f}", f"{wb:.2f}", runs],
                 ["cold (booted)", f"{cm:.2f}", f"{cb:.2f}", runs]])
    print(f"speed-up: {cm / wm:.1f}x (median), {cb / wb:.1f}x (best); target: warm <= 2 s, >= 10x")
    print()
    rows = []
    for n in counts:
        sums = {}
        for cold in (False, True):
            machines = [patient(client.create(f"m{'c' if cold else 'w'}{i}", image=args.image, memory=args.memory,
                                              cpus=args.cpus), cold=cold) for i in range(n)]
            with ThreadPoolExecutor(n) as pool:  # started side by side (as guests of a busy host are)
                list(pool.map(lambda m, c=cold: m.start(cold=c, timeout=1800), machines))
            time.sleep(args.settle)
            pids = [m.status().qemu_pid for m in machines]
            mem = [proc_mem(p) for p in pids if p is not None]
            sums[cold] = (sum(p for p, _ in mem), sum(r for _, r in mem))
            for m in machines:
                m.stop(force=True)
                m.delete(force=True)
        (wp, wr), (cp, cr) = sums[False], sums[True]
        rows.append([n, f"{wp / MiB:.0f}", f"{wr / MiB:.0f}", f"{cp / MiB:.0f}", f"{cr / MiB:.0f}",
                     f"{(cp - wp) / MiB:.0f} ({1 - wp / cp:.0%})" if cp else "-"])
    print_table(["guests", "clones Pss MiB", "clones RSS MiB", "cold Pss MiB", "cold RSS MiB", "saved (Pss)"],
                rows, left=1)

if __name__ == "__main__":
    main()
