"""Warm templates: a booted machine's running state, saved once per image, that new machines start from.

``vmkit image warm IMAGE [--memory SIZE] [--cpus N]`` boots the image with a generic identity (a
throw-away name and keys, no user data), waits until it is ready (cloud images: its agent answers
and cloud-init has finished), and saves it as a template next to the image::

    <image cache>/.templates/<image>/<memory>M-<cpus>cpu-<stamp>/
        ram              the guest's RAM (QEMU ``memory-backend-file``, written MAP_SHARED)
        devices.state    QEMU's device state, without RAM (migration capability ``x-ignore-shared``)
        disk.qcow2       cloud images: the root disk as it was at the save (an overlay on the image);
                         clones' disks are overlays on it, so it is never changed or removed by vmkit
        template.json    :class:`TemplateManifest`, written last: its presence means complete

A clone (``vmkit start`` of a machine created from a warm image) runs QEMU with the same RAM file
mapped copy-on-write (``share=off``: MAP_PRIVATE), loads only the device state (``-incoming``, the
same capability), and resumes: its RAM pages stay shared with every other clone in the host's page
cache until the guest writes them (Kata Containers' "VM templating"). It is then made its own
through the guest agent before ``vmkit start`` returns (:func:`personalize`): hostname, machine-id,
SSH host keys (those pinned in its known_hosts), the user's authorized key, instance-id, a reseeded
kernel RNG, the clock, and its own user-data when it has some. Its user-mode NIC gets its own MAC and
keeps the template's address (:func:`clone_config` says how).

What QEMU 7.2 must never do in a clone is give a page back (``ram_block_discard_range``): on a file it
punches a hole in the file, even through a copy-on-write mapping, and every clone would read zeros
there. So templates and clones have no free page reporting (the balloon's), and a clone's balloon is
not inflated while its RAM is the template's (the supervisor refuses).

A template is tied to the image (its manifest's creation time and recipe), the QEMU version and the
versioned machine type, and the machine's layout (memory, vCPUs, devices: :func:`layout`); a clone
whose configuration differs, or a template that is stale, is refused with the reason, and the
machine boots cold. Templates are never changed once made: a rebuild makes a new directory (clones
of the old one keep their disks' backing file).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import secrets
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from vmkit.config import MachineConfig, Network
from vmkit.errors import ImageError, VmkitError
from vmkit.fsutil import atomic_write, fsync_path
from vmkit.host import paths, provision
from vmkit.host import sshkeys as keys
from vmkit.host.cloudinit import read_seed_iso
from vmkit.host.images.store import Image, ImageStore
from vmkit.runtime import migration
from vmkit.runtime.guest.execute import guest_exec
from vmkit.runtime.machine import VirtualMachine
from vmkit.runtime.qemu.accel import AccelChoice
from vmkit.runtime.qemu.cmdline import Runtime, build_argv
from vmkit.runtime.states import VmState
from vmkit.state.savestate import machine_type

log = logging.getLogger("vmkit.state.template")

FORMAT = 3
"""2: no free page reporting in templates and clones (see :func:`vmkit.runtime.qemu.cmdline.balloon_args`);
3: a TCG guest's RAM on QEMU < 9.0 is 8 KiB larger (vmkit.runtime.qemu.dirtysync): an older template's
RAM file and device state no longer fit, so it is stale and `vmkit image warm` makes a new one."""
MANIFEST = "template.json"
RAM = "ram"
DEVICES = "devices.state"
DISK = provision.DISK
REFERENCE = "template.json"
"""In an instance directory: which template the machine was created from (:class:`TemplateReference`),
until its first start (then :data:`USED_REFERENCE`)."""
USED_REFERENCE = "template.used.json"
TEMPLATE_NAME = "vmkit-template"
"""The generic name (and hostname) a template boots with."""
_FD_NAME = "vmkit-template"
SPARE_NETDEV = "template-nat"
"""A clone whose NIC is on a vmkit network (:func:`moves_nic`) loads the template's user-mode NAT state (QEMU's
``slirp`` section: a stream section nothing takes fails the load) into a user-mode netdev of this name without a
NIC, deleted once the state is loaded."""
CLIENT_ID_DROPIN = "vmkit-clone.conf"
CLIENT_ID_TEXT = "[DHCPv4]\nClientIdentifier=mac\n"
"""A drop-in for the guest's systemd-networkd ``.network`` files: DHCP with the NIC's MAC as client id. Without
it networkd's client id is a DUID made of the machine-id it read at boot: in a clone, the template's, the same
for every clone, and dnsmasq keys its leases by client id. A template gets it before it is saved
(:data:`TEMPLATE_SETTLE`); a clone of an older template on a vmkit network, at its start (:func:`network_lines`)."""
_MIGRATION_TIMEOUT = 300.0
BUILD_READY_TIMEOUT = 1200.0
"""Seconds the template's boot may take until its agent answers."""

Progress = Callable[[str], None]


class TemplateManifest(BaseModel):
    """What a template is a snapshot of; a clone checks every field against what it would run."""

    model_config = ConfigDict(frozen=True)

    format: int = FORMAT
    image: str
    image_created: float
    image_recipe: str | None
    qemu_version: str
    machine_type: str
    memory: int
    cpus: int
    layout: str
    """:func:`layout_digest` of the template's configuration."""
    has_disk: bool
    mac: str | None = None
    """The MAC of the template's user-mode NIC, which a clone's replaces (see :func:`clone_config`)."""
    created: float
    boot_seconds: float


class TemplateReference(BaseModel):
    """``template.json`` in an instance directory: the template its disk was made from."""

    model_config = ConfigDict(frozen=True)

    path: str


def templates_root() -> Path:
    return paths.image_cache_dir() / ".templates"


def key(memory: int, cpus: int) -> str:
    return f"{memory >> 20}M-{cpus}cpu"


# --------------------------------------------------------------------------- layout


_LAYOUT_OPTIONS = frozenset({"-machine", "-cpu", "-smp", "-m", "-device", "-object", "-accel"})
_VARYING = ("mac=", "mem-path=", "share=", "guid=", "tb-size=")  # tb-size: TCG's code cache, in no state


def layout(config: MachineConfig, accel: AccelChoice) -> list[str]:
    """The parts of the QEMU command line a saved device state depends on (machine, CPUs, memory,
    every device and memory backend), without what may differ between clones (names, file paths,
    port forwards, MACs, the TCG code cache)."""
    argv = build_argv(config.model_copy(update={"name": TEMPLATE_NAME}), accel,
                      Runtime(qmp_fd=3, serial_fd=4, memory_file=Path(RAM),
                              ram_pad=migration.config_ram_pad(config, accel.name)))
    out = []
    for opt, value in itertools.pairwise(argv):
        if opt in _LAYOUT_OPTIONS:
            kept = [p for p in value.split(",") if not p.startswith(_VARYING)]
            out.append(f"{opt} {','.join(kept)}")
    return out


def layout_digest(config: MachineConfig, accel: AccelChoice) -> str:
    return hashlib.sha256("\n".join(layout(config, accel)).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- finding and checking


@dataclass(frozen=True)
class Template:
    directory: Path
    manifest: TemplateManifest

    @property
    def ram(self) -> Path:
        return self.directory / RAM

    @property
    def devices(self) -> Path:
        return self.directory / DEVICES

    @property
    def disk(self) -> Path:
        return self.directory / DISK


def load(directory: Path) -> Template:
    try:
        manifest = TemplateManifest.model_validate_json((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise ImageError(f"no warm template at {directory} (it was removed, or never finished)",
                         hint="make one: vmkit image warm IMAGE") from None
    except ValueError as exc:
        raise ImageError(f"the warm template at {directory} has an unreadable manifest: {exc}",
                         hint="make a new one: vmkit image warm IMAGE") from None
    return Template(directory, manifest)


def stale_reasons(tpl: Template, image: Image | None, qemu_version: tuple[int, int, int] | None) -> list[str]:
    """Why ``tpl`` no longer matches its image or this host's QEMU (empty: it is current)."""
    m = tpl.manifest
    out = []
    if m.format != FORMAT:
        out.append(f"it was made by another vmkit (template format {m.format}, this one reads {FORMAT})")
    if image is None:
        out.append(f"its image {m.image!r} is gone")
    elif image.manifest.created != m.image_created or image.manifest.recipe != m.image_recipe:
        out.append(f"image {m.image!r} was rebuilt since (recipe {image.manifest.recipe or 'none'})")
    if qemu_version is None or migration.parse_version(m.qemu_version) != qemu_version:
        now = ".".join(map(str, qemu_version)) if qemu_version else "unknown"
        out.append(f"it was made with QEMU {m.qemu_version}, this host runs {now}")
    for f in (RAM, DEVICES, *((DISK,) if m.has_disk else ())):
        if not (tpl.directory / f).is_file():
            out.append(f"its file {f} is missing")
    return out


def unusable_reasons(tpl: Template, config: MachineConfig, accel: AccelChoice, *,
                     image: Image | None, qemu_version: tuple[int, int, int] | None) -> list[str]:
    """Why the machine ``config`` cannot start from ``tpl`` (empty: it can)."""
    out = stale_reasons(tpl, image, qemu_version)
    m = tpl.manifest
    if config.image != m.image:
        out.append(f"the machine is made from image {config.image!r}, the template from {m.image!r}")
    if config.memory != m.memory or config.cpus != m.cpus:
        out.append(f"the machine has {config.memory >> 20} MiB and {config.cpus} vCPUs, the template "
                   f"{m.memory >> 20} MiB and {m.cpus} (`vmkit image warm {m.image} --memory "
                   f"{config.memory >> 20}M --cpus {config.cpus}` makes one that fits)")
    elif layout_digest(clone_nic_config(config), accel) != m.layout:
        out.append("the machine's devices differ from the template's (disks, NICs, display, balloon, limits "
                   "of memory or vCPUs): only a machine created as `vmkit create NAME --image IMAGE` fits, "
                   "or with one --network NAME (a virtio NIC)")
    if config.needs_shared_memory:
        out.append("virtiofs shares need the guest's RAM shared with virtiofsd (vhost-user maps it through its "
                   "file), and a clone maps the template's RAM copy-on-write: the pages it has written are its "
                   "own and virtiofsd would not see them (use a 9p share, or --cold)")
    if config.networks and not moves_nic(config):
        out.append("a clone runs the template's one NIC, on user-mode NAT or on one vmkit network: this machine has "
                   f"{len(config.networks) + (config.user_nic is not None)} NICs (QEMU loads saved devices only into "
                   "the same devices; NICs hot-plugged after the restore are not built)")
    elif config.networks and not config.agent:
        out.append("a clone's NIC on a vmkit network gets its address through the guest agent: this machine has none")
    return out


def find(image: str, memory: int, cpus: int, *, store: ImageStore | None = None) -> Template | None:
    """The newest current template of ``image`` for this memory and vCPU count (None: there is none)."""
    root = templates_root() / image
    if not root.is_dir():
        return None
    try:
        img: Image | None = (store or ImageStore()).get(image)
    except VmkitError:
        img = None
    version = migration.host_qemu_version()
    prefix = key(memory, cpus) + "-"
    for d in sorted((d for d in root.iterdir() if d.name.startswith(prefix)), reverse=True):
        with contextlib.suppress(ImageError):
            tpl = load(d)
            if not stale_reasons(tpl, img, version):
                return tpl
    return None


# --------------------------------------------------------------------------- building


def template_config(image: Image, directory: Path, memory: int, cpus: int, base: MachineConfig) -> MachineConfig:
    """``base`` (what ``vmkit create NAME --image IMAGE`` makes) with its files in ``directory``."""
    data = base.to_dict()
    for dev in data.get("storage") or []:
        att = dev.get("attachment") or {}
        if att.get("type") == "disk-image":
            att["path"] = str(directory / Path(att["path"]).name)
    data.update(name=TEMPLATE_NAME, memory=memory, cpus=cpus)
    # an unattended first boot, often on a busy host: it may take longer than a user waits for a start
    data["readiness"] = {**(data.get("readiness") or {}),
                         "timeout": max(float((data.get("readiness") or {}).get("timeout", 0)), BUILD_READY_TIMEOUT)}
    return MachineConfig.model_validate(data)


async def _wait_migration(vm: VirtualMachine, what: str) -> None:
    deadline = time.monotonic() + _MIGRATION_TIMEOUT
    while True:
        info = await migration.query(vm)
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise ImageError(f"{what} failed: {info.get('error-desc', 'QEMU gave no reason')}",
                             hint=f"see {vm.stderr_path}")
        if vm.state in (VmState.STOPPED, VmState.ERROR):
            raise ImageError(f"QEMU exited during {what}", hint=f"see {vm.stderr_path}")
        if time.monotonic() > deadline:
            raise ImageError(f"{what} did not finish within {_MIGRATION_TIMEOUT:.0f} s")
        await asyncio.sleep(0.05)


def _pass_file(vm: VirtualMachine, path: Path, flags: int) -> None:
    assert vm.qmp is not None
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        vm.qmp.send_fd(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Saved:
    qemu_version: str
    machine_type: str
    boot_seconds: float


async def _boot_and_save(vm: VirtualMachine, staging: Path, say: Progress) -> _Saved:
    """Boot the template's machine, wait until it is ready and settled, and save its device state."""
    config = vm.config
    booted = time.monotonic()
    async with vm:
        say(f"booting {config.image} ({config.memory >> 20} MiB, {config.cpus} vCPUs)")
        await vm.start(memory_file=staging / RAM, memory_shared=True)
        await vm.wait_ready()
        if vm.agent is not None:
            say("waiting for cloud-init to finish")
            await guest_exec(vm.agent, ["cloud-init", "status", "--wait"], timeout=config.readiness.timeout)
            # the throw-away login key goes; what the guest wrote reaches its disk
            await guest_exec(vm.agent, ["/bin/sh", "-c", TEMPLATE_SETTLE], timeout=120)
        boot_seconds = time.monotonic() - booted
        say("saving the running state")
        await vm.pause()
        await migration.set_capabilities(vm, x_ignore_shared=True)
        mtype = await machine_type(vm)
        assert vm.qmp is not None
        version = vm.qmp.qemu_version
        _pass_file(vm, staging / DEVICES, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        await vm.execute("getfd", {"fdname": _FD_NAME})
        await vm.execute("migrate", {"uri": f"fd:{_FD_NAME}"})
        await _wait_migration(vm, "saving the template")
        await vm.stop(timeout=10)
    return _Saved(version, mtype, round(boot_seconds, 2))


TEMPLATE_SETTLE = "\n".join([
    # the throw-away login key goes (emptied, not removed: a clone writes its key into the user's file, nothing
    # to chown)
    f": > /home/{provision.USER}/.ssh/authorized_keys",
    "mkdir -p /run/vmkit",
    # DHCP by MAC (see CLIENT_ID_DROPIN), read by networkd now: its link is configured again before the save
    "r=; for f in /etc/systemd/network/*.network; do [ -f \"$f\" ] || continue; mkdir -p \"$f.d\"",
    f"  printf {shlex.quote(CLIENT_ID_TEXT)} > \"$f.d/{CLIENT_ID_DROPIN}\"; r=1; done",
    'if [ -n "$r" ]; then networkctl reload; sleep 2',
    "  /lib/systemd/systemd-networkd-wait-online --timeout=60 || true; fi",
    # what the guest wrote reaches its disk
    "sync",
]) + "\n"
"""What the template's guest runs once it is ready, before it is saved."""

_LEFTOVERS = ("ssh", provision.SEED, "known_hosts", "ssh_config", "qga.sock", "serial.log", "qemu.pid", "qemu.log")


def build(image: Image, base: MachineConfig, *, progress: Progress | None = None) -> Template:
    """Boot ``image`` as ``base`` (what ``vmkit create NAME --image IMAGE`` makes) with a generic identity,
    wait until it is ready and settled, and save it as a new template. Nothing is left behind on failure
    or interrupt (QEMU is ended, the staging directory removed)."""
    say = progress or (lambda _m: None)
    root = paths.make_dirs(templates_root() / image.name)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{key(base.memory, base.cpus)}.building."))
    try:
        config = template_config(image, staging, base.memory, base.cpus, base)
        if image.manifest.kind == "disk":
            say("preparing the template's disk and generic identity")
            provision.provision(staging, config, image, provision.CloudOptions())
        vm = VirtualMachine(config, staging)
        saved = asyncio.run(_boot_and_save(vm, staging, say))
        for made in (RAM, DISK, DEVICES):  # QEMU and qemu-img made them with their umask
            if (staging / made).exists():
                (staging / made).chmod(0o600)
                fsync_path(staging / made)  # on disk before the template is declared made (a crash: no half template)
        for leftover in _LEFTOVERS:
            p = staging / leftover
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        manifest = TemplateManifest(
            image=image.name, image_created=image.manifest.created, image_recipe=image.manifest.recipe,
            qemu_version=saved.qemu_version, machine_type=saved.machine_type, memory=config.memory,
            cpus=config.cpus, layout=layout_digest(config, vm.accel), has_disk=image.manifest.kind == "disk",
            mac=config.network.mac if config.network is not None else None,
            created=time.time(), boot_seconds=saved.boot_seconds)
        atomic_write(staging / MANIFEST, manifest.model_dump_json(indent=2), 0o600)
        final = root / f"{key(config.memory, config.cpus)}-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(2)}"
        os.replace(staging, final)
        return Template(final, manifest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- cloning


def clone_config(config: MachineConfig, tpl: Template) -> MachineConfig:
    """A new machine's configuration as a clone of ``tpl``.

    A clone with a guest agent keeps its own MAC (as every machine: :func:`vmkit.host.builder.random_mac`).
    The template's MAC is device state: the NIC's and, behind user-mode NAT (slirp), the DHCP lease
    table's, which holds 10.0.2.15 for it (port forwards go to 10.0.2.15). :func:`device_state` writes
    the clone's MAC over the template's in both before QEMU loads them, and :func:`identity_script`
    gives the guest's interface that MAC: the lease stays 10.0.2.15 and renews under the new MAC.
    A machine without an agent cannot change its guest's interface: it keeps the template's MAC (alone
    behind its own user-mode NAT; a machine on a vmkit network is cloned only with its agent).

    A machine whose one NIC is on a vmkit network runs that NIC in the template's NIC slot (see
    :func:`clone_nic_config`): the clone's MAC goes into the NIC's device state as above, and the identity
    script moves the guest's interface onto the network (:func:`network_lines`)."""
    if config.network is None or tpl.manifest.mac is None or config.agent:
        return config
    return config.model_copy(update={"network": config.network.model_copy(update={"mac": tpl.manifest.mac})})


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def device_state(tpl: Template, config: MachineConfig) -> int:
    """A descriptor (a memfd, at offset 0) of ``tpl``'s device state for the clone ``config``: the
    template's MAC replaced by the clone's wherever it occurs (the NIC's address and filter table,
    slirp's DHCP lease); both are 6 bytes, so the stream's layout is unchanged."""
    data = tpl.devices.read_bytes()
    own = nic_mac(config)
    if tpl.manifest.mac is not None and own is not None and own.lower() != tpl.manifest.mac.lower():
        old, new = mac_bytes(tpl.manifest.mac), mac_bytes(own)
        if old not in data:
            raise ImageError(f"the warm template {tpl.directory.name} has no NIC with its MAC {tpl.manifest.mac}",
                             hint="make a new one: vmkit image warm IMAGE --rebuild")
        data = data.replace(old, new)
    fd = os.memfd_create("vmkit-devices", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def reference(instance_dir: Path) -> TemplateReference | None:
    path = instance_dir / REFERENCE
    try:
        return TemplateReference.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return None


def consume_reference(instance_dir: Path) -> None:
    """The machine's disk moves on from the template's at its first start (warm or cold): it can never
    start from the template again (``template.json`` becomes ``template.used.json``)."""
    with contextlib.suppress(FileNotFoundError):
        os.replace(instance_dir / REFERENCE, instance_dir / USED_REFERENCE)


def write_reference(instance_dir: Path, tpl: Template) -> None:
    atomic_write(instance_dir / REFERENCE, TemplateReference(path=str(tpl.directory)).model_dump_json(), 0o600)


class Phases:
    """How long each phase of a warm start took (seconds, in order), measured from ``began``
    (``time.monotonic()``); the start reports them and ``benchmarks/instant_bench.py --profile`` prints them."""

    def __init__(self, began: float) -> None:
        self.began = began
        self._last = began
        self.seconds: dict[str, float] = {}
        self.parallel: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def since_start(self) -> float:
        return self._last - self.began

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}

    def beside(self, name: str, seconds: float) -> None:
        """A step that ran beside others in the last phase (not added to the sequence)."""
        self.parallel[name] = round(seconds, 3)

    def render(self) -> str:
        return ", ".join([*(f"{k} {v:.3f} s" for k, v in self.seconds.items()),
                          *(f"({k} {v:.3f} s)" for k, v in self.parallel.items())])


def process_started() -> float:
    """When this process started (wall clock, from /proc: before the interpreter imported anything)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return round(time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK"), 3)


async def restore(vm: VirtualMachine, tpl: Template, phases: Phases | None = None) -> None:
    """Start the STOPPED machine ``vm`` from ``tpl``: its RAM mapped copy-on-write, its device state
    loaded; the machine is PAUSED afterwards (:func:`personalize` it after resuming)."""
    phases = phases or Phases(time.monotonic())
    spare = SPARE_NETDEV if moves_nic(vm.config) else None
    await vm.start(incoming=True, machine_type=tpl.manifest.machine_type, memory_file=tpl.ram, memory_shared=False,
                   spare_netdev=spare)
    phases.mark("QEMU started")
    try:
        await migration.set_capabilities(vm, x_ignore_shared=True)
        fd = device_state(tpl, vm.config)
        try:
            assert vm.qmp is not None
            vm.qmp.send_fd(fd)
        finally:
            os.close(fd)
        await vm.execute("getfd", {"fdname": _FD_NAME})
        await vm.execute("migrate-incoming", {"uri": f"fd:{_FD_NAME}"})
        await _wait_migration(vm, f"loading the template {tpl.directory.name}")
        phases.mark("device state loaded")
        # off again: the clone's own saves and migrations carry its RAM (the template file is not theirs)
        await migration.set_capabilities(vm, x_ignore_shared=False)
        if spare is not None:  # its user-mode NAT state is loaded: gone, so that the machine is its vm.yaml again
            await vm.execute("netdev_del", {"id": spare})
    except BaseException:
        await vm.shutdown(timeout=2)
        raise
    vm.guest_clock_stopped_at = tpl.manifest.created  # its clock stood still since the template was saved


def nic_mac(config: MachineConfig) -> str | None:
    """The MAC of the clone's NIC in the template's NIC slot: its user-mode NIC's or, on a machine whose
    one NIC is on a vmkit network, that NIC's (the template's NIC moved onto the network: :func:`clone_nic_config`)."""
    if config.user_nic is not None:
        return config.user_nic.mac
    return config.networks[0].mac if config.networks else None


def clone_nic_config(config: MachineConfig) -> MachineConfig:
    """``config`` as the template sees its devices: a machine whose one NIC is on a vmkit network runs it in the
    template's NIC slot (the same device at the same PCI address, on a tap instead of user-mode NAT), so its
    layout is the template's with that NIC as the user-mode one."""
    if not moves_nic(config):
        return config
    iface = config.networks[0]
    return config.model_copy(update={"network": Network(mode="user", mac=iface.mac, model=iface.model),
                                     "networks": ()})


def moves_nic(config: MachineConfig) -> bool:
    """Whether a clone of ``config`` runs the template's NIC on a vmkit network (see :func:`clone_nic_config`):
    its QEMU then takes the template's user-mode NAT state on a spare netdev (:data:`SPARE_NETDEV`)."""
    return config.user_nic is None and len(config.networks) == 1


@dataclass(frozen=True)
class CloneNic:
    """The template's NIC in a clone on a vmkit network (the supervisor knows the network)."""

    address: str | None
    """The static lease it gets (None: the network hands out none, rootless: nothing to wait for)."""
    resolv_conf: str | None
    """The guest's /etc/resolv.conf there (the network's DNS), as a cold boot writes it."""


def _q(value: str) -> str:
    return shlex.quote(value)


def _any_case(text: str) -> str:
    """A shell pattern matching ``text`` in any case (hex MACs in files may be upper-case)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in text)


def mac_lines(config: MachineConfig, template_mac: str | None) -> list[str]:
    """Shell lines finding the guest's interface that has the template's MAC (its name left in ``$nic``;
    :func:`identity_script` gives it the clone's MAC, see :func:`clone_config`) and putting the clone's MAC
    in the network configuration (cloud-init matches the NIC by its MAC)."""
    own = nic_mac(config)
    if template_mac is None or own is None or own.lower() == template_mac.lower():
        return []
    old, new = template_mac.lower(), own.lower()
    return [  # builtins (but `sed` where a file names the MAC)
        "nic=; for i in /sys/class/net/*; do read a < $i/address || continue",
        f"  if [ \"$a\" = {_q(old)} ]; then nic=${{i##*/}}; fi; done",
        '[ -n "$nic" ] || { echo "no interface has the template\'s MAC" >&2; exit 3; }',
        "set --; for f in /etc/netplan/*.yaml /etc/network/interfaces /etc/network/interfaces.d/* "
        "/etc/systemd/network/* /run/systemd/network/*; do [ -f \"$f\" ] || continue",
        f"  while IFS= read -r l; do case \"$l\" in *{_any_case(old)}*) set -- \"$@\" \"$f\"; break;; esac",
        "  done < \"$f\"",
        "done",
        f"[ $# -eq 0 ] || sed -i 's/{old}/{new}/gI' \"$@\"",
    ]


def network_lines(nic: CloneNic, mac: str) -> list[str]:
    """Shell lines that take the guest's interface ``$nic`` off the template's user-mode NAT for the vmkit
    network: down (networkd stops its DHCP client) with the clone's MAC (before networkd makes its new DHCP
    client: one made with the template's MAC asks for an address first, and dnsmasq's ping check of the
    dynamic address it offers holds every answer for 3 s), DHCP as a new client (its MAC as client id:
    networkd's default DUID comes from the machine-id it read at boot, the template's, the same in every
    clone), its DNS. :data:`PERL` then brings it up (one DHCP exchange, for the static lease) and waits until
    the address is there."""
    lines = [f"ip link set dev \"$nic\" down address {_q(mac)}",
             # a template made by vmkit has the drop-in already (networkd read it before the save); else here
             "r=; for f in /etc/systemd/network/*.network /run/systemd/network/*.network; do [ -f \"$f\" ] || continue",
             f"  if [ -f \"$f.d/{CLIENT_ID_DROPIN}\" ]; then continue; fi",
             "  d=/run/systemd/network/${f##*/}.d; [ -d \"$d\" ] || mkdir -p \"$d\"",
             f"  printf {_q(CLIENT_ID_TEXT)} > \"$d/{CLIENT_ID_DROPIN}\"; r=1; done",
             '[ -z "$r" ] || networkctl reload']
    if nic.address is None:  # no DHCP there (rootless): nothing takes the template's NAT address away
        lines.append("ip -4 addr flush dev \"$nic\"")
    if nic.resolv_conf is not None:
        lines.append(f"printf '%s' {_q(nic.resolv_conf)} > /etc/resolv.conf")
    return lines


PERL = """my ($hex, $host, $started, $nr, $if, $mac, $up, $addr) = @ARGV;
open(my $f, ">", "/dev/random") or die "open /dev/random: $!";
my $b = pack("H*", $hex);
ioctl($f, 0x40085203, pack("ii", length($b) * 8, length($b)) . $b) or die "RNDADDENTROPY: $!";
ioctl($f, 0x5207, 0) or die "RNDRESEEDCRNG: $!";
if ($host ne "-") {
  open(my $u, "<", "/proc/uptime") or die "uptime: $!"; my ($t) = split(/ /, <$u>);
  my $ns = $host + int(($t - $started / 100) * 1e9);
  syscall($nr, 0, pack("qq", int($ns / 1000000000), $ns % 1000000000)) == 0 or die "clock_settime: $!";
}
if ($if ne "-") {
  socket(my $s, 2, 2, 0) or die "socket: $!";
  ioctl($s, 0x8924, pack("a16 S a14", $if, 1, pack("H12", $mac))) or die "SIOCSIFHWADDR $if: $!";
  if ($up) {
    my $r = pack("a16 x24", $if); ioctl($s, 0x8913, $r) or die "SIOCGIFFLAGS $if: $!";
    ioctl($s, 0x8914, pack("a16 s x22", $if, unpack("x16 s", $r) | 1)) or die "SIOCSIFFLAGS $if: $!";
  }
}
if ($addr ne "-") {
  my $end = time + 60;
  while (1) {
    open(my $t, "<", "/proc/net/fib_trie") or die "fib_trie: $!"; local $/; my $x = <$t>; close $t;
    last if $x =~ /-- \\Q$addr\\E\\n\\s+\\/32 host LOCAL/;
    die "$if has no address $addr after 60 s\\n" if time > $end;
    select(undef, undef, undef, 0.02);
  }
}
"""
"""What the identity script runs in perl (perl-base is in every Debian; it starts in a fraction of python3's
time under TCG), one program for:

- the kernel RNG: the clone's state equals every other clone's until it reseeds. Fresh host bytes are added
  (credited: RNDADDENTROPY) and every CPU's generator reseeded (RNDRESEEDCRNG);
- the clock (clock_settime) to the host's time plus the time since the shell started;
- the NIC's MAC (SIOCSIFHWADDR: what `ip link set address` does, without starting ip; virtio-net takes it
  while up), and for a clone on a vmkit network the NIC up again (SIOCSIFFLAGS) and a wait until its static
  lease is one of the guest's addresses (/proc/net/fib_trie, every 20 ms, at most 60 s).

Arguments: entropy (hex), host time (ns) or ``-``, the shell's start (clock ticks), clock_settime's number,
interface or ``-``, MAC (hex), 1 to bring the interface up, the address to wait for or ``-``."""


def hosts_lines(name: str, path: str = "/etc/hosts") -> list[str]:
    """Shell lines (builtins only) putting ``name`` for the template's in ``path``, word by word (also as
    the first label of a domain name)."""
    return [
        'h=; while IFS= read -r l || [ -n "$l" ]; do',
        f'  case "$l" in *{TEMPLATE_NAME}*) set -f; set -- $l; set +f; l=',
        f'    for w; do case "$w" in {TEMPLATE_NAME}) w={_q(name)};; {TEMPLATE_NAME}.*) w={_q(name)}.${{w#*.}};; esac',
        '      l="$l${l:+ }$w"; done;; esac',
        f'  h="$h$l\n"; done < {path}',
        f"printf '%s' \"$h\" > {path}",
    ]


STEP = "vmkit-step"
"""What the identity script writes to its stderr as each step begins: ``vmkit-step NAME UPTIME`` (the guest's
/proc/uptime, read by a shell builtin); :func:`personalize` makes each step's seconds of them."""

CLOCK_SETTIME = {"x86_64": 227, "aarch64": 112}
"""The clock_settime system call's number (the identity script sets the clock through perl's ``syscall``)."""


def _step(name: str) -> str:
    return f'read t _ < /proc/uptime; echo "{STEP} {name} $t" >&2'


def identity_script(config: MachineConfig, instance_dir: Path, *, entropy: bytes, machine_id: str,
                    template_mac: str | None = None, nic: CloneNic | None = None,
                    host_time_ns: int | None = None, root_grown_to: int | None = None) -> str:
    """The shell script (run as root by the guest agent) that makes a fresh clone this machine.

    ``host_time_ns``: the host's time as the script is sent: the script sets the guest's clock to it plus the
    time since the shell started (the agent starts it as the request arrives; the kernel's clock only, as
    the guest agent's guest-set-time does before it runs ``hwclock`` to write the RTC, which QEMU's RTC
    does not need: it follows the host's clock).

    ``root_grown_to``: the clone's root disk is larger than the template's (``vmkit create --disk``), this many
    bytes (:func:`grow_root_disk` told the guest): the script waits until the kernel sees it and grows the root
    filesystem, as cloud-init's growpart and resizefs do at a cold boot.

    Every value comes from vmkit's own files (names are validated, keys are OpenSSH text) and is
    quoted with :func:`shlex.quote`. Each step writes a mark (:data:`STEP`) to stderr."""
    name = config.name
    host_keys = keys.HostKeys.load(instance_dir / "ssh" / "host")
    user_key = keys.load_keypair(instance_dir / "ssh" / "id_ed25519")
    meta = read_seed_iso(instance_dir / provision.SEED).get("meta-data", b"").decode()
    instance_id = next((ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("instance-id:")), "")
    home = f"/home/{provision.USER}"
    keys_dir = f"{home}/.ssh"
    # Shell builtins wherever they do: a program started costs 50 to 300 ms in a clone (TCG translates
    # its code anew in the clone's fresh QEMU).
    lines = [
        "set -e",
        # when this shell started (clock ticks since boot: field 22 of its stat), for the clock below
        "read -r st < /proc/$$/stat; set -f; set -- ${st##*) }; set +f; started=${20}",
        # (a first mark: when the agent started this shell)
        f'echo "{STEP} shell $((started / 100)).$((started % 100 / 10))$((started % 10))" >&2',
        _step("hostname"),
        f"echo {_q(name)} > /proc/sys/kernel/hostname",
        f"echo {_q(name)} > /etc/hostname",
        *hosts_lines(name),
        f"echo {_q(machine_id)} > /etc/machine-id",
    ]
    own_mac = mac_lines(config, template_mac)
    network = nic is not None and bool(own_mac)  # the template's NIC, now on a vmkit network
    set_mac = (f"\"$nic\" {(nic_mac(config) or '').replace(':', '')} {int(network)} "  # (perl's arguments)
               f"{(nic.address if nic is not None else None) or '-'}") if own_mac else "- - 0 -"
    if own_mac:
        lines += [_step("find-nic"), *own_mac]
    if network:
        assert nic is not None
        lines += [_step("network"), *network_lines(nic, nic_mac(config) or "")]
    lines += [_step("ssh-host-keys")]
    paths = []
    for k in host_keys.keys:
        path = f"/etc/ssh/ssh_host_{k.key_type}_key"
        paths.append(path)
        lines += [f"umask 077; printf '%s' {_q(k.private_openssh)} > {path}; umask 022",
                  f"printf '%s\\n' {_q(k.public_openssh)} > {path}.pub"]
    kept = " | ".join(f"{p} | {p}.pub" for p in paths) or "''"
    lines += [  # the template's keys of other types go (rm only when there are some)
        f"set --; for f in /etc/ssh/ssh_host_*; do case \"$f\" in {kept}) ;;",
        "  *) [ ! -e \"$f\" ] || set -- \"$@\" \"$f\";; esac; done",
        "[ $# -eq 0 ] || rm -f \"$@\"",
        _step("user-key"),
        f"[ -d {keys_dir} ] || install -d -m 700 -o {provision.USER} -g {provision.USER} {keys_dir}",
        # a template keeps the file, empty and the user's (written into, it stays so); else it is made here
        f"if [ -f {keys_dir}/authorized_keys ]; then new=; else new=1; fi",
        f"umask 077; printf '%s\\n' {_q(user_key.public_openssh)} > {keys_dir}/authorized_keys; umask 022",
        f"[ -z \"$new\" ] || chown {provision.USER}: {keys_dir}/authorized_keys",
        "[ -d /run/vmkit ] || mkdir -p /run/vmkit",
        f"echo {_q(instance_id)} > /run/vmkit/instance-id",
        _step("rng-clock-mac"),
        f"perl -e {_q(PERL)} {entropy.hex() or '00'} {host_time_ns if host_time_ns is not None else '-'} "
        f"\"$started\" {CLOCK_SETTIME.get(config.arch, 0)} {set_mac}",
        # no reload of sshd: it is re-executed for every connection, and reads the host keys then
        # (OpenSSH 9.2, Debian 12): the first connection already gets the new ones
    ]
    if root_grown_to is not None:
        lines += [_step("grow-root"), *grow_root_lines(root_grown_to)]
    if (instance_dir / provision.EXTRA_USER_DATA).exists():
        # its own user-data (users, files, runcmd): cloud-init runs again, as for a new instance, from the
        # machine's own seed (the block cache still holds the template's: dropped first)
        lines += [_step("user-data"),
                  "sync; echo 3 > /proc/sys/vm/drop_caches",
                  "cloud-init clean >/dev/null",
                  "cloud-init init >/dev/null 2>&1",
                  "cloud-init modules --mode config >/dev/null 2>&1",
                  "cloud-init modules --mode final >/dev/null 2>&1"]
    lines.append(_step("end"))
    return "\n".join(lines) + "\n"


def step_seconds(stderr: str) -> tuple[dict[str, float], str]:
    """Each step's seconds from the identity script's marks (see :data:`STEP`), and the rest of its stderr."""
    marks: list[tuple[str, float]] = []
    rest = []
    for line in stderr.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == STEP:
            with contextlib.suppress(ValueError):
                marks.append((parts[1], float(parts[2])))
                continue
        rest.append(line)
    steps: dict[str, float] = {}
    for (name, at), (_, nxt) in itertools.pairwise(marks):
        steps[name] = round(steps.get(name, 0.0) + nxt - at, 3)
    return steps, "\n".join(rest)


@dataclass(frozen=True)
class Personalized:
    seconds: float
    machine_id: str
    steps: dict[str, float]
    """Seconds of each step of the identity script, in the guest (:func:`step_seconds`)."""
    clock_set: bool
    """The script set the guest's clock to the host's."""


async def personalize(vm: VirtualMachine, instance_dir: Path, *, template_mac: str | None = None,
                      nic: CloneNic | None = None, root_grown_to: int | None = None) -> Personalized:
    """Make the running clone ``vm`` its own (see :func:`identity_script`), through its guest agent; the
    script also sets the guest's clock (on an architecture whose clock_settime vmkit knows)."""
    if vm.agent is None:
        return Personalized(0.0, "", {}, False)
    started = time.monotonic()
    machine_id = uuid.uuid4().hex
    sets_clock = vm.config.arch in CLOCK_SETTIME
    timeout = 600.0 if (instance_dir / provision.EXTRA_USER_DATA).exists() else 120.0
    script = identity_script(vm.config, instance_dir, entropy=secrets.token_bytes(64), machine_id=machine_id,
                             template_mac=template_mac, nic=nic, host_time_ns=time.time_ns() if sets_clock else None,
                             root_grown_to=root_grown_to)
    result = await guest_exec(vm.agent, ["/bin/sh", "-s"], stdin=script.encode(), timeout=timeout, max_poll=0.05)
    steps, stderr = step_seconds(result.stderr.decode(errors="replace"))
    if result.exit_code != 0:
        raise VmkitError(f"{vm.config.name}: the clone could not be given its own identity (exit "
                         f"{result.exit_code}): {stderr[-400:]}",
                         hint=f"start it cold: vmkit stop {vm.config.name} && vmkit start --cold {vm.config.name}")
    return Personalized(time.monotonic() - started, machine_id, steps, sets_clock)


GROW_WAIT_SECONDS = 10
"""How long the identity script waits for the guest's kernel to see its root disk grow."""


def grow_root_lines(size: int) -> list[str]:
    """Shell lines that wait until the disk under ``/`` has ``size`` bytes in the guest's eyes, then grow the
    partition under ``/`` (if it is one: ``growpart``, from cloud-guest-utils) and the filesystem on it (ext2/3/4:
    ``resize2fs``, xfs: ``xfs_growfs``; both work on a mounted filesystem)."""
    sectors = size // 512
    return [
        # the device under / by its numbers (/proc/mounts may say /dev/root), and its filesystem's type
        'while read -r id parent majmin root mnt rest; do [ "$mnt" != / ] || break; done < /proc/self/mountinfo',
        'while read -r dev mnt fstype rest; do [ "$mnt" != / ] || break; done < /proc/mounts',
        'part=$(basename "$(readlink -f "/sys/dev/block/$majmin")"); disk=$part; num=',
        'if [ -e "/sys/class/block/$part/partition" ]; then read -r num < "/sys/class/block/$part/partition"; '
        'disk=$(basename "$(readlink -f "/sys/class/block/$part/..")"); fi',
        f'i=0; while read -r now < "/sys/class/block/$disk/size" && [ "$now" -lt {sectors} ]; do',
        f'  i=$((i + 1)); [ $i -le {GROW_WAIT_SECONDS * 20} ] || {{ echo "the guest\'s kernel still sees $now '
        f'sectors on /dev/$disk, not {sectors}" >&2; exit 1; }}; sleep 0.05',
        "done",
        '[ -z "$num" ] || growpart "/dev/$disk" "$num" >/dev/null',
        'case "$fstype" in ext[234]) resize2fs "/dev/$part" >/dev/null 2>&1;; xfs) xfs_growfs / >/dev/null;;',
        '  *) echo "vmkit: the root filesystem ($fstype) was not grown: grow it yourself" >&2;; esac',
    ]


async def grow_root_disk(vm: VirtualMachine, tpl: Template) -> int | None:
    """A clone's root disk made larger than the template's (``vmkit create --disk``): QEMU serves the larger
    overlay, but the guest's kernel read the disk's size when the template booted. ``block_resize`` to the size it
    already has makes QEMU tell the guest (virtio's configuration-change interrupt; measured on QEMU 7.2: the
    kernel logs "detected capacity change" at once). Returns the new size (None: the disk is the template's size)."""
    for dev in await vm.execute("query-block"):
        inserted = dev.get("inserted") or {}
        image = inserted.get("image") or {}
        backing = image.get("backing-image") or {}
        if backing.get("filename") != str(tpl.disk):
            continue
        size, base = int(image.get("virtual-size", 0)), int(backing.get("virtual-size", 0))
        if size <= base:
            return None
        await vm.execute("block_resize", {"node-name": inserted["node-name"], "size": size})
        return size
    return None


def describe(tpl: Template) -> dict[str, Any]:
    m = tpl.manifest
    return {"path": str(tpl.directory), "image": m.image, "memory": m.memory, "cpus": m.cpus,
            "qemu_version": m.qemu_version, "machine_type": m.machine_type, "created": m.created,
            "boot_seconds": m.boot_seconds, "ram_bytes": tpl.ram.stat().st_size if tpl.ram.exists() else 0,
            "devices_bytes": tpl.devices.stat().st_size if tpl.devices.exists() else 0}

