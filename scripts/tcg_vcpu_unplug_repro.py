#!/usr/bin/env python3
"""Reproduce (or rule out) QEMU's heap corruption when a vCPU is hot-unplugged under TCG.

Plain QEMU, no vmkit: boots the micro guest's kernel and initramfs with ``-smp N,maxcpus=M``, then
for ``--cycles`` rounds adds a vCPU (``device_add`` of the slot ``query-hotpluggable-cpus`` names),
waits until the guest has it online, removes it (``device_del``) and waits for ``DEVICE_DELETED``.
Then it saves the machine to a file (``migrate exec:``) and quits. QEMU runs with
``MALLOC_CHECK_=3`` and ``MALLOC_PERTURB_``, so heap corruption aborts it loudly. Prints one line per
step and, at the end, QEMU's exit status and the last lines of its stderr.

    python3 scripts/tcg_vcpu_unplug_repro.py --cycles 5
    python3 scripts/tcg_vcpu_unplug_repro.py --accel tcg,thread=single --cpu qemu64 --machine pc

Exit status 0 if QEMU survived every step and exited 0, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

IMAGE = Path(os.environ.get("VMKIT_IMAGE_CACHE", "/work/main/.cache/images")) / "micro"


class Qmp:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rw")
        self.events: list[dict[str, Any]] = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("QMP closed: QEMU is gone")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        self.file.write(json.dumps({"execute": name, **({"arguments": args} if args else {})}) + "\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise RuntimeError(f"{name}: {msg['error']}")
            return msg.get("return")

    def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                self.events.append(self._read())
            except TimeoutError:
                return None
            finally:
                self.sock.settimeout(None)


def guest_cpus(serial: Path) -> str:
    """The guest's online CPU list from the last 'CPUS' line its loop printed (e.g. ``0-1``)."""
    found = re.findall(r"CPUS (\S+)", serial.read_text(errors="replace"))
    return found[-1] if found else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--accel", default="tcg,thread=multi")
    ap.add_argument("--cpu", default="max")
    ap.add_argument("--machine", default="q35")
    ap.add_argument("--smp", type=int, default=1, help="vCPUs at boot")
    ap.add_argument("--maxcpus", type=int, default=3)
    ap.add_argument("--add", type=int, default=1, help="vCPUs added (and removed) per cycle")
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--order", choices=["last-first", "first-first"], default="last-first",
                    help="which of the added vCPUs to remove first")
    ap.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                    help="save to a file (migrate exec:) after the cycles")
    ap.add_argument("--restore", action="store_true",
                    help="after the save, quit and restore the state into a new QEMU (-incoming), then continue there")
    ap.add_argument("--gdb", action="store_true", help="run QEMU under gdb -batch, print a backtrace on a crash")
    ap.add_argument("--wrapper", default="", help="command prefix for QEMU (e.g. 'valgrind --error-exitcode=9')")
    ap.add_argument("--extra", default="", help="more QEMU arguments, split at spaces (e.g. '-L DIR')")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="unplug-"))
    qmp_path, serial = work / "qmp.sock", work / "serial.log"
    # the micro guest runs this (vmkit.run=): it onlines every new CPU and prints how many it has online
    loop = ("while :; do for f in /sys/devices/system/cpu/cpu*/online; do "
            "[ \"$(cat $f)\" = 0 ] && echo 1 > $f; done; echo CPUS $(cat /sys/devices/system/cpu/online); "
            "sleep 0.5; done")
    argv = [a.qemu, "-machine", a.machine, "-accel", a.accel, "-cpu", a.cpu,
            "-smp", f"{a.smp},maxcpus={a.maxcpus}", "-m", "256M", "-nodefaults", "-no-user-config",
            "-display", "none", "-kernel", str(IMAGE / "vmlinuz"), "-initrd", str(IMAGE / "initrd.img"),
            "-append", f"console=ttyS0 panic=-1 vmkit.run={base64.b64encode(loop.encode()).decode()}",
            "-serial", f"file:{serial}",
            "-qmp", f"unix:{qmp_path},server=on,wait=off", *a.extra.split()]
    env = dict(os.environ, MALLOC_CHECK_="3", MALLOC_PERTURB_="165")
    if a.gdb:
        argv = ["gdb", "-q", "-batch", "-ex", "set pagination off",
                "-ex", "handle SIGUSR1 SIGUSR2 SIGPIPE nostop noprint", "-ex", "run",
                "-ex", "thread apply all bt 12", "-ex", "info threads", "--args", *argv]
    elif a.wrapper:
        argv = [*a.wrapper.split(), *argv]
    print("$", " ".join(argv), flush=True)
    err = (work / "stderr.log").open("w")  # QEMU writes it until it exits; closed below
    out = (work / "gdb.log").open("w") if a.gdb else err
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, start_new_session=True)
    ok = True
    try:
        for _ in range(600):
            if qmp_path.exists():
                break
            time.sleep(0.1)
        q = Qmp(qmp_path)
        deadline = time.monotonic() + 180
        while "VMKIT-READY" not in serial.read_text(errors="replace"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("guest did not boot")
            time.sleep(0.5)
        print(f"booted; cpus {len(q.cmd('query-cpus-fast'))}", flush=True)
        for cycle in range(a.cycles):
            slots = sorted(q.cmd("query-hotpluggable-cpus"),
                           key=lambda s: tuple(s["props"].get(k, 0) for k in ("socket-id", "core-id", "thread-id")))
            free = [s for s in slots if "qom-path" not in s][:a.add]
            ids = []
            for s in free:
                dev_id = f"cpu{s['props'].get('socket-id', 0)}-{s['props'].get('core-id', 0)}-{cycle}"
                q.cmd("device_add", {"driver": s["type"], "id": dev_id, **s["props"]})
                ids.append(dev_id)
            t0 = time.monotonic()
            n = len(q.cmd("query-cpus-fast"))
            time.sleep(3)  # the guest onlines the new CPU (ACPI notify; the kernel adds it)
            print(f"cycle {cycle}: added {ids}, QEMU has {n} vCPUs, guest has {guest_cpus(serial)} online", flush=True)
            if a.order == "last-first":
                ids.reverse()
            for dev_id in ids:
                q.cmd("device_del", {"id": dev_id})
                ev = q.wait_event("DEVICE_DELETED", 60)
                print(f"cycle {cycle}: removed {dev_id}: "
                      f"{'DEVICE_DELETED' if ev else 'no DEVICE_DELETED in 60 s'} after {time.monotonic() - t0:.1f} s, "
                      f"QEMU has {len(q.cmd('query-cpus-fast'))} vCPUs", flush=True)
            time.sleep(1.5)
            print(f"cycle {cycle}: guest has {guest_cpus(serial)} online", flush=True)
        if a.save:
            q.cmd("stop")
            q.cmd("migrate", {"uri": f"exec:cat > {work / 'state'}"})
            for _ in range(600):
                st = q.cmd("query-migrate")
                if st.get("status") in ("completed", "failed"):
                    break
                time.sleep(0.1)
            print(f"save: {st.get('status')}, {os.path.getsize(work / 'state') >> 20} MiB", flush=True)
            if not a.restore:
                q.cmd("cont")
            else:
                # the saved machine has as many vCPUs as it had then: the new QEMU starts with that many
                cpus = len(q.cmd("query-cpus-fast"))
                q.cmd("quit")
                rc0 = proc.wait(60)
                print(f"saved QEMU quit: exit status {rc0}", flush=True)
                if rc0 != 0:
                    raise RuntimeError(f"QEMU exited {rc0} on quit after the save")
                qmp_path.unlink(missing_ok=True)
                restore_argv = [x if not x.startswith(f"{a.smp},maxcpus=") else f"{cpus},maxcpus={a.maxcpus}"
                                for x in argv] + ["-incoming", f"exec:cat {work / 'state'}"]
                proc = subprocess.Popen(restore_argv, env=env, stdout=err, stderr=err, start_new_session=True)
                for _ in range(600):
                    if qmp_path.exists():
                        break
                    time.sleep(0.1)
                q = Qmp(qmp_path)
                for _ in range(600):
                    if q.cmd("query-status")["status"] != "inmigrate":
                        break
                    time.sleep(0.1)
                q.cmd("cont")
                before = serial.read_text(errors="replace").count("CPUS")
                time.sleep(3)
                after = serial.read_text(errors="replace").count("CPUS")
                print(f"restored: status {q.cmd('query-status')['status']}, QEMU has "
                      f"{len(q.cmd('query-cpus-fast'))} vCPUs, guest printed {after - before} lines in 3 s", flush=True)
        # one more add after everything (the crash reported earlier)
        slots = q.cmd("query-hotpluggable-cpus")
        free = [s for s in slots if "qom-path" not in s]
        if free:
            q.cmd("device_add", {"driver": free[-1]["type"], "id": "cpu-final", **free[-1]["props"]})
            time.sleep(2)
            print(f"final add: QEMU has {len(q.cmd('query-cpus-fast'))} vCPUs", flush=True)
        q.cmd("quit")
    except Exception as exc:  # report whatever happened
        ok = False
        print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
    try:
        rc = proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    err.close()
    out.close()
    tail = (work / "stderr.log").read_text(errors="replace").strip().splitlines()[-15:]
    print(f"QEMU exit status {rc}" + (f" (signal {signal.Signals(-rc).name})" if rc < 0 else ""))
    for line in tail:
        print("  stderr:", line)
    if a.gdb:
        log = (work / "gdb.log").read_text(errors="replace")
        if "received signal" in log or "Program terminated" in log:
            ok = False
            start = log.find("received signal")
            print(log[max(0, start - 200):start + 6000])
        elif "exited normally" not in log and "exited with code" not in log:
            print(log[-3000:])
    print("guest serial tail:", " | ".join(serial.read_text(errors="replace").strip().splitlines()[-5:]))
    if not a.keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    else:
        print("work dir:", work)
    return 0 if ok and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
