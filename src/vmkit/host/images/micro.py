"""The "micro" test guest: a Debian kernel plus a busybox initramfs that boots in seconds under TCG.

:func:`build_micro` downloads a kernel package (default ``linux-image-cloud-amd64``, resolved to
the concrete ``linux-image-<abi>-cloud-amd64``) and ``busybox-static`` through the host's apt,
then writes an image ``micro`` of kind ``initramfs`` into the image store: ``vmlinuz``,
``initrd.img`` (a deterministic gzip cpio) and a manifest whose ``extra`` records which kernel
modules were included, which the kernel has built in and which it lacks.

The initramfs holds ``/bin/busybox`` with every applet as a symlink, the kernel modules listed
in :data:`WANTED_MODULES` that the kernel ships as modules (plus everything they depend on,
from each module's ``.modinfo``), ``/lib/modules/<version>/modules.dep`` so ``modprobe`` works
in the guest, and ``/init``.

The ``/init`` contract
======================
Other code (integration tests, the VM object, the supervisor) relies on exactly this:

1. Mounts ``/proc``, ``/sys``, ``devtmpfs`` on ``/dev`` and ``devpts``; loads every included
   module with ``insmod`` in dependency order (best effort, errors are silenced).
2. Arms the power button *before* READY: with the module ``button`` (``CONFIG_ACPI_BUTTON``)
   the ACPI power button becomes an input device named "Power Button", and ``evdev`` gives it
   a ``/dev/input/eventN`` node. A background reader waits for one event on each such node;
   QEMU's ``system_powerdown`` (ACPI power button press) then makes the guest print a line
   ``VMKIT-POWEROFF``, ``sync`` and ``poweroff -f``, so QEMU exits cleanly (status 0) within
   about a second. There is no ``/proc/acpi/event`` in modern kernels, so nothing else can see
   the button. On QEMU's aarch64 ``virt`` machine the power key is a line of its PL061 GPIO
   controller (named in the device tree under ``gpio-keys``); a kernel without the gpio-keys
   driver (Debian's arm64 cloud kernel) gets it through ``/sys/class/gpio`` instead: init exports
   that line with a rising-edge interrupt, and a background loop looks at the interrupt's count
   every 0.5 s (a press is a 100 ms pulse), with the same effect when it grows.
   If no such device exists, init prints ``vmkit: no power button ...`` instead.
   A press that arrives before READY may be lost: callers should send ``system_powerdown``
   after READY, and fall back to ``quit``/kill after a timeout.
3. Prints a line ``VMKIT-READY`` on the console (the kernel's ``console=``, ``ttyS0`` by
   default) once the above is done.
4. Reads the kernel command line (``/proc/cmdline``):

   * ``vmkit.counter=1`` starts a background loop printing ``vmkit-tick <N>`` (N = 0, 1, 2, ...)
     every 0.5 s on the console. It starts right after READY, before any run command.
   * ``vmkit.run=<base64>`` (see :func:`run_parameter`) runs ``sh -c <decoded command>`` with
     stdin ``/dev/null``, cwd ``/``, stdout and stderr merged and streamed to the console between
     a line ``VMKIT-RUN-BEGIN`` and a line ``VMKIT-RUN-END rc=<exit code>``. If the output does
     not end with a newline one is added before the END line. A command that cannot be decoded
     gives rc 125. Counter ticks may interleave with the output; :func:`parse_run_output`
     drops them.
   * ``vmkit.then=poweroff`` then prints ``VMKIT-POWEROFF`` and powers off (after the run
     command, if any). Default (``vmkit.then=shell``): keep running.
5. Runs an interactive busybox shell on the console (``setsid cttyhack sh``), respawned when it
   exits, so ``vmkit console`` gives a ``vmkit-micro:/# `` prompt.

The serial console adds carriage returns (``\\r\\n``); the parsing helpers accept both.
``panic=-1`` in the default command line reboots on a kernel panic: run QEMU with ``-no-reboot``
so a panic ends the process instead of looping.

Guest layout: ``/etc/vmkit/modules`` lists the module files in load order;
``/lib/modules/<version>/modules.dep`` makes busybox ``modprobe`` work for them.

Manifest ``extra``: ``kernel_package`` / ``kernel_package_version`` (the concrete package),
``kernel_package_requested``, ``busybox_version``, ``modules`` (wanted modules included),
``modules_loaded`` (all included modules, load order), ``modules_builtin``, ``modules_missing``,
``power_button`` (button and evdev available, or the GPIO power key through sysfs), ``markers``,
``build_seconds``; the manifest's ``recipe`` is :data:`RECIPE` (:func:`is_outdated`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmkit.config import ARCHES, host_arch
from vmkit.errors import ConfigError, HostError, ImageError
from vmkit.host import paths
from vmkit.host.images import catalogue, debpkg
from vmkit.host.images.initramfs import CpioArchive
from vmkit.host.images.store import Image, ImageManifest, ImageStore

NAME = catalogue.MICRO
DEFAULT_KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet"
KERNEL_PACKAGES = {"x86_64": DEFAULT_KERNEL_PACKAGE, "aarch64": "linux-image-cloud-arm64"}
"""The micro guest's default kernel per architecture (``build_micro(arch=...)``)."""

READY_MARKER = "VMKIT-READY"
POWEROFF_MARKER = "VMKIT-POWEROFF"
RUN_BEGIN_MARKER = "VMKIT-RUN-BEGIN"
RUN_END_PREFIX = "VMKIT-RUN-END rc="
TICK_PREFIX = "vmkit-tick "
RECIPE = "micro/2"
"""The version of this recipe (the /init above all): ``micro/2`` polls the virt machine's GPIO power key."""
NO_POWER_BUTTON_MESSAGE = "vmkit: no power button input device; system_powerdown will not work"

#: Longest ``vmkit.run=...`` parameter accepted (x86 kernels truncate the command line at 2048).
MAX_RUN_PARAMETER = 1800

#: Modules the micro guest loads if the kernel has them as modules (name as in ``lsmod``), and why.
WANTED_MODULES: dict[str, str] = {
    "virtio_pci": "virtio devices on PCI (all of the below)",
    "virtio_blk": "virtio-blk disks",
    "virtio_scsi": "virtio-scsi disks",
    "sd_mod": "SCSI disks (virtio-scsi, usb-storage)",
    "nvme": "NVMe disks",
    "virtio_net": "virtio-net NICs",
    "virtio_console": "virtio-serial ports (guest agent channel)",
    "virtio_rng": "virtio-rng entropy",
    "virtio_balloon": "memory balloon",
    "virtio_input": "virtio input devices",
    "vmw_vsock_virtio_transport": "vhost-vsock",
    "virtiofs": "virtio-fs shares",
    "9p": "9p shares",
    "9pnet_virtio": "9p over virtio",
    "xhci_pci": "USB (qemu-xhci)",
    "usb_storage": "USB mass storage",
    "uas": "USB attached SCSI",
    "ext4": "ext4 file systems",
    "button": "ACPI power button (system_powerdown)",
    "evdev": "/dev/input/event* (power button events)",
}
ARCH_MODULES: dict[str, dict[str, str]] = {
    "aarch64": {"gpio_keys": "the virt machine's power button (gpio-keys in the device tree)"},
}
"""Modules wanted on one architecture only."""


def image_name(base: str, arch: str) -> str:
    """The store name of a built image for ``arch``: ``micro`` (x86-64), ``micro-aarch64``."""
    return base if arch == "x86_64" else f"{base}-{arch}"


def cmdline_for(arch: str) -> str:
    """The micro guest's default kernel command line on ``arch`` (its first serial port as console)."""
    return DEFAULT_CMDLINE.replace("console=ttyS0", f"console={ARCHES[arch].console}")

INIT_SCRIPT = r"""#!/bin/sh
# vmkit micro guest /init (PID 1). The contract is documented in vmkit.host.images.micro.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=linux
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run/vmkit
mount -t devpts devpts /dev/pts 2>/dev/null
hostname vmkit-micro
cd /

while read -r mod; do
    [ -n "$mod" ] && insmod "$mod" >/dev/null 2>&1
done < /etc/vmkit/modules

poweroff_now() {
    sync
    echo VMKIT-POWEROFF
    poweroff -f
}

buttons=0
for ev in /sys/class/input/event*; do
    [ -r "$ev/device/name" ] || continue
    read -r devname < "$ev/device/name"
    case "$devname" in
        "Power Button"*|gpio-keys*)
            buttons=$((buttons + 1))
            ( dd if="/dev/input/${ev##*/}" of=/dev/null bs=24 count=1 2>/dev/null && poweroff_now ) &
            ;;
    esac
done
# QEMU's virt machine (aarch64) wires its power key to line N of a PL061 GPIO controller and names it
# in the device tree (gpio-keys/poweroff/gpios: the controller's phandle, N, flags). A kernel without
# the gpio-keys driver (Debian's cloud kernel) still has the controller: the line is exported through
# sysfs with a rising-edge interrupt. system_powerdown raises the line for 100 ms only, so the loop
# watches that interrupt's count in /proc/interrupts (shell built-ins only), not the line's value.
gpio_presses() {
    presses=0
    while read -r irq counts; do
        case "$counts" in
            *pl061*gpiolib*)
                for c in $counts; do
                    case "$c" in ''|*[!0-9]*) break ;; esac
                    presses=$((presses + c))
                done ;;
        esac
    done < /proc/interrupts
}
keys=/proc/device-tree/gpio-keys/poweroff/gpios
if [ "$buttons" -eq 0 ] && [ -r "$keys" ] && [ -d /sys/class/gpio ]; then
    set -- $(od -An -v -tx1 "$keys")
    if [ $# -ge 8 ]; then
        phandle=$((0x$1$2$3$4)) line=$((0x$5$6$7$8))
        for chip in /sys/class/gpio/gpiochip*; do
            [ -r "$chip/device/of_node/phandle" ] || continue
            set -- $(od -An -v -tx1 "$chip/device/of_node/phandle")
            [ $# -eq 4 ] && [ $((0x$1$2$3$4)) -eq "$phandle" ] || continue
            read -r base < "$chip/base"
            gpio=$((base + line))
            [ -d "/sys/class/gpio/gpio$gpio" ] || echo "$gpio" > /sys/class/gpio/export 2>/dev/null
            if echo rising > "/sys/class/gpio/gpio$gpio/edge" 2>/dev/null; then
                buttons=$((buttons + 1))
                gpio_presses
                ( before=$presses
                  while gpio_presses; [ "$presses" -eq "$before" ]; do sleep 0.5; done
                  poweroff_now ) &
            fi
        done
    fi
    set --
fi
[ "$buttons" -gt 0 ] || echo "vmkit: no power button input device; system_powerdown will not work"

run=
after=shell
counter=
set -f
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmkit.run=*) run="${arg#vmkit.run=}" ;;
        vmkit.then=*) after="${arg#vmkit.then=}" ;;
        vmkit.counter=*) counter="${arg#vmkit.counter=}" ;;
    esac
done
set +f

echo VMKIT-READY

if [ "$counter" = 1 ]; then
    ( n=0; while :; do echo "vmkit-tick $n"; n=$((n + 1)); sleep 0.5; done ) &
fi

if [ -n "$run" ]; then
    echo VMKIT-RUN-BEGIN
    : > /run/vmkit/run.out
    if echo "$run" | base64 -d > /run/vmkit/run.sh 2>/dev/null; then
        { (sh -c "$(cat /run/vmkit/run.sh)" < /dev/null 2>&1); echo $? > /run/vmkit/run.rc; } \
            | tee /run/vmkit/run.out
        read -r rc < /run/vmkit/run.rc
    else
        echo "vmkit: cannot decode vmkit.run (not base64)"
        rc=125
    fi
    [ -n "$(tail -c 1 /run/vmkit/run.out)" ] && echo
    echo "VMKIT-RUN-END rc=$rc"
fi

case "$after" in
    poweroff) poweroff_now ;;
    shell|"") ;;
    *) echo "vmkit: unknown vmkit.then=$after (use poweroff or shell)" ;;
esac

while :; do
    setsid cttyhack sh -l
    sleep 1
done
"""

PROFILE = r"""export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
PS1='\h:\w\$ '
"""


# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class RunResult:
    """What a ``vmkit.run`` command printed (stdout and stderr merged) and its exit code."""

    output: str
    rc: int

    @property
    def ok(self) -> bool:
        return self.rc == 0


def run_parameter(command: str) -> str:
    """The kernel parameter ``vmkit.run=<base64>`` that makes the micro guest run ``command``."""
    if not command.strip():
        raise ConfigError.single("run", "the command is empty")
    param = "vmkit.run=" + base64.b64encode(command.encode()).decode("ascii")
    if len(param) > MAX_RUN_PARAMETER:
        raise ConfigError.single(
            "run",
            f"the command is too long for the kernel command line ({len(command.encode())} bytes, "
            f"{len(param)} encoded; at most {MAX_RUN_PARAMETER}): put a script on a disk instead",
        )
    return param


def guest_cmdline(base: str = DEFAULT_CMDLINE, *, run: str | None = None, poweroff: bool = False,
                  counter: bool = False) -> str:
    """A full kernel command line for the micro guest: ``base`` plus the vmkit parameters."""
    parts = [base] if base else []
    if counter:
        parts.append("vmkit.counter=1")
    if run is not None:
        parts.append(run_parameter(run))
    if poweroff:
        parts.append("vmkit.then=poweroff")
    return " ".join(parts)


def _lines(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


_END_RE = re.compile(r"^VMKIT-RUN-END rc=(-?\d+)$")
_TICK_RE = re.compile(r"^vmkit-tick \d+$")


def parse_run_output(text: str) -> RunResult | None:
    """The last complete ``VMKIT-RUN-BEGIN`` ... ``VMKIT-RUN-END rc=N`` block in serial text.

    Carriage returns are normalised away and ``vmkit-tick N`` lines (the counter) are dropped.
    The output keeps its final newline (init adds one if the command did not). Returns ``None``
    until the END line has arrived.
    """
    lines = _lines(text)
    result: RunResult | None = None
    begin: int | None = None
    for i, line in enumerate(lines):
        stripped = line.rstrip()
        if stripped == RUN_BEGIN_MARKER:
            begin = i
            continue
        m = _END_RE.match(stripped)
        if m and begin is not None:
            body = [ln for ln in lines[begin + 1:i] if not _TICK_RE.match(ln.rstrip())]
            output = "".join(ln + "\n" for ln in body)
            result = RunResult(output=output, rc=int(m.group(1)))
            begin = None
    return result


_TICK_END_RE = re.compile(r"vmkit-tick (\d+)$")


def parse_ticks(text: str) -> list[int]:
    """The counter values (``vmkit-tick N``) seen in serial text, in order.

    A tick ends its line but may follow other text on it (e.g. the shell prompt, which has no
    newline), so only the end of each line is matched.
    """
    out = []
    for line in _lines(text):
        m = _TICK_END_RE.search(line.rstrip())
        if m:
            out.append(int(m.group(1)))
    return out


def has_line(text: str, marker: str) -> bool:
    """Whether ``marker`` appears as a whole line of serial text."""
    return any(line.strip() == marker for line in _lines(text))


# --------------------------------------------------------------------------- kernel modules


def module_name(filename: str) -> str:
    """``usb-storage.ko.xz`` -> ``usb_storage`` (the name ``lsmod`` shows)."""
    return filename.split(".ko")[0].replace("-", "_")


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressing ``.ko.xz`` / ``.ko.gz`` / ``.ko.zst``."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise HostError("the kernel's modules are zstd-compressed and zstd is not installed",
                            hint="apt-get install zstd")
        return subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=True).stdout
    raise ImageError(f"unknown kernel module format: {path}")


def elf_section(data: bytes, wanted: str) -> bytes | None:
    """The contents of section ``wanted`` of an ELF file (32/64-bit, either endianness)."""
    if data[:4] != b"\x7fELF":
        raise ImageError("not an ELF file")
    is64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    try:
        if is64:
            shoff, = struct.unpack_from(end + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
        else:
            shoff, = struct.unpack_from(end + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x2E)

        def section(i: int) -> tuple[int, int, int]:
            base = shoff + i * shentsize
            if is64:
                name, = struct.unpack_from(end + "I", data, base)
                offset, size = struct.unpack_from(end + "QQ", data, base + 0x18)
            else:
                name, = struct.unpack_from(end + "I", data, base)
                offset, size = struct.unpack_from(end + "II", data, base + 0x10)
            return name, offset, size

        _, str_off, str_size = section(shstrndx)
        names = data[str_off:str_off + str_size]
        for i in range(shnum):
            name_off, offset, size = section(i)
            name = names[name_off:names.index(b"\0", name_off)].decode(errors="replace")
            if name == wanted:
                return data[offset:offset + size]
    except (struct.error, ValueError) as exc:
        raise ImageError(f"malformed ELF file: {exc}") from exc
    return None


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` key/values of a module (``depends``, ``name``, ``softdep``, ...)."""
    section = elf_section(data, ".modinfo") or b""
    out: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            out.setdefault(key, []).append(value)
    return out


@dataclass
class ModuleSet:
    """The modules chosen for the initramfs, in load order."""

    version: str
    load_order: list[str]  # module names, dependencies first
    files: dict[str, str]  # name -> path relative to the modules dir (decompressed: ends ".ko")
    data: dict[str, bytes]  # name -> ELF bytes
    depends: dict[str, list[str]]
    included: list[str]  # wanted modules that were included
    builtin: list[str]  # wanted modules the kernel has built in
    missing: list[str]  # wanted modules the kernel lacks


def select_modules(moddir: Path, wanted: Sequence[str]) -> ModuleSet:
    """Pick ``wanted`` modules and their dependencies from an unpacked ``lib/modules/<ver>``."""
    available: dict[str, Path] = {}
    for p in sorted(moddir.rglob("*.ko*")):
        if re.search(r"\.ko(\.(xz|gz|zst))?$", p.name):
            available.setdefault(module_name(p.name), p)
    builtin_names: set[str] = set()
    builtin_file = moddir / "modules.builtin"
    if builtin_file.is_file():
        builtin_names = {module_name(Path(line.strip()).name)
                         for line in builtin_file.read_text().splitlines() if line.strip()}
    mods = ModuleSet(moddir.name, [], {}, {}, {}, [], [], [])

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in mods.data or name in builtin_names:
            return
        if name in chain:
            raise ImageError(f"kernel module dependency cycle: {' -> '.join((*chain, name))}")
        path = available.get(name)
        if path is None:
            raise ImageError(f"kernel module {chain[-1]} needs {name}, which the kernel package lacks")
        data = read_module(path)
        deps = [d for v in modinfo(data).get("depends", []) for d in v.split(",") if d]
        for dep in deps:
            visit(module_name(dep), (*chain, name))
        rel = path.relative_to(moddir).as_posix()
        mods.files[name] = rel[: rel.index(".ko") + 3]
        mods.data[name] = data
        mods.depends[name] = [module_name(d) for d in deps if module_name(d) not in builtin_names]
        mods.load_order.append(name)

    for name in wanted:
        if name in builtin_names:
            mods.builtin.append(name)
        elif name in available:
            visit(name, ())
            mods.included.append(name)
        else:
            mods.missing.append(name)
    return mods


def modules_dep(mods: ModuleSet) -> str:
    """``modules.dep`` text for the chosen modules (dependencies listed as depmod does)."""
    lines = []
    position = {n: i for i, n in enumerate(mods.load_order)}
    for name in mods.load_order:
        closure: set[str] = set()
        stack = list(mods.depends[name])
        while stack:
            d = stack.pop()
            if d not in closure:
                closure.add(d)
                stack.extend(mods.depends[d])
        deps = sorted(closure, key=lambda d: position[d], reverse=True)  # modprobe loads from the end
        lines.append(f"{mods.files[name]}: {' '.join(mods.files[d] for d in deps)}".rstrip())
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the build


@contextlib.contextmanager
def _build_lock(store: ImageStore, name: str) -> Iterator[None]:
    paths.make_dirs(store.root)
    with open(store.root / f".{name}.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def gpio_power_key(kernel_root: Path, version: str) -> bool:
    """Whether the kernel (an unpacked package) can see the virt machine's GPIO power key without the
    gpio-keys driver: the PL061 controller built in and GPIO lines in sysfs (see the /init)."""
    try:
        config = (kernel_root / "boot" / f"config-{version}").read_text(errors="replace").splitlines()
    except OSError:
        return False
    return {"CONFIG_GPIO_PL061=y", "CONFIG_GPIO_SYSFS=y"} <= set(config)


def is_outdated(image: Image) -> bool:
    """Whether ``image`` is a micro image built by an older recipe (its /init lacks what this one does)."""
    return image.manifest.kind == "initramfs" and image.manifest.source.startswith("apt: ") \
        and image.manifest.recipe != RECIPE


def _find_kernel_tree(root: Path) -> tuple[Path, Path, str]:
    """(vmlinuz, modules dir, version) in an unpacked kernel package."""
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if base.is_dir():
            for moddir in sorted(base.iterdir()):
                version = moddir.name
                vmlinuz = root / "boot" / f"vmlinuz-{version}"
                if vmlinuz.is_file():
                    return vmlinuz, moddir, version
    raise ImageError(f"the kernel package has no boot/vmlinuz-<version> with modules (looked in {root})",
                     hint="pass a kernel image package, e.g. linux-image-cloud-amd64")


def _busybox_applets(busybox: Path, arch: str = "x86_64") -> list[str]:
    argv = [str(busybox), "--list-full"]
    if arch != host_arch():  # another architecture's busybox runs under qemu-user-static
        runner = shutil.which(ARCHES[arch].qemu_user)
        if runner is None:
            raise HostError(f"{ARCHES[arch].qemu_user} is not installed: it runs the {arch} busybox to list "
                            "its applets",
                            hint="apt-get install qemu-user-static")
        argv.insert(0, runner)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(f"could not list busybox applets with {busybox}: {exc}",
                         hint="the host must be able to run the guest's amd64 busybox-static") from exc
    return sorted(line.strip() for line in proc.stdout.splitlines() if line.strip())


def build_initramfs(busybox: Path, mods: ModuleSet, applets: Sequence[str]) -> CpioArchive:
    """The micro guest's root file system as an archive (see the module docstring)."""
    archive = CpioArchive()
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "mnt", "etc/vmkit", "bin", "sbin",
              "usr/bin", "usr/sbin", "var"):
        archive.add_dir(d)
    archive.add_dir("tmp", 0o1777)
    archive.add_dir("root", 0o700)
    archive.add_char_device("dev/console", 5, 1, 0o600)
    archive.add_char_device("dev/null", 1, 3, 0o666)
    archive.add_char_device("dev/ttyS0", 4, 64, 0o600)
    archive.add_char_device("dev/ttyAMA0", 204, 64, 0o600)
    archive.add_host_file("bin/busybox", busybox, 0o755)
    for applet in applets:
        if applet != "bin/busybox" and "/" in applet:
            archive.add_symlink(applet, "/bin/busybox")
    archive.add_file("init", INIT_SCRIPT.encode(), 0o755)
    archive.add_file("etc/profile", PROFILE.encode(), 0o644)
    archive.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    archive.add_file("etc/group", b"root:x:0:\n", 0o644)
    archive.add_file("etc/hostname", b"vmkit-micro\n", 0o644)
    moddir = f"lib/modules/{mods.version}"
    archive.add_dir(moddir)
    for name in mods.load_order:
        archive.add_file(f"{moddir}/{mods.files[name]}", mods.data[name], 0o644)
    archive.add_file(f"{moddir}/modules.dep", modules_dep(mods).encode(), 0o644)
    archive.add_file(f"{moddir}/modules.builtin", "".join(
        f"{n}\n" for n in sorted(mods.builtin)).encode(), 0o644)
    archive.add_file("etc/vmkit/modules",
                     "".join(f"/{moddir}/{mods.files[n]}\n" for n in mods.load_order).encode(), 0o644)
    return archive


def build_micro(
    store: ImageStore | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    kernel_package: str | None = None,
    name: str | None = None,
    arch: str = "x86_64",
) -> Image:
    """Build (or return the existing) micro image; see the module docstring for what it holds.

    ``arch``: the guest's architecture (``aarch64``: image ``micro-aarch64``, Debian's arm64 kernel
    and busybox, which need ``dpkg --add-architecture arm64`` on the host).

    If the image exists it is returned unchanged unless ``force`` is true; asking for a
    different ``kernel_package`` than the existing image was built from raises ImageError.
    Concurrent builds of the same image in one store are serialised by a lock file.
    """
    if arch not in ARCHES:
        raise ConfigError.single("--arch", f"{arch!r} is not an architecture vmkit runs: use {', '.join(ARCHES)}")
    kernel_package = kernel_package or KERNEL_PACKAGES[arch]
    name = name or image_name(NAME, arch)
    suffix = "" if arch == host_arch() else f":{ARCHES[arch].debian}"
    store = store if store is not None else ImageStore()
    say = progress or (lambda _msg: None)
    with _build_lock(store, name):
        if store.exists(name) and not force:
            image = store.get(name)
            built_from = image.manifest.extra.get("kernel_package_requested")
            if built_from not in (None, kernel_package):
                raise ImageError(
                    f"image {name!r} was built from {built_from}, not {kernel_package}",
                    hint="rebuild it with force=True (vmkit image build --force) or use another name",
                )
            return image
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=store.root, prefix=f".{name}.work.") as tmp:
            work = Path(tmp)
            say(f"resolving {kernel_package}")
            kinfo = debpkg.resolve_kernel_package(kernel_package + suffix)
            busybox_pkg = BUSYBOX_PACKAGE + suffix
            say(f"downloading {kinfo.name} {kinfo.version} and {busybox_pkg}")
            debs = debpkg.download([kinfo.name, busybox_pkg], work / "debs")
            say(f"unpacking {kinfo.name}")
            kroot = debpkg.extract(debs[kinfo.name].path, work / "kernel")
            say(f"unpacking {busybox_pkg}")
            broot = debpkg.extract(debs[busybox_pkg].path, work / "busybox")
            busybox = broot / "bin" / "busybox"
            if not busybox.is_file():
                raise ImageError(f"{BUSYBOX_PACKAGE} has no bin/busybox")
            vmlinuz, moddir, version = _find_kernel_tree(kroot)
            say("selecting kernel modules")
            mods = select_modules(moddir, [*WANTED_MODULES, *ARCH_MODULES.get(arch, {})])
            say("building initramfs")
            archive = build_initramfs(busybox, mods, _busybox_applets(busybox, arch))
            with store.staging(name) as staging:
                archive.write(staging / "initrd.img")
                shutil.copyfile(vmlinuz, staging / "vmlinuz")
                os.chmod(staging / "vmlinuz", 0o644)
                found = {*mods.included, *mods.builtin}
                power = "button" in found or "gpio_keys" in found or gpio_power_key(kroot, version)
                evdev = "evdev" in mods.included or "evdev" in mods.builtin
                manifest = ImageManifest(
                    name=name,
                    kind="initramfs",
                    source=(f"apt: {kinfo.name} {kinfo.version}, "
                            f"{busybox_pkg} {debs[busybox_pkg].version}"),
                    kernel="vmlinuz",
                    initrd="initrd.img",
                    cmdline=cmdline_for(arch),
                    ready_marker=READY_MARKER,
                    kernel_version=version,
                    recipe=RECIPE,
                    extra={
                        "kernel_package_requested": kernel_package,
                        "kernel_package": kinfo.name,
                        "kernel_package_version": kinfo.version,
                        "busybox_version": debs[busybox_pkg].version,
                        "arch": arch,
                        "modules": list(mods.included),
                        "modules_loaded": list(mods.load_order),
                        "modules_builtin": list(mods.builtin),
                        "modules_missing": list(mods.missing),
                        "power_button": power and evdev,
                        "markers": {
                            "ready": READY_MARKER,
                            "poweroff": POWEROFF_MARKER,
                            "run_begin": RUN_BEGIN_MARKER,
                            "run_end": RUN_END_PREFIX + "<rc>",
                            "tick": TICK_PREFIX + "<n>",
                        },
                        "build_seconds": round(time.monotonic() - started, 2),
                    },
                )
                say(f"storing image {name}")
                return store.commit(staging, manifest)


FULL_NAME = catalogue.MICRO_FULL
FULL_KERNEL_PACKAGE = "linux-image-amd64"


def build_micro_full(store: ImageStore | None = None, *, force: bool = False,
                     progress: Callable[[str], None] | None = None) -> Image:
    """The micro guest on Debian's generic kernel: USB storage and 9p, which the cloud
    kernel lacks, at the cost of a slower boot (~4 s of guest time under TCG)."""
    return build_micro(store, force=force, progress=progress, kernel_package=FULL_KERNEL_PACKAGE, name=FULL_NAME)
