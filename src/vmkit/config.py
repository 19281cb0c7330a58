"""The virtual machine configuration: frozen, typed, validated, round-tripped through YAML.

Two levels of checking:

* **Structure** (pydantic): types, ranges, sizes, enum values. :func:`parse_config` turns
  every structural problem into a :class:`~vmkit.errors.Problem` naming its field path.
* **Meaning and host** (:meth:`MachineConfig.validate`): files that must exist, two devices
  on one file, duplicate or taken host ports. Every problem is reported at once.
"""

from __future__ import annotations

import errno
import ipaddress
import platform
import re
import socket
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vmkit.errors import ConfigError, Problem
from vmkit.fsutil import atomic_write

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
"""A valid instance name or snapshot tag: use with ``fullmatch`` (``$`` would accept a trailing newline)."""


def parse_size(value: object) -> int:
    """``512M``, ``2G``, ``1.5G``, ``4096`` (bytes) -> bytes."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean: use a number with an optional K, M, G or T suffix")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            value = float(m.group(1)) * _UNITS[m.group(2).upper()]
            if value != int(value):
                raise ValueError(f"{value!r} is not a whole number of bytes: use e.g. 512M or 1536K")
            return int(value)
    raise ValueError(f"{value!r} is not a size: use a number with an optional K, M, G or T suffix, e.g. 512M or 2G")


def format_size(n: int) -> str:
    """Bytes -> the shortest exact ``512M``/``2G`` form (falls back to bytes)."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size, return_type=str)]


DISK_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,30}$")
"""A disk's device id. Pydantic's ``pattern`` (Rust regex) reads ``$`` as the end of the text; in
Python use :func:`validate_disk_id` (``fullmatch``: Python's ``$`` also matches before a final newline)."""


def validate_disk_id(disk_id: str, *, field: str = "id") -> str:
    if not isinstance(disk_id, str) or not DISK_ID_RE.fullmatch(disk_id):
        raise ConfigError.single(field, f"{disk_id!r} is not a disk id: use 1-31 letters, digits, '_' or '-', "
                                 "starting with a letter (see `vmkit disk list`)")
    return disk_id


def _not_bool(value: object) -> object:
    # pydantic's lax mode reads true as 1: `host_port: true` would become port 1
    if isinstance(value, bool):
        raise ValueError("a number, not true/false")
    return value


def _number(value: object) -> object:
    if isinstance(value, str):
        raise ValueError(f"{value!r} is a string: give a number (without quotes)")
    return _not_bool(value)


Int = Annotated[int, BeforeValidator(_not_bool)]
"""An int setting: numbers (or digit strings, as a command line gives them), never booleans."""
Float = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]
"""A finite number (seconds, say): never a boolean or a string."""
Bool = StrictBool
"""A yes/no setting: true or false only (not 1, 0 or "no")."""


def validate_name(name: str, *, field: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError.single(
            field,
            f"{name!r} is not a valid name: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')",
        )
    return name


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Accelerator(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class LinuxBoot(_Model):
    """Direct Linux kernel boot: kernel, optional initrd, command line."""

    kind: Literal["linux"] = "linux"
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


CacheMode = Literal["writeback", "none", "writethrough", "directsync", "unsafe"]


class DiskImage(_Model):
    """A disk image file attached to a storage device."""

    type: Literal["disk-image"] = "disk-image"
    path: Path
    format: Literal["raw", "qcow2"] = "raw"
    read_only: Bool = False
    cache: CacheMode = "writeback"

    @field_validator("path")
    @classmethod
    def _path(cls, v: Path) -> Path:
        if "\0" in str(v):
            raise ValueError("a path cannot contain a NUL character")
        return v

    @model_validator(mode="before")
    @classmethod
    def _infer_format(cls, data: Any) -> Any:
        if isinstance(data, dict) and "format" not in data and "path" in data:
            data = {**data, "format": "qcow2" if str(data["path"]).endswith(".qcow2") else "raw"}
        return data


class NbdAttachment(_Model):
    """A disk served by a Network Block Device server (QEMU is the client).

    ``url`` is ``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``.
    ``on_error``: ``pause`` stops the guest when the server goes away (QEMU's
    ``werror=stop,rerror=stop``) and vmkit resumes it once the server is back;
    ``report`` passes I/O errors to the guest. ``reconnect_delay``: seconds QEMU keeps
    retrying (stalling I/O) before it declares an error.
    """

    type: Literal["nbd"] = "nbd"
    url: str
    read_only: Bool = False
    on_error: Literal["pause", "report"] = "pause"
    reconnect_delay: Int = Field(default=5, ge=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_nbd_url(v)  # raises ValueError with what to do
        return v


@dataclass(frozen=True)
class NbdServerAddress:
    export: str
    unix_path: str | None = None
    host: str | None = None
    port: int = 10809


def parse_nbd_url(url: str) -> NbdServerAddress:
    """``nbd://host:port/export`` or ``nbd+unix:///export?socket=/path`` -> address parts."""
    parts = urlsplit(url)
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if parts.scheme == "nbd":
        if not parts.hostname:
            raise ValueError(f"{url!r} has no host: use nbd://HOST[:PORT]/EXPORT")
        try:
            port = parts.port or 10809
        except ValueError:
            raise ValueError(f"{url!r} has a bad port: use nbd://HOST:PORT/EXPORT") from None
        return NbdServerAddress(export=export, host=parts.hostname, port=port)
    if parts.scheme == "nbd+unix":
        sock = parse_qs(parts.query).get("socket", [""])[0]
        if not sock.startswith("/"):
            raise ValueError(f"{url!r} needs an absolute socket path: use nbd+unix:///EXPORT?socket=/PATH")
        return NbdServerAddress(export=export, unix_path=sock)
    raise ValueError(f"{url!r} is not an NBD URL: use nbd://HOST[:PORT]/EXPORT or "
                     "nbd+unix:///EXPORT?socket=/PATH")


Attachment = Annotated[DiskImage | NbdAttachment, Field(discriminator="type")]


DiskKind = Literal["virtio-blk", "nvme", "usb-storage", "sata", "ide"]
DISK_KINDS: tuple[str, ...] = ("virtio-blk", "nvme", "usb-storage", "sata", "ide")
SATA_PORTS = 6
"""Disks of kind ``sata`` a machine may have: the ports of its one AHCI controller (ich9-ahci)."""
IDE_UNITS = 4
"""Disks of kind ``ide`` a machine may have: two channels of a PIIX3 IDE controller, master and slave."""


class StorageDevice(_Model):
    """A disk the guest sees: ``virtio-blk`` (/dev/vdX), ``nvme`` (/dev/nvmeXnY), ``usb-storage``
    (/dev/sdX on an xHCI controller), ``sata`` (/dev/sdX on an emulated AHCI controller) or ``ide``
    (/dev/sdX on an emulated PIIX3 IDE controller). SATA and IDE are emulated hardware (no
    paravirtualization: ``vmkit bench devices`` measures what that costs) and cannot be hot-plugged."""

    kind: DiskKind = "virtio-blk"
    attachment: Attachment
    serial: str | None = Field(default=None, max_length=20, description="serial number the guest sees")
    id: str | None = Field(default=None, pattern=DISK_ID_RE.pattern,
                           description="device id for hot detach; default diskN")


class PortForward(_Model):
    """Host ``host_addr:host_port`` forwarded to guest ``guest_port`` (user-mode NAT)."""

    protocol: Literal["tcp", "udp"] = "tcp"
    host_addr: str = "127.0.0.1"
    host_port: Int = Field(ge=1, le=65535)
    guest_port: Int = Field(ge=1, le=65535)

    @field_validator("host_addr")
    @classmethod
    def _host_addr(cls, v: str) -> str:
        # QEMU's hostfwd takes a numeric IPv4 address; anything else fails at start, and a comma
        # would even inject options into -netdev.
        try:
            return str(ipaddress.IPv4Address(v))
        except ValueError:
            raise ValueError(f"{v!r} is not an IPv4 address: use e.g. 127.0.0.1 (this host only) "
                             "or 0.0.0.0 (all interfaces)") from None

    @classmethod
    def parse(cls, spec: str) -> PortForward:
        """``8080:80``, ``127.0.0.1:8080:80``, ``5353:53/udp``."""
        proto = "tcp"
        body = spec
        if "/" in spec:
            body, proto = spec.rsplit("/", 1)
        parts = body.split(":")
        if len(parts) == 2:
            addr, host, guest = "127.0.0.1", parts[0], parts[1]
        elif len(parts) == 3:
            addr, host, guest = parts
        else:
            raise ValueError(f"{spec!r} is not a port forward: use HOST:GUEST, ADDR:HOST:GUEST, or add /udp")
        try:
            host_port, guest_port = int(host), int(guest)
        except ValueError:
            raise ValueError(f"{spec!r} is not a port forward: use HOST:GUEST with ports 1-65535") from None
        try:
            return cls.model_validate(
                {"protocol": proto, "host_addr": addr, "host_port": host_port, "guest_port": guest_port}
            )
        except ValidationError as exc:
            detail = "; ".join(str(p) for p in problems_from_validation(exc))
            raise ValueError(f"{spec!r} is not a port forward ({detail}): "
                             "use [ADDR:]HOST:GUEST[/udp] with ports 1-65535") from None

    def __str__(self) -> str:
        return f"{self.host_addr}:{self.host_port}->{self.guest_port}/{self.protocol}"


# QEMU's -cpu syntax: a model, then features (+f, -f, f=value); nothing else can reach the option string
_CPU_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(,[+-]?[A-Za-z0-9._-]+(=[A-Za-z0-9._-]+)?)*")
_MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")


NicModel = Literal["virtio", "e1000", "e1000e", "rtl8139"]
"""The guest's NIC: paravirtual virtio-net (default, fastest) or an emulated card for guests without virtio."""

NETWORK_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
"""A vmkit network's name: it becomes a DNS domain and reaches ip, nft and dnsmasq (``fullmatch``)."""


def check_network_name(v: str) -> str:
    if not isinstance(v, str) or not NETWORK_NAME_RE.fullmatch(v) or v.endswith("-") or v == "user":
        raise ValueError(f"{v!r} is not a network name: use 1-31 lower-case letters, digits or '-', starting "
                         "with a letter and not ending with '-' ('user' is QEMU's user-mode NAT)")
    return v


def _check_mac(v: str | None) -> str | None:
    if v is not None:
        v = v.lower()
        if not _MAC_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a MAC address: use six hex pairs, e.g. 52:54:00:12:34:56")
        if int(v[:2], 16) & 1:
            raise ValueError(f"{v!r} is a multicast MAC address: the first byte must be even")
    return v


class Network(_Model):
    """User-mode NAT networking (QEMU's slirp) and the host port forwards.

    ``mode: none``: no user-mode NIC (the machine is on vmkit networks, see ``networks``); the
    forwards then go to the machine's address on its first vmkit network (the supervisor forwards
    them on the host)."""

    mode: Literal["user", "none"] = "user"
    mac: str | None = None
    model: NicModel = "virtio"
    forwards: tuple[PortForward, ...] = ()

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        return _check_mac(v)


class NetworkInterface(_Model):
    """A NIC on a vmkit network (``vmkit network create``): a stable MAC and a static address,
    both given when the machine joins."""

    network: str = Field(description="the vmkit network's name")
    model: NicModel = "virtio"
    mac: str | None = None
    address: str | None = Field(default=None, description="the static IPv4 address (given when the machine joins)")

    @field_validator("network")
    @classmethod
    def _network(cls, v: str) -> str:
        return check_network_name(v)

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        return _check_mac(v)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                return str(ipaddress.IPv4Address(v))
            except ValueError:
                raise ValueError(f"{v!r} is not an IPv4 address") from None
        return v


class Share(_Model):
    """A host folder shared into the guest.

    ``virtiofs`` (a virtiofsd per share, guest RAM in shared memory), ``9p`` (QEMU's own
    virtio-9p server; needs a guest kernel with 9p, not Debian's cloud kernel) or ``sshfs``
    (the guest mounts the folder over its SSH connection back to the host, see
    :mod:`vmkit.runtime.sshfs`; needs a guest with SSH and sshfs). ``read_only`` is enforced on the host
    side. Cloud-image guests mount every share at boot (virtiofs and 9p through ``/etc/fstab``,
    sshfs before ``vmkit start`` returns).
    """

    type: Literal["virtiofs", "9p", "sshfs"] = "virtiofs"
    host_path: Path
    guest_path: str | None = Field(default=None, description="where the guest mounts it; default: host_path")
    tag: str | None = Field(default=None, max_length=36, pattern=r"^[A-Za-z0-9_.-]+$",
                            description="mount tag the guest uses; default share<N>")
    read_only: Bool = False
    cache: Literal["auto", "always", "none"] = Field(default="auto", description="virtiofs cache mode")

    @field_validator("guest_path")
    @classmethod
    def _guest_path(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"{v!r} is not an absolute guest path: use e.g. /mnt/src")
        return v

    def mount_point(self) -> str:
        return self.guest_path or str(self.host_path)


SERIAL_LOG_MIN = 64 << 10
BALLOON_FLOOR = 64 << 20
"""The least usable memory a balloon may leave a guest: below it a Linux guest is likely to stall."""


class Serial(_Model):
    """The serial console: logged to ``serial.log`` (at most ``log_max`` bytes, and the previous
    ``log_max`` bytes in ``serial.log.1``); optionally attachable."""

    log: Bool = True
    console: Bool = True
    log_max: Size = Field(default=8 << 20, description="serial.log grows to this size, then becomes serial.log.1 "
                          "(replacing the previous one) and a new serial.log starts")

    @field_validator("log_max")
    @classmethod
    def _log_max(cls, v: int) -> int:
        if v < SERIAL_LOG_MIN:
            raise ValueError(f"{format_size(v)} is too small: give at least {format_size(SERIAL_LOG_MIN)}")
        return v


class Display(_Model):
    """A screen and keyboard: a display device (virtio-vga: VGA text mode at boot, then the guest's
    virtio-gpu driver; virtio-gpu: no VGA) with an EDID whose preferred mode is ``width`` x ``height``,
    served by QEMU's VNC server on ``vnc.sock`` in the instance directory (0600, no TCP port).

    ``width`` x ``height`` is the size the guest boots with, and the largest its fbdev console
    can show later: a VNC client (``vmkit console --web``) or ``vmkit display --size`` can make the
    display smaller and back, not larger than that (a guest with a KMS client, such as a desktop,
    can follow further).
    """

    type: Literal["virtio-vga", "virtio-gpu"] = "virtio-vga"
    width: Int = Field(default=1280, ge=320, le=8192)
    height: Int = Field(default=800, ge=200, le=8192)


class Readiness(_Model):
    """How ``start`` knows the guest is up: a line on the serial console and/or the guest agent
    answering, within a timeout."""

    serial_marker: str | None = None
    agent: Bool = Field(default=False, description="wait until qemu-guest-agent answers (needs agent: true)")
    timeout: Float = Field(default=120.0, gt=0)


_CPU_LIST_RE = re.compile(r"\d{1,4}(-\d{1,4})?(,\d{1,4}(-\d{1,4})?)*")
QEMU_OVERHEAD = 128 << 20
"""Memory a QEMU process needs beside the guest's RAM (code, TCG's translation cache, device buffers):
a cgroup ``memory_max`` below ``memory`` plus this is refused."""


MAX_LIMIT = 1 << 50
"""The largest memory limit accepted (1 PiB): beyond it a limit means nothing, and the kernel's parser overflows."""


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0-2,5"`` -> ``(0, 1, 2, 5)`` (sorted, each CPU once); a ValueError says what is wrong."""
    if not isinstance(text, str) or not _CPU_LIST_RE.fullmatch(text.strip()):
        raise ValueError(f"{text!r} is not a CPU list: use host CPU numbers and ranges, e.g. 0-1,3")
    cpus: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ValueError(f"{part!r} is a backwards range in {text!r}: write the lower CPU first, e.g. 0-3")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: tuple[int, ...] | list[int]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    out: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


class Limits(_Model):
    """Reservations, limits and CPU placement of the machine's QEMU and helpers, through its cgroup
    (``vmkit/<name>``; see :mod:`vmkit.host.cgroups` for what each becomes on cgroup v1 and v2).
    Every field is optional: unset means no limit (the cgroup's default)."""

    cpu_weight: Int | None = Field(default=None, ge=1, le=10000,
                                   description="relative CPU share against other machines (default 100; "
                                               "cgroup v2 cpu.weight, v1 cpu.shares = weight x 1024 / 100)")
    cpu_max: Int | None = Field(default=None, ge=1, le=6400,
                                description="CPU cap in percent of one host core (150 = one and a half cores)")
    cpu_pin: str | None = Field(default=None, description="host CPUs the machine runs on, e.g. 0-1,3; each vCPU "
                                                          "thread is pinned to one of them in turn")
    memory_min: Size | None = Field(
        default=None, le=MAX_LIMIT, description="memory reservation (v2 memory.min; v1 has none: "
                                                "memory.soft_limit_in_bytes)")
    memory_high: Size | None = Field(
        default=None, le=MAX_LIMIT, description="throttle and reclaim above this (v2 memory.high; "
                                                "v1 memory.soft_limit_in_bytes)")
    memory_max: Size | None = Field(
        default=None, le=MAX_LIMIT, description="hard memory limit of QEMU and its helpers (at least memory + 128M)")
    swap_max: Size | None = Field(
        default=None, le=MAX_LIMIT, description="host swap the machine may use (v2 memory.swap.max; "
                                                "v1 memory.memsw.limit_in_bytes = memory_max + this)")

    @field_validator("cpu_pin")
    @classmethod
    def _cpu_pin(cls, v: str | None) -> str | None:
        return None if v is None else format_cpu_list(parse_cpu_list(v))

    @property
    def cpus(self) -> tuple[int, ...]:
        return parse_cpu_list(self.cpu_pin) if self.cpu_pin is not None else ()

    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in type(self).model_fields)

    def problems(self, memory: int, *, prefix: str = "limits.") -> list[Problem]:
        """What is wrong with these limits for a guest of ``memory`` bytes: a memory_max it cannot run
        under, a reservation above a limit (min <= high <= max)."""
        problems = []
        for low, high in (("memory_min", "memory_high"), ("memory_min", "memory_max"), ("memory_high", "memory_max")):
            a, b = getattr(self, low), getattr(self, high)
            if a is not None and b is not None and a > b:
                problems.append(Problem(f"{prefix}{low}", f"{format_size(a)} is above {high} ({format_size(b)}): "
                                        f"give a {low} at most the {high}"))
        need = memory + QEMU_OVERHEAD
        if self.memory_max is not None and self.memory_max < need:
            problems.append(Problem(f"{prefix}memory_max", f"{format_size(self.memory_max)} is less than the guest's "
                            f"memory ({format_size(memory)}) plus what QEMU itself needs "
                            f"({format_size(QEMU_OVERHEAD)}): give at least {format_size(need)}"))
        return problems
MAX_VCPUS = 64
"""The most vCPUs a machine may have (``cpus`` and ``max_cpus``)."""
VMEM_BLOCK = 2 << 20
"""virtio-mem's block size: hot-plugged memory grows and shrinks in steps of this."""
VMEM_REGION_STEP = 128 << 20
"""The hot-pluggable region (``max_memory`` - ``memory``) comes in steps of this: Linux adds memory
to the guest in 128 MiB memory blocks (x86-64) and cannot use a partial block at the end."""


def default_max_cpus(cpus: int) -> int:
    """The vCPU ceiling when vm.yaml gives no ``max_cpus``: room to double, at least 4, at most
    :data:`MAX_VCPUS`. An absent vCPU costs the guest only its per-CPU areas and QEMU nothing at
    all (no thread), so a little headroom is cheap; a larger ceiling is one vm.yaml line."""
    return min(MAX_VCPUS, max(4, 2 * cpus))


Arch = Literal["x86_64", "aarch64"]
"""A guest architecture, named as ``uname -m`` names it."""


@dataclass(frozen=True)
class ArchInfo:
    """What differs between guest architectures: QEMU's binaries, Debian's name, the machine, the console."""

    name: str
    debian: str  # dpkg's architecture name
    qemu_system: str  # the system emulator
    qemu_user: str  # qemu-user-static's binary (binfmt_misc interpreter) for this architecture's programs
    machines: tuple[str, ...]  # machine types vmkit runs it on (the first is the default)
    console: str  # the guest's first serial port
    elf_machine: int  # e_machine in an ELF header


ARCHES: dict[str, ArchInfo] = {
    "x86_64": ArchInfo("x86_64", "amd64", "qemu-system-x86_64", "qemu-x86_64-static", ("q35", "pc"), "ttyS0", 62),
    "aarch64": ArchInfo("aarch64", "arm64", "qemu-system-aarch64", "qemu-aarch64-static", ("virt",), "ttyAMA0", 183),
}
"""Every architecture vmkit runs guests of (and runs foreign binaries of, through binfmt)."""
_HOST_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def host_arch() -> str:
    """This host's architecture in ``uname -m`` terms (``x86_64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return _HOST_ALIASES.get(machine, machine)


class ClockSync(_Model):
    """The supervisor keeps a running guest's clock right (needs the guest agent): every ``interval``
    seconds it reads the guest's clock (``guest-get-time``) and sets it to the host's time
    (``guest-set-time``) when it is off by more than ``threshold`` seconds, as it does after a resume
    or restore. Guests drift when their vCPUs wait for host CPUs (oversubscription)."""

    enabled: Bool = True
    interval: Float = Field(default=30.0, ge=1, le=86400, description="seconds between two checks")
    threshold: Float = Field(default=0.25, gt=0, le=3600, description="seconds off that make it set the clock")


class MachineConfig(_Model):
    """Everything that defines one virtual machine."""

    name: str
    cpus: Int = Field(default=1, ge=1, le=MAX_VCPUS, description="vCPUs the machine has; `vmkit set --cpus` "
                      "changes it live (and here, for the next boot)")
    max_cpus: Int | None = Field(default=None, ge=1, le=MAX_VCPUS,
                                 description="the most vCPUs `vmkit set --cpus` can give the running machine "
                                             "(QEMU's maxcpus); default: twice cpus, at least 4, at most 64")
    memory: Size = Field(default=512 << 20, description="the memory the machine boots with (QEMU's -m)")
    max_memory: Size | None = Field(default=None, description="a virtio-mem region: `vmkit set --memory` grows "
                                    "the machine's memory live up to this (and shrinks it back as far as the "
                                    "guest lets it); memory + a multiple of 128M. Default: none")
    plugged_memory: Size = Field(default=0, description="memory plugged into the virtio-mem region on top of "
                                 "memory (a multiple of 2M); `vmkit set --memory` keeps it up to date, and a new "
                                 "boot plugs it again")
    arch: Arch = Field(default="x86_64", description="the guest's architecture: x86_64, or aarch64 (QEMU's "
                       "virt machine, always emulated by TCG on an x86-64 host)")
    accel: Accelerator = Accelerator.AUTO
    tcg_cache: Size | None = Field(default=None, description="under TCG, the most memory QEMU keeps translated guest "
                                   "code in (its tb-size, whole MiB, 16M to 2G). Default: QEMU's (1G, used as the "
                                   "guest runs new code: about 450M per idle Debian guest after its boot). Smaller "
                                   "saves host memory per guest; code is translated again more often. No effect "
                                   "under KVM")
    machine: Literal["q35", "pc", "virt"] = Field(default="q35", description="QEMU machine type: q35 or pc "
                                                  "(x86_64), virt (aarch64); default: the architecture's first")
    binfmt: tuple[Arch, ...] = Field(default=(), description="foreign architectures whose programs the guest runs "
                                     "directly: qemu-user-static's interpreter is copied in and registered with "
                                     "binfmt_misc once the guest agent answers (needs agent: true)")
    cpu_model: str | None = Field(default=None, description="QEMU -cpu model, optionally with features (max,+pdpe1gb); "
                                              "default: host under KVM, max under TCG")
    boot: LinuxBoot
    storage: tuple[StorageDevice, ...] = ()
    hotplug_slots: Int = Field(default=2, ge=0, le=16,
                               description="q35 and virt: empty PCIe root ports for attaching disks to a running VM")
    usb: Bool = Field(default=False, description="add an xHCI controller even without USB disks (for hot attach)")
    shares: tuple[Share, ...] = ()
    agent: Bool = Field(default=False, description="a virtio-serial channel for qemu-guest-agent (qga.sock)")
    network: Network | None = Network()
    networks: tuple[NetworkInterface, ...] = Field(default=(), description="vmkit networks this machine is on "
                                                   "(one NIC each; `vmkit network create`)")
    serial: Serial = Serial()
    entropy: Bool = True
    balloon: Bool = Field(default=True, description="a virtio-balloon device (deflate-on-oom, free page reporting): "
                                                    "`vmkit set --balloon` moves the guest's usable memory live, "
                                                    "`vmkit stats` reads its guest memory statistics")
    memory_merge: Bool = Field(default=True, description="let the host's KSM merge this guest's identical pages "
                                                         "(QEMU mem-merge; `vmkit host ksm on` turns KSM on)")
    balloon_min: Size | None = Field(default=None, description="automatic ballooning (`vmkit host autoballoon on`) "
                                     "never takes the guest below this much usable memory (default: half its memory)")
    balloon_shares: Int = Field(default=1000, ge=0, le=50000,
                                description="automatic ballooning shares the host's memory above each guest's "
                                            "balloon_min in proportion to these (0: leave this machine's balloon "
                                            "alone)")
    clock_sync: ClockSync = ClockSync()
    display: Display | None = Field(default=None, description="a screen and keyboard (VNC on vnc.sock); "
                                                            "none for a headless machine")
    readiness: Readiness = Readiness()
    limits: Limits = Field(default=Limits(), description="cgroup reservations and limits, CPU weight, cap and "
                                                         "pinning (`vmkit set` changes them live)")
    image: str | None = Field(default=None, description="the image this machine was created from")

    @model_validator(mode="before")
    @classmethod
    def _default_machine(cls, data: Any) -> Any:
        """No ``machine`` given: the architecture's default (q35, virt)."""
        if isinstance(data, dict) and data.get("machine") is None and data.get("arch") in ARCHES:
            data = {**data, "machine": ARCHES[data["arch"]].machines[0]}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                f"{v!r} is not a valid name: use 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (no '/', no '..')"
            )
        return v

    @field_validator("cpu_model")
    @classmethod
    def _cpu_model(cls, v: str | None) -> str | None:
        if v is not None and not _CPU_MODEL_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a QEMU CPU model: give a model name, optionally with features "
                             "(letters, digits, '.', '_', '-'), e.g. max or max,+pdpe1gb,la57=off")
        return v

    @field_validator("balloon_min")
    @classmethod
    def _balloon_min(cls, v: int | None, info: ValidationInfo) -> int | None:
        memory = info.data.get("memory")
        if v is None:
            return v
        if v < BALLOON_FLOOR:
            raise ValueError(f"{format_size(v)} is too little for the guest: give at least "
                             f"{format_size(BALLOON_FLOOR)}")
        if isinstance(memory, int) and v > memory:
            raise ValueError(f"{format_size(v)} is more than the machine's memory ({format_size(memory)}): "
                             "give at most that")
        return v

    @property
    def balloon_floor(self) -> int:
        """The least usable memory automatic ballooning leaves the guest (balloon_min, default half its memory)."""
        if self.balloon_min is not None:
            return self.balloon_min
        return min(self.memory, max(BALLOON_FLOOR, self.memory // 2))

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: int) -> int:
        if v < 32 << 20:
            raise ValueError(f"{format_size(v)} is too little memory: give at least 32M")
        if v % (1 << 20):
            raise ValueError(f"{v} bytes is not a whole number of MiB: use e.g. 512M")
        return v

    @field_validator("tcg_cache")
    @classmethod
    def _tcg_cache(cls, v: int | None) -> int | None:
        if v is None:
            return v
        if v % (1 << 20):
            raise ValueError(f"{v} bytes is not a whole number of MiB: use e.g. 128M")
        if not 16 << 20 <= v <= 2 << 30:
            raise ValueError(f"{format_size(v)} is out of range: give 16M to 2G, or leave it out for QEMU's default")
        return v

    @field_validator("max_cpus")
    @classmethod
    def _max_cpus(cls, v: int | None, info: ValidationInfo) -> int | None:
        cpus = info.data.get("cpus")
        if v is not None and cpus is not None and v < cpus:
            raise ValueError(f"{v} is less than cpus ({cpus}): give at least {cpus}, or leave it out")
        return v

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, v: int | None, info: ValidationInfo) -> int | None:
        memory = info.data.get("memory")
        if v is None or memory is None:
            return v
        region = v - memory
        if region <= 0:
            raise ValueError(f"{format_size(v)} is not more than memory ({format_size(memory)}): give more, "
                             "or leave it out (no memory hot-plug)")
        if region % VMEM_REGION_STEP:
            up = memory + -(-region // VMEM_REGION_STEP) * VMEM_REGION_STEP
            raise ValueError(f"max_memory - memory ({format_size(region)}) is not a multiple of 128M (the guest "
                             f"adds memory in 128M blocks): use e.g. {format_size(up)}")
        return v

    @field_validator("plugged_memory")
    @classmethod
    def _plugged_memory(cls, v: int, info: ValidationInfo) -> int:
        if not v:
            return v
        if "max_memory" not in info.data or "memory" not in info.data:
            return v  # reported there
        memory, max_memory = info.data["memory"], info.data["max_memory"]
        if max_memory is None:
            raise ValueError("needs a virtio-mem region: set max_memory too, or leave this out")
        if v % VMEM_BLOCK:
            raise ValueError(f"{v} bytes is not a multiple of 2M (virtio-mem's block size)")
        if memory + v > max_memory:
            raise ValueError(f"memory + plugged_memory ({format_size(memory + v)}) is more than max_memory "
                             f"({format_size(max_memory)})")
        return v

    @property
    def cpu_ceiling(self) -> int:
        """The most vCPUs the machine can have while it runs (``max_cpus`` or its default; on
        aarch64, which QEMU cannot hot-plug vCPUs into, ``cpus``)."""
        if self.max_cpus is not None:
            return self.max_cpus
        if self.arch != "x86_64":
            return self.cpus
        return max(self.cpus, default_max_cpus(self.cpus))

    @property
    def arch_info(self) -> ArchInfo:
        return ARCHES[self.arch]

    def _arch_problems(self) -> list[Problem]:
        """Features QEMU cannot give this architecture's machine, refused by name."""
        info = self.arch_info
        problems: list[Problem] = []
        if self.machine not in info.machines:
            problems.append(Problem("machine", f"{self.machine} is not a machine for {self.arch} guests: use "
                                    f"{' or '.join(info.machines)} (or leave machine out)"))
        if self.arch == "aarch64":
            if self.max_cpus is not None and self.max_cpus > self.cpus:
                problems.append(Problem("max_cpus", "QEMU's aarch64 virt machine has no vCPU hot-plug: leave "
                                        f"max_cpus out or give {self.cpus} (= cpus)"))
            if self.max_memory is not None:
                problems.append(Problem("max_memory", "QEMU 7.2's aarch64 virt machine cannot plug virtio-mem "
                                        "(QEMU 8.1 added it): leave max_memory out"))
            for i, dev in enumerate(self.storage):
                if dev.kind == "ide":
                    problems.append(Problem(f"storage[{i}].kind", "ide needs a PC chipset's PIIX3 IDE controller, "
                                            "which QEMU has no aarch64 build of: use sata, nvme or virtio-blk"))
            if self.display is not None and self.display.type == "virtio-vga":
                problems.append(Problem("display.type", "virtio-vga is a PC VGA card QEMU has no aarch64 "
                                        "build of: use type: virtio-gpu"))
        for i, arch in enumerate(self.binfmt):
            if arch == self.arch:
                problems.append(Problem(f"binfmt[{i}]", f"{arch} is the guest's own architecture: its programs "
                                        "run natively; list only foreign ones"))
        if self.binfmt and not self.agent:
            problems.append(Problem("binfmt", "binfmt handlers are installed through the guest agent: use an image "
                                    "with one (e.g. --image debian-12), or leave binfmt out"))
        return problems

    @property
    def hotplug_memory(self) -> int:
        """The size of the virtio-mem region (0: none)."""
        return 0 if self.max_memory is None else self.max_memory - self.memory

    @property
    def total_memory(self) -> int:
        """Boot memory plus what is plugged into the virtio-mem region."""
        return self.memory + self.plugged_memory

    # -- checks beyond structure -------------------------------------------------------------
    def validate(self, *, host: bool = True) -> list[Problem]:  # type: ignore[override]
        """Every problem with this configuration, each naming its field path.

        ``host=True`` also checks the host: files exist, host ports are free.
        """
        problems: list[Problem] = []
        if host:
            problems += _check_file("boot.kernel", self.boot.kernel, "the kernel image")
            if self.boot.initrd is not None:
                problems += _check_file("boot.initrd", self.boot.initrd, "the initrd")
        seen: dict[Path, str] = {}
        ids: dict[str, str] = {}
        for i, dev in enumerate(self.storage):
            dev_id = dev.id or f"disk{i}"
            if dev_id in ids:
                problems.append(Problem(f"storage[{i}].id", f"{dev_id!r} is already the id of {ids[dev_id]}: "
                                        "give each device its own id"))
            ids[dev_id] = f"storage[{i}]"
            problems += device_problems(dev, f"storage[{i}]", seen, host=host)
        for kind, most in (("sata", SATA_PORTS), ("ide", IDE_UNITS)):
            where = [i for i, d in enumerate(self.storage) if d.kind == kind]
            if len(where) > most:
                problems.append(Problem(f"storage[{where[most]}].kind", f"a machine has at most {most} {kind} disks "
                                        f"(the ports of its one {kind.upper()} controller): use kind virtio-blk "
                                        "or nvme for the others"))
        problems += self._share_problems(host)
        problems += self._arch_problems()
        problems += self.limits.problems(self.total_memory)
        problems += self._network_problems()
        if self.network is not None:
            ports: dict[tuple[str, int], str] = {}
            for i, fwd in enumerate(self.network.forwards):
                field = f"network.forwards[{i}]"
                key2 = (fwd.protocol, fwd.host_port)
                if key2 in ports:
                    problems.append(Problem(field, f"host port {fwd.host_port}/{fwd.protocol} is already "
                                            f"forwarded by {ports[key2]}: pick another host port"))
                    continue
                ports[key2] = field
                if host and not port_is_free(fwd.host_addr, fwd.host_port, fwd.protocol):
                    problems.append(Problem(field, f"host port {fwd.host_addr}:{fwd.host_port}/{fwd.protocol} "
                                            "is already taken on this host: pick a free port"))
        return problems

    def _network_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        seen: dict[str, int] = {}
        macs: dict[str, str] = {}
        if self.network is not None and self.network.mode == "user" and self.network.mac:
            macs[self.network.mac] = "network.mac"
        for i, iface in enumerate(self.networks):
            if iface.network in seen:
                problems.append(Problem(f"networks[{i}].network", f"already joined by networks[{seen[iface.network]}]:"
                                        " join each network once"))
            seen[iface.network] = i
            if iface.mac is not None:
                if iface.mac in macs:
                    problems.append(Problem(f"networks[{i}].mac", f"{iface.mac} is already the MAC of "
                                            f"{macs[iface.mac]}: give each NIC its own"))
                macs[iface.mac] = f"networks[{i}]"
        if self.network is not None and self.network.mode == "none" and self.network.forwards and not self.networks:
            problems.append(Problem("network.forwards", "port forwards need a network: with mode none, join a vmkit "
                                    "network (networks: / --network NAME) or use mode user"))
        return problems

    @property
    def user_nic(self) -> Network | None:
        """The user-mode NAT NIC's settings, None if the machine has none."""
        return self.network if self.network is not None and self.network.mode == "user" else None

    @property
    def needs_shared_memory(self) -> bool:
        """virtiofsd maps guest RAM: it must live in shared memory (a memfd)."""
        return any(s.type == "virtiofs" for s in self.shares)

    @property
    def has_guest_ssh(self) -> bool:
        """A TCP port forward to the guest's SSH port (what sshfs shares travel over)."""
        return self.network is not None and any(f.guest_port == 22 and f.protocol == "tcp"
                                                for f in self.network.forwards)

    def share_tag(self, index: int) -> str:
        return self.shares[index].tag or f"share{index}"

    def _share_problems(self, host: bool) -> list[Problem]:
        problems: list[Problem] = []
        tags: dict[str, int] = {}
        writable: dict[Path, int] = {}
        mounts: dict[str, int] = {}
        for i, share in enumerate(self.shares):
            field = f"shares[{i}]"
            tag = self.share_tag(i)
            if tag in tags:
                problems.append(Problem(f"{field}.tag", f"tag {tag!r} is already used by shares[{tags[tag]}]: "
                                        "give each share its own tag"))
            tags[tag] = i
            mount = share.mount_point()
            if mount in mounts:
                problems.append(Problem(f"{field}.guest_path", f"{mount} is already the mount point of "
                                        f"shares[{mounts[mount]}]: pick another guest_path"))
            mounts[mount] = i
            if share.type == "sshfs" and not self.has_guest_ssh:
                problems.append(Problem(f"{field}.type", "sshfs shares need SSH into the guest (a TCP port "
                                        "forward to guest port 22, as machines made from cloud images such as "
                                        "--image debian-12 have): use type: virtiofs or 9p here"))
            if not share.host_path.is_absolute():
                problems.append(Problem(f"{field}.host_path", f"{share.host_path} is relative: give an absolute path"))
                continue
            key = share.host_path.resolve()
            if not share.read_only:
                if key in writable:
                    problems.append(Problem(f"{field}.host_path", f"{share.host_path} is already shared read-write "
                                            f"by shares[{writable[key]}]: share a folder read-write only once"))
                writable[key] = i
            if host and not share.host_path.is_dir():
                what = "does not exist" if not share.host_path.exists() else "is not a directory"
                problems.append(Problem(f"{field}.host_path", f"{share.host_path} {what}: share an existing folder"))
        return problems

    def ensure_valid(self, *, host: bool = True) -> MachineConfig:
        problems = self.validate(host=host)
        if problems:
            raise ConfigError(problems)
        return self

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_defaults=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Path) -> None:
        atomic_write(path, self.to_yaml(), 0o600)


def device_problems(dev: StorageDevice, where: str, seen: dict[Path, str], *, host: bool = True) -> list[Problem]:
    """What is wrong with one storage device (at ``where``, e.g. ``storage[0]``; ``""`` for a device
    on its own, as the supervisor's disk API takes it). ``seen`` maps the resolved image files already
    in use to their users; this device's file is added to it."""
    prefix = f"{where}." if where else ""
    att = dev.attachment
    if isinstance(att, NbdAttachment):
        if att.on_error == "pause" and dev.kind == "nvme":
            return [Problem(f"{prefix}attachment.on_error", "QEMU's nvme device cannot pause the guest on I/O "
                            "errors: use on_error: report, or kind virtio-blk or usb-storage")]
        return []
    field = f"{prefix}attachment.path"
    path = att.path
    problems = []
    if not path.is_absolute():
        problems.append(Problem(field, f"{path} is relative: give an absolute path"))
    key = path.resolve()
    if key in seen:
        problems.append(Problem(field, f"{path} is already used by {seen[key]}: attach each file to one device only"))
    else:
        seen[key] = where or "this device"
    if host:
        problems += _check_file(field, path, "the disk image", writable=not att.read_only)
    return problems


def parse_config(data: object, *, source: str = "configuration") -> MachineConfig:
    """Build a :class:`MachineConfig`, turning every structural error into a named problem."""
    if not isinstance(data, dict):
        raise ConfigError([Problem("<root>", f"expected a mapping of settings, got {type(data).__name__}")],
                          context=source)
    return validate_model(MachineConfig, data, context=source)


_M = TypeVar("_M", bound=BaseModel)


def validate_model(model: type[_M], data: object, *, context: str) -> _M:
    """``model.model_validate(data)``, with every validation error turned into a named problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc), context=context) from None


def problems_from_validation(exc: ValidationError) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = _field_path(err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting: remove it or check its spelling (see `vmkit schema`)"
        elif err["type"] == "missing":
            msg = "required: give a value"
        elif err["type"] == "union_tag_not_found":
            key = str(err.get("ctx", {}).get("discriminator", "type")).strip("'")
            msg = f"say which kind this is with `{key}:` (e.g. {key}: disk-image; see `vmkit schema`)"
        out.append(Problem(loc or "<root>", msg))
    return out


def _field_path(loc: tuple[int | str, ...]) -> str:
    s = ""
    for part in loc:
        if isinstance(part, int):
            s += f"[{part}]"
        elif part in ("disk-image", "nbd"):  # discriminated-union tags are noise in a path
            continue
        else:
            s += f".{part}" if s else str(part)
    return s


_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser where PyYAML has it (several times faster: ``vmkit list`` reads every vm.yaml)."""


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader (the C one, else the Python one)


def load_config(path: Path) -> MachineConfig:
    """Read and validate a vm.yaml; every way it can be unusable is a :class:`ConfigError` naming it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError.single(str(path), "file not found: give the path of a vm.yaml") from None
    except UnicodeDecodeError as exc:
        raise ConfigError.single(str(path), f"not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}): "
                                 "save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError.single(str(path), f"cannot be read: {exc.strerror}") from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError.single(str(path), f"not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError.single(str(path), "not valid YAML: nested too deeply") from None
    return parse_config(data, source=str(path))


def config_from_yaml(text: str) -> MachineConfig:
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError.single("<yaml>", f"not valid YAML: {exc}") from None
    return parse_config(data)


def json_schema() -> dict[str, Any]:
    return MachineConfig.model_json_schema(mode="validation")


def _check_file(field: str, path: Path, what: str, *, writable: bool = False) -> list[Problem]:
    if not path.exists():
        return [Problem(field, f"{what} {path} does not exist: check the path")]
    if not path.is_file():
        return [Problem(field, f"{what} {path} is not a regular file")]
    try:
        with path.open("r+b" if writable else "rb"):
            pass
    except PermissionError:
        mode = "read and write" if writable else "read"
        return [Problem(field, f"{what} {path} cannot be opened to {mode}: fix its permissions")]
    return []


def port_is_free(addr: str, port: int, protocol: str = "tcp") -> bool:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as QEMU's hostfwd does
        try:
            s.bind((addr, port))
        except OSError as exc:
            return exc.errno not in (errno.EADDRINUSE, errno.EACCES)
    return True
