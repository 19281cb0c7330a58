"""Save and restore a running machine's state; snapshots; the clock fix-up afterwards.

Save and restore
================
:func:`save_state` writes a paused machine's state to a protected state file
(:mod:`vmkit.state.file`: versioned header, zstd-compressed where that pays and AES-256-GCM
encrypted chunks, written with O_DIRECT, fsynced and renamed into place). The payload is
QEMU's own migration stream: vmkit creates a pipe, hands its write end to QEMU (``getfd``) and
runs ``migrate fd:<name>``; :func:`vmkit.state.file.save_from_fd` pumps the read end into the
file. The file is committed only after QEMU reports the migration ``completed`` (a failed
migration can also end in EOF) and the disks are still the ones recorded in the header.

:func:`restore_state` authenticates the file's header, launches QEMU with ``-incoming defer``,
checks that the file fits this machine (:func:`vmkit.state.file.check_compatible`: machine type
and QEMU version, configuration digest and RAM, then the disks unless ``force``), and feeds the
authenticated stream to ``migrate-incoming fd:<name>``. Afterwards the machine is PAUSED;
``resume()`` continues it. On any failure QEMU is stopped and the machine is left STOPPED (or
ERROR if QEMU itself died on the stream).

A machine with hot-plugged disks or virtiofs shares cannot be saved or snapshotted (a machine
started from ``vm.yaml`` would lack the disks; QEMU 7.2 cannot migrate vhost-user-fs). QEMU also
refuses to migrate a paused machine a second time before it has run again (``postmigrate``):
:func:`save_state` says so as a :class:`StateError`.

The header records the QEMU version (QMP greeting), the concrete machine type (``q35`` resolved
through ``query-machines``, e.g. ``pc-q35-7.2``), the RAM size, the identity of every disk image
(:func:`vmkit.state.file.disk_identity`: path, size, mtime, digest of the first 64 KiB) and the
configuration digest below. QEMU only writes to the disks when a machine is paused (it flushes
then), not while it migrates or quits afterwards, so the identities taken at save time are the
disks' state after the save; :func:`save_state` re-checks them before it commits the file.

The configuration digest
------------------------
``sha256:`` + SHA-256 of the canonical JSON (sorted keys, no spaces) of :func:`machine_fields`: what
decides whether QEMU's migration stream fits the machine or what the guest sees of it: ``cpus`` (kept up
to date by ``vmkit set --cpus``: a restore boots that many, and hot-plugged vCPUs are always the lowest
free ones, so the set is the same), ``max_cpus`` as it is resolved, ``memory``, ``max_memory`` (the
virtio-mem region; the plugged part travels in the migration stream), ``arch``, ``machine``, the CPU
model as it is resolved (``cpu_model`` or the accelerator's default), the accelerator (TCG state cannot
be loaded under KVM), ``boot`` (kernel, initrd and command line: a guest that reboots after a restore
must boot what it booted from), the storage devices without their paths (kind, format, read-only, cache
mode, serial: disks may move, their identities are checked separately), the shared-folder devices (type
and tag; not the host folder), the guest agent channel, the hot-plug ports and USB controller, whether
there is a NIC and its MAC, whether there is a virtio-rng and a virtio-balloon, the display (device
and boot-time size), the NICs on vmkit networks (model and MAC) and the vCPUs parked offline in the
guest (``vcpus_offline``, with ``cpus`` counting them: see vmkit.runtime.vcpus; a restore boots them
and parks them again); these three fields are there only for a machine that has them. Left out on
purpose: the name, port forwards (host side only), mem-merge (host side only), serial logging, readiness and the
image name. The fields themselves are stored in the header too (``machine``; not authenticated by
themselves, but checked against the authenticated digest before use) so that a mismatch can name the
field that changed.

Snapshots
=========
qcow2 *internal* snapshots through QEMU's ``snapshot-save`` / ``snapshot-load`` /
``snapshot-delete`` jobs: one instant of RAM and every writable disk together, stored inside the
qcow2 images (the machine state in the first one). The guest is paused around each job. Every
writable disk must be qcow2 (a raw disk cannot hold snapshots); read-only disks cannot change and
are left out. Snapshots of a stopped machine can be listed and deleted with ``qemu-img``; a
stopped machine is reverted by starting it from the snapshot (see :mod:`vmkit.backends.local.statectl`).

Note that a snapshot's RAM image is *not* encrypted with the user's state key: it is as protected
as the disk image that holds it (mode 0600 in the instance directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import stat
import struct
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field

from vmkit.config import DiskImage, MachineConfig, validate_name
from vmkit.errors import (
    AlreadyExistsError,
    ConfigError,
    ExitCode,
    NotFoundError,
    Problem,
    QemuError,
    StateError,
    VmTimeoutError,
)
from vmkit.host import paths
from vmkit.host.images import qemuimg
from vmkit.host.instance import Instance
from vmkit.runtime.guest.agent import ClockResult, ClockSetter, agent_socket, correct_guest_clock
from vmkit.runtime.machine import VirtualMachine, VmEvent
from vmkit.runtime.qemu.accel import AccelChoice
from vmkit.runtime.qemu.cmdline import device_id
from vmkit.runtime.states import VmState
from vmkit.runtime.vcpus import refuse_parked
from vmkit.state import key as keys
from vmkit.state.file import (
    MAGIC,
    AuthenticationFailed,
    ConfigMismatch,
    DiskIdentity,
    DisksChanged,
    IncompatibleQemu,
    ProgressCallback,
    RestoreInfo,
    SaveInfo,
    StateFileError,
    StateFileReader,
    StateFileWriteError,
    StateHeader,
    check_compatible,
    disk_identity,
    prefetch,
    read_info,
    restore_to_fd,
    save_from_fd,
)

__all__ = [
    "ClockResult",
    "RestoreFailed",
    "RestoreResult",
    "SnapshotInfo",
    "VmStateHeader",
    "check_save_target",
    "config_digest",
    "create_snapshot",
    "current_header",
    "delete_snapshot",
    "delete_snapshot_offline",
    "disk_identities",
    "fix_guest_clock",
    "list_snapshots",
    "list_snapshots_offline",
    "machine_fields",
    "precheck",
    "read_verified_header",
    "restore_state",
    "resume_and_fix_clock",
    "revert_snapshot",
    "save_state",
    "snapshot_targets",
]

log = logging.getLogger(__name__)

SAVE_FD_NAME = "vmkit-save"
RESTORE_FD_NAME = "vmkit-restore"
MIGRATION_TIMEOUT = 120.0
"""Seconds QEMU may take to report a migration's end after the stream has been written/read."""
JOB_TIMEOUT = 600.0
SAVE_CHUNK_SIZE = 512 << 10
"""Plaintext bytes per encrypted chunk of a machine save. Smaller than the format's 4 MiB default:
QEMU streams a paused machine at ~1 GB/s and a chunk that stays in the CPU cache while it is read,
compressed, sealed and written made saves ~1.6x faster here (benchmarks/save_bench.py); the cost
is a record header and tag of 24 bytes per chunk (0.005 %), less than what compression saves."""
_TERMINAL = ("completed", "failed", "cancelled")
_UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s: the default 128 MiB/s would throttle a paused save


class RestoreFailed(StateFileError):
    """QEMU could not load the state (the stream does not fit this QEMU or machine)."""

    exit_code = ExitCode.STATE_RESTORE

    def __init__(self, path: Path | None, reason: str) -> None:
        super().__init__(f"QEMU could not load the state from {path}: {reason}", path=path)
        self.reason = reason


class VmStateHeader(StateHeader):
    """The state-file header vmkit writes: :class:`StateHeader` plus the digested fields."""

    machine: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- the header


def machine_fields(config: MachineConfig, accel: AccelChoice, *, offline: Collection[int] = ()) -> dict[str, Any]:
    """The configuration fields that the configuration digest covers (see the module docstring).
    ``offline``: vCPUs QEMU has but the guest took offline (parked, see vmkit.runtime.vcpus): the state
    has ``cpus`` + those, and a restore boots them all and parks these again."""
    data = config.to_dict()
    storage = []
    for dev in data.get("storage") or []:
        att = {k: v for k, v in dict(dev.get("attachment") or {}).items() if k != "path"}
        storage.append({**dev, "attachment": att})
    net = data.get("network")
    fields: dict[str, Any] = {
        "cpus": data["cpus"],
        "max_cpus": config.cpu_ceiling,  # possible vCPUs (ACPI CPU hot-plug state; virtio-blk queues)
        "memory": data["memory"],
        "max_memory": data["max_memory"],  # the virtio-mem region (what is plugged travels in the stream)
        "arch": data["arch"],
        "machine": data["machine"],
        "cpu_model": config.cpu_model or accel.default_cpu,
        "accel": accel.name,
        "boot": data["boot"],
        "storage": storage,
        "shares": [{"type": sh.type, "tag": config.share_tag(i), "read_only": sh.read_only}
                   for i, sh in enumerate(config.shares) if sh.type != "sshfs"],  # devices QEMU has
        "agent": data.get("agent"),  # the guest agent's virtio-serial channel
        "hotplug_slots": data.get("hotplug_slots"),
        "usb": data.get("usb"),
        "network": None if net is None else {"mac": net.get("mac")},
        "entropy": data["entropy"],
        "balloon": data["balloon"],  # the virtio-balloon device (mem-merge is host-side only: left out)
    }
    if config.display is not None:  # only when there is one: headless machines' saved states stay valid
        fields["display"] = data["display"]
    if config.networks:  # NICs on vmkit networks: devices the guest has (only when there are some, as above)
        fields["networks"] = [{"model": n.model, "mac": n.mac} for n in config.networks]
    if offline:  # vCPUs parked in the guest (only when there are some, as above)
        fields["cpus"] = data["cpus"] + len(offline)
        fields["vcpus_offline"] = sorted(offline)
    return fields


def saved_offline(path: Path, saved: StateHeader) -> list[int]:
    """The vCPUs that were parked (offline in the guest) when ``path`` was saved, from its stored fields
    (trusted only if they hash to the authenticated digest)."""
    fields = _stored_fields(path, saved.config_digest) or {}
    offline = fields.get("vcpus_offline")
    return sorted(int(i) for i in offline) if isinstance(offline, list) else []


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def config_digest(fields: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of :func:`machine_fields`."""
    return "sha256:" + hashlib.sha256(_canonical(fields)).hexdigest()


def moved_header(document: dict[str, Any], config: MachineConfig, accel: AccelChoice) -> dict[str, Any]:
    """The header of a state file whose machine moved to another host (``vmkit migrate --offline``):
    the same state, described for ``config`` there (its paths, its disks as copied, which the state
    was taken with: the move carried both together)."""
    moved = document.get("machine")
    offline = moved.get("vcpus_offline") if isinstance(moved, dict) else None  # parked vCPUs travel along
    fields = machine_fields(config, accel, offline=[int(i) for i in offline] if isinstance(offline, list) else ())
    return {**document, "machine": fields, "config_digest": config_digest(fields),
            "disks": [d.model_dump(mode="json") for d in disk_identities(config)]}


def _disk_paths(config: MachineConfig) -> list[Path]:
    return [Path(dev.attachment.path) for dev in config.storage if isinstance(dev.attachment, DiskImage)]


def disk_identities(config: MachineConfig, *, path: Path | None = None) -> tuple[DiskIdentity, ...]:
    """The identity of every disk-image attachment, in device order.

    A disk that is gone raises :class:`DisksChanged` (``path`` names the state file in it).
    """
    out = []
    for i, disk in enumerate(_disk_paths(config)):
        try:
            out.append(disk_identity(disk))
        except FileNotFoundError:
            raise DisksChanged(path, (f"disk {i} {disk}: it does not exist any more",)) from None
    return tuple(out)


async def machine_type(vm: VirtualMachine) -> str:
    """The concrete machine type QEMU runs (``q35`` -> ``pc-q35-7.2``)."""
    qom_type = str(await vm.execute("qom-get", {"path": "/machine", "property": "type"}))
    return qom_type.removesuffix("-machine")  # QOM names the class pc-q35-7.2-machine


_MACHINE_FAMILIES = {"q35": "pc-q35-", "pc": "pc-i440fx-", "virt": "virt-"}


def pinned_machine_type(config: MachineConfig, saved_machine_type: str) -> str | None:
    """The versioned machine type a restore runs: the one the state was saved with, if it is a
    version of the configuration's alias (``pc-q35-7.1`` for ``q35``). A newer QEMU maps the alias
    to its own newest version, which cannot load an older machine's state; the old versions stay
    available, so pinning the saved one keeps state files usable across QEMU upgrades."""
    prefix = _MACHINE_FAMILIES.get(config.machine)
    return saved_machine_type if prefix and saved_machine_type.startswith(prefix) else None


async def current_header(vm: VirtualMachine, *, path: Path | None = None) -> VmStateHeader:
    """The header describing ``vm`` as it is now (QEMU must be running: live state)."""
    if vm.qmp is None:
        raise StateError("describe the machine state", vm.state.value, ["running", "paused"])
    fields = machine_fields(vm.config, vm.accel, offline=vm.vcpus_parked)
    return VmStateHeader(
        qemu_version=vm.qmp.qemu_version,
        machine_type=await machine_type(vm),
        config_digest=config_digest(fields),
        ram_bytes=vm.config.memory,
        disks=disk_identities(vm.config, path=path),
        machine=fields,
    )


_PREAMBLE = struct.Struct(">12sII")


def _stored_fields(path: Path, digest: str) -> dict[str, Any] | None:
    """The ``machine`` fields stored in ``path``'s header, if they hash to the authenticated ``digest``."""
    try:
        with open(path, "rb") as fh:
            pre = fh.read(_PREAMBLE.size)
            magic, _, length = _PREAMBLE.unpack(pre)
            if magic != MAGIC or length > 1 << 20:
                return None
            obj = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error):
        return None
    fields = obj.get("machine") if isinstance(obj, dict) else None
    if isinstance(fields, dict) and config_digest(fields) == digest:
        return fields
    return None


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: obj}
    if isinstance(obj, list):
        if not obj:
            return {prefix: obj}
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def _config_mismatch(path: Path | None, saved: dict[str, Any], current: dict[str, Any]) -> ConfigMismatch:
    a, b = _flatten(saved), _flatten(current)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))

    def show(d: dict[str, Any], k: str) -> str:
        if k not in d:
            return "unset"
        return d[k] if isinstance(d[k], str) else json.dumps(d[k])

    if len(changed) == 1:
        k = changed[0]
        return ConfigMismatch(path, field=k, saved=show(a, k), current=show(b, k))
    return ConfigMismatch(path, field=f"the configuration ({', '.join(changed)})",
                          saved=", ".join(f"{k}={show(a, k)}" for k in changed),
                          current=", ".join(f"{k}={show(b, k)}" for k in changed))


def check_header(saved: StateHeader, expected: VmStateHeader, *, path: Path | None, force: bool = False) -> None:
    """:func:`check_compatible`, with a configuration mismatch narrowed down to the fields that changed."""
    try:
        check_compatible(saved, expected, check_disks=not force, path=path)
    except ConfigMismatch:
        if saved.config_digest != expected.config_digest and path is not None:
            fields = _stored_fields(path, saved.config_digest)
            if fields is not None:
                raise _config_mismatch(path, fields, expected.machine) from None
        raise


def _load_key_for_reading(path: Path) -> bytes:
    """The user's key that ``path`` names (the current one, or one retired by an unfinished rotation);
    a missing key means the file cannot be authenticated (another user's key)."""
    kp = keys.key_path()
    if not kp.exists():
        read_info(path)  # a file that is no state file at all (or of another version) says so first
        raise AuthenticationFailed(path, f"it was written with a key this user does not have (there is no key at {kp})")
    try:
        wanted = read_info(path).key_id
    except StateFileError:
        return keys.load_key(kp)  # the reader says what is wrong with the file
    return keys.key_for(wanted)


def read_verified_header(path: Path, key: bytes | None = None) -> StateHeader:
    """Open ``path`` with the user's key and return its authenticated header (no payload is read)."""
    path = Path(path)
    key = key if key is not None else _load_key_for_reading(path)
    with StateFileReader(path, key) as reader:
        return reader.header


def precheck(path: Path, config: MachineConfig, accel: AccelChoice, *, force: bool = False,
             key: bytes | None = None) -> StateHeader:
    """Everything :func:`restore_state` checks that needs no QEMU: authenticity of the header,
    configuration digest, RAM and (unless ``force``) disks. Returns the authenticated header.

    The QEMU version and machine type are checked when QEMU runs.
    """
    path = Path(path).absolute()
    saved = read_verified_header(path, key)
    fields = machine_fields(config, accel, offline=saved_offline(path, saved))
    expected = VmStateHeader(qemu_version=saved.qemu_version, machine_type=saved.machine_type,
                             config_digest=config_digest(fields), ram_bytes=config.memory,
                             disks=disk_identities(config, path=path), machine=fields)
    check_header(saved, expected, path=path, force=force)
    return saved


async def _refuse_postmigrate(vm: VirtualMachine, operation: str) -> None:
    """QEMU cannot migrate (or snapshot) a machine again that has not run since its last migration."""
    status = await vm.execute("query-status")
    if status.get("status") == "postmigrate":
        raise StateError(operation, "paused and unchanged since its last save (QEMU cannot save it twice)",
                         ["resumed first (or copy the earlier state file)"])


def _absolute(path: Path | str) -> Path:
    return Path(path).absolute()


def _refuse_unmigratable(vm: VirtualMachine, what: str) -> None:
    virtiofs = [vm.config.share_tag(i) for i, sh in enumerate(vm.config.shares) if sh.type == "virtiofs"]
    if virtiofs:
        raise ConfigError.single(
            "shares", f"cannot {what}: QEMU cannot save the state of virtiofs shares ({', '.join(virtiofs)}); "
            "use 9p or sshfs shares for machines you save, or stop the machine instead")
    _refuse_hot_disks(vm, what)


def _refuse_hot_disks(vm: VirtualMachine, what: str) -> None:
    if vm.hot_disks:
        ids = ", ".join(sorted(vm.hot_disks))
        raise ConfigError.single(
            "disks", f"cannot {what} while disks are hot-plugged ({ids}): a machine started from "
            f"vm.yaml would not have them; detach them first (vmkit disk detach {vm.config.name} ID)")


# --------------------------------------------------------------------------- migration plumbing


async def _enable_migration_events(vm: VirtualMachine) -> None:
    await vm.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})


@contextlib.asynccontextmanager
async def _qmp_events(vm: VirtualMachine) -> AsyncIterator[asyncio.Queue[VmEvent]]:
    async with vm.subscribe() as q:
        yield q


async def _wait_qmp(vm: VirtualMachine, q: asyncio.Queue[VmEvent], check: Callable[[], Any],
                    event: str, timeout: float, what: str) -> Any:
    """Wait until ``await check()`` returns something truthy; re-checked on each ``event`` (and each second)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if vm.state in (VmState.STOPPED, VmState.ERROR):
            raise QemuError(f"{vm.config.name}: QEMU exited while {what}",
                            hint=f"see {vm.stderr_path}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise VmTimeoutError(f"{vm.config.name}: {what} did not finish within {timeout:.0f} s")
        with contextlib.suppress(TimeoutError):
            while True:
                ev = await asyncio.wait_for(q.get(), min(left, 1.0))
                if ev.kind != "qmp" or ev.detail.get("event") == event:
                    break


async def _migration_outcome(vm: VirtualMachine, q: asyncio.Queue[VmEvent], timeout: float) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        info: dict[str, Any] = await vm.execute("query-migrate")
        return info if info.get("status") in _TERMINAL else None

    result: dict[str, Any] = await _wait_qmp(vm, q, check, "MIGRATION", timeout, "the migration")
    return result


def _pass_fd(vm: VirtualMachine, fd: int) -> None:
    assert vm.qmp is not None
    vm.qmp.send_fd(fd)


# --------------------------------------------------------------------------- the save target


_BACKING_DEPTH = 16


def _qcow2_backing(path: Path) -> Path | None:
    """The backing file a qcow2 image names in its header (None for raw images or if unreadable)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
            if len(head) < 20 or head[:4] != b"QFI\xfb":
                return None
            offset, size = struct.unpack(">QI", head[8:20])
            if not offset or not 0 < size < 1024:
                return None
            fh.seek(offset)
            name = fh.read(size).decode()
    except (OSError, UnicodeDecodeError):
        return None
    if name.startswith("json:"):
        return None
    backing = Path(name)
    return backing if backing.is_absolute() else path.parent / backing


def _machine_files(inst: Instance) -> list[tuple[Path, str]]:
    """The files a machine runs from that live outside its directory: its disk images (and their
    qcow2 backing chains), kernel and initrd, each with what it is."""
    try:
        config = inst.load_config()
    except Exception:  # a broken vm.yaml: its directory is still protected as a whole
        log.warning("%s: cannot read its configuration to protect its disks from saves", inst.name)
        return []
    out: list[tuple[Path, str]] = []
    for i, dev in enumerate(config.storage):
        if not isinstance(dev.attachment, DiskImage):
            continue
        disk: Path | None = Path(dev.attachment.path)
        what = f"disk storage[{i}] of machine {inst.name}"
        for _ in range(_BACKING_DEPTH):
            if disk is None:
                break
            out.append((disk, what))
            disk, what = _qcow2_backing(disk), f"the backing image of storage[{i}] of machine {inst.name}"
    out.append((config.boot.kernel, f"the kernel of machine {inst.name}"))
    if config.boot.initrd is not None:
        out.append((config.boot.initrd, f"the initrd of machine {inst.name}"))
    return out


def _identity(path: Path, *, follow: bool = True) -> tuple[int, int] | None:
    """(device, inode) of ``path`` (of a symbolic link itself unless ``follow``), or None."""
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _bad_target(path: Path, message: str) -> ConfigError:
    return ConfigError([Problem("path", f"{path}: {message}")], context="save target")


def check_save_target(path: Path, own: Instance, *, force: bool = False) -> None:
    """Refuse a state-file target that would destroy something: raise :class:`ConfigError` (field ``path``)
    or :class:`AlreadyExistsError`. ``own`` is the instance being saved.

    Refused, even with ``force``: a file vmkit keeps (anything in an instance directory except
    ``own``'s saved state, the image cache, vmkit's configuration directory with the state-file key),
    a disk image, qcow2 backing image, kernel or initrd of any instance (by resolved path and by
    (device, inode), so symbolic and hard links are recognised), and anything but a regular file
    (directory, device, FIFO, socket). An existing regular file that is not a vmkit state file (it
    does not start with the signature) is replaced only with ``force``: :class:`AlreadyExistsError`.
    """
    path = Path(path).absolute()
    landing = path.parent.resolve() / path.name  # the name the rename replaces
    resolved = path.resolve()  # ... and what it holds, through symbolic links
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _bad_target(path, f"cannot be examined ({exc.strerror})") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        hint = f"give a file name inside it, e.g. {path / (own.name + '.vmstate')}" if stat.S_ISDIR(st.st_mode) \
            else "a state file must be a regular file: give the path of a new file"
        raise _bad_target(path, f"is {_file_kind(st.st_mode)}; {hint}")
    own_saved = own.saved_state_path.parent.resolve() / own.saved_state_path.name
    protected_dirs = [(own.root, "the instances directory, where vmkit keeps its own files"),
                      (paths.image_cache_dir(), "the image cache (base images that machines' disks are built on)"),
                      (paths.config_dir(), "vmkit's configuration directory (it holds the state-file key)")]
    for place in (landing, resolved):
        if place == own_saved:
            continue
        for directory, what in protected_dirs:
            base = directory.resolve()
            if place == base or place.is_relative_to(base):
                inside = place.relative_to(base).parts
                if directory == own.root and inside:
                    what = f"the directory of instance {inside[0]}, where vmkit keeps its files"
                raise _bad_target(path, f"is inside {what}; save elsewhere, or leave PATH out to save to "
                                  f"{own.saved_state_path} (which `vmkit start {own.name}` resumes)")
    target_ids = {i for i in (_identity(path), _identity(landing, follow=False)) if i is not None}
    for inst in Instance.all(own.root):
        for file, what in _machine_files(inst):
            if file.absolute() in (landing, resolved, path) or file.resolve() in (landing, resolved) \
                    or _identity(file) in target_ids:
                raise _bad_target(path, f"is {what} ({file}); saving there would destroy it: "
                                  "give the path of a new file or of an earlier state file")
    if st is None:
        if os.path.lexists(path) and not force:  # a dangling symbolic link
            raise AlreadyExistsError("path", str(path), hint="it is a symbolic link to nothing, not a vmkit state "
                                     "file: pick another path, or pass --force to replace the link")
        return
    if not force and not _starts_with_magic(path):
        raise AlreadyExistsError(
            "path", str(path),
            hint="it is not a vmkit state file and saving would replace it: pick another path, "
            "or pass --force to replace it")


def _starts_with_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# --------------------------------------------------------------------------- save


async def save_state(vm: VirtualMachine, path: Path, progress: ProgressCallback | None = None, *,
                     key: bytes | None = None, chunk_size: int = SAVE_CHUNK_SIZE,
                     target_check: Callable[[Path], None] | None = None) -> SaveInfo:
    """Save the state of the PAUSED machine ``vm`` to ``path`` (see the module docstring).

    ``target_check(path)`` (e.g. :func:`check_save_target`) runs before the save and again right
    before the file is renamed into place; what it raises aborts the save (``path`` untouched).
    ``progress(done, None)`` is called with the payload bytes written so far. Raises
    :class:`StateError` unless the machine is paused; :class:`~vmkit.state.file.NoSpace` /
    :class:`~vmkit.state.file.StateFileWriteError` when the file cannot be written or QEMU's
    migration fails (an earlier file at ``path`` is then unchanged, and the machine stays paused).
    """
    if vm.state != VmState.PAUSED:
        raise StateError("save the machine state", vm.state.value, [VmState.PAUSED.value])
    _refuse_unmigratable(vm, "save its state")
    path = _absolute(path)
    if target_check is not None:
        target_check(path)
    key = key if key is not None else keys.load_or_create_key()

    async def prepare() -> None:
        await _enable_migration_events(vm)
        await vm.execute("migrate-set-parameters", {"max-bandwidth": _UNLIMITED_BANDWIDTH})

    # independent queries: sent together, QEMU answers them in one go (each alone is a round trip)
    _, header, _ = await asyncio.gather(_refuse_postmigrate(vm, "save the machine state"),
                                        current_header(vm, path=path), prepare())
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            _pass_fd(vm, w)
            await vm.execute("getfd", {"fdname": SAVE_FD_NAME})
        finally:
            os.close(w)  # QEMU has its own copy: EOF on r comes when QEMU closes it
        async with _qmp_events(vm) as q:
            await vm.execute("migrate", {"uri": f"fd:{SAVE_FD_NAME}"})

            async def before_commit() -> None:
                info = await _migration_outcome(vm, q, MIGRATION_TIMEOUT)
                if info["status"] != "completed":
                    raise StateFileWriteError(path, f"QEMU's migration {info['status']}: "
                                              f"{info.get('error-desc', 'no reason given')}")
                now = disk_identities(vm.config, path=path)
                if any(not a.same_content(b) for a, b in zip(header.disks, now, strict=True)):
                    raise StateFileWriteError(path, "a disk image was modified while the state was saved")
                if target_check is not None:  # something may have appeared under that name meanwhile
                    target_check(path)

            try:
                return await save_from_fd(path, header, r, key, progress, before_commit=before_commit,
                                          chunk_size=chunk_size)
            except BaseException:
                os.close(r)  # QEMU's writes fail now (EPIPE): its migration ends
                r = -1
                await _abandon_migration(vm, q)
                raise
    finally:
        if r >= 0:
            os.close(r)


async def _abandon_migration(vm: VirtualMachine, q: asyncio.Queue[VmEvent]) -> None:
    """After a failed save: make sure QEMU's migration is over (the machine stays paused)."""
    if vm.state not in (VmState.PAUSED, VmState.RUNNING):
        return
    with contextlib.suppress(QemuError):
        await vm.execute("migrate_cancel")
    with contextlib.suppress(QemuError, VmTimeoutError):
        await asyncio.shield(_migration_outcome(vm, q, 30.0))


# --------------------------------------------------------------------------- restore


@dataclass(frozen=True)
class RestoreResult:
    """What :func:`restore_state` did."""

    info: RestoreInfo
    header: StateHeader
    suspended_seconds: float
    """Wall-clock time between the save and the restore: how far behind the guest clock now is."""

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.info.path), "payload_bytes": self.info.payload_bytes,
                "seconds": round(self.info.seconds, 3), "saved_at": self.header.created_at.isoformat(),
                "suspended_seconds": round(self.suspended_seconds, 1)}


def _qemu_log_tail(vm: VirtualMachine) -> str:
    try:
        lines = vm.stderr_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "no output"
    tail = [ln for ln in lines[-10:] if ln and not ln.startswith("--- ")]
    return "; ".join(tail[-3:]) or "no output"


async def restore_state(vm: VirtualMachine, path: Path, progress: ProgressCallback | None = None, *,
                        key: bytes | None = None, force: bool = False) -> RestoreResult:
    """Start the STOPPED machine ``vm`` from the state file ``path``; it is PAUSED afterwards.

    ``force`` skips the disk check (only the disks: QEMU version, machine type, configuration and
    RAM must always match). ``progress(done, total)`` reports payload bytes. Raises the specific
    :class:`~vmkit.state.file.StateFileError` (the machine is then STOPPED, or ERROR if QEMU died).
    """
    if vm.state not in (VmState.STOPPED, VmState.ERROR):
        raise StateError("restore a saved state", vm.state.value, [VmState.STOPPED.value])
    path = _absolute(path)
    key = key if key is not None else _load_key_for_reading(path)
    # authenticate the header and check what needs no QEMU before launching one
    saved = await asyncio.to_thread(precheck, path, vm.config, vm.accel, force=force, key=key)
    await asyncio.to_thread(prefetch, path)  # the disk reads the file while QEMU starts
    pinned = pinned_machine_type(vm.config, saved.machine_type)
    offline = saved_offline(path, saved)
    configured = vm.config
    if offline:  # QEMU starts with the vCPUs the state has; the guest has the parked ones offline
        vm.config = configured.model_copy(update={"cpus": configured.cpus + len(offline)})
    try:
        await vm.start(incoming=True, machine_type=pinned)
    except QemuError as exc:
        if pinned is None or "unsupported machine type" not in _qemu_log_tail(vm):
            raise
        raise IncompatibleQemu(path, saved_version=saved.qemu_version, saved_machine=saved.machine_type,
                               current_version="(the installed one)", current_machine=vm.config.machine,
                               reason=f"this QEMU does not have machine type {saved.machine_type}") from exc
    finally:
        vm.config = configured
    vm.vcpus_parked.update(offline)
    try:
        expected = await current_header(vm, path=path)
        check_header(saved, expected, path=path, force=force)
        await _enable_migration_events(vm)
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            _pass_fd(vm, r)
            await vm.execute("getfd", {"fdname": RESTORE_FD_NAME})
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        async with _qmp_events(vm) as q:
            try:
                await vm.execute("migrate-incoming", {"uri": f"fd:{RESTORE_FD_NAME}"})
                info = await restore_to_fd(path, key, w, progress, expected=expected, check_disks=not force)
            except BaseException as exc:
                # stop QEMU before it sees the stream end: a half-loaded machine must not run
                with contextlib.suppress(Exception):
                    await vm.stop()
                os.close(w)
                if isinstance(exc, OSError):
                    raise RestoreFailed(path, _qemu_log_tail(vm)) from exc
                raise
            os.close(w)
            try:
                outcome = await _migration_outcome(vm, q, MIGRATION_TIMEOUT)
            except QemuError as exc:
                raise RestoreFailed(path, _qemu_log_tail(vm)) from exc
            if outcome["status"] != "completed":
                raise RestoreFailed(path, str(outcome.get("error-desc") or _qemu_log_tail(vm)))
    except BaseException:
        await vm.shutdown(timeout=2)
        raise
    vm.guest_clock_stopped_at = saved.created_at.timestamp()  # the guest's clock stopped at the save
    suspended = max(0.0, (datetime.now(UTC) - saved.created_at).total_seconds())
    return RestoreResult(info=info, header=saved, suspended_seconds=suspended)


# --------------------------------------------------------------------------- clock


async def fix_guest_clock(vm: VirtualMachine, *, behind_seconds: float | None = None,
                          agent: Path | None = None, setter: ClockSetter | None = None) -> ClockResult:
    """After resuming a paused, restored or reverted machine: set its clock through the guest agent.

    ``behind_seconds`` defaults to how long the guest's clock stood still before the last resume
    (:attr:`VirtualMachine.clock_behind_seconds`). The agent channel defaults to ``qga.sock`` in
    the machine's directory. Never raises: the result says whether the clock was corrected, and
    how far behind it is if not.
    """
    sock = agent if agent is not None else agent_socket(vm.workdir)
    if setter is None and agent is None and sock is not None and vm.agent is not None:
        setter = vm.agent  # the machine's shared agent connection (never a second one beside it)
    behind = behind_seconds if behind_seconds is not None else vm.clock_behind_seconds
    result = await correct_guest_clock(sock, behind_seconds=behind, setter=setter)
    log.info("%s: %s", vm.config.name, result.message)
    return result


# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class SnapshotInfo:
    """One machine snapshot (as QEMU lists it on the disk that holds the machine state)."""

    tag: str
    created: float
    vm_state_bytes: int
    guest_clock_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"tag": self.tag, "created": self.created, "vm_state_bytes": self.vm_state_bytes,
                "guest_clock_seconds": self.guest_clock_seconds}

    @classmethod
    def from_qemu(cls, d: dict[str, Any]) -> SnapshotInfo:
        return cls(tag=str(d["name"]), created=d.get("date-sec", 0) + d.get("date-nsec", 0) / 1e9,
                   vm_state_bytes=int(d.get("vm-state-size", 0)),
                   guest_clock_seconds=d.get("vm-clock-sec", 0) + d.get("vm-clock-nsec", 0) / 1e9)


@dataclass(frozen=True)
class SnapshotTargets:
    """Which block nodes take part in a snapshot: ``nodes`` (the writable qcow2 disks) and their paths."""

    nodes: tuple[str, ...]
    paths: tuple[Path, ...]

    @property
    def vmstate(self) -> str:
        return self.nodes[0]


def snapshot_targets(config: MachineConfig) -> SnapshotTargets:
    """The writable qcow2 disks of ``config`` (node ``disk<i>``); ConfigError if snapshots are impossible."""
    nodes, paths, problems = [], [], []
    for i, dev in enumerate(config.storage):
        att = dev.attachment
        if att.read_only:
            continue  # cannot change: nothing to snapshot
        if isinstance(att, DiskImage) and att.format == "qcow2":
            nodes.append(device_id(i, dev))
            paths.append(Path(att.path))
        else:
            kind = att.format if isinstance(att, DiskImage) else att.type
            problems.append(f"storage[{i}] is a writable {kind} disk, which cannot hold snapshots: "
                            "convert it to qcow2 (qemu-img convert -O qcow2) or attach it read-only")
    if problems:
        raise ConfigError.single("storage", "; ".join(problems))
    if not nodes:
        raise ConfigError.single(
            "storage", "snapshots are stored in a writable qcow2 disk and this machine has none: "
            "attach one (qemu-img create -f qcow2 disk.qcow2 1G; vmkit create ... --disk disk.qcow2)")
    return SnapshotTargets(tuple(nodes), tuple(paths))


async def _run_job(vm: VirtualMachine, command: str, arguments: dict[str, Any], what: str) -> None:
    job_id = f"vmkit-{command}-{time.monotonic_ns()}"

    async def check() -> dict[str, Any] | None:
        for job in await vm.execute("query-jobs"):
            if job.get("id") == job_id and job.get("status") == "concluded":
                return dict(job)
        return None

    async with _qmp_events(vm) as q:
        await vm.execute(command, {"job-id": job_id, **arguments})
        job = await _wait_qmp(vm, q, check, "JOB_STATUS_CHANGE", JOB_TIMEOUT, what)
    with contextlib.suppress(QemuError):
        await vm.execute("job-dismiss", {"id": job_id})
    if job.get("error"):
        raise QemuError(f"{vm.config.name}: {what} failed: {job['error']}")


async def list_snapshots(vm: VirtualMachine) -> list[SnapshotInfo]:
    """The machine snapshots of a live machine (those on the disk that holds the machine state)."""
    targets = snapshot_targets(vm.config)
    for blk in await vm.execute("query-block"):
        inserted = blk.get("inserted") or {}
        if inserted.get("node-name") == targets.vmstate:
            return [SnapshotInfo.from_qemu(s) for s in inserted.get("image", {}).get("snapshots", [])]
    return []


def list_snapshots_offline(config: MachineConfig) -> list[SnapshotInfo]:
    """The machine snapshots of a stopped machine, read with ``qemu-img info``."""
    targets = snapshot_targets(config)
    raw = qemuimg.info(targets.paths[0]).raw
    return [SnapshotInfo.from_qemu(s) for s in raw.get("snapshots", [])]


def _check_tag(tag: str) -> str:
    return validate_name(tag, field="tag")


async def _paused_for(vm: VirtualMachine, operation: str) -> bool:
    """Pause a running machine for ``operation``; True if it was running (resume it afterwards)."""
    if vm.state == VmState.RUNNING:
        await vm.pause()
        return True
    if vm.state != VmState.PAUSED:
        raise StateError(operation, vm.state.value, [VmState.RUNNING.value, VmState.PAUSED.value])
    return False


async def create_snapshot(vm: VirtualMachine, tag: str) -> SnapshotInfo:
    """Snapshot RAM and every writable disk of a running or paused machine under ``tag``."""
    _check_tag(tag)
    targets = snapshot_targets(vm.config)
    if vm.state not in (VmState.RUNNING, VmState.PAUSED):
        raise StateError("create a snapshot", vm.state.value, [VmState.RUNNING.value, VmState.PAUSED.value])
    _refuse_unmigratable(vm, "snapshot the machine")
    refuse_parked(vm, "snapshot the machine")  # a revert in a QEMU booted with cpus would lack them
    if any(s.tag == tag for s in await list_snapshots(vm)):
        raise AlreadyExistsError("snapshot", tag, hint=f"delete it first (vmkit snapshot delete {vm.config.name} "
                                 f"{tag}) or pick another tag")
    await _refuse_postmigrate(vm, "create a snapshot")
    was_running = await _paused_for(vm, "create a snapshot")
    try:
        await _run_job(vm, "snapshot-save", {"tag": tag, "vmstate": targets.vmstate, "devices": list(targets.nodes)},
                       f"saving snapshot {tag!r}")
    finally:
        if was_running and vm.state == VmState.PAUSED:
            await vm.resume()
    for s in await list_snapshots(vm):
        if s.tag == tag:
            return s
    raise QemuError(f"{vm.config.name}: snapshot {tag!r} was saved but QEMU does not list it")


async def revert_snapshot(vm: VirtualMachine, tag: str, *, resume: bool | None = None) -> ClockResult | None:
    """Load snapshot ``tag`` (RAM and disks) into a running or paused machine.

    Afterwards the machine runs if it ran before (or if ``resume`` is true) and its clock is
    corrected (returned); otherwise it stays paused and None is returned.
    """
    _check_tag(tag)
    targets = snapshot_targets(vm.config)
    if vm.state not in (VmState.RUNNING, VmState.PAUSED):
        raise StateError("revert to a snapshot", vm.state.value, [VmState.RUNNING.value, VmState.PAUSED.value])
    found = [s for s in await list_snapshots(vm) if s.tag == tag]
    if not found:
        raise NotFoundError("snapshot", tag, hint=f"see `vmkit snapshot list {vm.config.name}`")
    if found[0].vm_state_bytes == 0:
        raise ConfigError.single("tag", f"snapshot {tag!r} holds disk state only (no machine state): "
                                 "revert it with qemu-img snapshot -a while the machine is stopped")
    await _refuse_postmigrate(vm, "revert to a snapshot")
    was_running = await _paused_for(vm, "revert to a snapshot")
    await _run_job(vm, "snapshot-load", {"tag": tag, "vmstate": targets.vmstate, "devices": list(targets.nodes)},
                   f"loading snapshot {tag!r}")
    vm.guest_clock_stopped_at = found[0].created  # the guest's clock now reads the snapshot's time
    if resume if resume is not None else was_running:
        return await resume_and_fix_clock(vm)
    return None


async def resume_and_fix_clock(vm: VirtualMachine) -> ClockResult:
    """Resume the PAUSED machine and put its clock right (see :func:`fix_guest_clock`): by the time
    it stood paused, or since the save or snapshot it was restored or reverted to."""
    await vm.resume()
    return await fix_guest_clock(vm)


async def delete_snapshot(vm: VirtualMachine, tag: str) -> None:
    """Delete snapshot ``tag`` from every disk of a running or paused machine."""
    _check_tag(tag)
    targets = snapshot_targets(vm.config)
    if not any(s.tag == tag for s in await list_snapshots(vm)):
        raise NotFoundError("snapshot", tag, hint=f"see `vmkit snapshot list {vm.config.name}`")
    await _run_job(vm, "snapshot-delete", {"tag": tag, "devices": list(targets.nodes)},
                   f"deleting snapshot {tag!r}")


def delete_snapshot_offline(config: MachineConfig, tag: str) -> None:
    """Delete snapshot ``tag`` from the disks of a stopped machine (``qemu-img snapshot -d``)."""
    _check_tag(tag)
    targets = snapshot_targets(config)
    holders = [p for p in targets.paths
               if any(s.get("name") == tag for s in qemuimg.info(p).raw.get("snapshots", []))]
    if not holders:
        raise NotFoundError("snapshot", tag, hint=f"see `vmkit snapshot list {config.name}`")
    for p in holders:
        qemuimg.run(["snapshot", "-d", tag, str(p)], what=f"cannot delete snapshot {tag!r} from {p}", timeout=300)
