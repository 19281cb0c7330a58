"""Live migration on one QEMU: which method is safe here, the QMP that drives it, and a check that
the guest's memory arrived whole.

Safety: QEMU before 9.0 loses dirty pages of TCG guests (fixed by QEMU commit 03bfc2188f, "physmem:
Fix migration dirty bitmap coherency with TCG memory access"). Its dirty-bitmap sync has a fast path
for RAM blocks whose length is a multiple of 64 pages (256 KiB): it clears 64 dirty bits at a time
but does not reset TCG's TLB, so a vCPU that keeps a writable TLB entry for a page goes on writing it
without marking it dirty again, and the target gets the page as it was. This is not a race between
vCPU threads: one vCPU loses pages too (measured here with plain QMP, benchmarks/migrate_bench.py
--check: 1 vCPU 1 run of 6 bad, 2 vCPUs 3 of 3 in HOST-NOTES), and single-threaded TCG
(``thread=single``) keeps the stale TLB entries just the same. The slow path, taken for any other
length, clears page by page and resets the TLB for each page it clears, which is what the fix makes
the fast path do. So vmkit gives a TCG guest on such a QEMU 8 KiB more RAM than configured
(:func:`ram_pad`; QEMU rounds RAM to 8 KiB): its RAM block is no multiple of 64 pages, QEMU syncs it
the correct way, and live pre-copy is safe (:func:`live_safety` looks at the RAM blocks of the running
QEMU). A machine whose RAM block is aligned anyway (hot-pluggable virtio-mem memory, or one started by
an earlier vmkit) is copied with the guest paused instead (its downtime is the whole copy), unless the
user asks for live pre-copy, which is then verified page by page and redone paused if a page was lost.

The check (:func:`memory_digest`): once a migration has completed, the source is stopped with the
guest's final memory and the target has not run yet, so their RAM must be equal byte for byte.
Each side saves its RAM (``pmemsave``) and hashes every page; any page that differs is a page the
migration lost. This is QEMU's own migration-test check (tests/qtest/migration compares every page
of the area its guest dirtied) made independent of what the guest runs. One kind of difference is no
loss (:func:`compare_pages`): memory the guest reported free while the copy ran (virtio-balloon free
page reporting, in 2 MiB blocks) is discarded by the source's QEMU without being marked dirty, so it
reads as zeros on the source and as its old content on the target, where the guest no longer uses it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from vmkit.errors import QemuError
from vmkit.runtime.qemu.dirtysync import FIXED_IN as FIXED_IN
from vmkit.runtime.qemu.dirtysync import RAM_PAD as RAM_PAD
from vmkit.runtime.qemu.dirtysync import SYNC_WORD as SYNC_WORD
from vmkit.runtime.qemu.dirtysync import affected
from vmkit.runtime.qemu.dirtysync import config_ram_pad as config_ram_pad
from vmkit.runtime.qemu.dirtysync import host_qemu_version as host_qemu_version
from vmkit.runtime.qemu.dirtysync import parse_version as parse_version
from vmkit.runtime.qemu.dirtysync import ram_pad as ram_pad

if TYPE_CHECKING:
    import asyncio

    from vmkit.runtime.machine import VirtualMachine, VmEvent

PAGE = 4096
DIGEST_BYTES = 8
"""Bytes of each page's hash in a memory digest (a weighted sum of its words, see :func:`_hash_pages`)."""

Method = Literal["live", "paused"]
TERMINAL = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class Safety:
    """How a machine can be migrated from this host without corrupting it."""

    method: Method
    reason: str

    @property
    def live(self) -> bool:
        return self.method == "live"


def live_safety(accel: str, qemu_version: tuple[int, int, int] | None, ram_blocks: Sequence[int]) -> Safety:
    """Whether pre-copy while the guest runs is safe for a machine whose guest RAM blocks (memory
    backends) have these sizes in bytes, on this QEMU."""
    if accel != "tcg":
        return Safety("live", f"{accel.upper()} tracks dirty pages in the kernel: live pre-copy is safe")
    shown = ".".join(map(str, qemu_version)) if qemu_version else "unknown"
    if not affected(accel, qemu_version):
        return Safety("live", f"QEMU {shown} tracks the dirty pages of TCG vCPUs correctly: live pre-copy is safe")
    aligned = [size for size in ram_blocks if size % SYNC_WORD == 0]
    if ram_blocks and not aligned:
        return Safety("live", f"QEMU {shown} under TCG loses dirty pages only in RAM blocks of a multiple of "
                              f"{SYNC_WORD >> 10} KiB (fixed in QEMU 9.0) and this machine's RAM is {RAM_PAD >> 10} "
                              "KiB over one: live pre-copy is safe")
    what = ("hot-pluggable memory (virtio-mem)" if len(ram_blocks) > 1 else
            "RAM of a multiple of 256 KiB (started by an earlier vmkit: a restart pads it)")
    return Safety("paused", f"QEMU {shown} under TCG can lose the pages the guest dirties while they are copied "
                            f"(fixed in QEMU 9.0) in a machine with {what}: the guest is paused while its memory "
                            "is copied, so its downtime is the whole copy (--live: pre-copy, verified page by page)")


async def ram_blocks(vm: VirtualMachine) -> dict[str, int]:
    """The running machine's memory backends (``mem``: its RAM) and their sizes in bytes."""
    return {str(m.get("id", "")): int(m["size"]) for m in await vm.execute("query-memdev")}


async def machine_safety(vm: VirtualMachine) -> Safety:
    """:func:`live_safety` of a running machine: its accelerator, QEMU and RAM blocks as QEMU has them."""
    blocks = await ram_blocks(vm)
    return live_safety(vm.accel.name, parse_version(vm.qmp.qemu_version if vm.qmp else None), list(blocks.values()))


# -- QMP -----------------------------------------------------------------------------------------------
async def set_capabilities(vm: VirtualMachine, **caps: bool) -> None:
    """``migrate-set-capabilities`` (names with ``_`` for ``-``)."""
    await vm.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]})


async def set_parameters(vm: VirtualMachine, **params: Any) -> None:
    """``migrate-set-parameters`` (names with ``_`` for ``-``; None values left out)."""
    args = {k.replace("_", "-"): v for k, v in params.items() if v is not None}
    if args:
        await vm.execute("migrate-set-parameters", args)


async def query(vm: VirtualMachine) -> dict[str, Any]:
    """``query-migrate``: QEMU's whole account of the migration (``{}`` before any)."""
    info = await vm.execute("query-migrate")
    return dict(info) if isinstance(info, dict) else {}


async def wait_status_change(events: asyncio.Queue[VmEvent], timeout: float) -> None:
    """Wait until QEMU reports that the migration's status changed (its ``MIGRATION`` event, with the
    ``events`` capability on) or the machine's state did, or ``timeout`` seconds have passed.
    ``events``: a subscription of the machine (:meth:`VirtualMachine.subscribe`), opened before the
    status was last read, so no change between that read and this wait is missed."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            ev = await asyncio.wait_for(events.get(), left)
        except TimeoutError:
            return
        if ev.kind != "qmp" or ev.detail.get("event") == "MIGRATION":
            return


async def final_figures(vm: VirtualMachine, info: dict[str, Any], wait: float = 2.0) -> dict[str, Any]:
    """``query-migrate`` of a completed migration once QEMU has its final figures: QEMU 7.2 sets the
    status (and sends its MIGRATION event) a moment before it fills in ``total-time`` and
    ``downtime``, so a query at the event can find neither. Asked again every 10 ms for up to
    ``wait`` seconds; then as it is."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + wait
    while not info.get("total-time") and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
        info = await query(vm)
    return info


def progress_of(info: dict[str, Any]) -> dict[str, Any]:
    """The figures a user follows while it runs."""
    ram = info.get("ram") or {}
    return {
        "status": str(info.get("status", "none")),
        "rounds": int(ram.get("dirty-sync-count", 0)),
        "transferred_bytes": int(ram.get("transferred", 0)),
        "remaining_bytes": int(ram.get("remaining", 0)),
        "total_bytes": int(ram.get("total", 0)),
        "dirty_pages_rate": int(ram.get("dirty-pages-rate", 0)),
        "mbps": float(ram.get("mbps", 0.0)),
        "expected_downtime_ms": info.get("expected-downtime"),
        "throttle_percent": info.get("cpu-throttle-percentage"),
        "elapsed_ms": info.get("total-time"),
    }


TLS_DIR = "migration-tls"
"""The directory of an instance that holds a migration's TLS certificates while it runs (both hosts;
made by :mod:`vmkit.migrate.tls`)."""
TLS_ID = "vmkit-migration-tls"
"""The id of QEMU's ``tls-creds-x509`` object for the migration stream."""


async def add_tls(vm: VirtualMachine, directory: Path, *, server: bool) -> None:
    """QEMU's TLS credentials from ``directory`` (verify-peer) used by the migration stream."""
    await vm.execute("object-add", {"qom-type": "tls-creds-x509", "id": TLS_ID, "dir": str(directory),
                                    "endpoint": "server" if server else "client", "verify-peer": True})
    await vm.execute("migrate-set-parameters", {"tls-creds": TLS_ID})


async def drop_tls(vm: VirtualMachine) -> None:
    """Back to a plain migration stream: the parameter cleared, the credentials object deleted."""
    with contextlib.suppress(QemuError):
        await vm.execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
    with contextlib.suppress(QemuError):
        await vm.execute("object-del", {"id": TLS_ID})


ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}
"""QEMU's own announce timing after an incoming migration (ms; 5 rounds, 50 ms then 100 ms more each)."""


async def announce(vm: VirtualMachine) -> None:
    """``announce-self``: every NIC sends gratuitous RARP frames (virtio-net guests that support it
    send gratuitous ARP themselves), so the switches and bridges between hosts learn where its MAC
    is now. QEMU announces once when an incoming migration completes, while the guest is still
    paused here; this is the announce for the guest that now runs here."""
    await vm.execute("announce-self", dict(ANNOUNCE))


def tcp_uri(address: str, port: int) -> str:
    """QEMU's ``tcp:HOST:PORT`` (IPv6 in brackets)."""
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    return f"tcp:{host}:{port}"


URI_RE = re.compile(r"^tcp:(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):\d{1,5}$")


# -- the check -----------------------------------------------------------------------------------------
async def memory_digest(vm: VirtualMachine, scratch: Path) -> bytes:
    """A hash of every page of the stopped guest's RAM (``DIGEST_BYTES`` per page, in address order).

    The RAM is saved with ``pmemsave`` to ``scratch`` (0600, deleted afterwards). Guest RAM of up to
    2 GiB sits at guest-physical 0 on both of QEMU's x86 machines, so 0..memory is all of it."""
    import asyncio

    size = vm.config.memory
    if size > (2 << 30):
        raise QemuError(f"{vm.config.name}: the memory check covers guests of up to 2 GiB (this one has "
                        f"{size >> 20} MiB)")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    try:
        await vm.execute("pmemsave", {"val": 0, "size": size, "filename": str(scratch)}, timeout=600)
        return await asyncio.to_thread(_hash_pages, scratch)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)


_WEIGHTS_SEED = 0x766D6B6974
"""Seed of the per-word weights of the page hash (the same on every host)."""


def _hash_pages(path: Path) -> bytes:
    """Every page's hash (see :func:`page_hashes`) of the file ``path``."""
    with path.open("rb") as fh:
        return page_hashes(fh)


def page_hashes(fh: BinaryIO, size: int | None = None) -> bytes:
    """Every page's hash, ``DIGEST_BYTES`` each, of ``size`` bytes (all of it if None) read from ``fh``:
    the sum of its 64-bit words, each times a fixed odd random weight, modulo 2**64 (numpy, a few
    hundred MB/s even on a loaded host, where BLAKE2b per page in Python took a minute for 1 GiB). A
    changed word always changes the sum (an odd weight times a non-zero difference is non-zero modulo
    2**64); changes cancelling out need a linear relation of the weights, vanishingly unlikely for what
    a lost page looks like. Not for adversaries: both hosts are yours."""
    import numpy as np

    words = PAGE // 8
    weights = np.random.default_rng(_WEIGHTS_SEED).integers(0, 2**63, size=words, dtype=np.uint64) * np.uint64(2)
    weights += np.uint64(1)
    out = bytearray()
    left = size
    while left is None or left > 0:
        chunk = fh.read(PAGE * 4096 if left is None else min(PAGE * 4096, left))
        if not chunk:
            break
        if left is not None:
            left -= len(chunk)
        if len(chunk) % PAGE:
            chunk += bytes(PAGE - len(chunk) % PAGE)
        pages = np.frombuffer(chunk, dtype="<u8").reshape(-1, words)
        with np.errstate(over="ignore"):
            out += (pages * weights).sum(axis=1, dtype=np.uint64).astype("<u8").tobytes()
    return bytes(out)


def bad_pages(a: bytes, b: bytes) -> list[int]:
    """The page numbers whose hashes differ (pages only one side has count as different)."""
    d = DIGEST_BYTES
    return [i for i in range(max(len(a), len(b)) // d) if a[i * d:(i + 1) * d] != b[i * d:(i + 1) * d]]


REPORT_BLOCK_PAGES = 512
"""Pages in the smallest block a Linux guest reports free through virtio-balloon (``pageblock_order``:
2 MiB of 4 KiB pages)."""


@dataclass(frozen=True)
class PageComparison:
    """Where a migrated guest's memory differs between the source and the target (page numbers)."""

    lost: list[int]
    """Pages the target has wrong: the migration lost the guest's writes to them."""
    given_back: list[int]
    """Pages in whole 2 MiB blocks that read as zeros on the source: the guest reported them free
    (virtio-balloon free page reporting) while the copy ran, and the source's QEMU discarded them
    (``ram_block_discard_range``) without marking them dirty, so the target keeps what it was sent
    before. The guest holds nothing in a page it reported free (vmkit sets no page poisoning), so a
    difference there is no loss."""


def describe_pages(source: bytes, pages: list[int]) -> str:
    """What ``pages`` (page numbers) look like on the source, to tell a write the migration lost (the source has
    the guest's newer content) from a page the guest had freed (zeros there): how many are zeros on the source,
    and how many 2 MiB blocks they fall in."""
    d, zero = DIGEST_BYTES, bytes(DIGEST_BYTES)
    zeros = sum(source[p * d:(p + 1) * d] == zero for p in pages)
    blocks = len({p // REPORT_BLOCK_PAGES for p in pages})
    return f"{zeros} of them zeros on the source, in {blocks} 2 MiB block{'s' if blocks != 1 else ''}"


def compare_pages(source: bytes, target: bytes) -> PageComparison:
    """:func:`bad_pages` of a migration's two memory digests, split into lost and given back. A block
    counts as given back only if it is whole, aligned and every page of it is zero on the source:
    a write the migration lost would leave the source's newer content, and a guest that zeroed 2 MiB
    itself while a loss hit all of it is not what QEMU's dirty-tracking bug looks like (it loses
    single pages a vCPU keeps writing)."""
    differ = bad_pages(source, target)
    if not differ:
        return PageComparison([], [])
    d, zero = DIGEST_BYTES, bytes(DIGEST_BYTES)  # every weight times zero: a zero page hashes to 0
    pages = len(source) // d

    def freed(block: int) -> bool:
        first = block * REPORT_BLOCK_PAGES
        last = first + REPORT_BLOCK_PAGES
        return last <= pages and source[first * d:last * d] == zero * REPORT_BLOCK_PAGES

    blocks = {p // REPORT_BLOCK_PAGES for p in differ}
    given = {b for b in blocks if freed(b)}
    return PageComparison(lost=[p for p in differ if p // REPORT_BLOCK_PAGES not in given],
                          given_back=[p for p in differ if p // REPORT_BLOCK_PAGES in given])
