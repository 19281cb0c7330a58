"""Kernel same-page merging (KSM) on this host: ``vmkit host ksm on|off|status``.

KSM is host-wide: the kernel's ``ksmd`` scans the memory that programs marked mergeable (QEMU marks
guest RAM so unless a machine says ``memory_merge: false``, ``-machine mem-merge=off``) and keeps one
copy of identical pages. Its knobs are files in ``/sys/kernel/mm/ksm`` (writing them needs root);
every function here takes that directory as ``root`` so it can be tested against a fake one.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from vmkit.errors import ConfigError, HostError

SYSFS = Path("/sys/kernel/mm/ksm")
PAGES_TO_SCAN = 500
"""Pages ksmd scans per wake-up when ``vmkit host ksm on`` is not told otherwise (the kernel's default
is 100: slow for guests of a few GiB; Proxmox's ksmtuned goes up to 1250). Measured with
``benchmarks/density_bench.py`` (3 idle 1 GiB Debian guests): 500 merged all it could (42 % of their
RAM) within 60 s for about 7 % of one core; 5000 did it within 30 s but ksmd then kept 25-45 % of a
core busy rescanning."""
SLEEP_MILLISECS = 20
"""Milliseconds ksmd sleeps between scans (the kernel's default)."""
SMART_SCAN = False
"""``smart_scan`` when ``vmkit host ksm on`` is not told otherwise: off. Kernels since 6.7 skip pages
that did not merge in earlier scans for more and more scans (``smart_scan=1``, their default); idle
guests' identical pages then waited minutes to merge, or did not merge at all in a 15-minute run
(measured with micro guests here: two merged nothing in 2 minutes with it, 60 of their 80 MiB each
within a minute without it). The saving in ksmd's CPU matters less for guests than the merging."""
RUN_STOP, RUN_MERGE, RUN_UNMERGE = 0, 1, 2
"""The values of ``run``: stop merging (merged pages stay merged), merge, unmerge everything and stop."""


@dataclass(frozen=True)
class KsmStatus:
    """KSM's settings and what it achieved (``saved_bytes``: pages_sharing * page size, host-wide)."""

    run: int
    pages_to_scan: int
    sleep_millisecs: int
    pages_shared: int
    pages_sharing: int
    page_size: int
    smart_scan: int | None = None
    """1: the kernel skips pages that did not merge before (6.7+); None: this kernel has no such knob."""

    @property
    def saved_bytes(self) -> int:
        return self.pages_sharing * self.page_size

    @property
    def mode(self) -> str:
        return {RUN_STOP: "off", RUN_MERGE: "on", RUN_UNMERGE: "unmerging"}.get(self.run, str(self.run))

    def to_dict(self) -> dict[str, int | str]:
        return {**asdict(self), "mode": self.mode, "saved_bytes": self.saved_bytes}


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def _require(root: Path) -> None:
    if not (root / "run").is_file():
        raise HostError(f"this kernel has no KSM ({root}/run does not exist)",
                        hint="KSM needs a kernel built with CONFIG_KSM (Debian's has it)")


def _read(root: Path, name: str) -> int:
    try:
        return int((root / name).read_text().strip())
    except FileNotFoundError:
        return 0  # an older kernel without this counter
    except PermissionError:
        raise HostError(f"cannot read {root / name}: permission denied") from None


def status(root: Path = SYSFS) -> KsmStatus:
    _require(root)
    return KsmStatus(run=_read(root, "run"), pages_to_scan=_read(root, "pages_to_scan"),
                     sleep_millisecs=_read(root, "sleep_millisecs"), pages_shared=_read(root, "pages_shared"),
                     pages_sharing=_read(root, "pages_sharing"), page_size=page_size(),
                     smart_scan=_read(root, "smart_scan") if (root / "smart_scan").is_file() else None)


def shared_bytes(root: Path = SYSFS) -> int | None:
    """Memory KSM saves on the whole host now (pages_sharing * page size); None without KSM."""
    if not (root / "pages_sharing").is_file():
        return None
    return _read(root, "pages_sharing") * page_size()


def _write(root: Path, name: str, value: int) -> None:
    try:
        (root / name).write_text(f"{value}\n")
    except PermissionError:
        raise HostError(f"cannot change KSM's {name}: writing {root / name} needs root",
                        hint="run `vmkit host ksm` as root (e.g. with sudo)") from None
    except OSError as exc:
        raise HostError(f"the kernel refused {name}={value} for KSM: {exc.strerror}") from None


def enable(root: Path = SYSFS, *, pages_to_scan: int = PAGES_TO_SCAN,
           sleep_millisecs: int = SLEEP_MILLISECS, smart_scan: bool = SMART_SCAN) -> KsmStatus:
    """Start merging with these settings (``smart_scan`` only where the kernel has the knob)."""
    if not 1 <= pages_to_scan <= 1_000_000:
        raise ConfigError.single("--pages-to-scan", f"{pages_to_scan} is out of range: give 1 to 1000000")
    if not 0 <= sleep_millisecs <= 60_000:
        raise ConfigError.single("--sleep-millisecs", f"{sleep_millisecs} is out of range: give 0 to 60000")
    _require(root)
    _write(root, "pages_to_scan", pages_to_scan)
    _write(root, "sleep_millisecs", sleep_millisecs)
    if (root / "smart_scan").is_file():
        _write(root, "smart_scan", int(smart_scan))
    _write(root, "run", RUN_MERGE)
    return status(root)


def disable(root: Path = SYSFS, *, unmerge: bool = False) -> KsmStatus:
    """Stop merging (``run=0``: pages merged so far stay merged), or with ``unmerge`` also give every
    merged page its own copy again (``run=2``: memory use goes up by the saved bytes)."""
    _require(root)
    _write(root, "run", RUN_UNMERGE if unmerge else RUN_STOP)
    return status(root)
