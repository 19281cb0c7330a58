#!/usr/bin/env python3
"""How fast the commands a user types all day answer: ``vmkit --help``, ``vmkit list`` (empty, and
with 50 machines defined), ``vmkit list --json``, ``vmkit inspect``, side by side with ``virsh list
--all`` with the same number of domains defined where libvirt is installed (skipped, with the
reason, where not); then commands that ask a running machine's supervisor (``vmkit stats``,
``vmkit pause`` and ``resume``) on a micro guest, where its image is built (skipped where not), and
the time ``vmkit migrate``'s imports take, and the time a command spends after its work is done,
exiting (with and without vmkit's ``gc.freeze``). vmkit runs byte-compiled, as installed.

Each command runs ``--repeat`` times (after one untimed warm-up, which also fills ``vmkit list``'s
cache of the machines' sizes) as a fresh process with its output to a pipe, the way a script runs
it (on a terminal ``vmkit list`` draws a rich table: slower, by the import of rich); the table
shows the median and best wall time and the issue's targets (``--help`` <= 150 ms, ``list`` with 50
machines <= 300 ms, ``list`` <= 2x ``virsh list``).

    .venv/bin/python benchmarks/cli_bench.py [--machines 50] [--repeat 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import as_installed, med_best, print_table

ROOT = Path(__file__).resolve().parent.parent
VMKIT = [str(Path(sys.executable).with_name("vmkit"))]


def timed(argv: list[str], env: dict[str, str], repeat: int, *, warm: bool = True) -> list[float]:
    if warm:
        subprocess.run(argv, env=env, capture_output=True, check=True)  # warm the page cache
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True)
        samples.append(time.perf_counter() - t0)
    return samples


def define_machines(home: Path, n: int) -> None:
    """``n`` stopped micro-sized machines, written the way ``vmkit create`` writes them, a minute ago
    (``vmkit list`` re-reads a vm.yaml changed in the last two seconds every time; a user's machines
    were made before they list them)."""
    from vmkit.config import parse_config
    from vmkit.host.instance import Instance

    kernel = home / "vmlinuz"
    kernel.write_bytes(b"not a kernel: never booted")
    before = time.time() - 60
    for i in range(n):
        inst = Instance.create(parse_config({"name": f"m{i:03d}", "memory": "256M",
                                             "boot": {"kernel": str(kernel)}}), home / "instances")
        os.utime(inst.config_path, (before, before))


def running_machine(home: Path) -> tuple[str | None, str]:
    """A micro guest started in ``home`` (its name), or None and why not."""
    env = {**os.environ, "VMKIT_HOME": str(home)}
    made = subprocess.run([*VMKIT, "create", "r0", "--image", "micro", "--memory", "256M"], env=env,
                          capture_output=True, text=True)
    if made.returncode != 0:
        return None, (made.stderr.strip().splitlines() or ["?"])[0]
    subprocess.run([*VMKIT, "start", "r0"], env=env, capture_output=True, check=True, timeout=300)
    return "r0", ""


MIGRATE_IMPORTS = "import vmkit.cli.app, vmkit.cli.migrate, vmkit.client.sync, vmkit.migrate.send\n"
"""What `vmkit migrate` has loaded by the time it starts migrating."""
IMPORT_PROBE = ("import time\n"
                "from vmkit.cli import main\n"  # the entry point (the standard library only)
                "t = time.perf_counter()\n"
                + MIGRATE_IMPORTS + "print(time.perf_counter() - t)\n")


def import_cost(repeat: int) -> list[tuple[str, float, float]]:
    """How long importing what `vmkit migrate` loads takes (measured inside the process)."""
    return [("imports of `vmkit migrate`", *med_best([float(subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True).stdout)
        for _ in range(repeat)]))]


EXIT_PROBE = ("import gc, time\n" + MIGRATE_IMPORTS
              + "print(time.time(), flush=True)\n")  # the moment its work is done


def exit_cost(repeat: int) -> list[tuple[str, float, float]]:
    """How long the interpreter takes to exit after what `vmkit migrate` imports, plain and after
    ``gc.freeze()`` (what vmkit.cli.main does, counted in): from the moment the process prints that its
    work is done to the moment this one sees it gone."""
    def runs(tail: str) -> tuple[float, float]:
        samples = []
        for _ in range(repeat):
            proc = subprocess.Popen([sys.executable, "-c", EXIT_PROBE + tail], stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            done = float(proc.stdout.readline())
            proc.wait()
            samples.append(time.time() - done)
        return med_best(samples)

    return [("exit after `vmkit migrate`'s imports", *runs("pass")),
            ("the same, after gc.freeze()", *runs("gc.freeze()"))]


def virsh_domains(n: int) -> tuple[list[float] | None, str]:
    """``virsh list --all`` with ``n`` domains defined on a private test driver (no daemon needed)."""
    if not shutil.which("virsh"):
        return None, "virsh not installed (libvirt-clients)"
    xml = "".join(f"<domain type='test'><name>d{i:03d}</name><memory>262144</memory><os><type>hvm</type></os>"
                  "</domain>" for i in range(n))
    with tempfile.TemporaryDirectory() as d:
        node = Path(d) / "node.xml"
        node.write_text(f"<node>{xml}</node>")
        return timed(["virsh", "-c", f"test://{node}", "list", "--all"], dict(os.environ), ARGS.repeat), \
            f"test:// driver, {n} domains"


def main() -> None:
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as empty_d, tempfile.TemporaryDirectory() as full_d:
        empty, full = Path(empty_d), Path(full_d)
        for d in (empty, full):
            d.chmod(0o700)
        define_machines(full, ARGS.machines)
        env0 = {**os.environ, "VMKIT_HOME": str(empty)}
        envn = {**os.environ, "VMKIT_HOME": str(full)}
        cases = [
            ("python -c pass (the interpreter: the floor)", [sys.executable, "-c", "pass"], env0, None),
            ("vmkit --help", [*VMKIT, "--help"], env0, 0.150),
            ("vmkit list (0 machines)", [*VMKIT, "list"], env0, None),
            (f"vmkit list ({ARGS.machines} machines)", [*VMKIT, "list"], envn, 0.300),
            (f"vmkit list --json ({ARGS.machines})", [*VMKIT, "list", "--json"], envn, 0.300),
            ("vmkit inspect m000", [*VMKIT, "inspect", "m000"], envn, None),
        ]
        results = {}
        for label, argv, env, target in cases:
            samples = timed(argv, env, ARGS.repeat)
            results[label] = samples
            m, b = med_best(samples)
            verdict = "" if target is None else ("meets" if m <= target else "misses")
            rows.append([label, f"{m * 1000:.0f}", f"{b * 1000:.0f}",
                         f"<= {target * 1000:.0f}" if target else "", verdict])
        vs, why = virsh_domains(ARGS.machines)
        if vs is not None:
            m, b = med_best(vs)
            rows.append([f"virsh list --all ({why})", f"{m * 1000:.0f}", f"{b * 1000:.0f}", "", ""])
            lm, _ = med_best(results[f"vmkit list ({ARGS.machines} machines)"])
            verdict = "meets" if lm / m <= 2 else "misses"
            rows.append(["vmkit list / virsh list", f"{lm / m:.2f}x", "", "<= 2.00x", verdict])
        else:
            rows.append([f"virsh list: skipped ({why})", "", "", "", ""])
        name, why = running_machine(empty) if not ARGS.no_guest else (None, "--no-guest")
        if name is None:
            rows.append([f"commands on a running machine: skipped ({why})", "", "", "", ""])
        else:
            try:
                m, b = med_best(timed([*VMKIT, "stats", name, "--json"], env0, ARGS.repeat))
                rows.append([f"vmkit stats {name} --json (running)", f"{m * 1000:.0f}", f"{b * 1000:.0f}", "", ""])
                pauses: list[float] = []
                resumes: list[float] = []
                for _ in range(ARGS.repeat):
                    pauses += timed([*VMKIT, "pause", name], env0, 1, warm=False)
                    resumes += timed([*VMKIT, "resume", name], env0, 1, warm=False)
                for what, samples in (("pause", pauses), ("resume", resumes)):
                    m, b = med_best(samples)
                    rows.append([f"vmkit {what} {name}", f"{m * 1000:.0f}", f"{b * 1000:.0f}", "", ""])
            finally:
                subprocess.run([*VMKIT, "delete", "--force", name], env=env0, capture_output=True)
        for label, m, b in [*import_cost(ARGS.repeat), *exit_cost(ARGS.repeat)]:
            rows.append([label, f"{m * 1000:.0f}", f"{b * 1000:.0f}", "", ""])
    print(f"wall time of a fresh process, median and best of {ARGS.repeat} runs, milliseconds "
          f"(load average {os.getloadavg()[0]:.2f})")
    print_table(["command", "median", "best", "target", ""], rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machines", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--no-guest", action="store_true", help="skip the commands on a running micro guest")
    ARGS = parser.parse_args()
    as_installed(ROOT / "src")
    main()
