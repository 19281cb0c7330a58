"""Boot time of the Debian guest: ``vmkit start`` against plain QEMU with a stock cloud-init seed.

Three variants, run interleaved ``--repeat`` times (the order rotates each round):

  vmkit        ``vmkit create NAME --image debian-12`` (untimed), then ``vmkit start NAME`` timed from
               the moment the CLI is launched: its Python start-up, the supervisor, QEMU, the guest.
  plain        plain ``qemu-system-x86_64`` on the *same* ``debian-12`` image with a stock seed.
  plain-stock  plain QEMU with a stock seed on ``debian-12-stock``: the same packages and kernel built
               the same way, but with none of vmkit's boot trims (``build_debian(stock=True)``: packaged
               cloud.cfg with every datasource and module, cloud-init-local, no masked units or
               drop-ins, ``MODULES=most`` initrd, no module blacklist, cloud-init renders the network
               config for systemd-networkd). Built into the image cache the first time.

Per run, the wall time from launch until

  agent   qemu-guest-agent answers ``guest-sync-delimited`` + ``guest-ping``. vmkit: when ``vmkit start``
          returns (it returns once the agent answered). Plain: this script's own probe, the same loop
          vmkit uses (a 3 s session timeout, 0.5 s between tries).
  ssh     ``ssh ... true`` logs in with the generated user key (a new connection every 0.5 s, from
          launch on, for every variant). vmkit pins the guest's host key (StrictHostKeyChecking yes);
          the stock seeds have no host key to pin, so the plain variants accept whatever key they see.
  final   cloud-init's final stage is done: its final_message on the serial console (vmkit's
          FINAL_MARKER, which the debian-12 image also sets for foreign seeds, or the stock
          "Cloud-init v. ... finished at" line).

and the CPU seconds the QEMU process had used at that moment (user + system, all threads): a busy
host stretches the wall times a lot, the CPU time a guest needs to get there much less.

What is the same in every variant: q35, TCG (``thread=multi``), ``-cpu max``, the CPU count and memory
of a default ``vmkit create --image debian-12`` (or ``--cpus``/``--memory``), a qcow2 overlay of
the base image's size, direct kernel boot with the image's kernel, initrd and command line, the seed
as a second virtio-blk disk, user networking with an SSH port forward, virtio-serial for the agent
and virtio-rng.

What differs, on purpose:

* vmkit's seed (``cloudinit.render_seed``) pins a pre-generated ed25519 host key, switches off the
  locale module and the console key printing; the stock seed (:func:`stock_user_data`) only creates
  a user with an SSH key and passwordless sudo (what a user writes without knowing vmkit's tricks),
  so cloud-init generates RSA, ECDSA and ed25519 host keys, and its locale module fails (no locale
  is generated on these images: ``status: error``; the later modules and stages still run; the
  status is printed).
* vmkit's QEMU is started paused by its supervisor and continued once QMP is up, and its serial
  console goes through the supervisor (plain: ``-serial file:``); ``vmkit start`` includes the
  CLI's and the supervisor's Python start-up.
* The debian-12 image's own trims (cloud.cfg, units, initrd...) apply to both ``vmkit`` and ``plain``;
  ``plain-stock`` has none of them. Its kernel command line is :data:`debian.STOCK_CMDLINE`.
* A Debian 12 cloud image also runs ``netplan generate`` at boot and has more packages; the stock
  image here has neither, so that baseline is if anything a little fast.

The host is shared and runs under TCG: other QEMU guests on it slow every variant. Look at the
spread, and at the load average printed at the end. After the runs, one extra vmkit boot (untimed)
shows where its boot time goes: ``systemd-analyze`` (critical chain, blame) and
``cloud-init analyze`` through ``vmkit exec`` (``--analyze-stock`` does the same for the stock
image through SSH).

    .venv/bin/python benchmarks/boot_bench.py [--repeat 3] [--json FILE] [--variants vmkit,plain,plain-stock]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmkit.host import cloudinit
from vmkit.host import sshkeys as keys
from vmkit.host.images import debian, qemuimg
from vmkit.host.images.store import Image, ImageStore
from vmkit.host.provision import free_port
from vmkit.runtime.guest.agent import GuestAgent, GuestAgentError

REPO = Path(__file__).resolve().parent.parent
VMKIT = [sys.executable, "-m", "vmkit.cli.main"] if not (REPO / ".venv/bin/vmkit").exists() \
    else [str(REPO / ".venv/bin/vmkit")]
STAGES = ("agent", "ssh", "final")
VARIANTS = ("vmkit", "plain", "plain-stock")
TARGET = 0.6
STOCK_FINAL = re.compile(r"Cloud-init v\. \S+ finished at")
RUN_TIMEOUT = 420.0


def image_store() -> ImageStore:
    cache = os.environ.get("VMKIT_IMAGE_CACHE") or str(REPO / ".cache" / "images")
    os.environ["VMKIT_IMAGE_CACHE"] = cache  # the vmkit CLI reads the same cache
    return ImageStore(Path(cache))


def get_images(store: ImageStore, variants: list[str]) -> dict[str, Image]:
    def show(ev: debian.BuildProgress) -> None:
        if ev.stage_done:
            print(f"  [{ev.elapsed:6.1f} s] {ev.message}", flush=True)

    images: dict[str, Image] = {}
    if {"vmkit", "plain"} & set(variants):
        if not store.exists("debian-12"):
            print("building debian-12 (once)", flush=True)
        images["debian-12"] = debian.build_debian(store, progress=show)
    if "plain-stock" in variants:
        if not store.exists("debian-12-stock"):
            print("building debian-12-stock, the untrimmed baseline image (once)", flush=True)
        images["debian-12-stock"] = debian.build_debian(store, stock=True, progress=show)
    return images


# --- probes ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One boot: stage -> seconds since launch, plus what was seen."""

    variant: str
    round: int
    times: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # QEMU's CPU seconds at each stage
    cloud_init_status: str = ""
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "round": self.round, **{k: round(v, 2) for k, v in self.times.items()},
                **{f"{k}_cpu": round(v, 2) for k, v in self.cpu.items()},
                "cloud_init_status": self.cloud_init_status, "error": self.error}


class Probes:
    """Background probes that record, relative to ``t0``, when SSH and the agent first work."""

    def __init__(self, t0: float, run: Run, qemu_pid: Callable[[], int | None]) -> None:
        self.t0 = t0
        self.run = run
        self.qemu_pid = qemu_pid
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.last_ssh_error = ""

    def mark(self, stage: str) -> None:
        now = time.monotonic() - self.t0
        cpu = cpu_seconds(self.qemu_pid())
        with self.lock:
            if stage not in self.run.times:
                self.run.times[stage] = now
                if cpu is not None:
                    self.run.cpu[stage] = cpu

    def start_ssh(self, argv: list[str]) -> None:
        def loop() -> None:
            while not self.stop.is_set():
                try:
                    r = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=30, check=False)
                except subprocess.TimeoutExpired:
                    continue
                if r.returncode == 0:
                    self.mark("ssh")
                    return
                self.last_ssh_error = r.stderr.strip()[-200:]
                self.stop.wait(0.5)

        self.spawn(loop)

    def start_agent(self, sock: Path) -> None:
        async def ping() -> None:  # the same loop as VirtualMachine._wait_agent
            while not self.stop.is_set():
                try:
                    async with GuestAgent(sock, timeout=3.0) as agent:
                        await agent.execute("guest-ping")
                        self.mark("agent")
                        return
                except (GuestAgentError, OSError):
                    await asyncio.sleep(0.5)

        self.spawn(lambda: asyncio.run(ping()))

    def spawn(self, fn: Callable[[], None]) -> None:
        th = threading.Thread(target=fn, daemon=True)
        th.start()
        self.threads.append(th)

    def close(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(timeout=40)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (all its threads), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pid_from_file(path: Path) -> Callable[[], int | None]:
    def read() -> int | None:
        try:
            return int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
    return read


def final_seen(serial_log: Path) -> bool:
    try:
        text = serial_log.read_text(errors="replace")
    except FileNotFoundError:
        return False
    return cloudinit.FINAL_MARKER in text or STOCK_FINAL.search(text) is not None


def wait_stages(run: Run, t0: float, serial_log: Path, alive: Callable[[], str | None],
                probes: Probes) -> None:
    """Until all stages are seen (or the run times out / the VM dies); the final marker is polled here."""
    while time.monotonic() - t0 < RUN_TIMEOUT:
        if "final" not in run.times and final_seen(serial_log):
            probes.mark("final")
        if all(s in run.times for s in STAGES):
            return
        dead = alive()
        if dead:
            run.error = dead
            return
        time.sleep(0.2)
    missing = [s for s in STAGES if s not in run.times]
    run.error = f"timed out after {RUN_TIMEOUT:.0f} s waiting for {', '.join(missing)}; ssh: {probes.last_ssh_error}"


def measure(run: Run, t0: float, serial_log: Path, alive: Callable[[], str | None], probes: Probes,
            ssh: list[str]) -> bool:
    """Wait for every stage (:func:`wait_stages`), stop the probes, read cloud-init's verdict; True if no error."""
    try:
        wait_stages(run, t0, serial_log, alive, probes)
    finally:
        probes.close()
    if run.error:
        return False
    run.cloud_init_status = cloud_init_status(ssh)
    return True


def ssh_base(key: Path, port: int, *, known_hosts: Path | None, user: str) -> list[str]:
    pin = (["-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes"] if known_hosts
           else ["-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no"])
    return ["ssh", "-F", "/dev/null", "-i", str(key), "-p", str(port), *pin, "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", f"{user}@127.0.0.1"]


def cloud_init_status(ssh: list[str]) -> str:
    """``cloud-init status`` (with the first error line if it is ``error``)."""
    try:
        r = subprocess.run([*ssh, "cloud-init status --long"], capture_output=True, text=True, timeout=60,
                           check=False)
    except subprocess.TimeoutExpired:
        return "(ssh timed out)"
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    status = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("status:")), r.stderr.strip())
    if status == "error":
        after = lines[[ln.startswith("detail:") for ln in lines].index(True) + 1:] \
            if any(ln.startswith("detail:") for ln in lines) else []
        if after:
            status += f" ({after[0][:70]})"
    return status[:90]


# --- vmkit -----------------------------------------------------------------------------------


def vmkit(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*VMKIT, *args], capture_output=True, text=True, timeout=timeout, check=False,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise RuntimeError(f"vmkit {shlex.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def instance_dir(name: str) -> Path:
    return Path(os.environ["VMKIT_HOME"]) / "instances" / name


def vmkit_create(name: str, cpus: int | None, memory: str | None) -> tuple[int, str]:
    """Create the instance (untimed); return its CPU count and memory, to give plain QEMU the same."""
    args = ["create", name, "--image", "debian-12"]
    if cpus is not None:
        args += ["--cpus", str(cpus)]
    if memory is not None:
        args += ["--memory", memory]
    vmkit(*args)
    cfg = json.loads(vmkit("inspect", name).stdout)["config"]
    return int(cfg["cpus"]), str(cfg["memory"])


def vmkit_delete(name: str) -> None:
    if instance_dir(name).exists():
        r = vmkit("delete", "--force", name, timeout=120, check=False)
        if r.returncode != 0:
            print(f"warning: vmkit delete {name} failed: {r.stderr.strip()}", file=sys.stderr)


def run_vmkit(rnd: int, cpus: int | None, memory: str | None, *, after: Callable[[str], None] | None = None) -> Run:
    name = f"boot-bench-{rnd}"
    run = Run("vmkit", rnd)
    proc: subprocess.Popen[str] | None = None
    try:
        vmkit_create(name, cpus, memory)
        d = instance_dir(name)
        ssh = ["ssh", "-F", str(d / "ssh_config"), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", name]
        out = Path(os.environ["VMKIT_HOME"]) / f"{name}.start.log"  # outlives the instance directory
        with out.open("w") as outf:
            t0 = time.monotonic()
            proc = subprocess.Popen([*VMKIT, "start", name], stdin=subprocess.DEVNULL, stdout=outf,
                                    stderr=subprocess.STDOUT, text=True)
        probes = Probes(t0, run, pid_from_file(d / "qemu.pid"))
        start_proc = proc

        def started() -> None:  # `vmkit start` returns once the agent answered
            if start_proc.wait() == 0:
                probes.mark("agent")

        probes.spawn(started)
        probes.start_ssh(ssh)

        def alive() -> str | None:
            rc = start_proc.poll()
            if rc is not None and rc != 0:
                return f"vmkit start failed ({rc}): {out.read_text(errors='replace').strip()[-500:]}"
            return None

        if measure(run, t0, d / "serial.log", alive, probes, ssh) and after is not None:
            after(name)
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # `vmkit start` takes its half-started VM down
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        raise
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        vmkit_delete(name)
    return run


# --- plain QEMU ------------------------------------------------------------------------------


def stock_user_data(user: str, public_key: str) -> str:
    """What a user writes without vmkit: one user with an SSH key and sudo, nothing else."""
    return ("#cloud-config\n"
            "users:\n"
            f"  - name: {user}\n"
            "    sudo: ALL=(ALL) NOPASSWD:ALL\n"
            "    shell: /bin/bash\n"
            f"    ssh_authorized_keys: [{json.dumps(public_key)}]\n")


def plain_argv(img: Image, work: Path, *, cpus: int, memory: str, port: int) -> list[str]:
    assert img.kernel is not None and img.initrd is not None
    return [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max",
        "-smp", str(cpus), "-m", memory, "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", img.manifest.cmdline,
        "-drive", f"file={work / 'disk.qcow2'},if=none,id=root,format=qcow2",
        "-device", "virtio-blk-pci,drive=root",
        "-drive", f"file={work / 'seed.iso'},if=none,id=seed,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=seed",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=n0",
        "-chardev", f"socket,id=qga0,path={work / 'qga.sock'},server=on,wait=off",
        "-device", "virtio-serial-pci",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-device", "virtio-rng-pci",
        "-serial", f"file:{work / 'serial.log'}",
    ]


def run_plain(variant: str, img: Image, rnd: int, tmp: Path, *, cpus: int, memory: str,
              after: Callable[[list[str]], None] | None = None) -> Run:
    assert img.disk is not None
    run = Run(variant, rnd)
    work = tmp / f"{variant}-{rnd}"
    work.mkdir()
    user_key = keys.generate_keypair(comment="bench@host")
    user_key.write(work / "id_ed25519")
    cloudinit.write_seed_iso(work / "seed.iso", {
        cloudinit.META_DATA: f"instance-id: {cloudinit.new_instance_id()}\nlocal-hostname: {variant}-{rnd}\n",
        cloudinit.USER_DATA: stock_user_data("bench", user_key.public_openssh),
    })
    qemuimg.create_overlay(work / "disk.qcow2", img.disk, backing_format=img.manifest.disk_format or "qcow2")
    port = free_port()
    argv = plain_argv(img, work, cpus=cpus, memory=memory, port=port)
    ssh = ssh_base(work / "id_ed25519", port, known_hosts=None, user="bench")
    proc: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=(work / "qemu.log").open("wb"))
        qemu = proc
        probes = Probes(t0, run, lambda: qemu.pid)
        probes.start_ssh(ssh)
        probes.start_agent(work / "qga.sock")

        def alive() -> str | None:
            if qemu.poll() is None:
                return None
            return f"QEMU exited ({qemu.returncode}): {(work / 'qemu.log').read_text(errors='replace')[-300:]}"

        if measure(run, t0, work / "serial.log", alive, probes, ssh) and after is not None:
            after(ssh)
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
        if run.error:
            tail = (work / "serial.log").read_text(errors="replace").splitlines()[-15:] \
                if (work / "serial.log").exists() else []
            run.error += "\n  serial: " + "\n  serial: ".join(tail)
        shutil.rmtree(work, ignore_errors=True)
    return run


# --- where the time goes ---------------------------------------------------------------------

ANALYZE = (
    ("systemd-analyze", "systemctl is-system-running --wait >/dev/null; systemd-analyze"),
    ("critical chain", "systemd-analyze critical-chain --no-pager | sed -n '3,22p'"),
    ("blame (top 15)", "systemd-analyze blame --no-pager | head -15"),
    ("cloud-init stages", "cloud-init analyze show | grep -E 'Finished stage|Total Time' | head -8"),
    ("cloud-init blame (top 10)", "cloud-init analyze blame | sed -n '2,11p'"),
)


def analyze_vmkit(name: str) -> dict[str, str]:
    out = {}
    for title, cmd in ANALYZE:
        r = vmkit("exec", "--timeout", "180", name, "--", "sh", "-c", cmd, timeout=240, check=False)
        out[title] = (r.stdout + r.stderr).rstrip()
    return out


def analyze_ssh(ssh: list[str]) -> dict[str, str]:
    out = {}
    for title, cmd in ANALYZE:
        r = subprocess.run([*ssh, f"sudo sh -c {shlex.quote(cmd)}"], capture_output=True, text=True,
                           timeout=240, check=False)
        # a stock seed does not manage /etc/hosts: sudo complains about the new host name
        err = "".join(ln for ln in r.stderr.splitlines(keepends=True) if "unable to resolve host" not in ln)
        out[title] = (r.stdout + err).rstrip()
    return out


def print_analysis(label: str, analysis: dict[str, str]) -> None:
    print(f"\nwhere the time goes: {label}")
    for title, text in analysis.items():
        print(f"  -- {title}")
        for line in text.splitlines():
            print(f"     {line.rstrip()}")


# --- report ----------------------------------------------------------------------------------


Summary = dict[str, dict[str, dict[str, float]]]


def summarize(runs: list[Run], what: str = "times") -> Summary:
    out: Summary = {}
    for variant in VARIANTS:
        for stage in STAGES:
            xs = [getattr(r, what)[stage] for r in runs
                  if r.variant == variant and stage in getattr(r, what) and not r.error]
            if xs:
                out.setdefault(variant, {})[stage] = {"median": statistics.median(xs), "min": min(xs),
                                                      "max": max(xs), "n": len(xs)}
    return out


def print_table(title: str, runs: list[Run], summary: Summary) -> None:
    print(title)
    print(f"{'variant':12} " + " ".join(f"{s:>20}" for s in STAGES) + "   runs")
    for variant, stages in summary.items():
        cells = []
        for s in STAGES:
            v = stages.get(s)
            cells.append(f"{v['median']:6.1f} ({v['min']:5.1f}-{v['max']:5.1f})" if v else f"{'-':>20}")
        n = sum(1 for r in runs if r.variant == variant and not r.error)
        print(f"{variant:12} " + " ".join(f"{c:>20}" for c in cells) + f"   {n}")


def print_ratios(label: str, summary: Summary) -> None:
    vm = summary.get("vmkit", {})
    for base in ("plain", "plain-stock"):
        b = summary.get(base)
        if not b or not vm:
            continue
        parts = [f"{s} {vm[s]['median'] / b[s]['median']:.2f}x" for s in STAGES if s in vm and s in b]
        print(f"  {label} vmkit / {base:11} per stage: " + ", ".join(parts))
    b = summary.get("plain-stock", {})
    if "agent" in vm and "ssh" in b:
        # vmkit's agent answers once logins work; the stock image's agent answers before that.
        r = vm["agent"]["median"] / b["ssh"]["median"]
        print(f"  {label} ready: vmkit start (agent) / plain-stock SSH login: {r:.2f}x -> "
              f"{'meets' if r <= TARGET else 'misses'} the {TARGET}x target")


def print_report(runs: list[Run], cpus: int, memory: str) -> None:
    wall, cpu = summarize(runs), summarize(runs, "cpu")
    print(f"\nDebian 12 guest boot under TCG, {cpus} vCPU, {memory}: median (min-max) over the runs that finished")
    print("the host is shared (other QEMU guests): wall times vary with its load; QEMU's CPU seconds much less")
    print_table("wall seconds from launch until", runs, wall)
    print_table("QEMU CPU seconds used until then", runs, cpu)
    statuses = {f"{r.variant}: {r.cloud_init_status}" for r in runs if r.cloud_init_status}
    if statuses:
        print("cloud-init status after the runs: " + "; ".join(sorted(statuses)))
    print(f"ratios of medians (target: vmkit <= {TARGET}x the baseline)")
    print_ratios("wall", wall)
    print_ratios("cpu ", cpu)
    for r in runs:
        if r.error:
            print(f"failed run: {r.variant} round {r.round}: {r.error}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each boots every variant once")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--cpus", type=int, default=None, help="vCPUs (default: what vmkit create gives debian-12)")
    ap.add_argument("--memory", default=None, help="guest RAM, e.g. 1G (default: vmkit create's)")
    ap.add_argument("--json", type=Path, default=None, help="also write every run and the summary here")
    ap.add_argument("--no-analyze", action="store_true", help="skip the extra vmkit boot that shows where time goes")
    ap.add_argument("--analyze-stock", action="store_true", help="also analyze one plain-stock boot")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}: use {', '.join(VARIANTS)}")

    images = get_images(image_store(), variants)
    runs: list[Run] = []
    analyses: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="vmkit-boot-bench-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["VMKIT_HOME"] = str(tmp / "home")  # throw-away instances
        cpus, memory = args.cpus, args.memory
        if cpus is None or memory is None:  # what a default `vmkit create` gives, for plain QEMU too
            c, m = vmkit_create("boot-bench-probe", args.cpus, args.memory)
            vmkit_delete("boot-bench-probe")
            cpus, memory = cpus or c, memory or m
        mem_arg = f"{int(memory) >> 20}M" if memory.isdigit() else memory
        try:
            for rnd in range(args.repeat):
                order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
                for variant in order:
                    print(f"round {rnd + 1}/{args.repeat}: {variant} ...", end=" ", flush=True)
                    if variant == "vmkit":
                        run = run_vmkit(rnd, cpus, mem_arg)
                    else:
                        img = images["debian-12" if variant == "plain" else "debian-12-stock"]
                        run = run_plain(variant, img, rnd, tmp, cpus=cpus, memory=mem_arg)
                    runs.append(run)
                    print(", ".join(f"{s} {run.times[s]:.1f} s" for s in STAGES if s in run.times)
                          + (f"  FAILED: {run.error.splitlines()[0]}" if run.error else "")
                          + (f"  [cloud-init: {run.cloud_init_status}]" if run.cloud_init_status else ""), flush=True)
            if not args.no_analyze and "vmkit" in variants:
                print("one more vmkit boot, to show where its time goes ...", flush=True)
                extra = run_vmkit(args.repeat, cpus, mem_arg,
                                  after=lambda name: analyses.__setitem__("vmkit", analyze_vmkit(name)))
                if extra.error:
                    print(f"  failed: {extra.error}")
            if args.analyze_stock and "plain-stock" in variants:
                print("one more plain-stock boot, to show where its time goes ...", flush=True)
                run_plain("plain-stock", images["debian-12-stock"], args.repeat, tmp, cpus=cpus, memory=mem_arg,
                          after=lambda ssh: analyses.__setitem__("plain-stock", analyze_ssh(ssh)))
        except KeyboardInterrupt:
            print("\ninterrupted: reporting the runs so far", file=sys.stderr)

    print_report(runs, cpus, mem_arg)
    for label, analysis in analyses.items():
        print_analysis(f"{label} (one extra boot)", analysis)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "cpus": cpus, "memory": mem_arg, "target": TARGET, "load_average": os.getloadavg()[0],
            "runs": [r.to_dict() for r in runs], "summary": {"wall": summarize(runs), "cpu": summarize(runs, "cpu")},
            "analysis": analyses,
        }, indent=1) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
