"""NBD attachments under a running machine: connection state and the pause-on-loss policy.

QEMU's NBD client retries a lost server for ``reconnect-delay`` seconds, stalling I/O, then
fails the request. With ``on_error: pause`` the device has ``werror=stop,rerror=stop``, so
QEMU emits ``BLOCK_IO_ERROR`` (action ``stop``) and stops the guest with status
``io-error``. The watcher turns that into connection events and brings the guest back:

* ``connected``: at start, for every NBD attachment;
* ``disconnected``: the first I/O error of an attachment (the guest is paused by QEMU);
* ``reconnected``: the server answers again, ``cont`` was sent and the guest kept running;
* ``failed``: the server did not come back within ``give_up_after`` seconds (the guest
  stays paused; ``vmkit resume`` retries by hand), or an attachment with ``on_error:
  report`` passed an error to the guest.

QEMU has no event for "the server is back", so the watcher probes the server's address
(a connect that reads the NBD greeting) with a backoff, only while a disk is disconnected.
After ``cont`` QEMU may stop again for a few seconds until its reconnect settles (measured
on 7.2), so resuming retries until the guest stays running for ``settle`` seconds.
``BLOCK_IO_ERROR`` floods (over a thousand events in 20 s with ``report``) are coalesced:
at most one ``qmp`` event per device per second reaches subscribers, with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmkit.config import MachineConfig, NbdAttachment, NbdServerAddress, parse_nbd_url
from vmkit.runtime.qemu.cmdline import device_id
from vmkit.runtime.states import VmState


class WatchedMachine(Protocol):
    """What the watcher needs of its machine (:class:`vmkit.runtime.machine.VirtualMachine`, which owns it)."""

    @property
    def config(self) -> MachineConfig: ...

    @property
    def state(self) -> VmState: ...

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...

log = logging.getLogger(__name__)

NBD_MAGIC = b"NBDMAGIC"


async def server_answers(addr: NbdServerAddress, timeout: float = 1.0) -> bool:
    """True when an NBD server at ``addr`` accepts a connection and sends its greeting."""
    try:
        if addr.unix_path:
            conn = asyncio.open_unix_connection(addr.unix_path)
        else:
            conn = asyncio.open_connection(addr.host, addr.port, family=socket.AF_UNSPEC)
        reader, writer = await asyncio.wait_for(conn, timeout)
    except (OSError, TimeoutError):
        return False
    try:
        greeting = await asyncio.wait_for(reader.readexactly(8), timeout)
        return greeting == NBD_MAGIC
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


@dataclass
class _Disk:
    node: str
    attachment: NbdAttachment
    address: NbdServerAddress
    state: str = "connected"
    errors: int = 0
    last_error_event: float = 0.0
    suppressed: int = 0
    since: float = field(default_factory=time.monotonic)


class NbdWatcher:
    def __init__(self, vm: WatchedMachine, emit: Callable[..., None], *, give_up_after: float = 600.0,
                 settle: float = 3.0) -> None:
        self.vm = vm
        self._emit = emit
        self.give_up_after = give_up_after
        self.settle = settle
        self.disks: dict[str, _Disk] = {}
        for i, dev in enumerate(vm.config.storage):
            if isinstance(dev.attachment, NbdAttachment):
                node = device_id(i, dev)
                self.disks[node] = _Disk(node, dev.attachment, parse_nbd_url(dev.attachment.url))
        self._recovery: asyncio.Task[None] | None = None

    def watch(self, node: str, attachment: NbdAttachment) -> None:
        """Follow a disk attached while running."""
        self.disks[node] = _Disk(node, attachment, parse_nbd_url(attachment.url))
        self._emit("nbd", device=node, state="connected", url=attachment.url)

    def unwatch(self, node: str) -> None:
        self.disks.pop(node, None)

    def __bool__(self) -> bool:
        return bool(self.disks)

    def started(self) -> None:
        for disk in self.disks.values():
            self._emit("nbd", device=disk.node, state="connected", url=disk.attachment.url)

    def on_qmp_event(self, name: str, data: dict[str, Any]) -> bool:
        """Handle a QMP event; returns False when it should not be passed on (flood control)."""
        if name != "BLOCK_IO_ERROR":
            return True
        disk = self.disks.get(str(data.get("node-name") or data.get("device") or ""))
        if disk is None:
            return True
        disk.errors += 1
        now = time.monotonic()
        if disk.state == "connected":
            disk.state = "disconnected"
            disk.since = now
            self._emit("nbd", device=disk.node, state="disconnected", url=disk.attachment.url,
                       operation=data.get("operation"), reason=data.get("reason"))
            if disk.attachment.on_error == "pause":
                self._start_recovery()
            else:
                disk.state = "failed"
                self._emit("nbd", device=disk.node, state="failed", url=disk.attachment.url,
                           reason="I/O error reported to the guest (on_error: report)")
        if now - disk.last_error_event < 1.0:
            disk.suppressed += 1
            return False
        if disk.suppressed:
            data["suppressed"] = disk.suppressed
            disk.suppressed = 0
        disk.last_error_event = now
        return True

    def _start_recovery(self) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover(), name="vmkit-nbd-recover")

    async def _recover(self) -> None:
        from vmkit.errors import QemuError

        delay = 0.2
        deadline = time.monotonic() + self.give_up_after
        while True:
            down = [d for d in self.disks.values() if d.state == "disconnected"]
            if not down:
                return
            if time.monotonic() > deadline:
                for d in down:
                    d.state = "failed"
                    self._emit("nbd", device=d.node, state="failed", url=d.attachment.url,
                               reason=f"the server did not come back within {self.give_up_after:.0f} s")
                return
            answers = [await server_answers(d.address) for d in down]
            if not all(answers):
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 2.0)
                continue
            # every lost server answers again: resume, and make sure it stays resumed
            if self.vm.state == VmState.PAUSED:
                with contextlib.suppress(QemuError):
                    await self.vm.execute("cont")
            try:
                await asyncio.sleep(self.settle)
            except asyncio.CancelledError:
                return
            if self.vm.state == VmState.RUNNING:
                for d in down:
                    d.state = "connected"
                    self._emit("nbd", device=d.node, state="reconnected", url=d.attachment.url,
                               outage=round(time.monotonic() - d.since, 1), errors=d.errors)
                return
            delay = 0.5  # QEMU stopped again while its reconnect settles: try again

    def close(self) -> None:
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
