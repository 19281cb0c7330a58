"""The public Python client for asyncio programs: :class:`Client` and :class:`Instance`, the same
shape as :mod:`vmkit.client.sync` (``vmkit.Client``) with every call awaitable::

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
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkit.api import models
from vmkit.client import libvirt as libvirt_client
from vmkit.client import sync
from vmkit.client.sync import ByteProgress, ConsoleProgress, Notice, PullProgress

if TYPE_CHECKING:
    from vmkit.bench.fs import Job, Report, Settings, Step
    from vmkit.config import MachineConfig, PortForward


class Client:
    """The machines of one vmkit home (default: ``VMKIT_HOME``, else the XDG data directory).
    ``connect`` (a libvirt host) and ``host`` (another host's vmkit) as for :class:`vmkit.Client`: the
    same operations, refused by name where that kind of host has none."""

    def __init__(self, home: str | Path | None = None, connect: str | None = None, *,
                 host: str | None = None) -> None:
        self._sync = sync.Client(home, connect, host=host)

    @property
    def connect(self) -> str | None:
        """The libvirt host's URI (None: this host's vmkit, or ``host``)."""
        return getattr(self._sync, "connect", None)

    @property
    def home(self) -> Path | None:
        return self._sync.home

    async def images(self) -> builtins.list[models.ImageInfo]:
        return await asyncio.to_thread(self._sync.images)

    async def image(self, name: str) -> models.ImageInfo:
        return await asyncio.to_thread(self._sync.image, name)

    async def build_image(self, name: str, *, force: bool = False, arch: str = "x86_64",
                          progress: Callable[[str], None] | None = None) -> models.ImageInfo:
        """As :meth:`vmkit.Client.build_image` (``progress`` is called from a worker thread)."""
        return await asyncio.to_thread(self._sync.build_image, name, force=force, arch=arch, progress=progress)

    async def pull_image(self, source: str, *, sums_url: str | None = None, name: str | None = None,
                         force: bool = False, mirror: str | None = None,
                         progress: PullProgress | None = None) -> models.ImageInfo:
        """As :meth:`vmkit.Client.pull_image` (``progress`` is called from a worker thread)."""
        return await asyncio.to_thread(self._sync.pull_image, source, sums_url=sums_url, name=name, force=force,
                                       mirror=mirror, progress=progress)

    async def export_image(self, name: str, file: str | Path, *,
                           progress: Callable[[str], None] | None = None) -> models.ImageExported:
        return await asyncio.to_thread(self._sync.export_image, name, file, progress=progress)

    async def import_image(self, file: str | Path, *, name: str | None = None, force: bool = False,
                           progress: Callable[[str], None] | None = None) -> models.ImageInfo:
        return await asyncio.to_thread(self._sync.import_image, file, name=name, force=force, progress=progress)

    async def delete_image(self, name: str) -> None:
        await asyncio.to_thread(self._sync.delete_image, name)

    async def warm_image(self, image: str, *, memory: str | None = None, cpus: int | None = None,
                         rebuild: bool = False, progress: Callable[[str], None] | None = None,
                         ) -> tuple[models.WarmTemplate, bool]:
        """As :meth:`vmkit.Client.warm_image`."""
        return await asyncio.to_thread(self._sync.warm_image, image, memory=memory, cpus=cpus, rebuild=rebuild,
                                       progress=progress)

    async def create(self, spec: str | MachineConfig | dict[str, Any], /, **options: Any) -> Instance:
        """As :meth:`vmkit.Client.create`."""
        return Instance(await asyncio.to_thread(self._sync.create, spec, **options))

    async def get(self, name: str) -> Instance:
        return Instance(await asyncio.to_thread(self._sync.get, name))

    async def list(self) -> list[Instance]:
        return [Instance(i) for i in await asyncio.to_thread(self._sync.list)]

    async def rows(self) -> builtins.list[models.InstanceRow]:
        return await asyncio.to_thread(self._sync.rows)

    async def top(self, *, workers: int = 8) -> builtins.list[models.MachineTop]:
        """As :meth:`vmkit.Client.top`."""
        return await asyncio.to_thread(self._sync.top, workers=workers)

    async def delete(self, name: str, *, force: bool = False) -> None:
        await asyncio.to_thread(self._sync.delete, name, force=force)

    async def clone(self, src: str, dst: str, *, notice: Callable[[str], None] | None = None) -> Instance:
        return Instance(await asyncio.to_thread(self._sync.clone, src, dst, notice=notice))

    async def copy(self, src: str, dst: str) -> int:
        return await asyncio.to_thread(self._sync.copy, src, dst)

    async def create_network(self, name: str, *, subnet: str | None = None, mode: str = "nat",
                             domain: str | None = None) -> models.NetworkView:
        """As :meth:`vmkit.Client.create_network`."""
        return await asyncio.to_thread(self._sync.create_network, name, subnet=subnet, mode=mode, domain=domain)

    async def networks(self) -> builtins.list[models.NetworkView]:
        return await asyncio.to_thread(self._sync.networks)

    async def network(self, name: str) -> models.NetworkView:
        return await asyncio.to_thread(self._sync.network, name)

    async def delete_network(self, name: str, *, force: bool = False) -> models.NetworkDeleted:
        return await asyncio.to_thread(self._sync.delete_network, name, force=force)

    async def clean_networks(self) -> builtins.list[str]:
        return await asyncio.to_thread(self._sync.clean_networks)

    async def key_info(self) -> models.KeyInfo:
        return await asyncio.to_thread(self._sync.key_info)

    async def rotate_key(self, files: Sequence[str | Path] = ()) -> models.KeyRotation:
        return await asyncio.to_thread(self._sync.rotate_key, files)

    async def autoballoon_start(self, *, target_percent: float = 80.0, step: int | str = "100M",
                                interval: float = 5.0, meminfo: str | Path | None = None) -> models.AutoballoonStatus:
        return await asyncio.to_thread(self._sync.autoballoon_start, target_percent=target_percent, step=step,
                                       interval=interval, meminfo=meminfo)

    async def autoballoon_stop(self) -> models.AutoballoonStatus:
        return await asyncio.to_thread(self._sync.autoballoon_stop)

    async def autoballoon_status(self) -> models.AutoballoonStatus:
        return await asyncio.to_thread(self._sync.autoballoon_status)


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

    async def config(self) -> MachineConfig:
        return await asyncio.to_thread(lambda: self._sync.config)

    async def directory(self) -> Path:
        return await asyncio.to_thread(lambda: self._sync.directory)

    async def qemu_argv(self) -> list[str]:
        return await asyncio.to_thread(self._sync.qemu_argv)

    async def start(self, *, timeout: float | None = None, cold: bool = False, progress: ConsoleProgress | None = None,
                    state_progress: ByteProgress | None = None, notice: Notice | None = None) -> models.StartResult:
        """As :meth:`vmkit.Instance.start`; the callbacks run in a worker thread."""
        return await asyncio.to_thread(self._sync.start, timeout=timeout, cold=cold, progress=progress,
                                       state_progress=state_progress, notice=notice)

    async def stop(self, *, force: bool = False, save: bool = False, timeout: float = 30.0) -> models.RuntimeStatus:
        return await asyncio.to_thread(self._sync.stop, force=force, save=save, timeout=timeout)

    async def pause(self) -> models.RuntimeStatus:
        return await asyncio.to_thread(self._sync.pause)

    async def resume(self) -> models.ResumeResult:
        return await asyncio.to_thread(self._sync.resume)

    async def save(self, path: str | Path | None = None, *, keep_running: bool = False, force: bool = False,
                   progress: ByteProgress | None = None) -> models.SaveOutcome:
        return await asyncio.to_thread(self._sync.save, path, keep_running=keep_running, force=force,
                                       progress=progress)

    async def migrate(self, target: str, *, method: str = "auto", downtime_limit_ms: int | None = None,
                      bandwidth_bytes: int | None = None, auto_converge: bool = True, postcopy: bool = False,
                      max_rounds: int = 30, verify: bool = False, shared_storage: bool = False,
                      copy_storage: bool = False, on_event: Callable[[dict[str, Any]], None] | None = None
                      ) -> dict[str, Any]:
        return await asyncio.to_thread(
            self._sync.migrate, target, method=method, downtime_limit_ms=downtime_limit_ms,
            bandwidth_bytes=bandwidth_bytes, auto_converge=auto_converge, postcopy=postcopy, max_rounds=max_rounds,
            verify=verify, shared_storage=shared_storage, copy_storage=copy_storage, on_event=on_event)

    async def cancel_migration(self, *, force: bool = False) -> dict[str, Any]:
        return await asyncio.to_thread(self._sync.cancel_migration, force=force)

    async def move(self, target: str, *, on_event: Callable[[dict[str, Any]], None] | None = None
                   ) -> dict[str, Any]:
        return await asyncio.to_thread(self._sync.move, target, on_event=on_event)

    async def restore(self, path: str | Path | None = None, *, force: bool = False, paused: bool = False,
                      timeout: float | None = None, progress: ConsoleProgress | None = None,
                      state_progress: ByteProgress | None = None) -> models.StartResult:
        return await asyncio.to_thread(self._sync.restore, path, force=force, paused=paused, timeout=timeout,
                                       progress=progress, state_progress=state_progress)

    async def delete(self, *, force: bool = False) -> None:
        await asyncio.to_thread(self._sync.delete, force=force)

    async def clone(self, name: str, *, notice: Callable[[str], None] | None = None) -> Instance:
        return Instance(await asyncio.to_thread(self._sync.clone, name, notice=notice))

    async def exec(self, argv: Sequence[str], *, stdin: bytes | None = None,
                   timeout: float = 60.0) -> models.ExecResult:
        return await asyncio.to_thread(self._sync.exec, argv, stdin=stdin, timeout=timeout)

    async def copy_in(self, local: str | Path, remote: str) -> int:
        return await asyncio.to_thread(self._sync.copy_in, local, remote)

    async def copy_out(self, remote: str, local: str | Path) -> int:
        return await asyncio.to_thread(self._sync.copy_out, remote, local)

    async def ssh_argv(self, command: Sequence[str] = (), *, tty: bool = False) -> list[str]:
        return await asyncio.to_thread(self._sync.ssh_argv, command, tty=tty)

    async def ssh_config(self) -> str:
        return await asyncio.to_thread(self._sync.ssh_config)

    async def console_log(self) -> str:
        return await asyncio.to_thread(self._sync.console_log)

    async def console_bytes(self) -> bytes:
        return await asyncio.to_thread(self._sync.console_bytes)

    async def wait_console(self, pattern: str, *, timeout: float = 60.0) -> str:
        return await asyncio.to_thread(self._sync.wait_console, pattern, timeout=timeout)

    async def attach_console(self, input_fd: int, on_output: Callable[[bytes], None], *, detach: bytes | None = None,
                             on_connected: Callable[[], None] | None = None) -> None:
        """As :meth:`vmkit.Instance.attach_console` (the callbacks run in a worker thread)."""
        await asyncio.to_thread(self._sync.attach_console, input_fd, on_output, detach=detach,
                                on_connected=on_connected)

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

    async def set_balloon(self, size: int | str, *, timeout: float = 10.0) -> models.BalloonResult:
        return await asyncio.to_thread(self._sync.set_balloon, size, timeout=timeout)

    async def set_limits(self, **changes: int | str | None) -> models.LimitsResult:
        return await asyncio.to_thread(self._sync.set_limits, **changes)
    async def set_cpus(self, count: int, *, timeout: float = 30.0) -> models.CpusResult:
        return await asyncio.to_thread(self._sync.set_cpus, count, timeout=timeout)

    async def set_memory(self, size: int | str, *, timeout: float = 10.0) -> models.MemoryResult:
        return await asyncio.to_thread(self._sync.set_memory, size, timeout=timeout)

    async def set_balloon_policy(self, *, balloon_min: int | str | None = None,
                                 balloon_shares: int | None = None) -> MachineConfig:
        return await asyncio.to_thread(self._sync.set_balloon_policy, balloon_min=balloon_min,
                                       balloon_shares=balloon_shares)

    async def stats(self) -> models.MachineStats:
        return await asyncio.to_thread(self._sync.stats)

    async def screenshot(self, path: str | Path | None = None) -> bytes:
        return await asyncio.to_thread(self._sync.screenshot, path)

    async def send_keys(self, keys: Sequence[str], *, hold_ms: int = 50) -> models.KeysSent:
        return await asyncio.to_thread(self._sync.send_keys, keys, hold_ms=hold_ms)

    async def type(self, text: str, *, hold_ms: int = 50) -> models.KeysSent:
        return await asyncio.to_thread(self._sync.type, text, hold_ms=hold_ms)

    async def display(self) -> models.DisplayInfo:
        return await asyncio.to_thread(self._sync.display)

    async def resize_display(self, size: str, *, timeout: float = 10.0) -> models.DisplayResized:
        return await asyncio.to_thread(self._sync.resize_display, size, timeout=timeout)

    async def web_console(self, *, port: int = 0) -> models.WebConsole:
        return await asyncio.to_thread(self._sync.web_console, port=port)

    async def mounts(self) -> list[models.ShareRow]:
        return await asyncio.to_thread(lambda: self._sync.mounts)

    async def snapshots(self) -> list[models.SnapshotInfo]:
        return await asyncio.to_thread(lambda: self._sync.snapshots)

    async def snapshot(self, tag: str | None = None) -> models.SnapshotInfo:
        return await asyncio.to_thread(self._sync.snapshot, tag)

    async def revert(self, tag: str, *, timeout: float | None = None, progress: ConsoleProgress | None = None,
                     notice: Notice | None = None) -> models.StartResult:
        return await asyncio.to_thread(self._sync.revert, tag, timeout=timeout, progress=progress, notice=notice)

    async def delete_snapshot(self, tag: str) -> None:
        await asyncio.to_thread(self._sync.delete_snapshot, tag)

    async def bench_fs(self, jobs: Sequence[Job], settings: Settings, *, shares: Sequence[str] | None = None,
                       disk: bool = True, progress: Callable[[Step], None] | None = None) -> Report:
        return await asyncio.to_thread(self._sync.bench_fs, jobs, settings, shares=shares, disk=disk,
                                       progress=progress)

    async def write_bench_report(self, report: Report, json_path: str | Path | None = None,
                                 markdown_path: str | Path | None = None) -> builtins.list[Path]:
        return await asyncio.to_thread(self._sync.write_bench_report, report, json_path, markdown_path)

    async def events(self) -> AsyncIterator[models.Event]:
        """The machine's events as they happen, straight from its supervisor's stream (on a libvirt
        host: libvirt's domain events, read in a worker thread)."""
        from vmkit.backends.local import control
        from vmkit.host import paths

        if isinstance(self._sync, libvirt_client.LibvirtInstance):
            async for event in _libvirt_events(self._sync):
                yield event
            return

        def supervisor() -> Any:
            with paths.using_home(self._sync.client.home):
                return control.client(self.name)

        api = await asyncio.to_thread(supervisor)
        async for item in api.events():
            yield models.Event.model_validate(item)


async def _libvirt_events(handle: libvirt_client.LibvirtInstance) -> AsyncIterator[models.Event]:
    """libvirt's domain events of ``handle``, read by a thread of their own (libvirt's callbacks are
    synchronous) and handed to the event loop; leaving the loop stops that thread within half a second."""
    import contextlib
    import threading

    loop = asyncio.get_running_loop()
    items: asyncio.Queue[models.Event | BaseException | None] = asyncio.Queue()
    stop = threading.Event()

    def put(item: models.Event | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody reads any more
            loop.call_soon_threadsafe(items.put_nowait, item)

    def pump() -> None:
        try:
            for event in handle.events(stop=stop):
                put(event)
        except BaseException as exc:  # raised again in the reader
            put(exc)
        finally:
            put(None)

    threading.Thread(target=pump, name="vmkit-aio-libvirt-events", daemon=True).start()
    try:
        while (item := await items.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
