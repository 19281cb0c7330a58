"""Memory plugged into and unplugged from a running machine (virtio-mem).

A machine with ``max_memory`` boots with ``memory`` and a virtio-mem device over a region of
``max_memory - memory`` (see :func:`vmkit.runtime.qemu.cmdline.hotplug_memory_args`). The guest's
virtio-mem driver plugs as much of the region as the device's ``requested-size`` asks, in 2 MiB
blocks, and unplugs blocks when it shrinks, as far as it can move the data off them (memory onlined
as movable, as the debian-12 image's udev rule does, can almost always be emptied). QEMU reports the
plugged ``size`` as it changes with ``MEMORY_DEVICE_SIZE_CHANGE`` events (at most one a second per
device: the last one always arrives).

The memory balloon works on the boot memory only (QEMU's balloon target leaves virtio-mem out), so
the guest's usable memory is ``memory + plugged - (memory - balloon actual)``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from vmkit.config import VMEM_BLOCK, MachineConfig, format_size
from vmkit.errors import ConfigError
from vmkit.runtime.machine import VirtualMachine
from vmkit.runtime.qemu.cmdline import VMEM_ID

VMEM_PATH = f"/machine/peripheral/{VMEM_ID}"


def check_memory(config: MachineConfig, total: int, *, field: str = "memory") -> int:
    """The size to request from the virtio-mem device (``total`` - boot memory) if a machine made from
    ``config`` can have ``total`` bytes of memory, else a :class:`ConfigError` naming ``field``."""
    if config.max_memory is None:
        raise ConfigError.single(field, f"{config.name} has no memory hot-plug region (no max_memory in its "
                                 "vm.yaml): set max_memory (e.g. vmkit create --max-memory 4G) and start it again; "
                                 "--balloon lowers its memory without one")
    if total < config.memory:
        raise ConfigError.single(field, f"{format_size(total)} is less than the memory {config.name} booted with "
                                 f"({format_size(config.memory)}), which cannot be unplugged: give at least that "
                                 "(--balloon takes memory from a guest below it)")
    if total > config.max_memory:
        raise ConfigError.single(field, f"{format_size(total)} is more than {config.name}'s max_memory "
                                 f"({format_size(config.max_memory)}): give at most that, or raise max_memory "
                                 "in its vm.yaml and start it again")
    if (total - config.memory) % VMEM_BLOCK:
        raise ConfigError.single(field, f"{total} bytes is not a whole number of 2M blocks above the boot memory "
                                 f"({format_size(config.memory)}): memory is plugged 2M at a time, e.g. "
                                 f"{format_size(config.memory + (total - config.memory) // VMEM_BLOCK * VMEM_BLOCK)}")
    problems = config.limits.problems(total, prefix="")
    if config.limits.memory_min is not None and total < config.limits.memory_min:
        raise ConfigError.single(field, f"{format_size(total)} is below {config.name}'s memory reservation "
                                 f"(limits.memory_min {format_size(config.limits.memory_min)}): lower the "
                                 "reservation first (vmkit set --memory-min), or give at least that")
    if problems:  # a cgroup memory_max the bigger guest could not run under
        raise ConfigError.single(field, f"{format_size(total)} does not fit {config.name}'s limits: "
                                 f"{problems[-1].message} (raise it first with vmkit set --memory-max)")
    return total - config.memory


@dataclass(frozen=True)
class PluggedMemory:
    requested: int
    """What the device asks the guest to plug."""
    plugged: int
    """What the guest has plugged (``size``)."""


async def plugged(vm: VirtualMachine) -> PluggedMemory:
    """The virtio-mem device's requested and plugged sizes now."""
    size, requested = await asyncio.gather(
        vm.execute("qom-get", {"path": VMEM_PATH, "property": "size"}),
        vm.execute("qom-get", {"path": VMEM_PATH, "property": "requested-size"}))
    return PluggedMemory(int(requested), int(size))


async def set_plugged(vm: VirtualMachine, requested: int, *, timeout: float = 10.0) -> PluggedMemory:
    """Ask the guest to have ``requested`` bytes plugged and wait up to ``timeout`` s for it to get there;
    returns where it got (a guest may stop short when shrinking: what it still uses stays plugged)."""
    async with vm.subscribe() as events:
        await vm.execute("qom-set", {"path": VMEM_PATH, "property": "requested-size", "value": requested})
        deadline = time.monotonic() + timeout
        while True:
            now = await plugged(vm)
            left = deadline - time.monotonic()
            if now.plugged == requested or left <= 0:
                return now
            await _size_changed(events, min(left, 1.5))  # a missed or merged event costs at most this


async def _size_changed(events: asyncio.Queue[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            ev = await asyncio.wait_for(events.get(), left)
        except TimeoutError:
            return
        if ev.kind == "qmp" and ev.detail.get("event") == "MEMORY_DEVICE_SIZE_CHANGE":
            return
        if ev.kind in ("guest-stopped", "stopped-with-error", "events-dropped"):
            return
