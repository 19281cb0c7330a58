"""Build the ``debian-12`` guest image from Debian packages alone.

Stages (each timed and reported through the progress callback, and recorded in
``manifest.extra["build_seconds"]``):

1. ``bootstrap``: ``mmdebstrap`` (mode root, variant minbase, no Recommends) installs systemd, the
   kernel, cloud-init, openssh-server, qemu-guest-agent, cloud-guest-utils and iproute2 into a
   directory. An essential-hook configures initramfs-tools *before* the kernel is installed (a
   small ``MODULES=list`` initrd with the virtio drivers and no udev, no resume wait, the module
   blacklist);
   a customize-hook enables systemd-networkd and masks units that cost boot time in a VM.
2. ``configure``: files written into the tree (:func:`configure_tree`); the build host's SSH host
   keys, hostname and machine-id are removed. The kernel and initrd are copied out for direct
   kernel boot.
3. ``mke2fs``: the tree becomes an ext4 file system image with ``mke2fs -d`` (no loop mounts).
4. ``qcow2``: ``qemu-img convert`` to qcow2 (``compress=True`` for ``-c``: smaller, slower).
5. ``commit``: digests, manifest, rename into the store.

The root file system is the whole disk (``root=/dev/vda``, no partition table): cloud-init's
``resizefs`` grows it online on first boot after the instance overlay was made larger (``growpart``
from cloud-guest-utils is installed for images with partitions but has nothing to do here). The
NoCloud seed is expected as a second virtio-blk disk.

First boot is trimmed (measured under TCG; see the issue note for numbers):

* cloud-init: ``datasource_list: [NoCloud]``, compact config files (every cloud-init process
  parses them several times with the pure-Python YAML loader), module lists without modules
  that do nothing here or only print to the console, ``cloud-init-local`` masked and the network
  baked in (systemd-networkd: DHCP on every ``en*``/``eth*`` NIC; the seed's network-config is
  *not* applied on this image), and ``cloud-init.service`` no longer ordered after
  ``systemd-networkd-wait-online`` (its init stage needs no network; cloud-config/final still wait);
* qemu-guest-agent starts right after cloud-init's init stage (users and keys exist) instead of
  after basic.target, so "the agent answers" means "SSH logins work";
* units that do nothing in a VM are masked, modules for emulated hardware that a headless VM does
  not use are blacklisted, the kernel skips crypto self-tests and the PS/2 mouse probe;
* the initrd starts no udev: it loads the four modules root needs and mounts ``/dev/vda`` (the
  real root's udev does the coldplug once, instead of twice);
* python3-jsonschema's module is deleted after the install: every cloud-init process imports it
  only to validate the user-data against its schema (~20% of its import time, plus the validation,
  three times per boot), and cloud-init skips that validation when jsonschema is missing
  (``cloud-init schema`` needs ``apt-get install --reinstall python3-jsonschema`` first).

The kernel is ``linux-image-amd64`` by default: unlike ``linux-image-cloud-amd64`` it has 9p,
virtiofs and USB storage, and it boots as fast under TCG with the small initrd. Modules a VM
never needs (GPU, sound, wireless, media, InfiniBand...) are not unpacked (dpkg ``path-exclude``),
nor are man pages, docs and translations.

**The stock variant** (``build_debian(stock=True)``, image ``debian-12-stock``) is the baseline the
boot benchmark compares against: the same packages and kernel, built the same way, with none of the
boot trims above. It keeps the packaged cloud-init configuration (``cloud.cfg``, every datasource
debconf offers, cloud-init-local, all module lists), the packaged units (nothing masked, no drop-ins,
no generator masks), initramfs-tools' defaults (``MODULES=most``, resume probing), every kernel
module, no module blacklist and a plain kernel command line (:data:`STOCK_CMDLINE`). Networking is as
on Debian 12's cloud images, minus netplan: systemd-networkd is enabled and cloud-init renders its
configuration (the seed's network-config, or its DHCP fallback). Only what any image needs is
written: fstab, hostname, resolv.conf (QEMU's DNS), an empty machine-id, no build-host SSH keys.
Docs, man pages and translations are still left out (image size only).

**aarch64** (``build_debian(arch="aarch64")``, image ``debian-12-aarch64``): the same recipe with
Debian's arm64 packages (``mmdebstrap --architectures=arm64``, kernel ``linux-image-arm64``, console
``ttyAMA0``). mmdebstrap runs the maintainer scripts through qemu-user-static, so binfmt_misc must
have ``qemu-aarch64`` enabled (``arch-test`` checks it); this makes the build far slower than the
x86-64 one (tens of minutes on a loaded 2-core host, against about a minute).

mmdebstrap needs root here: in any other mode the directory output has wrong ownership.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmkit.config import ARCHES, host_arch
from vmkit.errors import ConfigError, HostError, ImageError
from vmkit.fsutil import atomic_write
from vmkit.host.cloudinit import FINAL_MARKER
from vmkit.host.images import catalogue, qemuimg
from vmkit.host.images.store import Image, ImageManifest, ImageStore

RELEASES: dict[str, str] = {"bookworm": catalogue.DEBIAN_12}
DEFAULT_RELEASE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
MIRROR_ENV = "VMKIT_DEBIAN_MIRROR"
SECURITY_MIRROR_ENV = "VMKIT_DEBIAN_SECURITY_MIRROR"

KERNEL_PACKAGES = {"amd64": "linux-image-amd64", "cloud-amd64": "linux-image-cloud-amd64",
                   "arm64": "linux-image-arm64", "cloud-arm64": "linux-image-cloud-arm64"}
DEFAULT_KERNELS: tuple[str, ...] = ("amd64",)
ARCH_KERNELS: dict[str, tuple[str, ...]] = {"x86_64": DEFAULT_KERNELS, "aarch64": ("arm64",)}
"""The default kernel flavour per guest architecture (``build_debian(arch=...)``)."""

PACKAGES: tuple[str, ...] = (
    "systemd", "systemd-sysv", "udev", "dbus", "kmod",
    "initramfs-tools", "zstd",
    "cloud-init", "cloud-guest-utils", "e2fsprogs",
    "openssh-server", "qemu-guest-agent",
    "iproute2", "netbase", "ca-certificates", "sudo",
    # shares and their benchmark: sshfs for reverse-sshfs shares, fio for "vmkit bench fs"
    "sshfs", "fio",
    # the network benchmark (iperf3 between guests and to the host)
    "iperf3",
)

ROOT_LABEL = "vmkit-root"
# cryptomgr.notests: no crypto self-tests at boot (~1 s under TCG); i8042.noaux: no PS/2 mouse probe.
CMDLINE = "root=/dev/vda rw console=ttyS0 rootfstype=ext4 random.trust_cpu=on cryptomgr.notests i8042.noaux"
READY_MARKER = FINAL_MARKER  # printed by cloud-init (final_message) when it is done
# The stock variant: a Debian cloud image's kind of command line (root read-only until fstab says rw).
STOCK_SUFFIX = "-stock"
RECIPE = "debian/4"
"""Bumped whenever what goes into the image changes (packages, trims, kernel command line), so an
image built by an older vmkit is reported as outdated (3: sshfs and fio added, udev left out of
the initrd, more generators masked, python3-jsonschema removed; 4: iperf3, the GPU drivers kept
and modprobe@drm unmasked for a display, hot-added CPUs and memory onlined by udev)."""
STOCK_CMDLINE = "root=/dev/vda ro console=ttyS0,115200"
# Debian 12 cloud images run systemd-networkd (configured through netplan, not installed here).
STOCK_ENABLED_UNITS = ("systemd-networkd.service",)

# Hot-added vCPUs and memory blocks (``vmkit set --cpus/--memory``) arrive offline; udev onlines
# them at once (memory as movable, so that virtio-mem can take it back again).
HOTPLUG_RULES = (
    'SUBSYSTEM=="cpu", ACTION=="add", TEST=="online", ATTR{online}=="0", ATTR{online}="1"',
    'SUBSYSTEM=="memory", ACTION=="add", TEST=="state", ATTR{state}=="offline", ATTR{state}="online_movable"',
)
HOTPLUG_RULES_PATH = "/etc/udev/rules.d/80-vmkit-hotplug.rules"
STOCK_CLOUD_INIT_NOTE = ("stock: packaged cloud.cfg and units (all datasources, cloud-init-local), "
                         "cloud-init renders the network config for systemd-networkd")
SLIRP_DNS = "10.0.2.3"

# Modules in the initrd; with MODULES=list initramfs-tools adds only these (and their dependencies).
# Loaded by the initrd before it mounts root=/dev/vda (MODULES=list: only these, and what they need).
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")

# Never unpacked: a VM has no use for them (saves ~200 MB and the time to write them).
DOC_EXCLUDES = (
    "/usr/share/man/*", "/usr/share/info/*", "/usr/share/lintian/*", "/usr/share/linda/*",
    "/usr/share/doc/*", "/usr/share/locale/*",
)
PATH_EXCLUDES = (
    *DOC_EXCLUDES,
    *(f"{lib}/modules/*/kernel/{sub}/*" for lib in ("/lib", "/usr/lib") for sub in (
        "drivers/media", "sound", "drivers/net/wireless", "net/wireless",
        "net/mac80211", "drivers/bluetooth", "net/bluetooth", "drivers/infiniband",
        "drivers/staging", "drivers/isdn", "drivers/iio", "drivers/net/can", "net/can",
        "drivers/mtd", "drivers/net/ethernet/mellanox", "drivers/net/ethernet/chelsio",
        "drivers/net/ethernet/qlogic", "drivers/net/ethernet/broadcom", "drivers/net/ethernet/sfc",
        "drivers/scsi/qla2xxx", "drivers/scsi/lpfc", "drivers/scsi/mpt3sas", "drivers/scsi/qedf",
        "drivers/scsi/qedi", "drivers/scsi/bfa", "drivers/scsi/be2iscsi", "drivers/target",
    )),
)
# Boot trims by not unpacking (see the module docstring):
BOOT_EXCLUDES = (
    # the initrd's udev start, coldplug and settle (~3 s under TCG); without it the initrd loads
    # INITRD_MODULES itself and waits for /dev/vda, and udev's init-bottom still moves /dev (its
    # "udevadm control --exit" prints a harmless "Failed to send exit request" on the console)
    "/usr/share/initramfs-tools/scripts/init-top/udev",
)
# Deleted after the install (a path-exclude would break py3compile in the package's postinst):
# imported by every cloud-init process for schema validation only, which it skips without it.
REMOVED_PATHS = ("usr/lib/python3/dist-packages/jsonschema",)
PATH_INCLUDES = ("/usr/share/doc/*/copyright", "/usr/share/locale/locale.alias")

# Units that cost boot time (or run later for nothing) in a throw-away VM. cloud-init-local is
# masked: its only job on this image would be rendering the network config, which is baked in
# (one Python start-up less on the critical path, ~3 s under TCG).
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer", "getty@tty1.service", "systemd-pstore.service",
    "cloud-init-hotplugd.socket", "cloud-init-hotplugd.service", "remote-fs.target",
    "cloud-init-local.service", "modprobe@dm_mod.service",
)
ENABLED_UNITS = ("systemd-networkd.service",)

# Hot-added vCPUs and memory blocks (``vmkit set --cpus/--memory``) arrive offline; udev onlines
# them at once (memory as movable, so that virtio-mem can take it back again).
HOTPLUG_RULES = (
    'SUBSYSTEM=="cpu", ACTION=="add", TEST=="online", ATTR{online}=="0", ATTR{online}="1"',
    'SUBSYSTEM=="memory", ACTION=="add", TEST=="state", ATTR{state}=="offline", ATTR{state}="online_movable"',
)
HOTPLUG_RULES_PATH = "/etc/udev/rules.d/80-vmkit-hotplug.rules"

# Modules udev would load for emulated q35/CPU features that a headless VM never uses (kvm for
# nested virtualisation, the ICH9 watchdog/SMBus/LPC, PC speaker, PS/2 mouse). Blacklisting only
# stops automatic loading: "modprobe kvm_amd" still works. evdev/button stay (ACPI power button).
# ahci: q35's built-in SATA controller, unused when every disk is virtio (probing its six ports
# costs ~0.5 s of CPU while cloud-init starts); "modprobe ahci" before attaching SATA/IDE-CD disks.
BLACKLISTED_MODULES = (
    "kvm", "kvm_amd", "kvm_intel", "ccp", "iTCO_wdt", "iTCO_vendor_support", "intel_pmc_bxt",
    "i2c_i801", "lpc_ich", "pcspkr", "psmouse", "serio_raw", "ahci", "powernow_k8",
)

# systemd generators for things this image does not have (LUKS, dm-verity/integrity, hibernation,
# GPT auto-mounts, offline updates): masked, a few exec()s less before the first unit starts.
# Also the ones for SysV init scripts (every package here has native units), /etc/rc.local and the
# systemd.run=/systemd.mask=/debug-shell kernel options. Generators run before any unit starts:
# these four cost ~1 s of the boot's critical path under TCG.
MASKED_GENERATORS = (
    "systemd-cryptsetup-generator", "systemd-integritysetup-generator", "systemd-veritysetup-generator",
    "systemd-hibernate-resume-generator", "systemd-gpt-auto-generator", "systemd-system-update-generator",
    "systemd-sysv-generator", "systemd-rc-local-generator", "systemd-run-generator", "systemd-debug-generator",
)

# ssh: no "sshd -t" before the daemon starts (it checks the same configuration again at start).
SSH_DROPIN = """\
# Written by vmkit: sshd checks its configuration itself; skip the extra "sshd -t" run.
[Service]
ExecStartPre=
"""

# cloud-config (runcmd, packages...) starts once sshd is up, not in the same instant as sshd and
# the agent: the three compete for the CPU under TCG.
CLOUD_CONFIG_AFTER = "ssh.service qemu-guest-agent.service"

# /usr/bin/cloud-init is a setuptools entry-point script that imports importlib.metadata to find
# its entry point: ~1.2 s of CPU per cloud-init process under TCG. The units call the same main()
# directly.
CLOUD_INIT_SCRIPT = "/usr/bin/cloud-init"
FAST_CLOUD_INIT = "/usr/bin/python3 -m cloudinit.cmd.main"

# DHCP on the NAT NIC, whatever its name; cloud-init's own network rendering is switched off.
NETWORKD_CONFIG = """\
# Written by vmkit: DHCP on every ethernet NIC (QEMU user networking).
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
"""

# The guest agent starts as soon as cloud-init's init stage has created the user and installed
# the SSH keys, not after sysinit/basic: "agent answers" then means "you can log in".
QGA_DROPIN = """\
# Written by vmkit: start once cloud-init has created users and keys, not after basic.target.
[Unit]
DefaultDependencies=no
After=cloud-init.service systemd-journald.socket local-fs.target
Before=shutdown.target
Conflicts=shutdown.target
"""

# cloud-init's whole configuration, compact: every cloud-init process parses it (several times)
# with the pure-Python YAML loader, so comments and unused settings cost real time under TCG.
CLOUD_CFG = f"""\
# Written by vmkit: NoCloud only, network baked in, trimmed module lists.
users: [default]
disable_root: true
preserve_hostname: false
manage_etc_hosts: true
apt: {{preserve_sources_list: true}}
datasource_list: [NoCloud]
network: {{config: disabled}}
final_message: "{READY_MARKER} after $UPTIME s"
resize_rootfs: noblock
cloud_init_modules: [bootcmd, write-files, growpart, resizefs, disk_setup, mounts, set_hostname,
  update_hostname, update_etc_hosts, ca-certs, users-groups, ssh]
cloud_config_modules: [locale, set-passwords, apt-pipelining, apt-configure, ntp, timezone, runcmd]
cloud_final_modules: [package-update-upgrade-install, lxd, write-files-deferred, puppet, chef,
  mcollective, salt-minion, scripts-vendor, scripts-per-once, scripts-per-boot, scripts-per-instance,
  scripts-user, phone-home, final-message, power-state-change]
system_info:
  distro: debian
  default_user: {{name: debian, lock_passwd: true, gecos: Debian, groups: [adm, sudo],
    sudo: ["ALL=(ALL) NOPASSWD:ALL"], shell: /bin/bash}}
  paths: {{cloud_dir: /var/lib/cloud/, templates_dir: /etc/cloud/templates/}}
  package_mirrors:
  - arches: [default]
    failsafe: {{primary: "https://deb.debian.org/debian", security: "https://deb.debian.org/debian-security"}}
  ssh_svcname: ssh
"""

# The packaged 05_logging.cfg (log to /var/log/cloud-init.log) without comments and the unused
# syslog variant; built with the same ini text.
_LOG_BASE = (
    "[loggers]\nkeys=root,cloudinit\n[handlers]\nkeys=consoleHandler,cloudLogHandler\n"
    "[formatters]\nkeys=simpleFormatter,arg0Formatter\n"
    "[logger_root]\nlevel=DEBUG\nhandlers=consoleHandler,cloudLogHandler\n"
    "[logger_cloudinit]\nlevel=DEBUG\nqualname=cloudinit\nhandlers=\npropagate=1\n"
    "[handler_consoleHandler]\nclass=StreamHandler\nlevel=WARNING\nformatter=arg0Formatter\n"
    "args=(sys.stderr,)\n"
    "[formatter_arg0Formatter]\nformat=%(asctime)s - %(filename)s[%(levelname)s]: %(message)s\n"
    "[formatter_simpleFormatter]\nformat=[CLOUDINIT] %(filename)s[%(levelname)s]: %(message)s\n"
)
_LOG_FILE = ("[handler_cloudLogHandler]\nclass=FileHandler\nlevel=DEBUG\nformatter=arg0Formatter\n"
             "args=('/var/log/cloud-init.log', 'a', 'UTF-8')\n")
CLOUD_LOGGING_CFG = (
    "# Written by vmkit: the packaged logging settings without comments.\n"
    f"log_cfgs:\n- [{json.dumps(_LOG_BASE)}, {json.dumps(_LOG_FILE)}]\n"
    "output: {all: '| tee -a /var/log/cloud-init-output.log'}\n"
)

ESSENTIAL_HOOK = f"""\
#!/bin/sh
# vmkit: configure initramfs-tools before any kernel is installed.
set -eu
mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
printf 'MODULES=list\\nCOMPRESS=zstd\\nRESUME=none\\n' > "$1/etc/initramfs-tools/conf.d/vmkit.conf"
printf '%s\\n' {" ".join(INITRD_MODULES)} > "$1/usr/share/initramfs-tools/modules.d/vmkit"
# The module blacklist goes in now so that the initrd gets it too.
mkdir -p "$1/etc/modprobe.d"
printf '# Written by vmkit: not loaded automatically in a VM (modprobe still loads them).\\n' \\
    > "$1/etc/modprobe.d/vmkit-blacklist.conf"
printf 'blacklist %s\\n' {" ".join(BLACKLISTED_MODULES)} >> "$1/etc/modprobe.d/vmkit-blacklist.conf"
"""


def _customize_hook(*, stock: bool = False) -> str:
    if stock:
        return f"""\
#!/bin/sh
# vmkit (stock variant): enable networking as a Debian cloud image does; nothing else.
set -eu
chroot "$1" systemctl enable {" ".join(STOCK_ENABLED_UNITS)}
"""
    return f"""\
#!/bin/sh
# vmkit: enable and mask units inside the new tree.
set -eu
chroot "$1" systemctl enable {" ".join(ENABLED_UNITS)}
chroot "$1" systemctl mask {" ".join(MASKED_UNITS)}
printf '%s\\n' '# Written by vmkit: online hot-added CPUs and memory.' \\
    {" ".join(shlex.quote(r) for r in HOTPLUG_RULES)} > "$1{HOTPLUG_RULES_PATH}"
"""


def build_hooks(*, stock: bool = False) -> dict[str, str]:
    """The mmdebstrap hook scripts by file name (the stock variant has no essential hook)."""
    hooks = {"customize.sh": _customize_hook(stock=stock)}
    if not stock:
        hooks["essential.sh"] = ESSENTIAL_HOOK
    return hooks


@dataclass(frozen=True)
class BuildProgress:
    """One step of an image build, for a progress display."""

    stage: str  # bootstrap | configure | mke2fs | qcow2 | commit | done
    message: str
    elapsed: float  # seconds since the build started
    stage_done: bool = False  # True when ``stage`` just finished
    stage_seconds: float | None = None  # how long the finished stage took


ProgressCallback = Callable[[BuildProgress], None]


@dataclass
class _Timer:
    progress: ProgressCallback | None
    start: float = field(default_factory=time.monotonic)
    stages: dict[str, float] = field(default_factory=dict)
    _stage: str = ""
    _stage_start: float = 0.0

    def emit(self, message: str, stage: str | None = None) -> None:
        if self.progress is not None:
            self.progress(BuildProgress(stage or self._stage, message, time.monotonic() - self.start))

    def begin(self, stage: str, message: str) -> None:
        self._stage, self._stage_start = stage, time.monotonic()
        self.emit(message)

    def end(self, message: str = "") -> None:
        took = time.monotonic() - self._stage_start
        self.stages[self._stage] = round(took, 2)
        if self.progress is not None:
            self.progress(BuildProgress(self._stage, message or f"{self._stage} done in {took:.1f} s",
                                        time.monotonic() - self.start, True, took))


def console_for(cmdline: str, arch: str) -> str:
    """``cmdline`` with the architecture's first serial port as the console (ttyAMA0 on aarch64)."""
    return cmdline.replace("console=ttyS0", f"console={ARCHES[arch].console}")


BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


def _need_foreign_exec(arch: str, binfmt_dir: Path = BINFMT_DIR) -> None:
    """mmdebstrap runs the maintainer scripts of ``arch``'s packages: the kernel must hand its
    programs to qemu-user-static (binfmt_misc)."""
    entry = binfmt_dir / ARCHES[arch].qemu_user.removesuffix("-static")
    if entry.is_file() and entry.read_text().startswith("enabled"):
        return
    raise HostError(f"the kernel cannot run {arch} programs ({entry} is not an enabled binfmt_misc entry): "
                    f"building an {arch} image runs its packages' maintainer scripts",
                    hint=f"apt-get install qemu-user-static binfmt-support; mount -t binfmt_misc binfmt_misc "
                         f"{binfmt_dir}; update-binfmts --enable {entry.name}")


def _need_tool(name: str, package: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if exe is None:
        raise HostError(f"{name} is not installed; it is needed to build Debian images",
                        hint=f"install it: apt-get install {package}")
    return exe


def mmdebstrap_argv(release: str, target: Path, *, hooks_dir: Path, kernels: Sequence[str],
                    mirror: str, security_mirror: str, extra_packages: Sequence[str] = (),
                    stock: bool = False, arch: str = "x86_64") -> list[str]:
    """The ``mmdebstrap`` command line (pure; shown in logs and tests).

    ``stock``: no essential hook (initramfs-tools' defaults) and every kernel module unpacked.
    ``arch``: another architecture's packages (``--architectures=arm64``): mmdebstrap runs their
    maintainer scripts through qemu-user-static, registered with binfmt_misc.
    """
    packages = [*PACKAGES, *(KERNEL_PACKAGES[k] for k in kernels), *extra_packages]
    argv = ["mmdebstrap"]
    if arch != "x86_64":
        argv.append(f"--architectures={ARCHES[arch].debian}")
    argv += [
        "--mode=root", "--format=directory", "--variant=minbase",
        f"--include={','.join(packages)}",
        "--aptopt=APT::Install-Recommends \"false\"",
        "--aptopt=Acquire::Languages \"none\"",
    ]
    excludes = DOC_EXCLUDES if stock else (*PATH_EXCLUDES, *BOOT_EXCLUDES)
    argv += [f"--dpkgopt=path-exclude={p}" for p in excludes]
    argv += [f"--dpkgopt=path-include={p}" for p in PATH_INCLUDES]
    if not stock:
        argv.append(f"--essential-hook={hooks_dir / 'essential.sh'}")
    argv.append(f"--customize-hook={hooks_dir / 'customize.sh'}")
    argv += [release, str(target),
             f"deb {mirror} {release} main",
             f"deb {mirror} {release}-updates main",
             f"deb {security_mirror} {release}-security main"]
    return argv


def _run_streaming(argv: list[str], timer: _Timer, what: str) -> None:
    """Run ``argv``, passing its ``I:`` lines to the progress callback; keep the tail for errors."""
    tail: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}) as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.rstrip()
                tail = [*tail[-39:], line]
                if line.startswith(("I: ", "W: ", "E: ")):
                    timer.emit(line[3:])
        except BaseException:
            # Interrupted (or the progress callback raised): let mmdebstrap unmount and clean up.
            proc.terminate()
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        rc = proc.wait()
    if rc != 0:
        text = "\n".join(tail)
        raise ImageError(f"{what} failed (exit status {rc}); its last output:\n{text}",
                         hint=f"command: {shlex.join(argv)}")


def _tree_size(root: Path) -> int:
    """Bytes the tree needs, counting each file rounded up to 4 KiB blocks plus inode overhead."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        total += 4096 * (len(dirnames) + 1)
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            total += ((st.st_size + 4095) // 4096) * 4096 + 256
    return total


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (deepest first), from /proc/self/mountinfo."""
    prefix = str(root.resolve())
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def remove_tree(root: Path) -> None:
    """Delete a bootstrapped tree, first unmounting anything an interrupted mmdebstrap left mounted.

    Refuses (ImageError) to delete while something is still mounted: deleting through a bind
    mount of the host's /dev or /sys would remove host files.
    """
    if not root.exists():
        return
    for point in _mounts_under(root):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    left = _mounts_under(root)
    if left:
        raise ImageError(f"cannot remove {root}: still mounted: {', '.join(left)}",
                         hint="unmount them by hand, then remove the directory")
    shutil.rmtree(root)


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    atomic_write(path, text, mode)


def _fast_exec_start(line: str) -> str | None:
    """``ExecStart=/usr/bin/cloud-init ARGS`` -> the same ARGS through :data:`FAST_CLOUD_INIT`."""
    key, _, command = line.strip().partition("=")
    if key == "ExecStart" and command.startswith(CLOUD_INIT_SCRIPT + " "):
        return f"ExecStart={FAST_CLOUD_INIT} {command[len(CLOUD_INIT_SCRIPT) + 1:]}"
    return None


def _cloud_init_units(root: Path) -> None:
    """Rewrite how systemd starts cloud-init's three stages (see the constants above)."""
    units = root / "lib/systemd/system"
    # init stage: needs no network here (the seed is a local disk), so no ordering after
    # systemd-networkd-wait-online; a drop-in cannot remove an After=, so the unit is overridden.
    # cloud-config and cloud-final still wait for network-online.target.
    packaged = units / "cloud-init.service"
    if packaged.is_file():
        lines = []
        for line in packaged.read_text().splitlines(keepends=True):
            if line.strip() == "After=systemd-networkd-wait-online.service":
                continue
            fast = _fast_exec_start(line)
            lines.append(fast + "\n" if fast else line)
        _write(root, "etc/systemd/system/cloud-init.service",
               "# Written by vmkit: the packaged unit without After=systemd-networkd-wait-online.service,\n"
               f"# running {FAST_CLOUD_INIT} instead of {CLOUD_INIT_SCRIPT}\n" + "".join(lines))
    for name, after in (("cloud-config.service", CLOUD_CONFIG_AFTER), ("cloud-final.service", "")):
        unit = units / name
        if not unit.is_file():
            continue
        starts = [f for f in map(_fast_exec_start, unit.read_text().splitlines()) if f]
        text = f"# Written by vmkit: run {FAST_CLOUD_INIT} instead of {CLOUD_INIT_SCRIPT}"
        text += "; let sshd and the guest agent start first\n" if after else "\n"
        if after:
            text += f"[Unit]\nAfter={after}\n"
        if starts:
            text += "[Service]\nExecStart=\n" + "".join(f + "\n" for f in starts)
        _write(root, f"etc/systemd/system/{name}.d/vmkit.conf", text)


def _configure_identity(root: Path, fstab: str) -> None:
    """What every image needs: fstab, name, resolver, and no identity of the build host."""
    _write(root, "etc/fstab", fstab)
    # QEMU user networking always offers its DNS forwarder here; no resolver daemon needed.
    _write(root, "etc/resolv.conf", f"nameserver {SLIRP_DNS}\n")
    _write(root, "etc/hostname", "debian\n")
    _write(root, "etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    # Empty machine-id: systemd makes a new one on first boot (each instance is its own machine).
    _write(root, "etc/machine-id", "", 0o444)
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    for leftover in ("etc/apt/apt.conf.d/99mmdebstrap",):
        p = root / leftover
        if p.exists():
            p.unlink()


def configure_tree(root: Path, *, stock: bool = False) -> None:
    """Write vmkit's configuration into a bootstrapped tree (runs as root on the host).

    ``stock``: only :func:`_configure_identity`, with the kind of fstab a Debian cloud image has
    (checked at boot, no noatime); the packaged cloud-init and systemd configuration stay as they are.
    """
    if stock:
        _configure_identity(root, f"LABEL={ROOT_LABEL} / ext4 rw,discard,errors=remount-ro 0 1\n")
        return
    _configure_identity(root, f"LABEL={ROOT_LABEL} / ext4 defaults,noatime,errors=remount-ro 0 0\n")
    _write(root, "etc/cloud/cloud.cfg", CLOUD_CFG)
    _write(root, "etc/cloud/cloud.cfg.d/05_logging.cfg", CLOUD_LOGGING_CFG)
    _write(root, "etc/systemd/network/10-vmkit.network", NETWORKD_CONFIG)
    _write(root, "etc/systemd/system/qemu-guest-agent.service.d/vmkit.conf", QGA_DROPIN)
    _write(root, "etc/systemd/system/ssh.service.d/vmkit.conf", SSH_DROPIN)
    generators = root / "etc/systemd/system-generators"
    generators.mkdir(parents=True, exist_ok=True)
    for gen in MASKED_GENERATORS:
        link = generators / gen
        if not link.is_symlink():
            link.symlink_to("/dev/null")
    _cloud_init_units(root)
    # Without the local stage, "cloud-init init" trusts its cached datasource and would not see a
    # new instance-id in the seed (a clone). Dropping the cache makes it read the seed every boot,
    # as the local stage does for a NoCloud seed on a disk; per-instance modules still run once.
    _write(root, "etc/systemd/system/cloud-init.service.d/vmkit.conf",
           "# Written by vmkit: always read the seed (new instance-id => new instance)\n"
           "[Service]\nExecStartPre=-/bin/rm -f /var/lib/cloud/instance/obj.pkl\n")
    _write(root, "etc/systemd/system/systemd-networkd-wait-online.service.d/vmkit.conf",
           "[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30\n")
    _write(root, "etc/systemd/journald.conf.d/vmkit.conf", "[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n")
    for rel in REMOVED_PATHS:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def _kernels(root: Path) -> list[tuple[str, Path, Path]]:
    """(version, vmlinuz, initrd) for every kernel in the tree, sorted by version."""
    out = []
    for vmlinuz in sorted((root / "boot").glob("vmlinuz-*")):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        initrd = root / "boot" / f"initrd.img-{version}"
        if not initrd.is_file():
            raise ImageError(f"kernel {version} has no initrd in the built tree",
                             hint="rebuild with force=True; check initramfs-tools' output in the build log")
        out.append((version, vmlinuz, initrd))
    return out


def make_ext4(root: Path, image: Path, *, label: str = ROOT_LABEL, headroom: int = 512 << 20) -> int:
    """Turn the tree ``root`` into an ext4 image file ``image`` with ``mke2fs -d``; return its size."""
    mke2fs = _need_tool("mke2fs", "e2fsprogs")
    size = int(_tree_size(root) * 1.15) + headroom
    size = (size + (64 << 20) - 1) // (64 << 20) * (64 << 20)
    with image.open("wb") as fh:
        fh.truncate(size)
    argv = [mke2fs, "-q", "-F", "-t", "ext4", "-L", label, "-m", "1", "-d", str(root),
            "-E", "lazy_itable_init=1,lazy_journal_init=1", str(image), f"{size // 1024}k"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"mke2fs failed: {proc.stderr.strip() or proc.stdout.strip()}",
                         hint=f"command: {shlex.join(argv)}")
    return size


def is_outdated(image: Image) -> bool:
    """Whether ``image`` was built by an older version of this recipe (pulled images never are)."""
    return image.manifest.source.startswith("mmdebstrap ") and image.manifest.recipe != RECIPE


def outdated_note(image: Image) -> str | None:
    """What to tell the user about an outdated image, or None if it is current."""
    if not is_outdated(image):
        return None
    return (f"image {image.name} was built by an older vmkit recipe ({image.manifest.recipe or 'unversioned'}, "
            f"now {RECIPE}: some packages or boot trims differ); rebuild it with `vmkit image build "
            f"{image.name} --force` once no machine is made from it (their disks are overlays on it)")


def build_debian(store: ImageStore, *, release: str = DEFAULT_RELEASE, force: bool = False,
                 progress: ProgressCallback | None = None, name: str | None = None,
                 kernels: Sequence[str] = DEFAULT_KERNELS, extra_packages: Sequence[str] = (),
                 mirror: str | None = None, security_mirror: str | None = None,
                 compress: bool = False, stock: bool = False, arch: str = "x86_64") -> Image:
    """Build (or return the existing) Debian image ``debian-12`` in ``store``.

    ``stock``: the untrimmed baseline ``debian-12-stock`` (see the module docstring).

    ``kernels`` picks the kernel flavours (``amd64``, ``cloud-amd64``); the first one is the
    image's boot kernel, the others are recorded in ``manifest.extra["kernels"]``. Mirrors default
    to deb.debian.org (``$VMKIT_DEBIAN_MIRROR``, ``$VMKIT_DEBIAN_SECURITY_MIRROR``).
    An existing image is returned as is unless ``force``.
    """
    if release not in RELEASES:
        raise ConfigError.single("release", f"{release!r} is not a supported release: use "
                                            f"{', '.join(RELEASES)}")
    if arch not in ARCHES:
        raise ConfigError.single("--arch", f"{arch!r} is not an architecture vmkit runs: use {', '.join(ARCHES)}")
    if arch != "x86_64" and tuple(kernels) == DEFAULT_KERNELS:
        kernels = ARCH_KERNELS[arch]
    if not kernels or any(k not in KERNEL_PACKAGES for k in kernels):
        raise ConfigError.single("kernels", f"{list(kernels)!r}: pick one or more of {', '.join(KERNEL_PACKAGES)}")
    image_name = name or RELEASES[release] + (STOCK_SUFFIX if stock else "") + ("" if arch == "x86_64" else f"-{arch}")
    if store.exists(image_name) and not force:
        image = store.get(image_name)
        if progress is not None:
            progress(BuildProgress("done", outdated_note(image) or f"image {image_name} already built "
                                   "(use force to rebuild)", 0.0))
        return image
    if os.geteuid() != 0:
        raise HostError("building the Debian image needs root (mmdebstrap writes a root-owned tree)",
                        hint="run the build as root, or pull a cloud image instead: vmkit image pull debian-12")
    _need_tool("mmdebstrap", "mmdebstrap")
    _need_tool("mke2fs", "e2fsprogs")
    _need_tool("qemu-img", "qemu-utils")
    if arch != host_arch():
        _need_foreign_exec(arch)
    mirror = mirror or os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
    security_mirror = security_mirror or os.environ.get(SECURITY_MIRROR_ENV) or DEFAULT_SECURITY_MIRROR
    timer = _Timer(progress)

    with store.staging(image_name) as staging:
        rootfs = staging / "rootfs"
        hooks = staging / "hooks"
        try:
            hooks.mkdir()
            for hook, text in build_hooks(stock=stock).items():
                (hooks / hook).write_text(text)
                (hooks / hook).chmod(0o755)
            argv = mmdebstrap_argv(release, rootfs, hooks_dir=hooks, kernels=kernels, mirror=mirror,
                                   security_mirror=security_mirror, extra_packages=extra_packages,
                                   stock=stock, arch=arch)
            timer.begin("bootstrap", f"mmdebstrap {release} ({len(PACKAGES) + len(kernels)} packages + dependencies)")
            _run_streaming(argv, timer, "mmdebstrap")
            timer.end()

            timer.begin("configure", "writing vmkit's configuration into the tree")
            configure_tree(rootfs, stock=stock)
            found = _kernels(rootfs)
            if not found:
                raise ImageError("the built tree has no kernel in /boot")
            # "6.1.0-56-cloud-amd64" is flavour cloud-amd64, not amd64: try the longest name first.
            by_length = sorted(kernels, key=len, reverse=True)
            flavour_of = {v: next((k for k in by_length if v.endswith(f"-{k}")), kernels[0]) for v, _, _ in found}
            boot_flavour = kernels[0]
            extra_kernels: dict[str, dict[str, str]] = {}
            boot: tuple[str, str, str] | None = None
            for version, vmlinuz, initrd in found:
                flavour = flavour_of[version]
                suffix = "" if flavour == boot_flavour else f"-{flavour}"
                kname, iname = f"vmlinuz{suffix}", f"initrd.img{suffix}"
                shutil.copyfile(vmlinuz, staging / kname)
                shutil.copyfile(initrd, staging / iname)
                extra_kernels[flavour] = {"version": version, "kernel": kname, "initrd": iname}
                if flavour == boot_flavour:
                    boot = (version, kname, iname)
            if boot is None:
                raise ImageError(f"the built tree has no {KERNEL_PACKAGES[boot_flavour]} kernel")
            timer.end()

            timer.begin("mke2fs", "making the ext4 root file system (mke2fs -d)")
            raw = staging / "root.ext4"
            fs_size = make_ext4(rootfs, raw)
            remove_tree(rootfs)
            timer.end(f"ext4 image of {fs_size >> 20} MiB")

            timer.begin("qcow2", "converting to qcow2" + (" (compressed)" if compress else ""))
            qemuimg.convert(raw, staging / "disk.qcow2", src_format="raw", dst_format="qcow2", compress=compress)
            raw.unlink()
            shutil.rmtree(hooks)
            timer.end()

            timer.begin("commit", "recording digests and the manifest")
            manifest = ImageManifest(
                name=image_name,
                kind="disk",
                source=f"mmdebstrap {release} from {mirror}: "
                       + ", ".join([*PACKAGES, *(KERNEL_PACKAGES[k] for k in kernels), *extra_packages]),
                kernel=boot[1],
                initrd=boot[2],
                disk="disk.qcow2",
                disk_format="qcow2",
                cmdline=console_for((STOCK_CMDLINE if stock else CMDLINE), arch),
                # the stock final_message ("Cloud-init v. ... finished at ...") has no fixed text
                ready_marker=None if stock else READY_MARKER,
                kernel_version=boot[0],
                recipe=RECIPE,
                extra={
                    "release": release,
                    "arch": arch,
                    "kernels": extra_kernels,
                    "root_label": ROOT_LABEL,
                    "fs_size": fs_size,
                    "seed_attach": "virtio-blk",
                    "cloud_init": STOCK_CLOUD_INIT_NOTE if stock else
                                  "NoCloud only; init-local masked; network-config from the seed is not "
                                  "applied (systemd-networkd does DHCP on every en*/eth* NIC)",
                    "stock": stock,
                    "build_seconds": timer.stages,
                },
            )
            image = store.commit(staging, manifest)
            timer.end()
        finally:
            remove_tree(rootfs)
    total = time.monotonic() - timer.start
    if progress is not None:
        progress(BuildProgress("done", f"image {image_name} built in {total:.1f} s", total, True, total))
    return image
