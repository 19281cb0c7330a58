"""The memory balloon of a running machine, and what the host sees of its QEMU process.

The balloon (``-device virtio-balloon-pci,id=balloon0``, see :func:`vmkit.runtime.qemu.cmdline.balloon_args`)
moves the guest's usable memory live: QMP ``balloon`` sets the target, the guest driver inflates or
deflates towards it and QEMU reports each step as a ``BALLOON_CHANGE`` event. The driver also
reports the guest's memory statistics every :data:`STATS_POLL_SECONDS` (``guest-stats`` on the
device, switched on by :func:`enable_stats` once QEMU runs).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

from vmkit.config import BALLOON_FLOOR, MachineConfig, format_size
from vmkit.errors import ConfigError
from vmkit.runtime.qemu.cmdline import BALLOON_ID


class Qmp(Protocol):
    """What the balloon needs: QMP (a :class:`vmkit.runtime.machine.VirtualMachine` or its
    :class:`vmkit.runtime.qemu.monitor.Monitor`)."""

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = ...) -> Any: ...


BALLOON_PATH = f"/machine/peripheral/{BALLOON_ID}"
STATS_POLL_SECONDS = 2
"""How often the guest driver reports its memory statistics."""
MIN_TARGET = BALLOON_FLOOR
"""The smallest balloon target accepted: below it a Linux guest is likely to stall or run out of memory."""
CLOSE_ENOUGH = 1 << 20
"""A balloon within this many bytes of its target has reached it (the guest moves whole pages)."""
_UNSET = 1 << 63
"""QEMU fills a statistic the guest has not reported with all ones (as an unsigned 64-bit number)."""


def check_target(config: MachineConfig, target: int, *, field: str = "target") -> int:
    """``target`` if the balloon of a machine made from ``config`` can be set to it, else a
    :class:`ConfigError` naming ``field`` (or ``balloon`` when the machine has none)."""
    if not config.balloon:
        raise ConfigError.single("balloon", f"{config.name} has no memory balloon (balloon: false in its "
                                 "vm.yaml): set balloon: true and start it again")
    if target > config.memory:
        raise ConfigError.single(field, f"{format_size(target)} is more than the machine's memory "
                                 f"({format_size(config.memory)}): the balloon can only give back memory the "
                                 "guest was booted with (give at most that)")
    if target < MIN_TARGET:
        raise ConfigError.single(field, f"{format_size(target)} is too little for the guest: give at least "
                                 f"{format_size(MIN_TARGET)}")
    return target


async def enable_stats(vm: Qmp) -> None:
    """Ask QEMU to poll the guest driver's memory statistics every :data:`STATS_POLL_SECONDS`."""
    await vm.execute("qom-set", {"path": BALLOON_PATH, "property": "guest-stats-polling-interval",
                                 "value": STATS_POLL_SECONDS})


async def actual(vm: Qmp, memory: int) -> int:
    """The guest's usable memory now (QMP ``query-balloon``), in bytes, at most ``memory`` (the
    machine's configured memory: QEMU counts the few KiB a TCG guest's RAM gets over it for safe
    migration, :mod:`vmkit.runtime.qemu.dirtysync`, which are not the user's to see)."""
    reply = await vm.execute("query-balloon")
    return min(int(reply["actual"]), memory)


async def set_target(vm: Qmp, target: int, *, memory: int, timeout: float) -> int:
    """Set the balloon to ``target`` bytes and wait up to ``timeout`` s for the guest to get there;
    returns the size it reached (the guest may stop short, or not run its driver; see :func:`actual`)."""
    await vm.execute("balloon", {"value": target})
    deadline = time.monotonic() + timeout
    while True:
        now = await actual(vm, memory)
        if abs(now - target) < CLOSE_ENOUGH or time.monotonic() >= deadline:
            return now
        await asyncio.sleep(0.1)


@dataclass(frozen=True)
class GuestMemory:
    """What the guest driver last reported (None: not reported yet)."""

    total: int | None
    available: int | None


async def guest_memory(vm: Qmp) -> GuestMemory:
    reply: dict[str, Any] = await vm.execute("qom-get", {"path": BALLOON_PATH, "property": "guest-stats"})
    if not reply.get("last-update"):
        return GuestMemory(None, None)
    stats = reply.get("stats", {})

    def stat(name: str) -> int | None:
        value = stats.get(name)
        return None if value is None or value < 0 or value >= _UNSET else int(value)

    return GuestMemory(stat("stat-total-memory"), stat("stat-available-memory"))


# -- the QEMU process, as the host sees it ------------------------------------------------------------
def rss_bytes(pid: int, *, proc: str = "/proc") -> int:
    """Resident memory of process ``pid`` (``VmRSS``)."""
    with open(f"{proc}/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    return 0  # a zombie has no VmRSS


def ksm_merged_bytes(pid: int, *, proc: str = "/proc") -> int | None:
    """Memory of process ``pid`` that KSM has merged with identical pages (``ksm_merging_pages``,
    Linux 6.1 and later); None where the kernel does not say."""
    try:
        with open(f"{proc}/{pid}/ksm_merging_pages") as f:
            return int(f.read().strip()) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, ValueError):
        return None


def cpu_seconds(pid: int, *, proc: str = "/proc") -> float:
    """CPU time used by process ``pid`` (user + system, every thread), in seconds."""
    with open(f"{proc}/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU use of one process in percent of one core: since the previous reading, or over
    ``interval`` seconds when there is no recent one."""

    def __init__(self, interval: float = 0.25, stale: float = 60.0) -> None:
        self.interval = interval
        self.stale = stale
        self._last: tuple[int, float, float] | None = None  # pid, monotonic time, cpu seconds

    async def percent(self, pid: int) -> float:
        last = self._last
        if last is None or last[0] != pid or time.monotonic() - last[1] > self.stale:
            last = (pid, time.monotonic(), cpu_seconds(pid))
            await asyncio.sleep(self.interval)
        now = (pid, time.monotonic(), cpu_seconds(pid))
        self._last = now
        elapsed = now[1] - last[1]
        return round(100.0 * (now[2] - last[2]) / elapsed, 1) if elapsed > 0 else 0.0
