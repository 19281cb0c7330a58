"""What vmkit needs from the host, and whether it is there (``vmkit doctor``)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vmkit.config import ARCHES, host_arch
from vmkit.host import cgroups
from vmkit.runtime import migration
from vmkit.runtime.qemu import accel as accel_mod


@dataclass(frozen=True)
class Tool:
    name: str  # executable (or absolute path)
    package: str  # Debian package that provides it
    purpose: str
    required: bool = True


TOOLS: tuple[Tool, ...] = (
    Tool("qemu-system-x86_64", "qemu-system-x86", "runs the virtual machines"),
    Tool("qemu-system-aarch64", "qemu-system-arm", "runs aarch64 guests (--arch aarch64)", required=False),
    Tool("qemu-aarch64-static", "qemu-user-static", "aarch64 programs in x86-64 guests (vm.yaml binfmt) "
         "and building aarch64 images", required=False),
    Tool("qemu-img", "qemu-utils", "creates and converts disk images"),
    Tool("apt-get", "apt", "downloads the kernel and busybox for the micro guest"),
    Tool("dpkg-deb", "dpkg", "unpacks Debian packages for image builds"),
    Tool("mmdebstrap", "mmdebstrap", "builds the Debian guest image", required=False),
    Tool("mke2fs", "e2fsprogs", "makes the Debian guest's root filesystem", required=False),
    Tool("ssh", "openssh-client", "`vmkit shell` into guests", required=False),
    Tool("/usr/lib/qemu/virtiofsd", "qemu-system-common", "virtiofs shared folders", required=False),
    Tool("qemu-nbd", "qemu-utils", "NBD benchmark baseline", required=False),
)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str | None
    required: bool


def find_tool(tool: Tool) -> str | None:
    if tool.name.startswith("/"):
        return tool.name if Path(tool.name).exists() else None
    return shutil.which(tool.name)


def checks() -> list[Check]:
    out = []
    for tool in TOOLS:
        where = find_tool(tool)
        out.append(Check(
            name=tool.name, ok=where is not None,
            detail=f"{where} ({tool.purpose})" if where else f"missing ({tool.purpose})",
            hint=None if where else f"apt-get install {tool.package}", required=tool.required,
        ))
    choice = accel_mod.choose("auto")
    kvm = accel_mod.kvm_status()
    out.append(Check(name="accelerator", ok=True, detail=f"{choice.name}: {choice.reason}",
                     hint=None if kvm.usable else "TCG works everywhere but is slower than KVM", required=True))
    out += arch_checks()
    out.append(cgroup_check())
    out.append(migration_check(choice.name))
    return out


def arch_checks(host: str | None = None) -> list[Check]:
    """Per guest architecture: which accelerator its guests get here, and why (KVM runs only the
    host's own architecture, where it is usable; every other one is translated by TCG), and whether
    the QEMU that runs it is installed."""
    host = host or host_arch()
    out = []
    for arch, info in ARCHES.items():
        status = accel_mod.arch_kvm_status(arch, host=host)
        binary = shutil.which(info.qemu_system)
        how = "KVM (hardware virtualisation)" if status.usable else "TCG (QEMU translates every instruction)"
        detail = f"{how}: {status.reason}" if binary else f"{info.qemu_system} missing; would be {how}: {status.reason}"
        hint = None
        if binary is None:
            package = "qemu-system-x86" if arch == "x86_64" else "qemu-system-arm"
            hint = f"apt-get install {package}"
        elif not status.usable:
            hint = ("no KVM for a foreign architecture: slower than the host (see vmkit bench cpu)" if arch != host
                    else "TCG works everywhere but is slower than KVM")
        out.append(Check(name=f"arch {arch}", ok=binary is not None, detail=detail, hint=hint,
                         required=arch == host))
    return out


def cgroup_check(driver: cgroups.Driver | bool | None = True) -> Check:
    """Which cgroup version is in use and which controllers vmkit can use (for machines' ``limits``)."""
    found = cgroups.detect() if driver is True else driver
    if not isinstance(found, cgroups.Driver) or not found.controllers:
        return Check(name="cgroups", ok=False, detail="no cgroup controllers: machines run without limits",
                     hint="mount cgroup v2 with controllers, or the v1 cpu, cpuacct, cpuset and memory hierarchies",
                     required=False)
    writable = all(os.access(d.parent, os.W_OK) for d in found.dirs(cgroups.PARENT))
    layout = "unified" if found.version == 2 else "per-controller mounts"
    swap = "swap accounting" if found.swap_accounting() else "no swap accounting (swap_max refused)"
    detail = (f"v{found.version} ({layout}): vmkit can use {', '.join(found.controllers)}; {swap}; machines run "
              f"in {found.dirs(cgroups.PARENT)[0]}/<name>")
    return Check(name="cgroups", ok=writable, detail=detail if writable else f"{detail}, which this user cannot "
                 "create", hint=None if writable else "machines' limits need root", required=False)


def migration_check(accel: str) -> Check:
    """What `vmkit migrate` does on this host: live pre-copy, or a paused copy where that would corrupt."""
    version = migration.host_qemu_version()
    pad = migration.ram_pad(accel, version)
    safety = migration.live_safety(accel, version, [(1 << 30) + pad])  # any machine vmkit starts here
    detail = (f"live pre-copy ({safety.reason})" if safety.live else f"machines are copied paused: {safety.reason}")
    hint = None
    if not safety.live:
        hint = "live pre-copy needs KVM or QEMU >= 9.0 (vmkit migrate --live verifies every page instead)"
    elif pad:
        detail += (f"; each machine gets {pad >> 10} KiB more RAM for it, and machines with hot-pluggable memory "
                   "(max_memory) are copied with the guest paused. The pad makes QEMU's first dirty-page sync go "
                   "page by page under its big lock: the guest's network and timers stall while it runs, when a "
                   "migration starts (benchmarks/dirtysync_bench.py)")
        hint = "KVM, or QEMU >= 9.0 (on Debian 12: bookworm-backports), migrates without the pad and its stall"
    return Check(name="migration", ok=safety.live, detail=detail, hint=hint, required=False)
