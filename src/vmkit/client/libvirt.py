"""The public client on a libvirt host: what ``vmkit.Client(connect="qemu+ssh://HOST/system")`` returns.

:class:`LibvirtClient` and :class:`LibvirtInstance` have the shape of :class:`vmkit.Client` and
:class:`vmkit.Instance`; the operations libvirt runs (create, start, stop, pause, resume, list,
inspect, delete, exec, cp, console, save/restore, snapshots, events, migrate) go to
:class:`vmkit.backends.libvirt.machines.LibvirtHost`, and every other one raises a
:class:`~vmkit.errors.ConfigError` that names it (no silent local fallback).
"""

from __future__ import annotations

import builtins
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkit.api import models
from vmkit.client.sync import ByteProgress, Client, ConsoleProgress, Instance, Notice, create_options
from vmkit.errors import ConfigError

if TYPE_CHECKING:
    from vmkit.backends.libvirt.machines import LibvirtHost
    from vmkit.config import MachineConfig


def unsupported(what: str, uri: str) -> ConfigError:
    """The refusal of an operation the libvirt backend does not have (``what``: e.g. ``top (Client.top)``)."""
    return ConfigError.single("--connect", f"{what} is not supported on a libvirt host ({uri}): run it without "
                              "--connect on a machine of this host, or use virsh")


class LibvirtClient(Client):
    """The vmkit machines on one libvirt host (see the module's docs)."""

    def __init__(self, home: str | Path | None = None, connect: str | None = None, *, host: str | None = None) -> None:
        super().__init__(home)  # ``host`` with ``connect`` was refused by vmkit.Client.__new__
        from vmkit.backends.libvirt.machines import LibvirtHost

        assert connect is not None
        self.connect = connect
        self.libvirt: LibvirtHost = LibvirtHost(connect)

    def create(self, spec: str | MachineConfig | dict[str, Any], /, **options: Any) -> Instance:
        from vmkit.config import MachineConfig, parse_config

        progress = options.pop("progress", None)
        if isinstance(spec, MachineConfig):
            name = self._call(self.libvirt.create, spec, progress=progress)
        elif isinstance(spec, dict):
            name = self._call(self.libvirt.create, parse_config(spec), progress=progress)
        elif options.keys() & {"image", "kernel", "from_file"}:
            name = self._call(self.libvirt.create_from_options, create_options(spec, options), progress=progress)
        else:
            name = self._call(self.libvirt.create, parse_config({"name": spec, **options}), progress=progress)
        return LibvirtInstance(self, name)

    def get(self, name: str) -> Instance:
        return LibvirtInstance(self, self._call(self.libvirt.domain, name).name())

    def rows(self) -> builtins.list[models.InstanceRow]:
        return self._call(self.libvirt.rows)

    def list(self) -> builtins.list[Instance]:
        return [LibvirtInstance(self, row.name) for row in self.rows()]

    def delete(self, name: str, *, force: bool = False) -> None:
        self._call(self.libvirt.delete, name, force=force)

    def copy(self, src: str, dst: str) -> int:
        return self._call(self.libvirt.copy, src, dst)

    # the image cache is this host's (what create uploads to the libvirt host's pool from)
    images = Client.images
    image = Client.image
    build_image = Client.build_image
    pull_image = Client.pull_image
    export_image = Client.export_image
    import_image = Client.import_image
    delete_image = Client.delete_image

    def __repr__(self) -> str:
        return f"vmkit.Client(connect={self.connect!r})"


class LibvirtInstance(Instance):
    """A handle on one machine of a libvirt host."""

    client: LibvirtClient

    def __init__(self, client: LibvirtClient, name: str) -> None:
        super().__init__(client, name)

    @property
    def _host(self) -> LibvirtHost:
        return self.client.libvirt

    def __repr__(self) -> str:
        return f"<vmkit.Instance {self.name} on {self.client.connect}>"

    # -- state -------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self.row().state

    def row(self) -> models.InstanceRow:
        for row in self.client.rows():
            if row.name == self.name:
                return row
        from vmkit.errors import NotFoundError

        raise NotFoundError("machine", self.name)

    def status(self) -> models.RuntimeStatus:
        return self._call(lambda: self._host.status(self._host.domain(self.name)))

    def info(self) -> dict[str, Any]:
        return self._call(self._host.inspect, self.name)

    @property
    def config(self) -> MachineConfig:
        return self._call(self._host.config, self.name)

    @property
    def directory(self) -> Path:
        """This client's files of the machine (keys, ssh_config); the machine itself lives on the host."""
        return self._call(self._host.local_dir, self.name)

    def libvirt_xml(self, *, hostfwd: bool = False) -> str:
        """The domain's XML as libvirt has it now (``vmkit --connect URI export NAME --libvirt``; its
        port forwards are never in it: vmkit adds them to the running domain)."""
        return str(self._call(lambda: self._host.domain(self.name).XMLDesc(0)))

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, *, timeout: float | None = None, cold: bool = False, progress: ConsoleProgress | None = None,
              state_progress: ByteProgress | None = None, notice: Notice | None = None) -> models.StartResult:
        if cold:
            raise ConfigError.single("--cold", "not supported on a libvirt host: "
                                     "virsh managedsave-remove NAME discards the saved state")
        started = self._call(self._host.start, self.name, timeout=timeout, progress=progress)
        return models.StartResult(status=started.status,
                                  restored={"managed_save": True} if started.restored else None)

    def stop(self, *, force: bool = False, save: bool = False, timeout: float = 30.0) -> models.RuntimeStatus:
        if save:
            return self._call(self._host.save, self.name)
        return self._call(self._host.stop, self.name, force=force, timeout=timeout)

    def pause(self) -> models.RuntimeStatus:
        return self._call(self._host.pause, self.name)

    def resume(self) -> models.ResumeResult:
        return self._call(self._host.resume, self.name)

    def save(self, path: str | Path | None = None, *, keep_running: bool = False, force: bool = False,
             progress: ByteProgress | None = None) -> models.SaveOutcome:
        """libvirt's managed save (the host keeps the state; :meth:`start` or :meth:`restore` resumes it)."""
        if path is not None:
            raise ConfigError.single("PATH", "a libvirt host keeps the saved state itself (managed save): "
                                     "give no path")
        if keep_running:
            raise ConfigError.single("--keep-running", "libvirt's managed save stops the machine")
        import time

        started = time.monotonic()
        status = self._call(self._host.save, self.name)
        return models.SaveOutcome(path=f"{self.client.connect}#managedsave:{self.name}", payload_bytes=0,
                                  file_bytes=0, seconds=time.monotonic() - started, keep_running=False,
                                  status=status)

    def restore(self, path: str | Path | None = None, *, force: bool = False, paused: bool = False,
                timeout: float | None = None, progress: ConsoleProgress | None = None,
                state_progress: ByteProgress | None = None) -> models.StartResult:
        if path is not None:
            raise ConfigError.single("PATH", "a libvirt host restores its own managed save: give no path")
        status = self._call(self._host.restore, self.name, paused=paused)
        return models.StartResult(status=status, restored={"managed_save": True})

    def migrate(self, target: str, *, method: str = "auto", downtime_limit_ms: int | None = None,
                bandwidth_bytes: int | None = None, auto_converge: bool = True, postcopy: bool = False,
                max_rounds: int = 30, verify: bool = False, shared_storage: bool = False,
                copy_storage: bool = False, tls: bool = False,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """libvirt's migration to libvirt host ``target`` (a URI, e.g. ``qemu+ssh://b/system``); ``method``
        as for a local machine (``auto``: live where that is safe, else paused; see
        :meth:`vmkit.backends.libvirt.machines.LibvirtHost.migrate`)."""
        # auto_converge (vmkit's default) is left to libvirt, which tunes the migration itself
        for flag, given in (("--postcopy", postcopy), ("--verify", verify)):
            if given:
                raise ConfigError.single(flag, "not supported for a libvirt migration (libvirt tunes it)")
        if tls:
            raise ConfigError.single("--tls", "a libvirt migration is encrypted by libvirtd's own TLS setup "
                                     "(migrate_tls_x509_cert_dir in qemu.conf), not by vmkit")
        bw = (bandwidth_bytes >> 20) or 1 if bandwidth_bytes else None
        if shared_storage and copy_storage:
            raise ConfigError.single("--copy-storage", "give --copy-storage or --shared-storage, not both")
        return self._call(self._host.migrate, self.name, target, copy_storage=copy_storage, method=method,
                          bandwidth_mib=bw, on_event=on_event)

    def cancel_migration(self, *, force: bool = False) -> dict[str, Any]:
        raise ConfigError.single("--cancel", "a libvirt migration ends with its `vmkit migrate` command (Ctrl-C "
                                 "cancels it) or `virsh domjobabort NAME`; libvirt takes a failed one back itself")

    def move(self, target: str, *, on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        return self._call(self._host.migrate, self.name, target, offline=True, on_event=on_event)

    def delete(self, *, force: bool = False) -> None:
        self.client.delete(self.name, force=force)

    # -- the guest ---------------------------------------------------------------------------------
    def exec(self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = 60.0) -> models.ExecResult:
        res = self._call(self._host.exec, self.name, list(argv), timeout=timeout, stdin=stdin)
        return models.ExecResult.of(res.exit_code, res.stdout, res.stderr, res.signal)

    def ssh_argv(self, command: Sequence[str] = (), *, tty: bool = False) -> list[str]:
        return self._call(self._host.ssh_argv, self.name, list(command), tty=tty)

    def ssh_config(self) -> str:
        return self._call(self._host.ssh_config, self.name)

    def console_bytes(self) -> bytes:
        return self._call(self._host.console_bytes, self.name)

    def wait_console(self, pattern: str, *, timeout: float = 60.0) -> str:
        return self._call(self._host.wait_console, self.name, pattern, timeout)

    def attach_console(self, input_fd: int, on_output: Callable[[bytes], None], *, detach: bytes | None = None,
                       on_connected: Callable[[], None] | None = None) -> None:
        self._call(self._host.attach_console, self.name, input_fd, on_output, detach=detach,
                   on_connected=on_connected)

    # -- snapshots ---------------------------------------------------------------------------------
    @property
    def snapshots(self) -> builtins.list[models.SnapshotInfo]:
        return self._call(self._host.snapshots, self.name)

    def snapshot(self, tag: str | None = None) -> models.SnapshotInfo:
        return self._call(self._host.snapshot, self.name, tag)

    def revert(self, tag: str, *, timeout: float | None = None, progress: ConsoleProgress | None = None,
               notice: Notice | None = None) -> models.StartResult:
        return models.StartResult(status=self._call(self._host.revert, self.name, tag), snapshot=tag)

    def delete_snapshot(self, tag: str) -> None:
        self._call(self._host.delete_snapshot, self.name, tag)

    # -- events ------------------------------------------------------------------------------------
    def events(self, *, stop: threading.Event | None = None) -> Iterator[models.Event]:
        """libvirt's domain events (``stop``: set it to end the stream from another thread)."""
        yield from self._host.events(self.name, stop=stop)


def _refuse_the_rest(cls: type, base: type, what: str) -> None:
    """Every public method or property of ``base`` that ``cls`` does not implement refuses by name."""
    for attr, value in vars(base).items():
        if attr.startswith("_") or attr in vars(cls):
            continue
        label = f"{attr} ({what}.{attr})"

        def refuse(self: Any, *_a: Any, _label: str = label, **_k: Any) -> Any:
            raise unsupported(_label, self.connect if hasattr(self, "connect") else self.client.connect)

        if isinstance(value, property):
            setattr(cls, attr, property(refuse))
        elif callable(value):
            setattr(cls, attr, functools.wraps(value)(refuse))


_refuse_the_rest(LibvirtClient, Client, "Client")
_refuse_the_rest(LibvirtInstance, Instance, "Instance")
