"""The public Python client: :class:`Client` and its :class:`Instance` handles (synchronous).

It sees the same machines as the ``vmkit`` command (the same home, the same supervisors), and
every result is one of the typed models of the REST API (:mod:`vmkit.api.models`)::

    import vmkit

    client = vmkit.Client()                       # or Client(home="/srv/vmkit")
    web = client.create("web", image="debian-12", cpus=2, memory="1G", ports=["8080:80"])
    web.start()
    print(web.exec(["uname", "-a"]).stdout.decode())
    web.copy_in("notes.txt", "/tmp/notes.txt")
    web.stop()

Errors are :mod:`vmkit.errors` classes (``NotFoundError``, ``StateError``, ``ConfigError``...),
also for failures that happened inside a supervisor. It works inside a running event loop too
(Jupyter, an asyncio program): each call then runs in a worker thread. The asynchronous client
with the same shape is :class:`vmkit.aio.Client`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from vmkit import paths
from vmkit.api import models
from vmkit.config import MachineConfig, PortForward, parse_config

T = TypeVar("T")

_CREATE_OPTIONS = frozenset({"image", "kernel", "initrd", "cmdline", "disks", "ports", "mounts", "user_data",
                             "run", "accel", "cpus", "memory"})


def _status(st: Any) -> models.RuntimeStatus:
    return models.RuntimeStatus.model_validate(st.to_dict())


def _start_result(outcome: Any) -> models.StartResult:
    return models.StartResult(
        status=_status(outcome.status), restored=outcome.restored, snapshot=outcome.snapshot,
        clock=models.ClockFix.model_validate(outcome.clock) if outcome.clock else None,
        fallback=outcome.fallback, discarded=str(outcome.discarded) if outcome.discarded else None)


class Client:
    """The machines of one vmkit home (default: ``VMKIT_HOME``, else the XDG data directory)."""

    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home).expanduser().resolve() if home is not None else None

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one operation with this client's home; in a worker thread inside a running event loop
        (the operations drive supervisors with their own short-lived loops)."""
        def run() -> T:
            with paths.using_home(self.home):
                return fn(*args, **kwargs)

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return run()
        with ThreadPoolExecutor(1, thread_name_prefix="vmkit-client") as pool:
            return pool.submit(contextvars.copy_context().run, run).result()

    # -- machines ----------------------------------------------------------------------------------
    def create(self, spec: str | MachineConfig | dict[str, Any], /, **options: Any) -> Instance:
        """Create a machine and return its handle.

        * ``create(config)``: a :class:`~vmkit.config.MachineConfig` or a vm.yaml mapping;
        * ``create(name, image="debian-12", cpus=2, memory="1G", disks=["20G"], ports=["8080:80"],
          mounts=["~/src"], user_data=Path(...))``: as ``vmkit create`` (with ``image`` or ``kernel``);
        * ``create(name, **vm_yaml_fields)``: any other keywords are vm.yaml's fields.
        """
        from vmkit import control
        from vmkit.builder import CreateOptions

        if isinstance(spec, MachineConfig):
            inst = self._call(control.create, spec)
        elif isinstance(spec, dict):
            inst = self._call(control.create, parse_config(spec))
        elif "image" in options or "kernel" in options:
            unknown = set(options) - _CREATE_OPTIONS
            if unknown:
                from vmkit.errors import ConfigError

                raise ConfigError.single(sorted(unknown)[0], f"not an option of create with an image or kernel: "
                                         f"use {', '.join(sorted(_CREATE_OPTIONS))}")
            opts: dict[str, Any] = {k: (Path(v) if k in ("kernel", "initrd", "user_data") and v is not None else v)
                                    for k, v in options.items()}
            if "memory" in opts:
                opts["memory"] = str(opts["memory"])
            inst = self._call(control.create_from_options, CreateOptions(name=spec, **opts))
        else:
            inst = self._call(control.create, parse_config({"name": spec, **options}))
        return Instance(self, inst.name)

    def get(self, name: str) -> Instance:
        """The machine ``name`` (``NotFoundError`` if there is none)."""
        from vmkit import control

        return Instance(self, self._call(control.get, name).name)

    def list(self) -> list[Instance]:
        """Every machine, by name."""
        return [Instance(self, row.name) for row in self.rows()]

    def rows(self) -> builtins.list[models.InstanceRow]:
        """Every machine as ``vmkit list`` shows it (a broken one included, with the reason)."""
        from vmkit import control

        return self._call(control.list_instances)

    def delete(self, name: str, *, force: bool = False) -> None:
        """Delete a stopped machine and its directory (``force``: stop it first)."""
        from vmkit import control

        self._call(control.delete, name, force=force)

    def __repr__(self) -> str:
        return f"vmkit.Client(home={str(self.home) if self.home else None!r})"


class Instance:
    """A handle on one machine; every call reads or changes the machine as it is now."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"<vmkit.Instance {self.name}>"

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.client._call(fn, *args, **kwargs)

    # -- state -------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``stopped``, ``running``, ``paused``, ..., ``saved`` or ``broken``, as ``vmkit list`` shows it."""
        return self.row().state

    def row(self) -> models.InstanceRow:
        from vmkit import control

        return self._call(lambda: control.view(control.get(self.name)))

    def status(self) -> models.RuntimeStatus:
        from vmkit import control

        return _status(self._call(lambda: control.get(self.name).reconcile()))

    def info(self) -> dict[str, Any]:
        """Configuration and runtime status (``vmkit inspect``)."""
        from vmkit import control

        return self._call(control.inspect, self.name)

    @property
    def config(self) -> MachineConfig:
        from vmkit import control

        return self._call(lambda: control.get(self.name).load_config())

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, *, timeout: float | None = None, cold: bool = False) -> models.StartResult:
        """Boot the machine, or resume its saved state if it has one (``cold``: boot anyway); returns
        once the guest is ready."""
        from vmkit import statectl

        return _start_result(self._call(statectl.start, self.name, timeout=timeout, cold=cold))

    def stop(self, *, force: bool = False, save: bool = False, timeout: float = 30.0) -> models.RuntimeStatus:
        """ACPI power button, then a hard stop after ``timeout`` s (``force``: hard stop now;
        ``save``: save the running state first, so that :meth:`start` resumes it)."""
        from vmkit import control, statectl

        if save:
            return _status(self._call(statectl.save, self.name, keep_running=False).status)
        return _status(self._call(control.stop, self.name, force=force, timeout=timeout))

    def pause(self) -> models.RuntimeStatus:
        from vmkit import control

        return _status(self._call(control.pause, self.name))

    def resume(self) -> models.ResumeResult:
        from vmkit import control

        resumed = self._call(control.resume, self.name)
        return models.ResumeResult.model_validate({**resumed.status.to_dict(), "clock": resumed.clock})

    def save(self, path: str | Path | None = None, *, keep_running: bool = False,
             force: bool = False) -> models.SaveResult:
        """Save the running state to ``path`` (default: the machine's own, resumed by :meth:`start`)."""
        from vmkit import statectl

        out = self._call(statectl.save, self.name, Path(path) if path is not None else None,
                         keep_running=keep_running, force=force)
        return models.SaveResult(path=str(out.path), payload_bytes=out.payload_bytes, file_bytes=out.file_bytes,
                                 seconds=out.seconds, keep_running=out.keep_running,
                                 clock=models.ClockFix.model_validate(out.clock) if out.clock else None)

    def restore(self, path: str | Path | None = None, *, force: bool = False,
                paused: bool = False) -> models.StartResult:
        """Start the stopped machine from a state file (``force``: even if its disks changed)."""
        from vmkit import statectl

        return _start_result(self._call(statectl.restore, self.name, Path(path) if path is not None else None,
                                        force=force, paused=paused))

    def delete(self, *, force: bool = False) -> None:
        self.client.delete(self.name, force=force)

    # -- the guest ---------------------------------------------------------------------------------
    def exec(self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = 60.0) -> models.ExecResult:
        """Run ``argv`` in the guest through its agent: ``.exit_code``, ``.stdout``, ``.stderr`` (bytes)."""
        from vmkit import control

        res = self._call(control.exec_in_guest, self.name, list(argv), timeout=timeout, stdin=stdin)
        return models.ExecResult.of(res.exit_code, res.stdout, res.stderr, res.signal)

    def copy_in(self, local: str | Path, remote: str) -> int:
        """Copy a host file into the guest (``remote`` ending in ``/``: into that directory)."""
        from vmkit import control

        return self._call(control.copy, str(local), f"{self.name}:{remote}")

    def copy_out(self, remote: str, local: str | Path) -> int:
        """Copy a guest file to the host (atomically; a directory ``local`` receives it by name)."""
        from vmkit import control

        return self._call(control.copy, f"{self.name}:{remote}", str(local))

    def console_log(self) -> str:
        """What the guest has printed on its serial console so far."""
        from vmkit.serial import read_log

        return self._call(lambda: read_log(self._dir() / "serial.log").decode("utf-8", errors="replace"))

    def _dir(self) -> Path:
        from vmkit import control

        return self._call(lambda: control.get(self.name).dir)

    # -- devices -----------------------------------------------------------------------------------
    @property
    def ports(self) -> list[PortForward]:
        from vmkit import control

        return self._call(control.port_list, self.name)

    def add_port(self, spec: str) -> PortForward:
        """Forward a host port (``8080:80``, ``127.0.0.1:5353:53/udp``): live if running, and in vm.yaml."""
        from vmkit import control

        return self._call(control.port_add, self.name, spec)

    @property
    def disks(self) -> list[models.DiskRow]:
        from vmkit import control

        return [models.DiskRow.model_validate(r) for r in self._call(control.list_disks, self.name)]

    def attach_disk(self, spec: str, *, disk_id: str | None = None) -> models.DiskAttached:
        from vmkit import control

        return models.DiskAttached.model_validate(self._call(control.attach_disk, self.name, spec, disk_id=disk_id))

    def detach_disk(self, disk_id: str, *, timeout: float = 30.0) -> None:
        from vmkit import control

        self._call(control.detach_disk, self.name, disk_id, timeout=timeout)

    # -- snapshots ---------------------------------------------------------------------------------
    @property
    def snapshots(self) -> list[models.SnapshotInfo]:
        from vmkit import statectl

        return [models.SnapshotInfo.model_validate(s.to_dict()) for s in self._call(statectl.snapshot_list, self.name)]

    def snapshot(self, tag: str | None = None) -> models.SnapshotInfo:
        """Snapshot RAM and disks (qcow2) under ``tag`` (default: a timestamp)."""
        from vmkit import statectl

        return models.SnapshotInfo.model_validate(self._call(statectl.snapshot_create, self.name, tag).to_dict())

    def revert(self, tag: str) -> models.StartResult:
        from vmkit import statectl

        return _start_result(self._call(statectl.snapshot_revert, self.name, tag))

    def delete_snapshot(self, tag: str) -> None:
        from vmkit import statectl

        self._call(statectl.snapshot_delete, self.name, tag)

    # -- events ------------------------------------------------------------------------------------
    def events(self) -> Iterator[models.Event]:
        """The machine's events as they happen (the first says its state now); ends when it stops.

        Close the iterator (or leave the ``for`` loop) to stop listening."""
        from vmkit import control

        api = self._call(control.client, self.name)
        items: queue.Queue[models.Event | BaseException | None] = queue.Queue(maxsize=1000)
        stop = threading.Event()

        async def pump() -> None:
            try:
                async for item in api.events():
                    if stop.is_set():
                        return
                    items.put(models.Event.model_validate(item))
            except Exception as exc:  # handed to the reader
                items.put(exc)
            finally:
                items.put(None)

        reader = threading.Thread(target=lambda: asyncio.run(pump()), name="vmkit-events", daemon=True)
        reader.start()
        try:
            while (item := items.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
