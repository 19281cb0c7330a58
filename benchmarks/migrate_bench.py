#!/usr/bin/env python3
"""Live migration between two hosts of scripts/lab.sh: vmkit against the same migration driven with
plain QMP, and the correctness check (every memory page compared after each migration).

    python benchmarks/migrate_bench.py                 # the table (micro guest, 256 MiB)
    python benchmarks/migrate_bench.py --memory 1G
    python benchmarks/migrate_bench.py --check 10      # correctness mode: 10 runs per case, bad pages counted
    python benchmarks/migrate_bench.py --memory 1G --runs 20 --only idle   # the 1 GiB targets (p95)

Cases: an idle guest and one dirtying memory (two busybox loops rewriting 16 MiB tmpfs files); vmkit
with its defaults (live pre-copy: its TCG guests' RAM is padded so QEMU 7.2 tracks their dirty pages,
vmkit.runtime.qemu.dirtysync; auto-converge on), --tls, --paused, --no-auto-converge, --postcopy, 2
vCPUs, an idle Debian guest (debian-12, its overlay disk copied too: --copy-storage; no plain QMP
row, which would need the disk mirror by hand); and plain QMP (two bare QEMUs, `migrate` and
`query-migrate` by hand). The plain QMP cases with 2 vCPUs, `thread=single` or `RAM +8 KiB` show
what QEMU 7.2 does by itself: --check counts the runs that lost pages (unpadded RAM loses them with 1
or 2 vCPUs and with single-threaded TCG; padded RAM did not). --check compares every page after each
run (the guest paused meanwhile).

Fair end to end: vmkit's clock runs for its whole `vmkit migrate` command (a new process: Python's
start and vmkit's imports, the target prepared over ssh, the copy, the take-over, the source's QEMU
ended and its network lease released, the command's exit); plain QMP's from the moment the user
starts the target QEMU over ssh (`-incoming`, the bench process already running and connected to the
source's QMP) to the moment the target's QEMU says the migration completed (it runs the guest itself
then: no -S). Printed: QEMU's total-time ratio, the end-to-end ratio, and the ratio of vmkit's own
clock (`seconds` of `vmkit migrate --json`: from the machine found to its source ended, so without the
command's start and exit, what a long-running program calling vmkit.Client pays) to plain QMP's; then
where the time goes, per phase.

The target's half: after a run, the target keeps a warm receiver (vmkit.migrate.warm), so later runs
start no Python there; the case "cold receiver" ends it before each run. vmkit's ssh connections are
shared (vmkit.backends.ssh; kept for the whole run here); the case "plain QMP live, shared ssh" keeps
plain QMP's too. The case "vmkit API (Client.migrate)" calls the Python client from this process (its
modules imported once): what a program scripting vmkit pays, against a program scripting QMP.

Downtime seen from outside: every guest is on a network that spans the lab's hosts (`mbspan`, the
same network on this machine and the target, joined by `scripts/lab.sh link`), runs a TCP echo
server, and a prober on the lab's third host (vmklab2) sends it an ICMP echo every 10 ms and a line
on an open TCP connection every 100 ms (vmkit.net.probes.GAPS). The longest gap between ICMP replies
is printed beside QEMU's own `downtime`, and the TCP column says whether the connection survived.
With --runs N the table adds p95 of both. Targets (issue 14): p95 downtime <= 300 ms for an idle
1 GiB guest, vmkit's total time <= 1.10x the plain QMP migration of the same guest.

Plain QMP rows: the target QEMU runs the guest itself (no -S) as soon as the whole state has arrived,
so their outside gap is QEMU's alone; vmkit's target waits (-S) until the source's QEMU has said the
copy completed (and, with --verify, every page was compared), then runs it (`cont`). The case "idle,
plain QMP live, RAM +8 KiB" is the same QEMU setup as vmkit's (its RAM padded, so every dirty sync of
QEMU 7.2 goes page by page, under QEMU's big lock: the guest stalls too), the fair baseline for vmkit's
own overhead; each run's three longest silences are printed (a padded guest shows two: the longest
at the copy's start, QEMU's first dirty sync, page by page over the whole RAM under its big lock:
benchmarks/dirtysync_bench.py times it, and the switch-over). Plain QMP's pages
are compared only in --check mode (the target held paused meanwhile: -S, then `cont`).

Needs root (the lab's network namespaces). Brings the lab up if it is down, and down again after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import random
import shlex
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
sys.path.insert(0, str(REPO / "benchmarks"))

from _guests import qmp_connect  # noqa: E402
from _table import as_installed  # noqa: E402
from vmkit.config import parse_size  # noqa: E402
from vmkit.host.images import micro  # noqa: E402
from vmkit.net.probes import GAPS  # noqa: E402
from vmkit.runtime import migration  # noqa: E402

LAB = Path(os.environ.get("VMKIT_LAB_DIR", "/tmp/vmklab"))
TARGET_NS, TARGET_ADDR = "vmklab1", "10.231.0.11"
TARGET = f"ssh://root@{TARGET_ADDR}"
NET, NET_SUBNET, OBSERVER_NS, OBSERVER = "mbspan", "10.119.10.0/24", "vmklab2", "10.119.10.250/24"
PLAIN_ADDR = "10.119.10.200"
PERSIST = 3600
"""Seconds a shared ssh connection outlives its last use (vmkit's and the plain case's that shares one)."""
PLAIN_QEMU = ["qemu-system-x86_64"]
"""The QEMU of the plain QMP cases, on both hosts: the host's, or --qemu-dir's."""


def use_qemu_dir(qemu_dir: Path) -> None:
    """Every QEMU of this run is ``qemu_dir``'s: the plain cases run it by path; vmkit finds its QEMU on PATH,
    so ``qemu_dir`` goes first on the PATH of the vmkit commands here and of the target's vmkit (run over ssh)."""
    PLAIN_QEMU[:] = [str(qemu_dir / "qemu-system-x86_64")]
    os.environ["PATH"] = f"{qemu_dir}:{os.environ['PATH']}"
    prepend = f'PATH={shlex.quote(str(qemu_dir))}:"$PATH" exec vmkit "$@"'
    os.environ["VMKIT_REMOTE_VMKIT"] = shlex.join(["sh", "-c", prepend, "vmkit"])


DHCP = ("ip link set eth0 up; printf '#!/bin/sh\\n[ \"$1\" = bound ] && ip addr add $ip/$mask dev $interface\\n"
        "exit 0\\n' > /tmp/dh; chmod +x /tmp/dh; udhcpc -i eth0 -q -n -t 20 -T 1 -s /tmp/dh >/dev/null 2>&1; ")
STATIC = f"ip link set eth0 up; ip addr add {PLAIN_ADDR}/24 dev eth0; "
ECHO = "nc -ll -p 7000 -e cat & echo ECHO-UP $(ip -4 -o addr show eth0 | awk '{print $4}'); "
DIRTIER = ("mkdir -p /d && mount -t tmpfs -o size=100m tmpfs /d && head -c 16m /dev/urandom > /d/a && "
           "head -c 16m /dev/zero > /d/z && for i in 1 2; do (while :; do cat /d/a > /d/b$i; cat /d/z > /d/b$i; "
           "done) & done; echo DIRTIER-UP")


def lab_up() -> tuple[int, bool]:
    """Bring the lab up unless it is; the lock held shared while this run uses it (as the tests' lab
    fixture does: tests/conftest.py) and True if this run brought it up."""
    LAB.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{LAB}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    if (LAB / "ssh_config").exists():
        return fd, False
    fcntl.flock(fd, fcntl.LOCK_UN)
    fcntl.flock(fd, fcntl.LOCK_EX)
    brought = not (LAB / "ssh_config").exists()
    if brought:
        subprocess.run([str(REPO / "scripts" / "lab.sh"), "up", "2"], check=True, stdout=subprocess.DEVNULL)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd, brought


def lab_leave(fd: int, brought: bool) -> None:
    """Take the lab down if this run brought it up and nobody else uses it now."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass
    else:
        if brought:
            subprocess.run([str(REPO / "scripts" / "lab.sh"), "down"], check=False, stdout=subprocess.DEVNULL)
    finally:
        os.close(fd)


def vmkit(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMKIT_HOME": str(home), "VMKIT_SSH_CONFIG": str(LAB / "ssh_config"),
           "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "vmkit.cli.main", *args], capture_output=True, text=True,
                          env=env, check=check, timeout=900)


def cmdline(dirty: bool, net: str = DHCP) -> str:
    return "vmkit.counter=1 " + micro.run_parameter(net + ECHO + (DIRTIER if dirty else "echo DIRTIER-UP"))


def span_up(home: Path) -> None:
    """The network `mbspan` on this machine and the target, one layer-2 segment, an observer on vmklab2."""
    vmkit("network", "create", NET, "--mode", "isolated", "--subnet", NET_SUBNET, home=home)
    vmkit("--host", TARGET, "network", "create", NET, "--mode", "isolated", "--subnet", NET_SUBNET, home=home)
    subprocess.run([str(REPO / "scripts" / "lab.sh"), "link", NET, OBSERVER], check=True, stdout=subprocess.DEVNULL)


def span_down(home: Path) -> None:
    subprocess.run([str(REPO / "scripts" / "lab.sh"), "unlink", NET], check=False, stdout=subprocess.DEVNULL)
    vmkit("--host", TARGET, "network", "delete", "--force", NET, home=home, check=False)
    vmkit("network", "delete", "--force", NET, home=home, check=False)


class Prober:
    """vmkit.net.probes.GAPS on the observer host: ICMP every 10 ms, a TCP echo session."""

    def __init__(self, address: str, attempts: int = 3) -> None:
        for attempt in range(attempts):  # the guest's echo server may not take the connection yet
            self.proc = subprocess.Popen(["ip", "netns", "exec", OBSERVER_NS, "python3", "-c", GAPS, address,
                                          "7000", "0.01"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline().strip()
            if line == "PROBING":
                return
            self.proc.kill()
            error = (self.proc.communicate()[1].strip().splitlines() or ["?"])[-1]
            if attempt == attempts - 1:
                raise RuntimeError(f"the prober did not start: {line} {error}")
            time.sleep(2)

    def result(self, settle: float = 1.5) -> dict[str, Any]:
        time.sleep(settle)  # the guest answers again on the target
        out, err = self.proc.communicate("stop\n", timeout=60)
        if not out.strip():
            raise RuntimeError(f"the prober failed: {err.strip()[-200:]}")
        got: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return got


def wait_log(path: Path, marker: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if marker in text:
            return text
        time.sleep(0.1)
    raise RuntimeError(f"{path}: no {marker!r} within {timeout:.0f} s")


DEBIAN_ECHO = ("import socket, threading\n"
               "def serve(c):\n"
               "    while (b := c.recv(4096)):\n"
               "        c.sendall(b)\n"
               "s = socket.create_server(('', 7000))\n"
               "while True:\n"
               "    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()\n")
"""The TCP echo server of the Debian guest (its python3) for the prober's session."""


def run_vmkit(home: Path, name: str, memory: str, cpus: int, dirty: bool, flags: list[str],
              verify: bool, *, debian: bool = False) -> dict[str, Any]:
    if debian:  # the full distribution: its overlay disk is copied too (--copy-storage)
        vmkit("create", name, "--image", "debian-12", "--memory", memory, "--cpus", str(cpus), "--network", NET,
              home=home)
    else:
        vmkit("create", name, "--image", "micro", "--memory", memory, "--cpus", str(cpus), "--network", NET,
              "--cmdline", cmdline(dirty), home=home)
    prober: Prober | None = None
    try:
        vmkit("start", name, home=home)
        if debian:  # started: its agent answers
            address = json.loads(vmkit("inspect", name, home=home).stdout)["config"]["networks"][0]["address"]
            vmkit("exec", name, "--", "sh", "-c", f"setsid python3 -c {shlex.quote(DEBIAN_ECHO)} </dev/null "
                  ">/dev/null 2>&1 &", home=home)
            time.sleep(10)  # the guest settles after its boot (cloud-init, timers)
        else:
            log = wait_log(home / "instances" / name / "serial.log", "DIRTIER-UP")
            address = log.split("ECHO-UP ", 1)[1].split("/", 1)[0]
            time.sleep(2)
        if "@cold" in flags:  # no warm receiver on the target: this run's `vmkit migrate-receive` starts Python
            subprocess.run(["ip", "netns", "exec", TARGET_NS, "pkill", "-x", "vmkit-receiver"], check=False)
            time.sleep(0.5)
        if "@api" in flags:  # a program that has used vmkit before: its modules imported (once per program)
            import importlib

            from vmkit import Client
            from vmkit.errors import VmkitError

            importlib.import_module("vmkit.migrate.send")
        prober = Prober(address)
        t0 = time.monotonic()
        if "@api" in flags:  # what such a program pays: no command started, no ssh prestarted
            try:
                out = Client(home=home).get(name).migrate(TARGET, verify=verify)
            except VmkitError as exc:
                prober.result()
                return {"error": str(exc)[:400], "wall_s": time.monotonic() - t0}
            wall = time.monotonic() - t0
            seen, prober = prober.result(), None
        else:
            res = vmkit("migrate", name, TARGET, *(["--verify"] if verify else []), "--json",
                        *(f for f in flags if not f.startswith("@")), home=home, check=False)
            wall = time.monotonic() - t0
            seen, prober = prober.result(), None
            if res.returncode != 0:
                lines = res.stderr.strip().splitlines() or ["?"]  # the error's own line, not its hint
                return {"error": next((ln for ln in lines if ln.startswith("error:")), lines[-1])[:400],
                        "wall_s": wall}
            out = json.loads(res.stdout)
        rep = out["report"]
        redone = any("done again with the guest paused" in n for n in out["notes"])
        return {"wall_s": wall, "phases": out.get("phases", {}), "cli_s": wall - out["seconds"],
                "own_s": out["seconds"], "total_ms": rep["total_time_ms"], "downtime_ms": rep["downtime_ms"],
                "paused_ms": rep["paused_ms"], "rounds": rep["rounds"], "mib": rep["transferred_bytes"] / 2**20,
                "method": rep["method"] + ("(redone)" if redone else ""), "bad": out["bad_pages"],
                "reason": rep["method_reason"],
                "receiver": out.get("receiver", "cold"),  # None: unchecked
                "freed": out["pages_given_back"] or 0,
                "gap_ms": seen["max_gap_ms"], "gaps_ms": seen["gaps_ms"][:3], "tcp": seen["tcp"]["error"] is None}
    finally:
        if prober is not None:
            prober.proc.kill()
        vmkit("--host", TARGET, "delete", "--force", name, home=home, check=False)
        vmkit("delete", "--force", name, home=home, check=False)


# -- plain QMP ------------------------------------------------------------------------------------------
def _tap_to_bridge(tap: str, ns: str | None) -> None:
    """Put QEMU's tap on the span network's bridge (in the host's namespace ``ns``)."""
    pre = ["ip", "-n", ns] if ns else ["ip"]
    for _ in range(200):
        res = subprocess.run([*pre, "link", "set", tap, "master", f"vmkbr-{NET}", "up"], capture_output=True)
        if res.returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"tap {tap} did not appear")


async def plain_qmp(work: Path, memory: str, cpus: int, dirty: bool, check: bool, *, thread: str = "multi",
                    pad: bool = False, shared: bool = False) -> dict[str, Any]:
    """The same migration with two bare QEMUs and QMP by hand (no vmkit). ``check``: the target stays
    paused after completion and both RAMs are compared; else it runs the guest at once. ``thread``:
    TCG's threading (``single``: one thread runs every vCPU); ``pad``: the RAM is 8 KiB larger, so its
    length is no multiple of 64 pages and QEMU < 9.0 syncs its dirty bitmap page by page (the path that
    resets the TCG TLB, see vmkit.runtime.migration.RAM_PAD)."""
    img = Path(os.environ.get("VMKIT_IMAGE_CACHE", REPO / ".cache" / "images")) / "micro"
    mem_mib = parse_size(memory) >> 20
    mem_arg = f"{(mem_mib << 10) + 8}k" if pad else str(mem_mib)
    base = [*PLAIN_QEMU, "-accel", f"tcg,thread={thread}", "-M", "q35", "-cpu", "max", "-m", mem_arg,
            "-smp", str(cpus), "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"),
            "-append", f"console=ttyS0 panic=-1 quiet {cmdline(dirty, STATIC)}", "-display", "none", "-nodefaults",
            "-no-user-config", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:6d:62:01"]
    nic = "tap,id=n0,script=no,downscript=no,ifname="
    port = random.randint(20000, 60000)  # in the target's namespace: nothing else listens there
    src_log, dst_log = work / "src.log", work / "dst.log"
    src_argv = [*base, "-netdev", nic + "vmkmb-src", "-serial", f"file:{src_log}", "-qmp",
                f"unix:{work}/src.qmp,server=on,wait=off"]
    # what a user without vmkit does on the target host: start QEMU there over ssh, waiting (-incoming)
    # shared: the ssh connection of the run before is reused (ControlPersist, as vmkit's own ssh does)
    mux = ["-o", "ControlMaster=auto", "-o", f"ControlPath={work}/cm-%C", "-o", f"ControlPersist={PERSIST}"]
    dst_argv = ["ssh", "-F", str(LAB / "ssh_config"), "-o", "BatchMode=yes", *(mux if shared else []), "-T",
                f"root@{TARGET_ADDR}",
                shlex.join([*base, "-netdev", nic + "vmkmb-dst", "-serial", f"file:{dst_log}", "-qmp",
                            f"unix:{work}/dst.qmp,server=on,wait=off", "-incoming", f"tcp:{TARGET_ADDR}:{port}",
                            "-pidfile", str(work / "dst.pid"), *(["-S"] if check else [])])]
    # without -S QEMU runs the guest itself the moment the whole state has arrived (the fastest a
    # switch-over can be); --check holds it (-S) until the pages are compared, then `cont`
    src = subprocess.Popen(src_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
    dst: subprocess.Popen[bytes] | None = None
    prober: Prober | None = None
    try:
        s_qmp = await qmp_connect(f"{work}/src.qmp")
        _tap_to_bridge("vmkmb-src", None)
        await asyncio.to_thread(wait_log, src_log, "DIRTIER-UP")
        await asyncio.sleep(2)
        prober = await asyncio.to_thread(Prober, PLAIN_ADDR)
        await s_qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        t_start = time.monotonic()  # end to end: from here (the target QEMU not started yet) to `cont` there
        dst = subprocess.Popen(dst_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
        d_qmp = await qmp_connect(f"{work}/dst.qmp")
        _tap_to_bridge("vmkmb-dst", TARGET_NS)
        started = time.monotonic() - t_start
        t0 = time.monotonic()
        await s_qmp.execute("migrate", {"uri": f"tcp:{TARGET_ADDR}:{port}"})
        info: dict[str, Any] = {}
        while True:  # the target has all of it once its own status says so (asked every 20 ms)
            there = str((await d_qmp.execute("query-migrate")).get("status"))
            if there in migration.TERMINAL:
                break
            if (await s_qmp.execute("query-migrate")).get("status") in ("failed", "cancelled"):
                break  # the target would wait for ever
            if time.monotonic() - t0 > 300:
                await s_qmp.execute("migrate_cancel")
            await asyncio.sleep(0.02)
        landed = time.monotonic()
        wall = landed - t0
        for _ in range(500):
            info = await s_qmp.execute("query-migrate")
            if info.get("status") in migration.TERMINAL:
                break
            await asyncio.sleep(0.02)
        if info.get("status") != "completed" or there != "completed":
            return {"error": f"plain QMP: {info.get('status')} (target: {there})", "wall_s": wall}
        bad: list[int] | None = None
        freed = 0
        if check:
            size = mem_mib << 20
            await s_qmp.execute("pmemsave", {"val": 0, "size": size, "filename": str(work / "src.mem")})
            await d_qmp.execute("pmemsave", {"val": 0, "size": size, "filename": str(work / "dst.mem")})
            compared = migration.compare_pages(migration._hash_pages(work / "src.mem"),
                                               migration._hash_pages(work / "dst.mem"))
            bad, freed = compared.lost, len(compared.given_back)
            await d_qmp.execute("cont")
        end_to_end = (landed if not check else time.monotonic()) - t_start
        seen, prober = await asyncio.to_thread(prober.result), None
        ram = info.get("ram", {})
        await s_qmp.disconnect()
        await d_qmp.disconnect()
        return {"wall_s": end_to_end if not check else wall, "qemu_start_s": started, "copy_s": wall,
                "total_ms": info.get("total-time"),
                "downtime_ms": info.get("downtime"), "paused_ms": info.get("downtime"),
                "rounds": ram.get("dirty-sync-count"), "mib": ram.get("transferred", 0) / 2**20,
                "method": "live (plain QMP)", "bad": None if bad is None else len(bad), "freed": freed,
                "gap_ms": seen["max_gap_ms"], "gaps_ms": seen["gaps_ms"][:3], "tcp": seen["tcp"]["error"] is None}
    finally:
        if prober is not None:
            prober.proc.kill()
        with contextlib.suppress(OSError, ValueError):  # the target's QEMU (ssh only started it)
            os.kill(int((work / "dst.pid").read_text().strip()), signal.SIGKILL)
        for p in (src, dst):
            if p is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
            p.wait(10)
        for f in ("src.mem", "dst.mem", "dst.pid"):
            with contextlib.suppress(FileNotFoundError):
                (work / f).unlink()


CASES: list[tuple[str, int, bool, list[str] | None]] = [
    # label, vCPUs, dirtier, vmkit flags (None: plain QMP)
    ("idle, vmkit default (live)", 1, False, []),
    ("idle, vmkit default, cold receiver", 1, False, ["@cold"]),  # the target's warm receiver ended first
    ("idle, vmkit API (Client.migrate)", 1, False, ["@api"]),  # called from a running program
    ("idle, vmkit --tls", 1, False, ["--tls"]),
    ("idle, vmkit --paused", 1, False, ["--paused"]),
    ("idle, vmkit --postcopy", 1, False, ["--postcopy"]),  # the first sync (the stall) is paid all the same
    ("idle, plain QMP live", 1, False, None),
    ("idle, plain QMP live, RAM +8 KiB", 1, False, None),  # vmkit's padded RAM by hand: its dirty syncs' cost
    ("idle, plain QMP live, shared ssh", 1, False, None),  # its ssh connection kept between runs, as vmkit's
    ("idle Debian, vmkit --copy-storage (live)", 1, False, ["--copy-storage"]),
    ("dirtying, vmkit default (live)", 1, True, []),
    ("dirtying, vmkit --no-auto-converge", 1, True, ["--no-auto-converge"]),
    ("dirtying, vmkit --paused", 1, True, ["--paused"]),
    ("dirtying, plain QMP live", 1, True, None),
    ("dirtying, --postcopy", 1, True, ["--postcopy"]),
    ("dirtying 2 vCPUs, vmkit default (live)", 2, True, []),
    ("dirtying 2 vCPUs, plain QMP live", 2, True, None),
    ("dirtying 2 vCPUs, plain QMP live, thread=single", 2, True, None),
    ("dirtying 2 vCPUs, plain QMP live, RAM +8 KiB", 2, True, None),
    ("dirtying, plain QMP live, RAM +8 KiB", 1, True, None),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--runs", type=int, default=1, help="runs per case (the table shows medians)")
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="correctness mode: N runs of the dirtying cases, bad pages counted")
    ap.add_argument("--only", default="", help="run only cases whose label contains this (or one of these, "
                    "separated by |)")
    ap.add_argument("--qemu-dir", type=Path, metavar="DIR",
                    help="run DIR/qemu-system-x86_64 on both hosts, in vmkit's cases and the plain ones (another "
                    "QEMU build, or a script that runs one: see benchmarks/dirtysync_bench.py)")
    args = ap.parse_args()
    if args.qemu_dir is not None:
        use_qemu_dir(args.qemu_dir.resolve())
    as_installed(REPO / "src")  # the vmkit commands timed run byte-compiled, as installed
    if os.geteuid() != 0:
        print("needs root (network namespaces): run as root", file=sys.stderr)
        return 2
    lab_fd, brought = lab_up()
    home = Path(tempfile.mkdtemp(prefix="vmkit-mbench-"))
    work = Path(tempfile.mkdtemp(prefix="vmkit-mqmp-"))
    runs = args.check or args.runs
    cases = [c for c in CASES if any(o in c[0] for o in args.only.split("|")) and (not args.check or c[2])]
    os.environ["VMKIT_SSH_CONFIG"] = str(LAB / "ssh_config")  # the API case runs in this process
    # vmkit's shared ssh connections (vmkit.backends.ssh): kept for the whole run (a case's runs are minutes
    # apart; vmkit's default keeps one 60 s), in a directory of this run's, ended at its end
    os.environ["VMKIT_SSH_PERSIST"] = str(PERSIST)
    os.environ["XDG_RUNTIME_DIR"] = str(work)
    try:
        span_up(home)
        print(f"# migrate_bench: micro guests (Debian where the case says), {args.memory}, {runs} run(s) per case; "
              f"load: {Path('/proc/loadavg').read_text().split()[:3]}")
        version = subprocess.run([*PLAIN_QEMU, "--version"], capture_output=True, text=True).stdout
        print(f"# {(version.splitlines() or ['?'])[0]}")
        print("# gap: longest silence of ICMP echoes (every 10 ms) from another host during the migration; "
              "tcp: an open TCP session survived")
        hdr = (f"{'case':48} {'method':18} {'total ms':>9} {'QEMU downtime':>13} {'gap ms':>7} {'paused ms':>9} "
               f"{'rounds':>6} {'MiB':>6} {'wall s':>7} {'tcp':>5} {'bad pages':>9}"
               + (f" {'p95 downtime':>12} {'p95 gap':>8}" if runs > 1 else ""))
        print(hdr)
        print("-" * len(hdr))
        medians: dict[str, dict[str, float]] = {}
        phases: dict[str, dict[str, float]] = {}
        warmed: dict[str, str] = {}
        p95s: dict[str, dict[str, float]] = {}
        # run i of every case, then run i + 1 of every case: the cases compared side by side see the same
        # load (other users of the host come and go; run one case after the other, and its rows did not)
        every: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in cases}
        for i in range(runs):
            for label, cpus, dirty, flags in cases:
                name = f"mb{i}"
                try:
                    r = (run_vmkit(home, name, args.memory, cpus, dirty, flags, bool(args.check),
                                   debian="Debian" in label) if flags is not None
                         else asyncio.run(plain_qmp(work, args.memory, cpus, dirty, bool(args.check),
                                                    thread="single" if "thread=single" in label else "multi",
                                                    pad="RAM +8 KiB" in label, shared="shared ssh" in label)))
                except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                    r = {"error": str(exc)[:100]}
                r["load"] = float(Path("/proc/loadavg").read_text().split()[0])
                every[label].append(r)
        for label, _cpus, _dirty, flags in cases:
            results = every[label]
            ok = [r for r in results if "error" not in r]
            errs = [r["error"] for r in results if "error" in r]
            if not ok:
                print(f"{label:48} failed: {errs[0]}")
                continue

            def med(k: str, rows: list[dict[str, Any]] = ok) -> float:
                vals = [float(r[k]) for r in rows if r.get(k) is not None]
                return statistics.median(vals) if vals else float("nan")

            def p95(k: str, rows: list[dict[str, Any]] = ok) -> float:
                vals = sorted(float(r[k]) for r in rows if r.get(k) is not None)
                if len(vals) < 2:
                    return vals[0] if vals else float("nan")
                return statistics.quantiles(vals, n=20, method="inclusive")[18]

            bad = [int(r["bad"]) for r in ok if r.get("bad") is not None]
            shown = ("-" if not bad else "/".join(map(str, bad)) if runs <= 5
                     else f"{sum(b > 0 for b in bad)}/{len(bad)} runs bad")
            tcp = f"{sum(bool(r.get('tcp')) for r in ok)}/{len(ok)}"
            medians[label] = {k: med(k) for k in ("total_ms", "wall_s", "own_s")}
            if flags is not None:
                names = list(ok[0].get("phases", {}))
                phases[label] = {"cli": med("cli_s"), **{n: statistics.median(float(r["phases"].get(n, 0.0))
                                                                          for r in ok) for n in names}}
                warmed[label] = f"{sum(r.get('receiver') == 'warm' for r in ok)}/{len(ok)}"
            else:
                phases[label] = {"start target QEMU (ssh)": med("qemu_start_s"), "copy": med("copy_s")}
            p95s[label] = {k: p95(k) for k in ("downtime_ms", "gap_ms")}
            methods = "/".join(str(r["method"]) for r in ok) if runs <= 3 else ok[0]["method"]
            print(f"{label:48} {methods:18} {med('total_ms'):9.0f} {med('downtime_ms'):13.0f} {med('gap_ms'):7.0f} "
                  f"{med('paused_ms'):9.0f} {med('rounds'):6.0f} {med('mib'):6.0f} {med('wall_s'):7.1f} {tcp:>5} "
                  f"{shown:>9}" + (f" {p95('downtime_ms'):12.0f} {p95('gap_ms'):8.0f}" if runs > 1 else "")
                  + (f"  ({len(errs)} failed: {errs[0]})" if errs else "")
                  + (f"  (+{freed} pages differing in 2 MiB blocks the guest reported free, not counted)"
                     if (freed := sum(int(r.get("freed") or 0) for r in ok)) else ""))
            for reason in sorted({str(r["reason"]) for r in ok if r.get("reason")}):  # QEMU's version included
                print(f"{'':48} vmkit's method: {reason}")
            if runs > 1 and not args.check:  # each run's longest silences (an outlier shows with its next ones)
                print(f"{'':48} per run, the 3 longest gaps in ms (load average after the run): "
                      + "; ".join("/".join(f"{g:.0f}" for g in r.get("gaps_ms", [])) + f" ({r['load']:.1f})"
                                  for r in ok))
        for a, b in (("idle, vmkit default (live)", "idle, plain QMP live"),
                     ("idle, vmkit default (live)", "idle, plain QMP live, RAM +8 KiB"),  # the same QEMU setup
                     ("idle, vmkit default, cold receiver", "idle, plain QMP live"),
                     ("idle, vmkit API (Client.migrate)", "idle, plain QMP live"),
                     ("idle, vmkit API (Client.migrate)", "idle, plain QMP live, RAM +8 KiB"),
                     ("idle, vmkit API (Client.migrate)", "idle, plain QMP live, shared ssh"),
                     ("dirtying, vmkit default (live)", "dirtying, plain QMP live"),
                     ("dirtying, vmkit default (live)", "dirtying, plain QMP live, RAM +8 KiB")):
            if a in medians and b in medians:
                qemu = medians[a]["total_ms"] / medians[b]["total_ms"]
                whole = medians[a]["wall_s"] / medians[b]["wall_s"]
                own = medians[a]["own_s"] / medians[b]["wall_s"]
                if "API" in a:  # no command: its wall clock is the call's
                    print(f"ratio {a.split(', ', 1)[1]} / {b.split(', ', 1)[1]} ({a.split(',')[0]}): QEMU total time "
                          f"{qemu:.2f}x, end to end {whole:.2f}x (the call, ssh to the target included); target 1.10x")
                    continue
                print(f"ratio {a.split(', ', 1)[1]} / {b.split(', ', 1)[1]} ({a.split(',')[0]}): "
                      f"QEMU total time {qemu:.2f}x, "
                      f"end to end {whole:.2f}x (the vmkit command) and {own:.2f}x (vmkit's own clock, without the "
                      "command's start and exit); target 1.10x. Plain QMP end to end: the target QEMU started over "
                      "ssh, migrate, until the target says completed")
        print("# where the end-to-end time goes (medians, s; vmkit: cli = the vmkit command's own start and exit)")
        for label, parts in phases.items():
            print(f"{label:48} " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in parts.items())
                  + (f"; warm receiver {warmed[label]}" if label in warmed else ""))
        for label, vals in p95s.items():
            if label.startswith("idle"):
                print(f"p95 {label}: QEMU downtime {vals['downtime_ms']:.0f} ms, seen from outside "
                      f"{vals['gap_ms']:.0f} ms (target 300 ms at {args.memory})")
        print(f"# load after: {Path('/proc/loadavg').read_text().split()[:3]}")
    finally:
        span_down(home)
        for sock in [*work.glob("cm-*"), *(work / "vmkit" / "ssh").glob("*")]:  # the shared ssh connections
            subprocess.run(["ssh", "-F", str(LAB / "ssh_config"), "-o", f"ControlPath={sock}", "-O", "exit",
                            f"root@{TARGET_ADDR}"], capture_output=True, check=False, timeout=30)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        lab_leave(lab_fd, brought)
    return 0


if __name__ == "__main__":
    sys.exit(main())
