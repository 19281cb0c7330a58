"""QEMU's dirty-page tracking of TCG guests before 9.0, and the RAM size that keeps it correct.

QEMU before 9.0 (commit 03bfc2188f fixed it) syncs the dirty bitmap of a RAM block whose length is
a multiple of 64 pages 64 bits at a time without resetting TCG's TLB, so writes through a stale
writable TLB entry are not marked dirty again and a migration loses them; any other length is
synced page by page with the TLB reset. :func:`ram_pad` is what vmkit adds to a guest's RAM so that
its block takes the correct path (see :mod:`vmkit.runtime.migration`).
"""

from __future__ import annotations

import functools
import re
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmkit.config import MachineConfig

PAGE = 4096
FIXED_IN = (9, 0, 0)
"""The first QEMU whose TCG dirty tracking is correct in every RAM block (commit 03bfc2188f)."""
SYNC_WORD = 64 * PAGE
"""QEMU before 9.0 syncs a RAM block whose length is a multiple of this 64 dirty bits at a time,
leaving TCG's TLB stale (the bug)."""
RAM_PAD = 8 << 10
"""What :func:`ram_pad` adds to a TCG guest's RAM on such a QEMU (QEMU rounds RAM up to 8 KiB)."""


def parse_version(text: str | None) -> tuple[int, int, int] | None:
    """``"7.2.22"`` (or QEMU's ``--version`` text) as (7, 2, 22)."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def affected(accel: str, qemu_version: tuple[int, int, int] | None) -> bool:
    """Whether this QEMU loses TCG dirty pages in RAM blocks of a multiple of 64 pages (an unknown
    version counts as affected)."""
    return accel == "tcg" and (qemu_version is None or qemu_version < FIXED_IN)


def ram_pad(accel: str, qemu_version: tuple[int, int, int] | None, *, hotplug_memory: bool = False) -> int:
    """Bytes to add to a machine's RAM so that QEMU tracks its dirty pages correctly (0 where it
    does anyway). 0 with hot-pluggable memory: its virtio-mem backend has a multiple of its block
    size whatever the main RAM is, so such a machine is copied paused on an affected QEMU."""
    return RAM_PAD if affected(accel, qemu_version) and not hotplug_memory else 0


@functools.lru_cache(maxsize=8)
def host_qemu_version(binary: str = "qemu-system-x86_64") -> tuple[int, int, int] | None:
    """The installed QEMU's version (None if it cannot be run; asked once per process)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(out)


def config_ram_pad(config: MachineConfig, accel: str, binary: str | None = None) -> int:
    """:func:`ram_pad` for ``config`` on this host's QEMU (``binary``, else the one that runs its
    architecture)."""
    from vmkit.runtime.qemu.cmdline import QEMU_BINARY  # cmdline's Runtime refers to this module

    return ram_pad(accel, host_qemu_version(binary or QEMU_BINARY[config.arch]),
                   hotplug_memory=config.max_memory is not None)
