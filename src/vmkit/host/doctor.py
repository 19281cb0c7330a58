"""What vmkit needs from the host, and whether it is there (``vmkit doctor``)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

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
    out.append(migration_check(choice.name))
    return out


def migration_check(accel: str) -> Check:
    """What `vmkit migrate` does on this host: live pre-copy, or a paused copy where that would corrupt."""
    version = migration.host_qemu_version()
    safety = migration.live_safety(accel, 2, version)
    detail = (f"live pre-copy ({safety.reason})" if safety.live else
              f"machines are copied paused: {safety.reason}")
    return Check(name="migration", ok=safety.live, detail=detail,
                 hint=None if safety.live else "live pre-copy needs KVM or QEMU >= 9.0 (vmkit migrate --live "
                                               "verifies every page instead)", required=False)
