"""Attaching disks to, and detaching them from, a running machine.

``attach_disk`` checks the device as ``vm.yaml`` checks its storage (absolute path, an
existing file it may open, not used by another disk), then adds the backend (QMP
``blockdev-add``) and the guest device (``device_add``): PCI kinds (virtio-blk, nvme) go into
a free PCIe root port (the ``hotplug_slots`` of the configuration, q35 and virt), USB disks onto the
xHCI controller (``usb: true`` or a USB disk at boot). ``detach_disk`` asks the guest to
release the device (``device_del``) and waits for QEMU's ``DEVICE_DELETED`` event (the
guest's PCIe hot-plug driver takes about five seconds: the attention-button delay).

Whenever ``DEVICE_DELETED`` arrives, even after ``detach_disk`` gave up waiting, the machine
calls :func:`device_deleted`, which removes the backend (``blockdev-del``) and forgets the disk.
Until then the disk is ``detaching``: a second ``detach_disk`` does not ask again (QEMU would
refuse), it waits for the same release, and it succeeds at once if the release came meanwhile.

Hot-plugged disks live only as long as the running machine; the instance's ``vm.yaml`` is
not changed (``vmkit disk attach`` says so).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vmkit.config import DiskImage, MachineConfig, NbdAttachment, StorageDevice, device_problems
from vmkit.errors import ConfigError, NotFoundError, Problem, QemuError, VmkitError, VmTimeoutError
from vmkit.runtime.nbdwatch import NbdWatcher
from vmkit.runtime.qemu.cmdline import PCIE_MACHINES, blockdev_spec, device_id, device_spec

log = logging.getLogger(__name__)
_background: set[asyncio.Task[None]] = set()


@dataclass(frozen=True)
class HotDisk:
    id: str
    device: StorageDevice
    port: str | None  # the PCIe root port it occupies


class HotplugMachine(Protocol):
    """What hot-plugging needs of the machine (:class:`vmkit.runtime.machine.VirtualMachine`, which keeps the
    hot-plugged disks and the detaches in progress)."""

    @property
    def config(self) -> MachineConfig: ...

    @property
    def nbd(self) -> NbdWatcher: ...

    @property
    def hot_disks(self) -> dict[str, HotDisk]: ...

    @property
    def unplugs(self) -> dict[str, asyncio.Future[None]]: ...

    @property
    def detached_late(self) -> set[str]: ...

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...


def _used_ids(vm: HotplugMachine) -> set[str]:
    boot = {device_id(i, d) for i, d in enumerate(vm.config.storage)}
    return boot | set(vm.hot_disks)


def _free_port(vm: HotplugMachine) -> str:
    if vm.config.machine not in PCIE_MACHINES:
        raise ConfigError.single("machine", "hot-plugging PCI disks needs PCIe root ports: machine q35 (x86_64) "
                                 "or virt (aarch64), not pc")
    taken = {d.port for d in vm.hot_disks.values()}
    for i in range(vm.config.hotplug_slots):
        if f"hotplug{i}" not in taken:
            return f"hotplug{i}"
    raise ConfigError.single("hotplug_slots", f"all {vm.config.hotplug_slots} hot-plug slots are in use: "
                             "detach a disk, or raise hotplug_slots in vm.yaml (takes effect at next start)")


def disk_table(vm: HotplugMachine) -> list[dict[str, object]]:
    """Every disk of the running machine: id, kind, what it is attached to, how, and its state."""
    rows: list[dict[str, object]] = []
    entries = [(device_id(i, d), d, "boot") for i, d in enumerate(vm.config.storage)]
    entries += [(h.id, h.device, "hot-plugged") for h in vm.hot_disks.values()]
    for node, dev, origin in entries:
        att = dev.attachment
        target = att.url if isinstance(att, NbdAttachment) else str(att.path)
        watched = vm.nbd.disks.get(node)
        state = "detaching" if node in vm.unplugs else watched.state if watched else "attached"
        rows.append({"id": node, "kind": dev.kind, "attachment": att.type, "target": target,
                     "read_only": att.read_only, "origin": origin, "state": state})
    return rows


async def attach_disk(vm: HotplugMachine, dev: StorageDevice) -> HotDisk:
    """Attach ``dev`` to the running machine; returns its id (for ``detach_disk``)."""
    problems = device_problems(dev, "", _files_in_use(vm))
    if problems:
        raise ConfigError(problems, context="disk")
    used = _used_ids(vm)
    node = dev.id or next(f"disk{i}" for i in range(len(used) + 1) if f"disk{i}" not in used)
    if node in used:
        raise ConfigError.single("id", f"{node!r} is already a disk of this machine: pick another id")
    if dev.kind in ("sata", "ide"):
        raise ConfigError.single("kind", f"a {dev.kind} disk cannot be attached to a running machine (QEMU's "
                                 "emulated ATA disks are not hot-pluggable): add it to storage in vm.yaml and "
                                 "restart, or attach a virtio-blk or nvme disk")
    vm.detached_late.discard(node)
    port = None
    spec = device_spec(node, dev, queues=vm.config.cpu_ceiling)
    if dev.kind == "usb-storage":
        if not (vm.config.usb or any(d.kind == "usb-storage" for d in vm.config.storage)):
            raise ConfigError.single("kind", "this machine has no USB controller: set usb: true in vm.yaml "
                                     "(takes effect at next start), or attach a virtio-blk or nvme disk")
    else:
        port = _free_port(vm)
        spec["bus"] = port
    try:
        await vm.execute("blockdev-add", blockdev_spec(node, dev.attachment))
    except QemuError as exc:  # the file or server given: bad input, not a failing QEMU
        field = "attachment.url" if isinstance(dev.attachment, NbdAttachment) else "attachment.path"
        raise ConfigError([Problem(field, f"QEMU cannot open it: {exc.message}")], context="disk") from None
    try:
        await vm.execute("device_add", spec)
    except QemuError:
        await vm.execute("blockdev-del", {"node-name": node})
        raise
    disk = HotDisk(node, dev, port)
    vm.hot_disks[node] = disk
    if isinstance(dev.attachment, NbdAttachment):
        vm.nbd.watch(node, dev.attachment)
    return disk


def _files_in_use(vm: HotplugMachine) -> dict[Path, str]:
    used = {}
    for i, d in enumerate(vm.config.storage):
        if isinstance(d.attachment, DiskImage):
            used[d.attachment.path.resolve()] = f"storage[{i}] (disk {device_id(i, d)})"
    for h in vm.hot_disks.values():
        if isinstance(h.device.attachment, DiskImage):
            used[h.device.attachment.path.resolve()] = f"hot-plugged disk {h.id}"
    return used


async def detach_disk(vm: HotplugMachine, disk_id: str, timeout: float = 30.0) -> None:
    """Detach a hot-plugged disk; the guest must release it within ``timeout`` seconds.

    On :class:`VmTimeoutError` the request stands: the disk is detached whenever the guest
    releases it, and calling this again waits for that (or returns at once if it happened).
    """
    disk = vm.hot_disks.get(disk_id)
    if disk is None:
        if disk_id in vm.detached_late:  # an earlier detach timed out, then the guest released it
            vm.detached_late.discard(disk_id)
            return
        boot = {device_id(i, d) for i, d in enumerate(vm.config.storage)}
        hint = ("it was attached at boot: remove it from vm.yaml and restart" if disk_id in boot
                else "see `vmkit disk list`")
        raise NotFoundError("hot-plugged disk", disk_id, hint=hint)
    released = vm.unplugs.get(disk_id)
    if released is None:  # not asked yet
        released = _unplugging(vm, disk_id)
        try:
            await vm.execute("device_del", {"id": f"{disk_id}-dev"})
        except QemuError as exc:
            if "not found" not in exc.message.lower():
                vm.unplugs.pop(disk_id, None)
                raise
            _finish_in_background(vm, disk_id)  # the device is already gone: free its backend
    try:
        await asyncio.wait_for(asyncio.shield(released), timeout)
    except TimeoutError:
        raise VmTimeoutError(
            f"the guest did not release {disk_id} within {timeout:.0f} s",
            hint="is the disk mounted or in use in the guest? The detach stands: the disk goes when the guest "
                 "releases it (`vmkit disk list` shows it as detaching); run the detach again to wait for it") from None
    vm.detached_late.discard(disk_id)


def device_deleted(vm: HotplugMachine, data: dict[str, Any]) -> None:
    """QEMU's ``DEVICE_DELETED`` event: if the device is a hot-plugged disk's, remove its backend
    and forget the disk (also when the guest released it after ``detach_disk`` gave up)."""
    device = data.get("device")
    if not isinstance(device, str) or not device.endswith("-dev"):
        return
    disk_id = device.removesuffix("-dev")
    if disk_id in vm.hot_disks:
        if disk_id not in vm.unplugs:
            _unplugging(vm, disk_id)
        _finish_in_background(vm, disk_id)


def _unplugging(vm: HotplugMachine, disk_id: str) -> asyncio.Future[None]:
    released: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    released.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody may be waiting any more
    vm.unplugs[disk_id] = released
    return released


def _finish_in_background(vm: HotplugMachine, disk_id: str) -> None:
    task = asyncio.ensure_future(_remove_backend(vm, disk_id))
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _remove_backend(vm: HotplugMachine, disk_id: str) -> None:
    released = vm.unplugs[disk_id]
    try:
        await vm.execute("blockdev-del", {"node-name": disk_id})
    except VmkitError as exc:
        log.error("the guest released %s but its backend could not be removed: %s", disk_id, exc)
        vm.unplugs.pop(disk_id, None)
        if not released.done():
            released.set_exception(exc)
        return
    vm.hot_disks.pop(disk_id, None)
    vm.nbd.unwatch(disk_id)
    vm.unplugs.pop(disk_id, None)
    vm.detached_late.add(disk_id)  # until a waiting detach_disk takes the news
    log.info("hot-plugged disk %s detached", disk_id)
    if not released.done():
        released.set_result(None)
