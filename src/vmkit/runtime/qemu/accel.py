"""Which accelerator works on this host, and why.

KVM is used only where ``/dev/kvm`` opens read-write *and* the host runs a hardware KVM
module (``kvm_intel`` or ``kvm_amd``). On a nested-PVM host (``kvm_pvm``) stock guest
kernels hang under ``-accel kvm`` (CPUID.01H:ECX.pni unsupported), so vmkit uses TCG there,
as it does where there is no ``/dev/kvm`` at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmkit.config import host_arch
from vmkit.errors import HostError

AccelName = Literal["kvm", "tcg"]


@dataclass(frozen=True)
class AccelChoice:
    name: AccelName
    reason: str

    def argv(self, tcg_cache: int | None = None) -> list[str]:
        """QEMU's -accel option; ``tcg_cache`` (bytes): TCG's translation cache (tb-size), else QEMU's default."""
        if self.name == "kvm":
            return ["-accel", "kvm"]
        return ["-accel", "tcg,thread=multi" + (f",tb-size={tcg_cache >> 20}" if tcg_cache else "")]

    @property
    def default_cpu(self) -> str:
        # Under KVM pass the host CPU through; TCG emulates everything it can ("max").
        return "host" if self.name == "kvm" else "max"


@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    reason: str


def kvm_status(dev: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")) -> KvmStatus:
    """Whether hardware KVM is usable here, with the reason either way."""
    if not dev.exists():
        return KvmStatus(False, f"{dev} does not exist (no KVM in this kernel or no nested virtualisation)")
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmStatus(False, f"{dev} cannot be opened read-write ({exc.strerror}): add your user to the kvm group")
    os.close(fd)
    if (sys_module / "kvm_pvm").exists():
        return KvmStatus(False, "the host's KVM is nested PVM (kvm_pvm): stock guest kernels hang under it")
    for mod in ("kvm_intel", "kvm_amd"):
        if (sys_module / mod).exists():
            return KvmStatus(True, f"{dev} opens and the host runs {mod}")
    return KvmStatus(False, f"{dev} opens but neither kvm_intel nor kvm_amd is loaded")


def arch_kvm_status(arch: str, *, host: str | None = None, dev: Path = Path("/dev/kvm"),
                    sys_module: Path = Path("/sys/module")) -> KvmStatus:
    """Whether KVM can run ``arch`` guests here: only the host's own architecture, and only where
    :func:`kvm_status` says KVM is usable."""
    host = host or host_arch()
    if arch != host:
        return KvmStatus(False, f"{arch} is not this host's architecture ({host}): KVM runs guests of the "
                                "host's own architecture only, so QEMU translates every instruction (TCG)")
    return kvm_status(dev, sys_module)


def choose(requested: str = "auto", *, arch: str | None = None, dev: Path = Path("/dev/kvm"),
           sys_module: Path = Path("/sys/module")) -> AccelChoice:
    """The accelerator to use for ``requested`` (auto, kvm or tcg) for a guest of ``arch``
    (default: the host's own)."""
    if requested == "tcg":
        return AccelChoice("tcg", "TCG was asked for")
    status = arch_kvm_status(arch, dev=dev, sys_module=sys_module) if arch else kvm_status(dev, sys_module)
    if requested == "kvm":
        if not status.usable:
            raise HostError(f"accel: KVM was asked for but is not usable: {status.reason}",
                            hint="use accel: auto or tcg")
        return AccelChoice("kvm", status.reason)
    if requested != "auto":
        raise HostError(f"accel: unknown accelerator {requested!r}", hint="use auto, kvm or tcg")
    if status.usable:
        return AccelChoice("kvm", status.reason)
    return AccelChoice("tcg", f"software emulation (TCG, multi-threaded): {status.reason}")
