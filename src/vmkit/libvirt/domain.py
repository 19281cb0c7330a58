"""A vmkit machine as libvirt domain XML: pure, golden-tested, nothing read from the host.

Call :func:`domain_xml` with the machine's configuration and where its files are **on the host that
runs the domain** (:class:`DomainFiles`; a remote host's storage-pool volumes, say), and where each
vmkit-network NIC plugs in there (:class:`NicTarget`)::

    from vmkit.libvirt.domain import DomainFiles, NicTarget, domain_xml, config_from_domain_xml

    xml = domain_xml(config, domain_type="qemu",
                     files=DomainFiles(kernel="/var/lib/libvirt/images/web-vmlinuz",
                                       disks={"root": "/var/lib/libvirt/images/web.qcow2",
                                              "seed": "/var/lib/libvirt/images/web-seed.iso"},
                                       serial_log="/var/log/libvirt/qemu/web-serial.log"),
                     nics={"lab": NicTarget("bridge", "vmkbr-lab")})
    conn.defineXML(xml)
    config_from_domain_xml(dom.XMLDesc())   # the vm.yaml back (kept in the domain's <metadata>)

Every vm.yaml setting becomes a domain element, or :func:`domain_xml` raises a
:class:`~vmkit.errors.ConfigError` naming the field libvirt (9.0) cannot express, all of them at
once (:func:`problems` lists them without raising). Settings about what vmkit does around a
machine rather than what the machine is (``readiness``, ``clock_sync``, ``image``) have no domain
element: they travel in the ``<metadata>`` copy of the configuration for the backend to act on.

Device aliases follow vmkit's ids (libvirt's user aliases start with ``ua-``): a disk ``ua-<id>``
(``ua-disk0`` when it has none), the user-mode NIC ``ua-net0``, vmkit-network NICs ``ua-vnetN``,
the agent channel ``ua-qga0``, the balloon ``ua-balloon0``, virtio-mem ``ua-vmem0``.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vmkit.config import (
    DiskImage,
    MachineConfig,
    NbdAttachment,
    Serial,
    StorageDevice,
    parse_config,
    parse_nbd_url,
    validate_name,
)
from vmkit.errors import ConfigError, Problem

DomainType = Literal["qemu", "kvm"]
"""libvirt's domain type: ``qemu`` runs under TCG, ``kvm`` under hardware KVM."""

METADATA_NS = "https://vmkit.dev/xmlns/libvirt/1"
"""The namespace of vmkit's element in a domain's ``<metadata>`` (the machine's vm.yaml as JSON)."""
METADATA_PREFIX = "vmkit"

AGENT_CHANNEL = "org.qemu.guest_agent.0"
CPU_PERIOD_US = 100_000
"""The CFS period ``limits.cpu_max`` is a quota of (libvirt's ``global_period``)."""
USER_NETDEV = "hostua-net0"
"""QEMU's id of the user-mode NIC's backend in a domain (libvirt names it ``host`` + the alias)."""
SERIAL_LOG_DEFAULT = "/var/log/libvirt/qemu/{name}-serial.log"
"""Where the serial console is logged when :class:`DomainFiles` gives no ``serial_log``: libvirt's
own log directory on the system daemon (virtlogd writes it)."""


@dataclass(frozen=True)
class NicTarget:
    """Where a NIC on a vmkit network plugs in on the libvirt host: a host bridge (``kind="bridge"``,
    e.g. vmkit's ``vmkbr-NAME``) or a libvirt network (``kind="network"``, e.g. ``default``)."""

    kind: Literal["bridge", "network"]
    name: str


@dataclass(frozen=True)
class DomainFiles:
    """Where the machine's files are on the host that runs the domain. Each ``None`` falls back to
    the path in the configuration (or, for sockets, lets libvirt choose).

    ``disks`` maps a storage device's id (``storage[i].id``, default ``disk<i>``) to its image file
    there. ``serial_log``: the file the serial console is logged to (when ``serial.log``; default
    :data:`SERIAL_LOG_DEFAULT`). ``agent_socket``: the guest agent channel's unix socket (default:
    libvirt makes one in its channel directory). ``vnc_socket``: the display's VNC unix socket
    (default: VNC on a free TCP port on 127.0.0.1)."""

    kernel: str | Path | None = None
    initrd: str | Path | None = None
    disks: Mapping[str, str | Path] = field(default_factory=dict)
    serial_log: str | Path | None = None
    agent_socket: str | Path | None = None
    vnc_socket: str | Path | None = None


def domain_xml(config: MachineConfig, *, name: str | None = None, uuid: str | None = None,
               domain_type: DomainType | None = None, files: DomainFiles | None = None,
               nics: Mapping[str, NicTarget] | None = None, metadata: bool = True,
               forwards: Literal["refuse", "hostfwd"] = "refuse") -> str:
    """The libvirt domain XML of ``config``.

    ``name``: the domain's name (default ``config.name``). ``uuid``: keep a domain's identity when
    redefining it (default: libvirt makes one). ``domain_type``: ``qemu`` or ``kvm`` for ``accel:
    auto`` (decide it with :func:`vmkit.runtime.qemu.accel.choose` on the host that runs it;
    default ``qemu``); ``accel: tcg`` is always ``qemu`` and ``accel: kvm`` always ``kvm``.
    ``files``: paths on the target host (:class:`DomainFiles`). ``nics``: each vmkit network in
    ``config.networks`` by name -> where its NIC plugs in. ``metadata``: keep the configuration in
    the domain's ``<metadata>`` (read back with :func:`config_from_domain_xml`), with the domain's
    name and the files where ``files`` puts them. ``forwards``: libvirt 9.0 has no element for
    ``network.forwards`` on user-mode networking, so they are refused, unless ``"hostfwd"``: the
    caller adds them to the running domain itself (:func:`hostfwd_commands`, through libvirt's
    ``qemuMonitorCommand`` with the HMP flag, as vmkit's supervisor adds them with ``hostfwd_add``).

    Raises :class:`~vmkit.errors.ConfigError` naming every setting libvirt cannot express.
    """
    files = files or DomainFiles()
    nics = nics or {}
    found = problems(config, domain_type=domain_type, files=files, nics=nics, forwards=forwards)
    if name is not None:
        try:
            validate_name(name, field="name")
        except ConfigError as exc:
            found = [*exc.problems, *found]
    if found:
        raise ConfigError(found, context="libvirt domain")
    return _Builder(config, name or config.name, uuid, _domain_type(config, domain_type), files, nics,
                    metadata).build()


def problems(config: MachineConfig, *, domain_type: DomainType | None = None, files: DomainFiles | None = None,
             nics: Mapping[str, NicTarget] | None = None,
             forwards: Literal["refuse", "hostfwd"] = "refuse") -> list[Problem]:
    """Every setting of ``config`` the domain XML cannot express (each naming its vm.yaml field)."""
    files = files or DomainFiles()
    nics = nics or {}
    out: list[Problem] = []
    if domain_type is not None and domain_type not in ("qemu", "kvm"):
        out.append(Problem("accel", f"{domain_type!r} is not a libvirt domain type: use qemu or kvm"))
    elif domain_type is not None and config.accel != "auto" and _domain_type(config, None) != domain_type:
        out.append(Problem("accel", f"accel: {config.accel} cannot run as a libvirt domain of type {domain_type}: "
                           "use accel: auto, or run it where the accelerator fits"))
    if config.arch != "x86_64":
        out.append(Problem("arch", f"{config.arch} domains are not generated yet (libvirt's aarch64 virt machine "
                           "boots a kernel without ACPI, unlike vmkit's): run it with vmkit's own backend"))
    if config.binfmt:
        out.append(Problem("binfmt", "vmkit installs binfmt handlers through its supervisor, which a libvirt "
                           "domain does not have: leave binfmt out"))
    if config.cpu_model is not None:
        out += _cpu_model_problems(config.cpu_model)
    for label, value in (("boot.kernel", files.kernel or config.boot.kernel),
                         ("boot.initrd", files.initrd or config.boot.initrd),
                         ("serial.log", files.serial_log), ("agent", files.agent_socket),
                         ("display", files.vnc_socket)):
        if value is not None and not str(value).startswith("/"):
            out.append(Problem(label, f"{value} is relative: libvirt needs an absolute path on the host that "
                               "runs the domain"))
    ids = {_device_id(i, dev) for i, dev in enumerate(config.storage)}
    for unknown in sorted(set(files.disks) - ids):
        out.append(Problem("storage", f"a file is given for a disk {unknown!r} this machine does not have: "
                           f"its disks are {', '.join(sorted(ids)) or 'none'}"))
    for i, dev in enumerate(config.storage):
        out += _storage_problems(i, dev, files, config.machine)
    for i, share in enumerate(config.shares):
        where = f"shares[{i}]"
        if share.type == "sshfs":
            out.append(Problem(f"{where}.type", "libvirt has no sshfs share (vmkit mounts it over SSH from its own "
                               "supervisor): use type: virtiofs or 9p"))
        elif share.type == "virtiofs" and share.read_only:
            out.append(Problem(f"{where}.read_only", "libvirt 9.0 cannot make a virtiofs share read-only: use "
                               "type: 9p for a read-only share, or read_only: false"))
        if not share.host_path.is_absolute():
            out.append(Problem(f"{where}.host_path", f"{share.host_path} is relative: give an absolute path"))
    net = config.network
    if net is not None and net.mode == "user" and net.forwards and forwards != "hostfwd":
        out.append(Problem("network.forwards", "libvirt 9.0 cannot forward host ports into user-mode networking "
                           "(its <portForward> needs the passt backend, from libvirt 9.2): leave the forwards out "
                           "and reach the guest on a bridge (networks:) or a libvirt network, or add them to "
                           "the running domain (virsh qemu-monitor-command --hmp NAME 'hostfwd_add "
                           f"{USER_NETDEV} tcp:127.0.0.1:HOST-:GUEST')"))
    if net is not None and net.mode == "none" and net.forwards:
        out.append(Problem("network.forwards", "forwards to a machine's address on a vmkit network are made by "
                           "vmkit's supervisor, which a libvirt domain does not have: forward ports with the "
                           "bridge's own firewall, or use network mode user"))
    for i, iface in enumerate(config.networks):
        target = nics.get(iface.network)
        if target is None:
            out.append(Problem(f"networks[{i}].network", f"no bridge or libvirt network is given for vmkit network "
                               f"{iface.network!r} on the libvirt host: bridged vmkit networks plug into their "
                               "bridge (vmkbr-NAME); rootless ones cannot be reached from libvirt"))
        elif target.kind not in ("bridge", "network") or not target.name or "/" in target.name:
            out.append(Problem(f"networks[{i}].network", f"{target!r} is not a bridge or libvirt network"))
    if config.serial.log_max != Serial.model_fields["log_max"].default:
        out.append(Problem("serial.log_max", "libvirt's serial log is rotated by virtlogd (its max_size, for every "
                           "domain at once), not per machine: leave serial.log_max out"))
    if config.display is not None and config.display.type == "virtio-gpu":
        out.append(Problem("display.type", "libvirt makes a primary virtio display a virtio-vga device (it has no "
                           "way to ask for virtio-gpu-pci alone): use type: virtio-vga"))
    if config.balloon_min is not None:
        out.append(Problem("balloon_min", "automatic ballooning is vmkit's own host controller, which does not "
                           "drive libvirt domains: leave balloon_min out (set a balloon target with virsh setmem)"))
    if config.balloon_shares != MachineConfig.model_fields["balloon_shares"].default:
        out.append(Problem("balloon_shares", "automatic ballooning is vmkit's own host controller, which does not "
                           "drive libvirt domains: leave balloon_shares out"))
    lim = config.limits
    if lim.memory_min is not None:
        out.append(Problem("limits.memory_min", "libvirt's QEMU driver has no memory reservation (min_guarantee "
                           "is for VMware ESX only): leave memory_min out, or use memory_high"))
    if lim.swap_max is not None and lim.memory_max is None:
        out.append(Problem("limits.swap_max", "libvirt limits memory plus swap together (swap_hard_limit): set "
                           "limits.memory_max too"))
    return out


def _domain_type(config: MachineConfig, asked: DomainType | None) -> DomainType:
    if config.accel == "tcg":
        return "qemu"
    if config.accel == "kvm":
        return "kvm"
    return asked or "qemu"


def _device_id(index: int, dev: StorageDevice) -> str:
    return dev.id or f"disk{index}"


def _storage_problems(index: int, dev: StorageDevice, files: DomainFiles, machine: str) -> list[Problem]:
    where = f"storage[{index}]"
    out: list[Problem] = []
    if dev.kind == "nvme":
        out.append(Problem(f"{where}.kind", "libvirt 9.0 has no NVMe disk bus: use kind: virtio-blk "
                           "(or usb-storage, sata)"))
    if dev.kind in ("sata", "ide") and dev.attachment.read_only:
        out.append(Problem(f"{where}.attachment.read_only", f"libvirt refuses read-only {dev.kind} disks (a "
                           "disk, not a CD-ROM): use kind: virtio-blk or usb-storage for a read-only disk"))
    if dev.kind == "ide" and machine == "q35":
        out.append(Problem(f"{where}.kind", "libvirt has no IDE controller on q35: use kind: sata (or machine: pc)"))
    att = dev.attachment
    if isinstance(att, NbdAttachment):
        if _device_id(index, dev) in files.disks:
            out.append(Problem(f"{where}.attachment", "an NBD disk has no file: give files only for disk images"))
        if att.reconnect_delay:
            out.append(Problem(f"{where}.attachment.reconnect_delay", "libvirt 9.0 cannot set QEMU's NBD "
                               "reconnect-delay: set reconnect_delay: 0 (I/O errors at once, then on_error)"))
    else:
        path = files.disks.get(_device_id(index, dev), att.path)
        if not str(path).startswith("/"):
            out.append(Problem(f"{where}.attachment.path", f"{path} is relative: libvirt needs an absolute path"))
    return out


_ON = ("on", "true", "yes")
_OFF = ("off", "false", "no")


def _cpu_features(model: str) -> tuple[str, list[tuple[str, str]]]:
    """``max,+pdpe1gb,la57=off`` -> ("max", [("require", "pdpe1gb"), ("disable", "la57")]); unknown
    feature values become ("?", value)."""
    name, *feats = model.split(",")
    out: list[tuple[str, str]] = []
    for feat in feats:
        if feat.startswith("+"):
            out.append(("require", feat[1:]))
        elif feat.startswith("-"):
            out.append(("disable", feat[1:]))
        else:
            key, _, value = feat.partition("=")
            policy = "require" if value.lower() in _ON or not value else "disable" if value.lower() in _OFF else "?"
            out.append((policy, key if policy != "?" else feat))
    return name, out


def _cpu_model_problems(model: str) -> list[Problem]:
    name, feats = _cpu_features(model)
    out = [Problem("cpu_model", f"{value!r} is a QEMU CPU property libvirt cannot set: give features as +name, "
                   "-name, name=on or name=off") for policy, value in feats if policy == "?"]
    if name == "host" and feats:
        out.append(Problem("cpu_model", "libvirt passes the host CPU through as it is (host-passthrough): leave "
                           "the features out of cpu_model: host"))
    return out


def _disk_target(prefix: str, n: int) -> str:
    """``vd`` 0 -> ``vda``, 25 -> ``vdz``, 26 -> ``vdaa`` (as libvirt and Linux name them)."""
    letters = ""
    n += 1
    while n:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return prefix + letters


_DISK_BUS = {"virtio-blk": "virtio", "usb-storage": "usb", "sata": "sata", "ide": "ide", "nvme": "nvme"}
"""libvirt's disk bus for each storage kind (nvme is refused)."""
_TARGET_PREFIX = {"virtio": "vd", "usb": "sd", "sata": "sd", "ide": "hd", "nvme": "nvme"}
"""libvirt's target names: USB and SATA disks share the sdX names."""


def _kib(n: int) -> str:
    return str(n >> 10)


class _Builder:
    def __init__(self, config: MachineConfig, name: str, uuid: str | None, dtype: DomainType,
                 files: DomainFiles, nics: Mapping[str, NicTarget], metadata: bool) -> None:
        self.c = config
        self.name = name
        self.uuid = uuid
        self.dtype = dtype
        self.files = files
        self.nics = nics
        self.metadata = metadata

    def build(self) -> str:
        c = self.c
        dom = ET.Element("domain", type=self.dtype)
        _text(dom, "name", self.name)
        if self.uuid:
            _text(dom, "uuid", self.uuid)
        if self.metadata:
            meta = ET.SubElement(dom, "metadata")
            el = ET.SubElement(meta, f"{METADATA_PREFIX}:machine", {f"xmlns:{METADATA_PREFIX}": METADATA_NS})
            el.text = json.dumps(self._as_placed().to_dict(), sort_keys=True, separators=(",", ":"))
        self._memory(dom)
        vcpu = _text(dom, "vcpu", str(c.cpu_ceiling), placement="static")
        if c.cpus < c.cpu_ceiling:
            vcpu.set("current", str(c.cpus))
        self._cputune(dom)
        self._memtune(dom)
        self._os(dom)
        features = ET.SubElement(dom, "features")
        ET.SubElement(features, "acpi")
        ET.SubElement(features, "apic")
        if c.tcg_cache is not None and self.dtype == "qemu":  # TCG's translation cache (libvirt 8.0+)
            tcg = ET.SubElement(features, "tcg")
            _text(tcg, "tb-cache", str(c.tcg_cache >> 20)).set("unit", "MiB")
        self._cpu(dom)
        ET.SubElement(dom, "clock", offset="utc")
        _text(dom, "on_poweroff", "destroy")
        _text(dom, "on_reboot", "restart")
        _text(dom, "on_crash", "destroy")
        self._devices(ET.SubElement(dom, "devices"))
        ET.indent(dom, space="  ")
        return ET.tostring(dom, encoding="unicode") + "\n"

    def _as_placed(self) -> MachineConfig:
        """The configuration with the files where the domain has them (what the metadata keeps)."""
        c, f = self.c, self.files
        boot = c.boot.model_copy(update={"kernel": Path(f.kernel or c.boot.kernel),
                                         "initrd": Path(f.initrd) if f.initrd else c.boot.initrd})
        storage = []
        for i, sd in enumerate(c.storage):
            path = f.disks.get(_device_id(i, sd))
            if path is not None and isinstance(sd.attachment, DiskImage):
                sd = sd.model_copy(update={"attachment": sd.attachment.model_copy(update={"path": Path(path)})})
            storage.append(sd)
        return c.model_copy(update={"name": self.name, "boot": boot, "storage": tuple(storage)})

    # -- resources ---------------------------------------------------------------------------
    def _memory(self, dom: ET.Element) -> None:
        c = self.c
        if c.max_memory is not None:
            # memory devices need NUMA (one cell, see _cpu) and a maxMemory; virtio-mem takes no slot
            _text(dom, "maxMemory", _kib(c.max_memory), unit="KiB", slots="1")
        _text(dom, "memory", _kib(c.memory + c.hotplug_memory), unit="KiB")
        _text(dom, "currentMemory", _kib(c.total_memory), unit="KiB")
        backing: list[ET.Element] = []
        if not c.memory_merge:
            backing.append(ET.Element("nosharepages"))
        if c.needs_shared_memory:  # virtiofsd maps the guest's RAM
            backing += [ET.Element("source", type="memfd"), ET.Element("access", mode="shared")]
        if backing:
            ET.SubElement(dom, "memoryBacking").extend(backing)

    def _cputune(self, dom: ET.Element) -> None:
        lim = self.c.limits
        tune: list[ET.Element] = []
        if lim.cpu_weight is not None:  # libvirt's shares are cgroup v1's cpu.shares (default 1024)
            tune.append(_el("shares", str(max(2, lim.cpu_weight * 1024 // 100))))
        if lim.cpu_pin is not None:
            cpus = lim.cpus
            tune += [ET.Element("vcpupin", vcpu=str(i), cpuset=str(cpus[i % len(cpus)]))
                     for i in range(self.c.cpu_ceiling)]
            tune.append(ET.Element("emulatorpin", cpuset=lim.cpu_pin))
        if lim.cpu_max is not None:  # a cap on the whole machine, not per vCPU
            tune += [_el("global_period", str(CPU_PERIOD_US)),
                     _el("global_quota", str(CPU_PERIOD_US * lim.cpu_max // 100))]
        if tune:
            ET.SubElement(dom, "cputune").extend(tune)

    def _memtune(self, dom: ET.Element) -> None:
        lim = self.c.limits
        tune: list[ET.Element] = []
        if lim.memory_max is not None:
            tune.append(_el("hard_limit", _kib(lim.memory_max), unit="KiB"))
        if lim.memory_high is not None:
            tune.append(_el("soft_limit", _kib(lim.memory_high), unit="KiB"))
        if lim.swap_max is not None and lim.memory_max is not None:
            tune.append(_el("swap_hard_limit", _kib(lim.memory_max + lim.swap_max), unit="KiB"))
        if tune:
            ET.SubElement(dom, "memtune").extend(tune)

    def _os(self, dom: ET.Element) -> None:
        c, boot = self.c, self.c.boot
        os_el = ET.SubElement(dom, "os")
        _text(os_el, "type", "hvm", arch=c.arch, machine=c.machine)
        _text(os_el, "kernel", str(self.files.kernel or boot.kernel))
        initrd = self.files.initrd or boot.initrd
        if initrd is not None:
            _text(os_el, "initrd", str(initrd))
        if boot.cmdline:
            _text(os_el, "cmdline", boot.cmdline)

    def _cpu(self, dom: ET.Element) -> None:
        c = self.c
        if c.cpu_model is None:
            cpu = ET.SubElement(dom, "cpu", mode="host-passthrough" if self.dtype == "kvm" else "maximum")
        else:
            name, feats = _cpu_features(c.cpu_model)
            if name == "host":
                cpu = ET.SubElement(dom, "cpu", mode="host-passthrough")
            elif name == "max":
                cpu = ET.SubElement(dom, "cpu", mode="maximum")
            else:
                cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact")
                _text(cpu, "model", name, fallback="forbid")
            for policy, feat in feats:
                ET.SubElement(cpu, "feature", policy=policy, name=feat)
        if c.max_memory is not None:
            numa = ET.SubElement(cpu, "numa")
            ET.SubElement(numa, "cell", id="0", cpus=f"0-{c.cpu_ceiling - 1}" if c.cpu_ceiling > 1 else "0",
                          memory=_kib(c.memory), unit="KiB")

    # -- devices -----------------------------------------------------------------------------
    def _devices(self, dev: ET.Element) -> None:
        c = self.c
        for i, sd in enumerate(c.storage):
            dev.append(self._disk(i, sd))
        usb = c.usb or any(d.kind == "usb-storage" for d in c.storage)
        ET.SubElement(dev, "controller", type="usb", model="qemu-xhci" if usb else "none")
        if c.machine == "q35":
            for i in range(self._root_ports()):
                ET.SubElement(dev, "controller", type="pci", index=str(i + 1), model="pcie-root-port")
        for i, share in enumerate(c.shares):
            fs = ET.SubElement(dev, "filesystem", type="mount",
                               accessmode="passthrough" if share.type == "virtiofs" else "squash")
            if share.type == "virtiofs":
                ET.SubElement(fs, "driver", type="virtiofs", queue="1024")
                if share.cache != "auto":  # virtiofsd's default is auto
                    ET.SubElement(ET.SubElement(fs, "binary"), "cache", mode=share.cache)
            ET.SubElement(fs, "source", dir=str(share.host_path))
            ET.SubElement(fs, "target", dir=c.share_tag(i))
            if share.read_only:
                ET.SubElement(fs, "readonly")
        if c.user_nic is not None:
            net = c.user_nic
            nic = ET.SubElement(dev, "interface", type="user")
            if net.mac:
                ET.SubElement(nic, "mac", address=net.mac)
            ET.SubElement(nic, "model", type=net.model)
            ET.SubElement(nic, "alias", name="ua-net0")
        for i, iface in enumerate(c.networks):
            target = self.nics[iface.network]
            nic = ET.SubElement(dev, "interface", type=target.kind)
            if iface.mac:
                ET.SubElement(nic, "mac", address=iface.mac)
            ET.SubElement(nic, "source", {target.kind: target.name})
            ET.SubElement(nic, "model", type=iface.model)
            ET.SubElement(nic, "alias", name=f"ua-vnet{i}")
        self._serial(dev)
        if c.agent:
            ch = ET.SubElement(dev, "channel", type="unix")
            src = ET.SubElement(ch, "source", mode="bind")
            if self.files.agent_socket is not None:
                src.set("path", str(self.files.agent_socket))
            ET.SubElement(ch, "target", type="virtio", name=AGENT_CHANNEL)
            ET.SubElement(ch, "alias", name="ua-qga0")
        self._display(dev)
        if c.balloon:
            bal = ET.SubElement(dev, "memballoon", model="virtio", autodeflate="on", freePageReporting="on")
            ET.SubElement(bal, "alias", name="ua-balloon0")
        else:
            ET.SubElement(dev, "memballoon", model="none")
        if c.entropy:
            rng = ET.SubElement(dev, "rng", model="virtio")
            _text(rng, "backend", "/dev/urandom", model="random")
        if c.max_memory is not None:
            mem = ET.SubElement(dev, "memory", model="virtio-mem")
            size = ET.SubElement(mem, "target")
            _text(size, "size", _kib(c.hotplug_memory), unit="KiB")
            _text(size, "node", "0")
            _text(size, "block", "2048", unit="KiB")
            _text(size, "requested", _kib(c.plugged_memory), unit="KiB")
            ET.SubElement(mem, "alias", name="ua-vmem0")

    def _root_ports(self) -> int:
        """PCIe root ports on q35. libvirt puts each PCIe device on a free one (and adds ports only when
        none is free), so ``hotplug_slots`` stay empty for disks attached to the running machine when
        there are that many more than the devices take: virtio disks, PCIe NICs (legacy PCI ones sit on
        a pcie-to-pci-bridge, for which libvirt adds a port of its own), shares, xHCI, virtio-serial
        (the agent), balloon, rng, virtio-mem. The primary display sits on the root bus itself."""
        c = self.c
        models = [n.model for n in c.networks] + ([c.user_nic.model] if c.user_nic else [])
        nics = [m for m in models if m not in ("e1000", "rtl8139")]
        usb = c.usb or any(d.kind == "usb-storage" for d in c.storage)
        return (c.hotplug_slots + sum(d.kind == "virtio-blk" for d in c.storage) + len(nics)
                + len(c.shares) + int(usb) + int(c.agent) + int(c.balloon) + int(c.entropy)
                + int(c.max_memory is not None))

    def _disk(self, index: int, sd: StorageDevice) -> ET.Element:
        att = sd.attachment
        node = _device_id(index, sd)
        bus = _DISK_BUS[sd.kind]
        prefix = _TARGET_PREFIX[bus]
        same_bus = [d for d in self.c.storage[:index] if _TARGET_PREFIX[_DISK_BUS[d.kind]] == prefix]
        if isinstance(att, NbdAttachment):
            disk = ET.Element("disk", type="network", device="disk")
            policy = "stop" if att.on_error == "pause" else "report"
            ET.SubElement(disk, "driver", name="qemu", type="raw", error_policy=policy, rerror_policy=policy)
            addr = parse_nbd_url(att.url)
            src = ET.SubElement(disk, "source", protocol="nbd")
            if addr.export:
                src.set("name", addr.export)
            if addr.unix_path:
                ET.SubElement(src, "host", transport="unix", socket=addr.unix_path)
            else:
                ET.SubElement(src, "host", name=str(addr.host), port=str(addr.port))
        else:
            assert isinstance(att, DiskImage)
            disk = ET.Element("disk", type="file", device="disk")
            ET.SubElement(disk, "driver", name="qemu", type=att.format, cache=att.cache)
            ET.SubElement(disk, "source", file=str(self.files.disks.get(node, att.path)))
        if bus == "virtio":
            # the vCPU ceiling, as vmkit's own command line: QEMU's default (the vCPUs at start) changes
            # with a vCPU hot-plug, and a state saved after one would not load into the new count
            disk[0].set("queues", str(self.c.cpu_ceiling))
        ET.SubElement(disk, "target", dev=_disk_target(prefix, len(same_bus)), bus=bus)
        if att.read_only:
            ET.SubElement(disk, "readonly")
        if sd.serial:
            _text(disk, "serial", sd.serial)
        ET.SubElement(disk, "alias", name=f"ua-{node}")
        return disk

    def _serial(self, dev: ET.Element) -> None:
        s = self.c.serial
        kind = "pty" if s.console else "null"
        ser = ET.SubElement(dev, "serial", type=kind)
        if s.log:
            log = self.files.serial_log or SERIAL_LOG_DEFAULT.format(name=self.name)
            ET.SubElement(ser, "log", file=str(log), append="on")
        ET.SubElement(ser, "target", port="0")
        if s.console:
            con = ET.SubElement(dev, "console", type="pty")
            ET.SubElement(con, "target", type="serial", port="0")

    def _display(self, dev: ET.Element) -> None:
        d = self.c.display
        video = ET.SubElement(dev, "video")
        if d is None:
            ET.SubElement(video, "model", type="none")
            return
        model = ET.SubElement(video, "model", type="virtio", heads="1", primary="yes")
        ET.SubElement(model, "resolution", x=str(d.width), y=str(d.height))
        if self.files.vnc_socket is not None:
            dev.insert(list(dev).index(video), ET.Element("graphics", type="vnc", socket=str(self.files.vnc_socket)))
        else:
            gfx = ET.Element("graphics", type="vnc", autoport="yes")
            ET.SubElement(gfx, "listen", type="address", address="127.0.0.1")
            dev.insert(list(dev).index(video), gfx)


def _el(tag: str, text: str, **attrs: str) -> ET.Element:
    el = ET.Element(tag, attrs)
    el.text = text
    return el


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    el.text = text
    return el


def hostfwd_commands(config: MachineConfig) -> list[str]:
    """The HMP commands that add ``network.forwards`` to a running domain made with ``forwards="hostfwd"``
    (``virsh qemu-monitor-command --hmp``, or ``libvirt_qemu.qemuMonitorCommand`` with
    ``VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP``); an empty answer means it worked."""
    net = config.user_nic
    if net is None:
        return []
    return [f"hostfwd_add {USER_NETDEV} {f.protocol}:{f.host_addr}:{f.host_port}-:{f.guest_port}"
            for f in net.forwards]


def config_from_domain_xml(xml: str) -> MachineConfig | None:
    """The vmkit configuration kept in a domain's ``<metadata>`` (None: not a vmkit machine). A
    configuration that no longer parses raises :class:`~vmkit.errors.ConfigError`."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's own XML of a domain (entities are not expanded)
    except ET.ParseError as exc:
        raise ConfigError.single("<domain xml>", f"not XML: {exc}") from None
    el = root.find(f"metadata/{{{METADATA_NS}}}machine")
    if el is None or not (el.text or "").strip():
        return None
    try:
        data = json.loads(el.text or "")
    except ValueError as exc:
        raise ConfigError.single("<domain metadata>", f"vmkit's configuration is not JSON: {exc}") from None
    return parse_config(data, source=f"domain {root.findtext('name')!r} metadata")
