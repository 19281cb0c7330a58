"""Pure functions from a configuration to QEMU's argv.

One small builder per device kind; :func:`build_argv` concatenates them. Nothing here
touches the host: paths and file descriptors come in through :class:`Runtime`, so the
output is golden-testable and ``vmkit start --dry-run`` shows exactly what will run.
"""

from __future__ import annotations

import json
import shlex
import uuid
from dataclasses import dataclass
from pathlib import Path

from vmkit.config import (
    ARCHES,
    Attachment,
    DiskImage,
    Display,
    MachineConfig,
    NbdAttachment,
    Network,
    NetworkInterface,
    StorageDevice,
    parse_nbd_url,
)
from vmkit.runtime.qemu.accel import AccelChoice

QEMU_BINARY = {name: info.qemu_system for name, info in ARCHES.items()}


@dataclass(frozen=True)
class NicBackend:
    """How one vmkit-network NIC reaches its network: a tap device QEMU gets as an open file
    descriptor (``tap_fd``), or, rootless, a unix datagram socket pair with the network's switch
    (``local`` is this NIC's socket, ``remote`` the switch's)."""

    tap_fd: int | None = None
    local: Path | None = None
    remote: Path | None = None


@dataclass(frozen=True)
class Runtime:
    """Host-side endpoints the command line refers to.

    ``qmp_fd`` and ``serial_fd`` are connected sockets the parent passes to QEMU (one
    end of a socketpair each), so nothing races on socket paths.
    """

    qmp_fd: int
    serial_fd: int
    pidfile: Path | None = None
    share_dir: Path | None = None  # where the virtiofs vhost-user sockets live (the instance dir)
    nics: tuple[NicBackend, ...] = ()
    """One per ``config.networks`` entry, in order (the supervisor opens the taps)."""
    machine_type: str | None = None
    """A versioned machine type to run instead of the configuration's alias (``pc-q35-7.1`` for
    ``q35``): a restore runs the type the state was saved with, as libvirt pins it."""
    memory_file: Path | None = None
    """The guest's RAM as this file (``memory-backend-file``): a warm template writes it (``memory_shared``,
    MAP_SHARED); its clones map it copy-on-write (MAP_PRIVATE), so they share its pages in the host's
    page cache until they write them (see :mod:`vmkit.state.template`)."""
    memory_shared: bool = False
    ram_pad: int = 0
    """Bytes of RAM added to the configured memory (:func:`vmkit.runtime.migration.ram_pad`: QEMU before
    9.0 tracks the dirty pages of a TCG guest correctly only in a RAM block whose length is no multiple
    of 64 pages). The guest sees them as RAM."""
    spare_netdev: str | None = None
    """A user-mode netdev of this name without a NIC (``restrict=on``): it takes the user-mode NAT state of a
    warm template whose NIC a clone runs on a vmkit network (:mod:`vmkit.state.template`)."""

    def virtiofs_socket(self, tag: str) -> Path:
        return (self.share_dir or Path(".")) / f"virtiofs-{tag}.sock"

    @property
    def agent_socket(self) -> Path:
        return (self.share_dir or Path(".")) / "qga.sock"

    @property
    def vnc_socket(self) -> Path:
        return (self.share_dir or Path(".")) / "vnc.sock"


def opt_escape(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (commas are doubled)."""
    return value.replace(",", ",,")


def base_args(config: MachineConfig, accel: AccelChoice, machine_type: str | None = None,
              ram_pad: int = 0) -> list[str]:
    cpu = config.cpu_model or accel.default_cpu
    machine = machine_type or config.machine
    if config.machine == "virt":
        # the newest interrupt controller TCG emulates (GICv3: more than 8 vCPUs)
        machine += ",gic-version=max"
    # the guest's RAM is always the backend object ``mem`` (anonymous memory, a memfd shared with
    # virtiofsd, or a warm template's file): QEMU names the RAM block after it, and a saved state or
    # a migration stream loads only into a QEMU whose RAM block has the same name, so a machine
    # cloned from a template, one with virtiofs shares and a plain one can save, restore and migrate
    # between each other's layouts
    machine += ",memory-backend=mem"
    if not config.memory_merge:  # QEMU's default is on (KSM may merge the guest's pages)
        machine += ",mem-merge=off"
    return [
        "-name", f"{opt_escape(config.name)},debug-threads=on",
        "-machine", machine,
        *accel.argv(config.tcg_cache),
        "-cpu", cpu,
        "-smp", f"{config.cpus},maxcpus={config.cpu_ceiling}",
        "-m", memory_arg(config, ram_pad),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-S",  # start paused: vmkit connects QMP and subscribes to events, then sends 'cont'
    ]


def ram_size(config: MachineConfig, ram_pad: int = 0) -> str:
    """The boot memory as QEMU's size (``1024M``; in KiB with a pad: ``1048584K``)."""
    return f"{config.memory >> 20}M" if not ram_pad else f"{(config.memory + ram_pad) >> 10}K"


def memory_arg(config: MachineConfig, ram_pad: int = 0) -> str:
    """``-m``: the boot memory, and room for the virtio-mem region when there is one."""
    arg = ram_size(config, ram_pad)
    if config.max_memory is not None:
        arg += f",maxmem={config.max_memory >> 20}M"  # no pad then (see vmkit.runtime.migration.ram_pad)
    return arg


VMEM_ID = "vmem0"
"""The virtio-mem device's id: QOM path ``/machine/peripheral/vmem0``; its backend is ``vmem0-mem``."""
VMEM_BLOCK_SIZE = "2M"


def hotplug_memory_args(config: MachineConfig) -> list[str]:
    """A virtio-mem device over a backend as large as the region (``max_memory`` - ``memory``), with
    ``plugged_memory`` requested from the start. Its backend shares the guest's memory when the main
    one does (virtiofsd maps all of it) and follows mem-merge."""
    if config.max_memory is None:
        return []
    size = config.hotplug_memory >> 20
    merge = "" if config.memory_merge else ",merge=off"
    backend = (f"memory-backend-memfd,id={VMEM_ID}-mem,size={size}M,share=on{merge}" if config.needs_shared_memory
               else f"memory-backend-ram,id={VMEM_ID}-mem,size={size}M{merge}")
    return ["-object", backend,
            "-device", f"virtio-mem-pci,id={VMEM_ID},memdev={VMEM_ID}-mem,block-size={VMEM_BLOCK_SIZE},"
                       f"requested-size={config.plugged_memory >> 20}M"]


def boot_args(config: MachineConfig) -> list[str]:
    boot = config.boot
    out = ["-kernel", str(boot.kernel)]
    if boot.initrd is not None:
        out += ["-initrd", str(boot.initrd)]
    if boot.cmdline:
        out += ["-append", boot.cmdline]
    return out


def monitor_args(runtime: Runtime) -> list[str]:
    return [
        "-chardev", f"socket,id=qmp,fd={runtime.qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
    ]


def serial_args(runtime: Runtime) -> list[str]:
    return [
        "-chardev", f"socket,id=serial0,fd={runtime.serial_fd}",
        "-serial", "chardev:serial0",
    ]


def blockdev_spec(node: str, att: Attachment) -> dict[str, object]:
    """The ``-blockdev`` / QMP ``blockdev-add`` argument for one attachment."""
    if isinstance(att, NbdAttachment):
        addr = parse_nbd_url(att.url)
        server: dict[str, object] = (
            {"type": "unix", "path": addr.unix_path} if addr.unix_path
            else {"type": "inet", "host": addr.host, "port": str(addr.port)}
        )
        return {"driver": "nbd", "node-name": node, "server": server, "export": addr.export,
                "reconnect-delay": att.reconnect_delay, "read-only": att.read_only}
    cache_direct = att.cache in ("none", "directsync")
    cache_no_flush = att.cache == "unsafe"
    proto: dict[str, object] = {
        "driver": "file",
        "filename": str(att.path),
        "node-name": f"{node}-file",
        "cache": {"direct": cache_direct, "no-flush": cache_no_flush},
        "read-only": att.read_only,
    }
    if not att.read_only:
        proto["locking"] = "on"
    return {
        "driver": att.format,
        "node-name": node,
        "file": proto,
        "read-only": att.read_only,
        "cache": {"direct": cache_direct, "no-flush": cache_no_flush},
    }


def blockdev_json(node: str, att: Attachment) -> str:
    return json.dumps(blockdev_spec(node, att), separators=(",", ":"))


def device_id(index: int, dev: StorageDevice) -> str:
    """The node name of a storage device's backend (its guest device is ``<id>-dev``)."""
    return dev.id or f"disk{index}"


SATA_CONTROLLER = "sata0"
"""The AHCI controller sata disks sit on (its ports are buses ``sata0.0`` ... ``sata0.5``)."""
IDE_CONTROLLER = "pata0"
"""The PIIX3 IDE controller ide disks sit on (channels ``pata0.0``, ``pata0.1``; units 0 and 1 on each)."""


def device_spec(node: str, dev: StorageDevice, *, queues: int | None = None, slot: int = 0) -> dict[str, object]:
    """The ``-device`` / QMP ``device_add`` properties of one storage device.

    ``queues``: a virtio-blk's queue count (QEMU's default is the vCPUs at start, which a vCPU hot-plug
    changes: a state saved after one would not load into a machine started with the new count). vmkit
    gives the machine's vCPU ceiling, which never changes while it exists. ``slot``: for ``sata`` and
    ``ide`` disks, how many disks of the same kind come before it (its port, or channel and unit)."""
    spec: dict[str, object] = {"driver": _DEVICE_DRIVER[dev.kind], "drive": node, "id": f"{node}-dev"}
    if dev.kind == "virtio-blk" and queues is not None:
        spec["num-queues"] = queues
    if dev.kind == "usb-storage":
        spec["bus"] = "xhci.0"
    elif dev.kind == "sata":
        spec["bus"] = f"{SATA_CONTROLLER}.{slot}"
    elif dev.kind == "ide":
        spec["bus"] = f"{IDE_CONTROLLER}.{slot // 2}"
        spec["unit"] = slot % 2
    if dev.kind == "nvme":
        spec["serial"] = dev.serial or node  # QEMU's nvme requires a serial
    elif dev.serial:
        spec["serial"] = dev.serial
    att = dev.attachment
    if isinstance(att, DiskImage) and att.cache in ("writethrough", "directsync") and dev.kind == "virtio-blk":
        spec["write-cache"] = "off"
    if isinstance(att, NbdAttachment) and dev.kind != "nvme":
        policy = "stop" if att.on_error == "pause" else "report"
        spec["werror"] = policy
        spec["rerror"] = policy
    return spec


_DEVICE_DRIVER = {"virtio-blk": "virtio-blk-pci", "nvme": "nvme", "usb-storage": "usb-storage", "sata": "ide-hd",
                  "ide": "ide-hd"}


def device_arg(spec: dict[str, object]) -> str:
    rest = ",".join(f"{k}={opt_escape(str(v))}" for k, v in spec.items() if k != "driver")
    return f"{spec['driver']},{rest}"


def storage_args(index: int, dev: StorageDevice, *, queues: int | None = None, slot: int = 0) -> list[str]:
    node = device_id(index, dev)
    return ["-blockdev", blockdev_json(node, dev.attachment),
            "-device", device_arg(device_spec(node, dev, queues=queues, slot=slot))]


def storage_slots(config: MachineConfig) -> list[int]:
    """Each storage device's place among the devices of its kind (a sata disk's port, say)."""
    seen: dict[str, int] = {}
    slots = []
    for dev in config.storage:
        slots.append(seen.get(dev.kind, 0))
        seen[dev.kind] = slots[-1] + 1
    return slots


PCIE_MACHINES = ("q35", "virt")
"""Machine types with a PCI Express host bridge ``pcie.0``: empty root ports there take hot-plugged disks."""


def controller_args(config: MachineConfig) -> list[str]:
    """Buses the devices need: PCIe root ports for hot-plug (q35, and aarch64's virt, whose host
    bridge is also ``pcie.0``), xHCI for USB storage, an AHCI controller for sata disks and a PIIX3
    IDE controller for ide disks (on q35 and pc alike)."""
    out: list[str] = []
    if config.machine in PCIE_MACHINES:
        for i in range(config.hotplug_slots):
            out += ["-device", f"pcie-root-port,id=hotplug{i},chassis={i + 1},bus=pcie.0"]
    if any(d.kind == "usb-storage" for d in config.storage) or config.usb:
        out += ["-device", "qemu-xhci,id=xhci"]
    if any(d.kind == "sata" for d in config.storage):
        out += ["-device", f"ich9-ahci,id={SATA_CONTROLLER}"]
    if any(d.kind == "ide" for d in config.storage):
        out += ["-device", f"piix3-ide,id={IDE_CONTROLLER}"]
    return out


def shared_memory_args(config: MachineConfig, runtime: Runtime | None = None) -> list[str]:
    size = ram_size(config, runtime.ram_pad if runtime is not None else 0)
    merge = "" if config.memory_merge else ",merge=off"
    if runtime is not None and runtime.memory_file is not None:
        share = "on" if runtime.memory_shared else "off"
        return ["-object", f"memory-backend-file,id=mem,size={size},"
                           f"mem-path={opt_escape(str(runtime.memory_file))},share={share}{merge}"]
    if not config.needs_shared_memory:
        return ["-object", f"memory-backend-ram,id=mem,size={size}{merge}"]
    return ["-object", f"memory-backend-memfd,id=mem,size={size},share=on{merge}"]


# The 9p message size guests mount with (``msize=``). QEMU's virtio-9p server takes what the guest
# asks for; Linux's virtio transport allows at most 125 pages (512000 bytes, it clamps larger
# values down to that), which is also the fastest setting for large reads and writes.
NINEP_MSIZE = 512000


def share_args(config: MachineConfig, runtime: Runtime) -> list[str]:
    """virtiofs: a vhost-user-fs device per share (virtiofsd serves it); 9p: QEMU's -virtfs.

    9p uses ``security_model=none`` (as Lima does): files the guest creates belong to the
    user running QEMU, and the guest sees host ownership and modes as they are.
    sshfs shares need nothing on the QEMU command line.
    """
    out: list[str] = []
    for i, share in enumerate(config.shares):
        tag = config.share_tag(i)
        if share.type == "virtiofs":
            sock = opt_escape(str(runtime.virtiofs_socket(tag)))
            out += ["-chardev", f"socket,id=fs{i},path={sock}",
                    "-device", f"vhost-user-fs-pci,chardev=fs{i},tag={tag},queue-size=1024"]
        elif share.type == "9p":
            ro = ",readonly=on" if share.read_only else ""
            out += ["-virtfs", f"local,id=fs{i},path={opt_escape(str(share.host_path))},mount_tag={tag},"
                               f"security_model=none{ro}"]
    return out


AGENT_PORT_ID = "qga0-port"
"""The agent's virtio-serial port: QEMU names it in VSERPORT_CHANGE when the guest opens or closes it."""


def agent_args(runtime: Runtime) -> list[str]:
    """qemu-guest-agent's channel: a virtio-serial port named as the agent expects, served on
    ``qga.sock`` in the instance directory (one client at a time)."""
    sock = opt_escape(str(runtime.agent_socket))
    return ["-chardev", f"socket,id=qga0,path={sock},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vserial0",
            "-device", f"virtserialport,chardev=qga0,name=org.qemu.guest_agent.0,id={AGENT_PORT_ID}"]


NIC_DRIVER = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "rtl8139"}
"""QEMU's device for each NIC model."""


def network_args(net: Network) -> list[str]:
    """The user-mode NAT NIC (``net0``, where ``hostfwd_add`` adds forwards)."""
    netdev = "user,id=net0"
    for fwd in net.forwards:
        netdev += f",hostfwd={fwd.protocol}:{fwd.host_addr}:{fwd.host_port}-:{fwd.guest_port}"
    device = f"{NIC_DRIVER[net.model]},netdev=net0,id=net0-dev"
    if net.mac:
        device += f",mac={net.mac}"
    return ["-netdev", netdev, "-device", device]


def nic_args(index: int, iface: NetworkInterface, backend: NicBackend) -> list[str]:
    """One NIC on a vmkit network: ``vnetN`` on a tap (an fd) or, rootless, a datagram socket."""
    nid = f"vnet{index}"
    if backend.local is not None and backend.remote is not None:
        netdev = (f"dgram,id={nid},local.type=unix,local.path={opt_escape(str(backend.local))},"
                  f"remote.type=unix,remote.path={opt_escape(str(backend.remote))}")
    else:
        # no vhost: vhost-net needs KVM's ioeventfds; under TCG QEMU's own backend carries the frames
        netdev = f"tap,id={nid},fd={backend.tap_fd if backend.tap_fd is not None else -1}"
    device = f"{NIC_DRIVER[iface.model]},netdev={nid},id={nid}-dev"
    if iface.mac:
        device += f",mac={iface.mac}"
    return ["-netdev", netdev, "-device", device]


VMGENID_ID = "vmgenid0"


def generation_id(name: str) -> str:
    """The machine's VM generation ID: one per machine name, so it stays the same across a restore
    of the machine's own saved state and a migration (the target writes the same 16 bytes into the
    same guest page: the page-by-page check holds), and differs for a machine cloned from a warm
    template (another name): the clone's kernel sees a new generation."""
    return str(uuid.uuid5(_VMGENID_NAMESPACE, name))


_VMGENID_NAMESPACE = uuid.UUID("6d1b0f3e-8a57-4c1e-9a0c-766d6b69740a")


def generation_id_args(config: MachineConfig) -> list[str]:
    """A VM generation ID (``vmgenid``, ACPI, x86 only in QEMU 7.2); a Linux guest built with
    ``CONFIG_VMGENID`` (5.18+) reseeds its RNG when it changes (Debian 12's cloud kernel is not:
    clones are reseeded through the agent as well)."""
    if config.arch != "x86_64":
        return []
    return ["-device", f"vmgenid,id={VMGENID_ID},guid={generation_id(config.name)}"]


def entropy_args() -> list[str]:
    return [
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0",
    ]


BALLOON_ID = "balloon0"
"""The balloon device's id: QOM path ``/machine/peripheral/balloon0`` (its guest statistics)."""


def balloon_args(*, free_page_reporting: bool = True) -> list[str]:
    """virtio-balloon: the guest gives memory back when asked (``balloon``), takes it back before it
    would run out (``deflate-on-oom``), and reports the pages it frees (``free-page-reporting``).

    Not reported when the guest's RAM is a file (a warm template and its clones): QEMU 7.2 gives a
    reported page back by punching a hole in the RAM's file even when it is mapped copy-on-write, so a
    clone would zero pages of the template every other clone reads (fixed in QEMU 8.2)."""
    reporting = "on" if free_page_reporting else "off"
    return ["-device", f"virtio-balloon-pci,id={BALLOON_ID},deflate-on-oom=on,free-page-reporting={reporting}"]


DISPLAY_ID = "video0"
_DISPLAY_DRIVER = {"virtio-vga": "virtio-vga", "virtio-gpu": "virtio-gpu-pci"}


def display_args(display: Display, runtime: Runtime) -> list[str]:
    """The display device (EDID on: the guest reads ``width`` x ``height`` as its preferred mode, and
    a new one when a VNC client asks for another size) and QEMU's VNC server on ``vnc.sock`` (a unix
    socket only: no TCP port). The keyboard is the machine's own PS/2 one. ``-display none`` stays:
    VNC is a server, not a window."""
    sock = opt_escape(str(runtime.vnc_socket))
    return ["-device", f"{_DISPLAY_DRIVER[display.type]},id={DISPLAY_ID},edid=on,"
                       f"xres={display.width},yres={display.height}",
            "-vnc", f"unix:{sock}"]


def build_argv(config: MachineConfig, accel: AccelChoice, runtime: Runtime,
               *, binary: str | None = None) -> list[str]:
    """The full QEMU argv for ``config``."""
    argv = [binary or QEMU_BINARY[config.arch]]
    argv += base_args(config, accel, runtime.machine_type, runtime.ram_pad)
    argv += boot_args(config)
    argv += monitor_args(runtime)
    argv += serial_args(runtime)
    argv += shared_memory_args(config, runtime)
    argv += hotplug_memory_args(config)
    argv += controller_args(config)
    for i, (dev, slot) in enumerate(zip(config.storage, storage_slots(config), strict=True)):
        argv += storage_args(i, dev, queues=config.cpu_ceiling, slot=slot)
    argv += share_args(config, runtime)
    if config.user_nic is not None:
        argv += network_args(config.user_nic)
    for i, iface in enumerate(config.networks):
        argv += nic_args(i, iface, runtime.nics[i] if i < len(runtime.nics) else NicBackend())
    if runtime.spare_netdev is not None:
        argv += ["-netdev", f"user,id={runtime.spare_netdev},restrict=on"]
    if config.agent:
        argv += agent_args(runtime)
    if config.entropy:
        argv += entropy_args()
    argv += generation_id_args(config)
    if config.balloon:
        argv += balloon_args(free_page_reporting=runtime is None or runtime.memory_file is None)
    if config.display is not None:
        argv += display_args(config.display, runtime)
        if config.machine == "virt":  # no PS/2 keyboard on the virt board: a virtio one for the screen
            argv += ["-device", "virtio-keyboard-pci,id=kbd0"]
    if runtime.pidfile is not None:
        argv += ["-pidfile", str(runtime.pidfile)]
    return argv


def render(argv: list[str]) -> str:
    return shlex.join(argv)
