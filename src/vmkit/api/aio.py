"""The public Python client for asyncio programs: :class:`Client` and :class:`Instance`, the same
shape as :mod:`vmkit.api.client` (``vmkit.Client``) with every call awaitable::

    import vmkit.aio

    async def main() -> None:
        client = vmkit.aio.Client()
        web = await client.get("web")
        await web.start()
        result = await web.exec(["uname", "-a"])
        async for event in web.events():
            print(event.kind, event.state)

The operations run in worker threads (they wait on supervisors and files), so they never block
the event loop and several run at once; events come straight from the supervisor's stream.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from vmkit.api import client as sync
from vmkit.api import models
from vmkit.config import MachineConfig, PortForward


class Client:
    """The machines of one vmkit home (default: ``VMKIT_HOME``, else the XDG data directory)."""

    def __init__(self, home: str | Path | None = None) -> None:
        self._sync = sync.Client(home)

    @property
    def home(self) -> Path | None:
        return self._sync.home

    async def create(self, spec: str | MachineConfig | dict[str, Any], /, **options: Any) -> Instance:
        """As :meth:`vmkit.Client.create`."""
        return Instance(await asyncio.to_thread(self._sync.create, spec, **options))

    async def get(self, name: str) -> Instance:
        return Instance(await asyncio.to_thread(self._sync.get, name))

    async def list(self) -> list[Instance]:
        return [Instance(i) for i in await asyncio.to_thread(self._sync.list)]

    async def rows(self) -> builtins.list[models.InstanceRow]:
        return await asyncio.to_thread(self._sync.rows)

    async def delete(self, name: str, *, force: bool = False) -> None:
        await asyncio.to_thread(self._sync.delete, name, force=force)


class Instance:
    """A handle on one machine (see :class:`vmkit.Instance`); every method is a coroutine."""

    def __init__(self, handle: sync.Instance) -> None:
        self._sync = handle
        self.name = handle.name

    def __repr__(self) -> str:
        return f"<vmkit.aio.Instance {self.name}>"

    async def state(self) -> str:
        return (await asyncio.to_thread(self._sync.row)).state

    async def row(self) -> models.InstanceRow:
        return await asyncio.to_thread(self._sync.row)

    async def status(self) -> models.RuntimeStatus:
        return await asyncio.to_thread(self._sync.status)

    async def info(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._sync.info)

    async def start(self, *, timeout: float | None = None, cold: bool = False) -> models.StartResult:
        return await asyncio.to_thread(self._sync.start, timeout=timeout, cold=cold)

    async def stop(self, *, force: bool = False, save: bool = False, timeout: float = 30.0) -> models.RuntimeStatus:
        return await asyncio.to_thread(self._sync.stop, force=force, save=save, timeout=timeout)

    async def pause(self) -> models.RuntimeStatus:
        return await asyncio.to_thread(self._sync.pause)

    async def resume(self) -> models.ResumeResult:
        return await asyncio.to_thread(self._sync.resume)

    async def save(self, path: str | Path | None = None, *, keep_running: bool = False,
                   force: bool = False) -> models.SaveResult:
        return await asyncio.to_thread(self._sync.save, path, keep_running=keep_running, force=force)

    async def restore(self, path: str | Path | None = None, *, force: bool = False,
                      paused: bool = False) -> models.StartResult:
        return await asyncio.to_thread(self._sync.restore, path, force=force, paused=paused)

    async def delete(self, *, force: bool = False) -> None:
        await asyncio.to_thread(self._sync.delete, force=force)

    async def exec(self, argv: Sequence[str], *, stdin: bytes | None = None,
                   timeout: float = 60.0) -> models.ExecResult:
        return await asyncio.to_thread(self._sync.exec, argv, stdin=stdin, timeout=timeout)

    async def copy_in(self, local: str | Path, remote: str) -> int:
        return await asyncio.to_thread(self._sync.copy_in, local, remote)

    async def copy_out(self, remote: str, local: str | Path) -> int:
        return await asyncio.to_thread(self._sync.copy_out, remote, local)

    async def console_log(self) -> str:
        return await asyncio.to_thread(self._sync.console_log)

    async def ports(self) -> list[PortForward]:
        return await asyncio.to_thread(lambda: self._sync.ports)

    async def add_port(self, spec: str) -> PortForward:
        return await asyncio.to_thread(self._sync.add_port, spec)

    async def disks(self) -> list[models.DiskRow]:
        return await asyncio.to_thread(lambda: self._sync.disks)

    async def attach_disk(self, spec: str, *, disk_id: str | None = None) -> models.DiskAttached:
        return await asyncio.to_thread(self._sync.attach_disk, spec, disk_id=disk_id)

    async def detach_disk(self, disk_id: str, *, timeout: float = 30.0) -> None:
        await asyncio.to_thread(self._sync.detach_disk, disk_id, timeout=timeout)

    async def snapshots(self) -> list[models.SnapshotInfo]:
        return await asyncio.to_thread(lambda: self._sync.snapshots)

    async def snapshot(self, tag: str | None = None) -> models.SnapshotInfo:
        return await asyncio.to_thread(self._sync.snapshot, tag)

    async def revert(self, tag: str) -> models.StartResult:
        return await asyncio.to_thread(self._sync.revert, tag)

    async def delete_snapshot(self, tag: str) -> None:
        await asyncio.to_thread(self._sync.delete_snapshot, tag)

    async def events(self) -> AsyncIterator[models.Event]:
        """The machine's events as they happen, straight from its supervisor's stream."""
        from vmkit import control, paths

        def supervisor() -> Any:
            with paths.using_home(self._sync.client.home):
                return control.client(self.name)

        api = await asyncio.to_thread(supervisor)
        async for item in api.events():
            yield models.Event.model_validate(item)
