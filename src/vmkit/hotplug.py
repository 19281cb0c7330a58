"""Attaching disks to, and detaching them from, a running machine.

``attach_disk`` adds the backend (QMP ``blockdev-add``) and then the guest device
(``device_add``): PCI kinds (virtio-blk, nvme) go into a free PCIe root port (the
``hotplug_slots`` of the configuration, q35), USB disks onto the xHCI controller
(``usb: true`` or a USB disk at boot). ``detach_disk`` asks the guest to release the
device (``device_del``), waits for QEMU's ``DEVICE_DELETED`` event (the guest's PCIe
hot-plug driver takes about five seconds: the attention-button delay), then removes the
backend (``blockdev-del``).

Hot-plugged disks live only as long as the running machine; the instance's ``vm.yaml`` is
not changed (``vmkit disk attach`` says so).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmkit.config import NbdAttachment, StorageDevice
from vmkit.errors import ConfigError, NotFoundError, QemuError, VmTimeoutError
from vmkit.qemu.cmdline import blockdev_spec, device_id, device_spec

if TYPE_CHECKING:
    from vmkit.machine import VirtualMachine


@dataclass(frozen=True)
class HotDisk:
    id: str
    device: StorageDevice
    port: str | None  # the PCIe root port it occupies


def _used_ids(vm: VirtualMachine) -> set[str]:
    boot = {device_id(i, d) for i, d in enumerate(vm.config.storage)}
    return boot | set(vm.hot_disks)


def _free_port(vm: VirtualMachine) -> str:
    if vm.config.machine != "q35":
        raise ConfigError.single("machine", "hot-plugging PCI disks needs machine: q35 (PCIe root ports)")
    taken = {d.port for d in vm.hot_disks.values()}
    for i in range(vm.config.hotplug_slots):
        if f"hotplug{i}" not in taken:
            return f"hotplug{i}"
    raise ConfigError.single("hotplug_slots", f"all {vm.config.hotplug_slots} hot-plug slots are in use: "
                             "detach a disk, or raise hotplug_slots in vm.yaml (takes effect at next start)")


def disk_table(vm: VirtualMachine) -> list[dict[str, object]]:
    """Every disk of the running machine: id, kind, what it is attached to, how, and its state."""
    rows: list[dict[str, object]] = []
    entries = [(device_id(i, d), d, "boot") for i, d in enumerate(vm.config.storage)]
    entries += [(h.id, h.device, "hot-plugged") for h in vm.hot_disks.values()]
    for node, dev, origin in entries:
        att = dev.attachment
        target = att.url if isinstance(att, NbdAttachment) else str(att.path)
        watched = vm.nbd.disks.get(node)
        rows.append({"id": node, "kind": dev.kind, "attachment": att.type, "target": target,
                     "read_only": att.read_only, "origin": origin,
                     "state": watched.state if watched else "attached"})
    return rows


async def attach_disk(vm: VirtualMachine, dev: StorageDevice) -> HotDisk:
    """Attach ``dev`` to the running machine; returns its id (for ``detach_disk``)."""
    used = _used_ids(vm)
    node = dev.id or next(f"disk{i}" for i in range(len(used) + 1) if f"disk{i}" not in used)
    if node in used:
        raise ConfigError.single("id", f"{node!r} is already a disk of this machine: pick another id")
    port = None
    spec = device_spec(node, dev)
    if dev.kind == "usb-storage":
        if not (vm.config.usb or any(d.kind == "usb-storage" for d in vm.config.storage)):
            raise ConfigError.single("kind", "this machine has no USB controller: set usb: true in vm.yaml "
                                     "(takes effect at next start), or attach a virtio-blk or nvme disk")
    else:
        port = _free_port(vm)
        spec["bus"] = port
    await vm.execute("blockdev-add", blockdev_spec(node, dev.attachment))
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


async def detach_disk(vm: VirtualMachine, disk_id: str, timeout: float = 30.0) -> None:
    """Detach a hot-plugged disk; the guest must release it within ``timeout`` seconds."""
    disk = vm.hot_disks.get(disk_id)
    if disk is None:
        boot = {device_id(i, d) for i, d in enumerate(vm.config.storage)}
        hint = ("it was attached at boot: remove it from vm.yaml and restart" if disk_id in boot
                else "see `vmkit disk list`")
        raise NotFoundError("hot-plugged disk", disk_id, hint=hint)
    async with vm.subscribe() as events:
        await vm.execute("device_del", {"id": f"{disk_id}-dev"})

        async def deleted() -> None:
            while True:
                ev = await events.get()
                if (ev.kind == "qmp" and ev.detail.get("event") == "DEVICE_DELETED"
                        and ev.detail.get("data", {}).get("device") == f"{disk_id}-dev"):
                    return

        try:
            await asyncio.wait_for(deleted(), timeout)
        except TimeoutError:
            raise VmTimeoutError(f"the guest did not release {disk_id} within {timeout:.0f} s",
                                 hint="is the disk mounted or in use in the guest?") from None
    await vm.execute("blockdev-del", {"node-name": disk_id})
    del vm.hot_disks[disk_id]
    vm.nbd.unwatch(disk_id)
