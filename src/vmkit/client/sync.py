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

import builtins
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vmkit.api import models
from vmkit.host import paths

if TYPE_CHECKING:
    from vmkit.backends.local.statectl import Note
    from vmkit.backends.ssh import SshHost
    from vmkit.bench.cpu import Report as CpuReport
    from vmkit.bench.cpu import Settings as CpuSettings
    from vmkit.bench.devices import Report as DevicesReport
    from vmkit.bench.devices import Settings as DevicesSettings
    from vmkit.bench.fs import Job, Report, Settings, Step
    from vmkit.config import MachineConfig, PortForward
    from vmkit.host.builder import CreateOptions
    from vmkit.host.images.pull import PullProgress as PullStep
    from vmkit.host.images.store import Image
    from vmkit.host.templates import Template

T = TypeVar("T")

ConsoleProgress = Callable[[str], None]
"""Receives the last line the guest printed on its console, while a machine boots (for a spinner)."""
ByteProgress = Callable[[int, "int | None"], None]
"""Receives (bytes done, total or None) while a machine state is saved or restored (for a byte bar)."""
PullProgress = Callable[["PullStep"], None]
"""Receives each step of an image pull (stage, message, bytes done and total: for a byte bar)."""
Notice = Callable[["Note"], None]
"""Receives what the user should be told while a machine comes up (:class:`vmkit.backends.local.statectl.Note`)."""

_CREATE_OPTIONS = frozenset({"image", "kernel", "initrd", "cmdline", "disks", "ports", "mounts", "user_data",
                             "run", "accel", "cpus", "memory", "max_cpus", "max_memory", "from_file", "limits",
                             "balloon_min", "balloon_shares", "networks",
                             "display", "arch", "binfmt", "template"})
_CREATE_PATHS = ("kernel", "initrd", "user_data", "from_file")


def _in_event_loop() -> bool:
    """Whether this thread runs an asyncio event loop (without importing asyncio: no module, no loop)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _status(st: models.RuntimeStatus) -> models.RuntimeStatus:
    """A status the backend read (the state file's model is the API's: a copy, not a conversion)."""
    return st.model_copy()


def _clock(clock: dict[str, Any] | None) -> models.ClockFix | None:
    return models.ClockFix.model_validate(clock) if clock else None


def _start_result(outcome: Any) -> models.StartResult:
    return models.StartResult(
        status=_status(outcome.status), restored=outcome.restored, snapshot=outcome.snapshot,
        clock=_clock(outcome.clock), fallback=outcome.fallback, template=getattr(outcome, "template", None),
        discarded=str(outcome.discarded) if outcome.discarded else None, notes=list(outcome.notes))


def _path(p: str | Path | None) -> Path | None:
    return Path(p) if p is not None else None


def _image_info(image: Image) -> models.ImageInfo:
    from vmkit.host.images import debian

    m = image.manifest
    return models.ImageInfo(
        name=image.name, kind=m.kind, directory=str(image.directory),
        kernel=str(image.kernel) if image.kernel else None, initrd=str(image.initrd) if image.initrd else None,
        disk=str(image.disk) if image.disk else None, kernel_version=m.kernel_version,
        size=sum(f.size for f in m.files.values()), created=m.created, source=m.source, recipe=m.recipe,
        outdated=debian.is_outdated(image), note=debian.outdated_note(image))


def create_options(name: str, options: dict[str, Any]) -> CreateOptions:
    """``create(name, image=..., cpus=..., ...)``'s keywords as :class:`~vmkit.host.builder.CreateOptions`
    (options given as None are not set; bad keywords: a ConfigError naming them)."""
    from vmkit.host.builder import CreateOptions

    unknown = set(options) - _CREATE_OPTIONS
    if unknown:
        from vmkit.errors import ConfigError

        raise ConfigError.single(sorted(unknown)[0], f"not an option of create with an image or kernel: "
                                 f"use {', '.join(sorted(_CREATE_OPTIONS))}")
    opts: dict[str, Any] = {k: (Path(v) if k in _CREATE_PATHS and v is not None else v)
                            for k, v in options.items() if v is not None}
    for size in ("memory", "max_memory"):
        if size in opts:
            opts[size] = str(opts[size])
    if "display" in opts:
        if opts["display"] is False:
            del opts["display"]
        else:
            opts["display"] = "default" if opts["display"] is True else str(opts["display"])
    for listed in ("disks", "ports", "mounts", "networks", "binfmt"):
        if listed in opts:
            opts[listed] = [str(v) for v in opts[listed]]
    return CreateOptions(name=name, **opts)


CONNECTED: dict[str, type[Client]] = {}
"""The client class of each kind of ``connect`` URI (``libvirt``: :class:`vmkit.client.libvirt.LibvirtClient`,
registered when :mod:`vmkit.client` is imported; this module does not import it: it imports this one)."""


class Client:
    """The machines of one vmkit home (default: ``VMKIT_HOME``, else the XDG data directory).

    ``connect``: the machines of a libvirt host (``qemu:///system``, ``qemu+ssh://HOST/system``): then a
    :class:`vmkit.client.libvirt.LibvirtClient`, whose machines libvirt runs.
    ``host="ssh://[user@]HOST[:PORT]"``: the machines of that host's vmkit (its own home), each call
    run there over SSH as ``vmkit --host`` runs a command (:mod:`vmkit.client.remote`)."""

    def __new__(cls, home: str | Path | None = None, connect: str | None = None, *, host: str | None = None) -> Client:
        if cls is Client and connect:
            if host is not None:
                from vmkit.errors import ConfigError

                raise ConfigError.single("connect", "give connect (a libvirt host) or host (another host's vmkit), "
                                         "not both")
            from vmkit.backends import resolve_connect

            resolve_connect(connect)
            return super().__new__(CONNECTED["libvirt"])
        if cls is Client and host is not None:
            from vmkit.backends import resolve

            if resolve(host, field="host") is not None:
                return super().__new__(RemoteClient)
        return super().__new__(cls)

    def __init__(self, home: str | Path | None = None, connect: str | None = None, *, host: str | None = None) -> None:
        self.home = Path(home).expanduser().resolve() if home is not None else None
        self.host: str | None = None

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one operation with this client's home; in a worker thread inside a running event loop
        (the operations drive supervisors with their own short-lived loops)."""
        def run() -> T:
            with paths.using_home(self.home):
                return fn(*args, **kwargs)

        if not _in_event_loop():
            return run()
        import contextvars
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="vmkit-client") as pool:
            return pool.submit(contextvars.copy_context().run, run).result()

    # -- images ------------------------------------------------------------------------------------
    def images(self) -> builtins.list[models.ImageInfo]:
        """``vmkit image list``: every image in the image cache, by name."""
        from vmkit.host.images.store import ImageStore

        return self._call(lambda: [_image_info(i) for i in ImageStore().list()])

    def image(self, name: str) -> models.ImageInfo:
        """The image ``name`` (``NotFoundError`` if the cache has none)."""
        from vmkit.host.images.store import ImageStore

        return self._call(lambda: _image_info(ImageStore().get(name)))

    def build_image(self, name: str, *, force: bool = False, arch: str = "x86_64",
                    progress: Callable[[str], None] | None = None) -> models.ImageInfo:
        """``vmkit image build``: build image ``name`` (``micro``, ``micro-full``, ``debian-12``,
        ``debian-12-docker``, ``debian-12-dev``) into the cache, or return it if it is there (``force``:
        build it again). ``progress`` receives a line per build step."""
        from vmkit.host.images import builders
        from vmkit.host.images.store import ImageStore

        return self._call(lambda: _image_info(builders.build(ImageStore(), name, force=force, progress=progress,
                                                             arch=arch)))

    def pull_image(self, source: str, *, sums_url: str | None = None, name: str | None = None, force: bool = False,
                   mirror: str | None = None, progress: PullProgress | None = None) -> models.ImageInfo:
        """``vmkit image pull``: download a catalogue image (``ubuntu-24.04``, ``debian-12``) or an
        http(s) URL, verify it against its publisher's checksums and cache it. ``mirror``: a directory
        holding the image and its checksum file (default ``$VMKIT_PULL_BASE_URL``, else the publisher's)."""
        from vmkit.host.images import pull
        from vmkit.host.images.store import ImageStore

        return self._call(lambda: _image_info(pull.pull(source, ImageStore(), progress=progress, sums_url=sums_url,
                                                        name=name, force=force, base_url=mirror)))

    def export_image(self, name: str, file: str | Path, *,
                     progress: Callable[[str], None] | None = None) -> models.ImageExported:
        """``vmkit image export``: image ``name`` with its manifest into the tar ``file`` (``.tar.gz``:
        compressed), verified first; the file appears only when complete."""
        from vmkit.host.images import archive
        from vmkit.host.images.store import ImageStore

        def export() -> models.ImageExported:
            dest = archive.export_image(ImageStore(), name, Path(file), progress=progress)
            return models.ImageExported(name=name, path=str(dest), size=dest.stat().st_size)

        return self._call(export)

    def import_image(self, file: str | Path, *, name: str | None = None, force: bool = False,
                     progress: Callable[[str], None] | None = None) -> models.ImageInfo:
        """``vmkit image import``: an archive made by :meth:`export_image` into the cache (as ``name``,
        default its own), every file checked against its manifest first."""
        from vmkit.host.images import archive
        from vmkit.host.images.store import ImageStore

        return self._call(lambda: _image_info(archive.import_image(ImageStore(), Path(file), name=name, force=force,
                                                                   progress=progress)))

    def delete_image(self, name: str) -> None:
        """``vmkit image rm``: remove image ``name`` from the cache."""
        from vmkit.host.images.store import ImageStore

        self._call(lambda: ImageStore().remove(name))

    def warm_image(self, image: str, *, memory: str | None = None, cpus: int | None = None, rebuild: bool = False,
                   progress: Callable[[str], None] | None = None) -> tuple[models.WarmTemplate, bool]:
        """``vmkit image warm``: the image's warm template for this memory and vCPU count (made now if
        there is no current one, or ``rebuild``); and whether it was made now. Machines created from
        the image with the same memory and vCPUs then start from it."""
        from vmkit.backends.local import warm

        return self._call(warm.warm, image, memory=memory, cpus=cpus, rebuild=rebuild, progress=progress)

    # -- machines ----------------------------------------------------------------------------------
    def create(self, spec: str | MachineConfig | dict[str, Any], /, **options: Any) -> Instance:
        """Create a machine and return its handle.

        * ``create(config)``: a :class:`~vmkit.config.MachineConfig` or a vm.yaml mapping;
        * ``create(name, image="debian-12", cpus=2, memory="1G", disks=["20G"], ports=["8080:80"],
          mounts=["~/src"], user_data=Path(...), limits={"cpu_max": 50},
          display=True or "1920x1080")``: as ``vmkit create`` (with
          ``image``, ``kernel`` or ``from_file``, a vm.yaml to start from; options given as None are not set);
        * ``create(name, template="docker", ...)``: from a template (a name, file or URL), the
          other options over it; its provisioning runs at ``start``;
        * ``create(name, **vm_yaml_fields)``: any other keywords are vm.yaml's fields.
        """
        from vmkit.backends.local import control
        from vmkit.config import MachineConfig, parse_config

        if isinstance(spec, MachineConfig):
            inst = self._call(control.create, spec)
        elif isinstance(spec, dict):
            inst = self._call(control.create, parse_config(spec))
        elif options.keys() & {"image", "kernel", "from_file", "template"}:
            template = options.get("template")
            opts = create_options(spec, {k: v for k, v in options.items() if k != "template"})
            if template is not None:
                from vmkit.backends.local import provisioning

                inst = self._call(provisioning.create_from_template, str(template), opts)
            else:
                inst = self._call(control.create_from_options, opts)
        else:
            inst = self._call(control.create, parse_config({"name": spec, **options}))
        return Instance(self, inst.name)

    def templates(self) -> builtins.list[tuple[str, str, str]]:
        """``(name, where, description)`` of every template found by name (user's, then shipped)."""
        from vmkit.host import templates

        return self._call(templates.available)

    def template(self, ref: str) -> Template:
        """The template ``ref`` (a name, file or URL), its bases merged and its fields checked."""
        from vmkit.host import templates

        return self._call(templates.resolve, ref)

    def template_text(self, ref: str) -> str:
        """The template file ``ref`` as written (its bases not merged)."""
        from vmkit.host import templates

        return self._call(lambda: templates.read(templates.locate(ref)))

    def template_schema(self) -> dict[str, Any]:
        """The JSON schema of template files (their own keys and vm.yaml's top-level fields)."""
        from vmkit.host import templates

        return self._call(templates.json_schema)

    def get(self, name: str) -> Instance:
        """The machine ``name`` (``NotFoundError`` if there is none)."""
        from vmkit.host.instance import Instance as Record

        return Instance(self, self._call(lambda: Record(name).require()).name)

    def list(self) -> list[Instance]:
        """Every machine, by name."""
        return [Instance(self, row.name) for row in self.rows()]

    def rows(self) -> builtins.list[models.InstanceRow]:
        """Every machine as ``vmkit list`` shows it (a broken one included, with the reason)."""
        from vmkit.backends.local import listing

        return self._call(listing.list_instances)

    def top(self, *, workers: int = 8) -> builtins.list[models.MachineTop]:
        """Every live machine (running, paused, ...) with its statistics now (``vmkit top``): one
        ``GET /v1/stats`` per machine, up to ``workers`` at once, so one slow supervisor does not
        hold up the others. A machine whose statistics cannot be read has ``error`` instead."""
        from concurrent.futures import ThreadPoolExecutor

        from vmkit.errors import VmkitError
        from vmkit.host.instance import LIVE

        live = [r for r in self.rows() if r.state in LIVE]

        def one(row: models.InstanceRow) -> models.MachineTop:
            try:
                return models.MachineTop(name=row.name, state=row.state, stats=Instance(self, row.name).stats())
            except VmkitError as exc:
                return models.MachineTop(name=row.name, state=row.state, error=exc.message)

        if len(live) <= 1:
            return [one(r) for r in live]
        with ThreadPoolExecutor(min(workers, len(live)), thread_name_prefix="vmkit-top") as pool:
            return builtins.list(pool.map(one, live))

    def delete(self, name: str, *, force: bool = False) -> None:
        """Delete a stopped machine and its directory (``force``: stop it first)."""
        from vmkit.backends.local import control

        self._call(control.delete, name, force=force)

    def clone(self, src: str, dst: str, *, notice: Callable[[str], None] | None = None) -> Instance:
        """An independent copy ``dst`` of the stopped machine ``src`` (new identity, keys, MAC and SSH
        port); ``notice`` receives what was not copied (host port forwards belong to ``src``)."""
        from vmkit.backends.local import control

        inst, notes = self._call(control.clone, src, dst)
        for note in notes:
            if notice is not None:
                notice(note)
        return Instance(self, inst.name)

    def copy(self, src: str, dst: str) -> int:
        """``vmkit cp``: exactly one of ``src`` and ``dst`` is ``NAME:/guest/path``, the other a host path;
        returns the bytes copied (see :meth:`Instance.copy_in`, :meth:`Instance.copy_out`)."""
        from vmkit.backends.local import control

        return self._call(control.copy, src, dst)

    # -- benchmarks of the host and of device models -------------------------------------------------
    def bench_cpu(self, settings: CpuSettings, *, machine: str | None = None, targets: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = None) -> CpuReport:
        """sysbench's CPU test on the host, a container and guests (``vmkit bench cpu``; see
        :mod:`vmkit.bench.cpu`, :func:`~vmkit.bench.cpu.settings_for`)."""
        from vmkit.bench import cpu as cpubench

        return self._call(cpubench.run, settings, machine=machine, targets=targets or cpubench.TARGETS,
                          progress=progress)

    def bench_devices(self, settings: DevicesSettings, *, machine: str | None = None,
                      kinds: Sequence[str] | None = None, nics: Sequence[str] | None = None,
                      progress: Callable[[str], None] | None = None) -> DevicesReport:
        """fio on virtio-blk, NVMe, SATA and IDE disks and iperf3 through virtio-net and e1000 NICs in
        one guest (``vmkit bench devices``; see :mod:`vmkit.bench.devices`,
        :func:`~vmkit.bench.devices.settings_for`). ``nics``: the NIC models (default virtio and e1000;
        rtl8139 too if asked; empty: no network part)."""
        from vmkit.bench import devices as devbench

        return self._call(devbench.run, settings, machine=machine, kinds=kinds or devbench.KINDS,
                          nics=devbench.DEFAULT_NICS if nics is None else nics, progress=progress)

    # -- networks ----------------------------------------------------------------------------------
    def create_network(self, name: str, *, subnet: str | None = None, mode: str = "nat",
                       domain: str | None = None) -> models.NetworkView:
        """A vmkit network (``vmkit network create``): ``mode`` nat, isolated, routed (these need root)
        or rootless; ``subnet`` an IPv4 CIDR (default: a free /24 in 10.117.0.0/16); ``domain``
        the DNS domain machines are found under (default: the name). It is up when this returns."""
        from vmkit.backends.local import networks

        return self._call(networks.create, name, subnet=subnet, mode=mode, domain=domain)

    def networks(self) -> builtins.list[models.NetworkView]:
        """Every vmkit network of this home."""
        from vmkit.backends.local import networks

        return self._call(networks.list_networks)

    def network(self, name: str) -> models.NetworkView:
        """One network: its definition, whether it is up, and its machines with their addresses."""
        from vmkit.backends.local import networks

        return self._call(networks.inspect, name)

    def delete_network(self, name: str, *, force: bool = False) -> models.NetworkDeleted:
        """Take a network down and remove it; refused while machines on it run (``force``: stop them hard)."""
        from vmkit.backends.local import control

        return self._call(control.delete_network, name, force=force)

    def clean_networks(self) -> builtins.list[str]:
        """Remove what vmkit left on the host for networks that no longer exist; returns what it removed."""
        from vmkit.backends.local import networks

        return self._call(networks.sweep)

    # -- the state-file key ------------------------------------------------------------------------
    def key_info(self) -> models.KeyInfo:
        """The state-file key that encrypts saved machine states: where, its fingerprint, retired keys."""
        from vmkit.state import key as keys

        def info() -> models.KeyInfo:
            path = keys.key_path()
            return models.KeyInfo(path=str(path), key_id=keys.key_id(keys.load_key()) if path.exists() else None,
                                  retired_key_ids=[keys.key_id(k) for k in keys.load_retired_keys()])

        return self._call(info)

    def rotate_key(self, files: Sequence[str | Path] = ()) -> models.KeyRotation:
        """A new state-file key; every machine's saved state and ``files`` are re-encrypted with it
        (no machine may run). See :func:`vmkit.backends.local.statectl.rotate_key`."""
        from vmkit.backends.local import statectl
        from vmkit.state import key as keys

        def rotate() -> models.KeyRotation:
            done = statectl.rotate_key([Path(f) for f in files])
            return models.KeyRotation(
                path=str(keys.key_path()), old_key_id=done.old_key_id, new_key_id=done.new_key_id,
                reencrypted=[str(p) for p in done.reencrypted],
                skipped=[models.SkippedFile(path=str(p), reason=why) for p, why in done.skipped])

        return self._call(rotate)

    # -- automatic ballooning (host-wide, one controller per home) ----------------------------------
    def autoballoon_start(self, *, target_percent: float = 80.0, step: int | str = "100M", interval: float = 5.0,
                          meminfo: str | Path | None = None) -> models.AutoballoonStatus:
        """Start the automatic balloon controller of this home (``vmkit host autoballoon on``): it keeps the
        host at ``target_percent`` of its memory by moving running guests' balloons, ``step`` at a
        time, every ``interval`` s. ``meminfo``: read the host's figures from this file (the format of
        /proc/meminfo) instead: a simulated host. Already running: nothing changes
        (``already_running`` in the result)."""
        from vmkit.backends.local import balloonctl

        def start() -> models.AutoballoonStatus:
            settings = balloonctl.settings_from_options(target_percent, step, interval, meminfo)
            return balloonctl.start(settings)

        return self._call(start)

    def autoballoon_stop(self) -> models.AutoballoonStatus:
        """Stop the controller; the balloons stay where it left them."""
        from vmkit.backends.local import balloonctl

        return self._call(balloonctl.stop)

    def autoballoon_status(self) -> models.AutoballoonStatus:
        """Whether the controller runs, its settings and its last round (host figures, each guest, the
        targets it set)."""
        from vmkit.backends.local import balloonctl

        return self._call(balloonctl.status)

    def __repr__(self) -> str:
        return f"vmkit.Client(home={str(self.home) if self.home else None!r})"


class Instance:
    """A handle on one machine; every call reads or changes the machine as it is now."""

    def __new__(cls, client: Client, name: str) -> Instance:
        if cls is Instance and client.host is not None:
            return super().__new__(RemoteInstance)
        return super().__new__(cls)

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
        from vmkit.backends.local import listing
        from vmkit.host.instance import Instance as Record

        return self._call(lambda: listing.view(Record(self.name).require()))

    def status(self) -> models.RuntimeStatus:
        from vmkit.host.instance import Instance as Record

        return _status(self._call(lambda: Record(self.name).require().reconcile()))

    def info(self) -> dict[str, Any]:
        """Configuration and runtime status (``vmkit inspect``)."""
        from vmkit.backends.local import listing

        return self._call(listing.inspect, self.name)

    @property
    def config(self) -> MachineConfig:
        from vmkit.host.instance import Instance as Record

        return self._call(lambda: Record(self.name).require().load_config())

    @property
    def directory(self) -> Path:
        """The instance directory (vm.yaml, logs, sockets, disks made by vmkit)."""
        from vmkit.host.instance import Instance as Record

        return self._call(lambda: Record(self.name).require().dir)

    def libvirt_xml(self, *, hostfwd: bool = False) -> str:
        """The machine as a libvirt domain (``vmkit export NAME --libvirt``): its files where they are
        on this host. Raises :class:`~vmkit.errors.ConfigError` naming each setting libvirt cannot express.
        ``hostfwd``: without the user-mode port forwards, which :meth:`libvirt_hostfwd` adds to the running
        domain."""
        from vmkit.backends.local import export

        return self._call(export.libvirt_xml, self.name, hostfwd=hostfwd)

    def libvirt_hostfwd(self) -> list[list[str]]:
        """The ``virsh`` commands that add this machine's port forwards to its running libvirt domain."""
        from vmkit.backends.local import export

        return self._call(export.hostfwd_commands, self.name)

    def qemu_argv(self) -> list[str]:
        """The QEMU command line :meth:`start` would run (``vmkit start --dry-run``; file descriptors
        shown as the supervisor passes them)."""
        from vmkit.backends.local import control

        return self._call(control.dry_run_argv, self.name)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, *, timeout: float | None = None, cold: bool = False, progress: ConsoleProgress | None = None,
              state_progress: ByteProgress | None = None, notice: Notice | None = None) -> models.StartResult:
        """Boot the machine, or resume its saved state if it has one (``cold``: boot anyway); returns
        once the guest is ready. ``progress`` receives console lines while it boots,
        ``state_progress`` the bytes of a saved state being resumed, ``notice`` what to tell the user
        (resuming, or why the saved state was not used)."""
        from vmkit.backends.local import statectl

        return _start_result(self._call(statectl.start, self.name, timeout=timeout, cold=cold, progress=progress,
                                        state_progress=state_progress, notice=notice))

    def stop(self, *, force: bool = False, save: bool = False, timeout: float = 30.0) -> models.RuntimeStatus:
        """ACPI power button, then a hard stop after ``timeout`` s (``force``: hard stop now;
        ``save``: save the running state first, so that :meth:`start` resumes it)."""
        if save:
            from vmkit.backends.local import statectl

            return _status(self._call(statectl.save, self.name, keep_running=False).status)
        from vmkit.backends.local import control

        return _status(self._call(control.stop, self.name, force=force, timeout=timeout))

    def pause(self) -> models.RuntimeStatus:
        from vmkit.backends.local import control

        return _status(self._call(control.pause, self.name))

    def resume(self) -> models.ResumeResult:
        from vmkit.backends.local import control

        resumed = self._call(control.resume, self.name)
        return models.ResumeResult.model_validate({**resumed.status.to_dict(), "clock": resumed.clock})

    def save(self, path: str | Path | None = None, *, keep_running: bool = False, force: bool = False,
             progress: ByteProgress | None = None) -> models.SaveOutcome:
        """Save the running state to ``path`` (default: the machine's own, resumed by :meth:`start`);
        ``progress`` receives the bytes written."""
        from vmkit.backends.local import statectl

        out = self._call(statectl.save, self.name, _path(path), keep_running=keep_running, force=force,
                         progress=progress)
        return models.SaveOutcome(path=str(out.path), payload_bytes=out.payload_bytes, file_bytes=out.file_bytes,
                                  seconds=out.seconds, keep_running=out.keep_running, clock=_clock(out.clock),
                                  status=_status(out.status))

    def migrate(self, target: str, *, method: str = "auto", downtime_limit_ms: int | None = None,
                bandwidth_bytes: int | None = None, auto_converge: bool = True, postcopy: bool = False,
                max_rounds: int = 30, verify: bool = False, shared_storage: bool = False,
                copy_storage: bool = False, tls: bool = False,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Move the running machine to ``target`` (``ssh://[user@]HOST[:PORT]``, see :mod:`vmkit.migrate`);
        ``on_event`` receives progress lines. On success it runs there and is ``migrated`` here."""
        from vmkit.migrate import send

        opts = send.Options(method=method, downtime_limit_ms=downtime_limit_ms, bandwidth_bytes=bandwidth_bytes,
                            auto_converge=auto_converge, postcopy=postcopy, max_rounds=max_rounds, verify=verify,
                            shared_storage=shared_storage, copy_storage=copy_storage, tls=tls)
        return self._call(send.migrate, self.name, target, opts, on_event=on_event).to_dict()

    def cancel_migration(self, *, force: bool = False) -> dict[str, Any]:
        """Cancel the machine's migration in flight, or take back a completed one that its target did not take
        over (the guest runs here again); refused while the target has the machine, or cannot be asked unless
        ``force`` (see :func:`vmkit.migrate.send.cancel`)."""
        from vmkit.migrate import send

        return self._call(send.cancel, self.name, force=force)

    def move(self, target: str, *, on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Move the stopped or saved machine to ``target`` (``vmkit migrate --offline``): disks, files
        and its saved state (re-encrypted there for that user), so that starting it there resumes it."""
        from vmkit.migrate import send

        return self._call(send.move_offline, self.name, target, on_event=on_event)

    def restore(self, path: str | Path | None = None, *, force: bool = False, paused: bool = False,
                timeout: float | None = None, progress: ConsoleProgress | None = None,
                state_progress: ByteProgress | None = None) -> models.StartResult:
        """Start the stopped machine from a state file (default: its own saved state; ``force``: even
        if its disks changed; ``paused``: leave it paused)."""
        from vmkit.backends.local import statectl

        return _start_result(self._call(statectl.restore, self.name, _path(path), force=force, paused=paused,
                                        timeout=timeout, progress=progress, state_progress=state_progress))

    def delete(self, *, force: bool = False) -> None:
        self.client.delete(self.name, force=force)

    def clone(self, name: str, *, notice: Callable[[str], None] | None = None) -> Instance:
        """An independent copy of this stopped machine, named ``name`` (see :meth:`Client.clone`)."""
        return self.client.clone(self.name, name, notice=notice)

    # -- the guest ---------------------------------------------------------------------------------
    def exec(self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = 60.0) -> models.ExecResult:
        """Run ``argv`` in the guest through its agent: ``.exit_code``, ``.stdout``, ``.stderr`` (bytes)."""
        from vmkit.backends.local import control

        res = self._call(control.exec_in_guest, self.name, list(argv), timeout=timeout, stdin=stdin)
        return models.ExecResult.of(res.exit_code, res.stdout, res.stderr, res.signal)

    def copy_in(self, local: str | Path, remote: str) -> int:
        """Copy a host file into the guest (``remote`` ending in ``/``: into that directory)."""
        return self.client.copy(str(local), f"{self.name}:{remote}")

    def copy_out(self, remote: str, local: str | Path) -> int:
        """Copy a guest file to the host (atomically; a directory ``local`` receives it by name)."""
        return self.client.copy(f"{self.name}:{remote}", str(local))

    def ssh_argv(self, command: Sequence[str] = (), *, tty: bool = False) -> list[str]:
        """The ``ssh`` command line that logs in (or runs ``command``) with the pinned host key and the
        machine's own key (``vmkit shell``; cloud images only)."""
        from vmkit.backends.local import control

        return self._call(control.ssh_argv, self.name, list(command), tty=tty)

    def ssh_config(self) -> str:
        """An OpenSSH config for the machine (``ssh -F FILE NAME``; cloud images only)."""
        from vmkit.backends.local import control

        return self._call(control.ssh_config, self.name)

    def console_log(self) -> str:
        """What the guest has printed on its serial console so far."""
        return self.console_bytes().decode("utf-8", errors="replace")

    def console_bytes(self) -> bytes:
        """What the guest has printed on its serial console so far, as it printed it."""
        from vmkit.host.instance import Instance as Record
        from vmkit.runtime.serial import read_log

        return self._call(lambda: read_log(Record(self.name).require().serial_log))

    def wait_console(self, pattern: str, *, timeout: float = 60.0) -> str:
        """Wait until the console log matches ``pattern`` (a multiline regex); return the log so far."""
        from vmkit.backends.local import control

        return self._call(control.wait_console, self.name, pattern, timeout)

    def attach_console(self, input_fd: int, on_output: Callable[[bytes], None], *, detach: bytes | None = None,
                       on_connected: Callable[[], None] | None = None) -> None:
        """Connect the serial console: bytes read from ``input_fd`` go to the guest until end of file
        or ``detach`` (default Ctrl-]); what the guest prints goes to ``on_output``. ``on_connected`` runs once
        the console is reached. Returns when detached or the machine stops."""
        from vmkit.backends.local import control

        self._call(control.attach_console, self.name, input_fd, on_output, detach=detach, on_connected=on_connected)

    # -- devices -----------------------------------------------------------------------------------
    @property
    def ports(self) -> list[PortForward]:
        from vmkit.backends.local import control

        return self._call(control.port_list, self.name)

    def add_port(self, spec: str) -> PortForward:
        """Forward a host port (``8080:80``, ``127.0.0.1:5353:53/udp``): live if running, and in vm.yaml."""
        from vmkit.backends.local import control

        return self._call(control.port_add, self.name, spec)

    @property
    def disks(self) -> list[models.DiskRow]:
        from vmkit.backends.local import control

        return [models.DiskRow.model_validate(r) for r in self._call(control.list_disks, self.name)]

    def attach_disk(self, spec: str, *, disk_id: str | None = None) -> models.DiskAttached:
        from vmkit.backends.local import control

        return models.DiskAttached.model_validate(self._call(control.attach_disk, self.name, spec, disk_id=disk_id))

    def detach_disk(self, disk_id: str, *, timeout: float = 30.0) -> None:
        from vmkit.backends.local import control

        self._call(control.detach_disk, self.name, disk_id, timeout=timeout)

    # -- memory and statistics ---------------------------------------------------------------------
    def set_balloon(self, size: int | str, *, timeout: float = 10.0) -> models.BalloonResult:
        """Move the running guest's usable memory to ``size`` (bytes or ``512M``; at most the machine's
        memory, at least 64M) with its balloon, waiting up to ``timeout`` s for the guest to get there
        (``reached``). Lasts until the machine stops; vm.yaml is not changed."""
        from vmkit.backends.local import control

        return self._call(control.set_balloon, self.name, size, timeout=timeout)

    def set_limits(self, **changes: int | str | None) -> models.LimitsResult:
        """Change the machine's cgroup limits: ``cpu_weight`` (1-10000), ``cpu_max`` (percent of one host
        core), ``cpu_pin`` (``"0-1,3"``), ``memory_min``, ``memory_high``, ``memory_max``, ``swap_max``
        (bytes or ``"1G"``); ``None`` or ``"none"`` removes one. Live when it runs (and written to
        vm.yaml), else for its next start."""
        from vmkit.backends.local import control

        return self._call(control.set_limits, self.name, dict(changes))

    def set_cpus(self, count: int, *, timeout: float = 30.0) -> models.CpusResult:
        """Give the machine ``count`` vCPUs (1 to its max_cpus). Running: live, waiting up to ``timeout`` s
        for the guest to release vCPUs it gives up; stopped: for its next start. vm.yaml's ``cpus`` follows."""
        from vmkit.backends.local import control

        return self._call(control.set_cpus, self.name, count, timeout=timeout)

    def set_memory(self, size: int | str, *, timeout: float = 10.0) -> models.MemoryResult:
        """Give the machine ``size`` of memory (bytes or ``3G``: its boot memory up to its max_memory) through
        its virtio-mem region. Running: live, waiting up to ``timeout`` s for the guest (``reached``);
        stopped: for its next start. vm.yaml's ``plugged_memory`` follows."""
        from vmkit.backends.local import control

        return self._call(control.set_memory, self.name, size, timeout=timeout)

    def set_balloon_policy(self, *, balloon_min: int | str | None = None,
                           balloon_shares: int | None = None) -> MachineConfig:
        """What automatic ballooning may do with this machine: leave it at least ``balloon_min`` (e.g.
        ``"512M"``) and share the host's memory by ``balloon_shares`` (0: leave its balloon alone).
        Written to vm.yaml; holds at once. Returns the new configuration."""
        from vmkit.backends.local import control

        return self._call(control.set_balloon_policy, self.name, balloon_min=balloon_min,
                          balloon_shares=balloon_shares)

    def stats(self) -> models.MachineStats:
        """Memory (balloon, guest, QEMU's RSS, host-wide KSM savings) and CPU use of the running machine."""
        from vmkit.backends.local import control

        return self._call(control.stats, self.name)

    # -- screen and keyboard (a machine with a display) ---------------------------------------------
    def screenshot(self, path: str | Path | None = None) -> bytes:
        """The screen now as PNG bytes (also written to ``path`` if given)."""
        from vmkit.backends.local import control

        png = self._call(control.screenshot, self.name)
        if path is not None:
            from vmkit.fsutil import atomic_write

            atomic_write(Path(path), png, 0o644)
        return png

    def send_keys(self, keys: Sequence[str], *, hold_ms: int = 50) -> models.KeysSent:
        """Press keys in turn: QEMU key names (``ret``, ``a``, ``f2``); ``ctrl-alt-delete`` together."""
        from vmkit.backends.local import control

        return self._call(control.send_keys, self.name, list(keys), hold_ms=hold_ms)

    def type(self, text: str, *, hold_ms: int = 50) -> models.KeysSent:
        """Type ``text`` on the machine's keyboard (US layout: printable ASCII, newlines, tabs)."""
        from vmkit.backends.local import control

        return self._call(control.type_text, self.name, text, hold_ms=hold_ms)

    def display(self) -> models.DisplayInfo:
        """The display's device, its size now and the size it booted with."""
        from vmkit.backends.local import control

        return self._call(control.display_info, self.name)

    def resize_display(self, size: str, *, timeout: float = 10.0) -> models.DisplayResized:
        """Ask the guest for display size ``size`` (``1024x768``); what it shows then."""
        from vmkit.backends.local import control

        return self._call(control.resize_display, self.name, size, timeout=timeout)

    def web_console(self, *, port: int = 0) -> models.WebConsole:
        """The web console's one-time URL (the supervisor serves it on 127.0.0.1)."""
        from vmkit.backends.local import control

        return self._call(control.web_console, self.name, port=port)

    @property
    def mounts(self) -> list[models.ShareRow]:
        """The shared folders, with whether each is active (``vmkit mount list``)."""
        from vmkit.backends.local import control

        return [models.ShareRow.model_validate(r) for r in self._call(control.list_mounts, self.name)]

    # -- snapshots ---------------------------------------------------------------------------------
    @property
    def snapshots(self) -> list[models.SnapshotInfo]:
        from vmkit.backends.local import statectl

        return [models.SnapshotInfo.model_validate(s.to_dict()) for s in self._call(statectl.snapshot_list, self.name)]

    def snapshot(self, tag: str | None = None) -> models.SnapshotInfo:
        """Snapshot RAM and disks (qcow2) under ``tag`` (default: a timestamp)."""
        from vmkit.backends.local import statectl

        return models.SnapshotInfo.model_validate(self._call(statectl.snapshot_create, self.name, tag).to_dict())

    def revert(self, tag: str, *, timeout: float | None = None, progress: ConsoleProgress | None = None,
               notice: Notice | None = None) -> models.StartResult:
        """Go back to snapshot ``tag`` (RAM and disks); a stopped machine is started from it."""
        from vmkit.backends.local import statectl

        return _start_result(self._call(statectl.snapshot_revert, self.name, tag, timeout=timeout,
                                        progress=progress, notice=notice))

    def delete_snapshot(self, tag: str) -> None:
        from vmkit.backends.local import statectl

        self._call(statectl.snapshot_delete, self.name, tag)

    # -- benchmarks --------------------------------------------------------------------------------
    def bench_fs(self, jobs: Sequence[Job], settings: Settings, *, shares: Sequence[str] | None = None,
                 disk: bool = True, progress: Callable[[Step], None] | None = None) -> Report:
        """fio in the running guest on every mounted share (``shares``: only these tags) and on its
        own disk (``disk``); see :mod:`vmkit.bench.fs` (:func:`~vmkit.bench.fs.select_jobs`,
        :func:`~vmkit.bench.fs.settings_for`)."""
        from vmkit.bench import fs as fsbench

        return self._call(fsbench.bench, self.name, jobs, settings, shares=shares, disk=disk, progress=progress)

    def write_bench_report(self, report: Report, json_path: str | Path | None = None,
                           markdown_path: str | Path | None = None) -> builtins.list[Path]:
        """Write a :meth:`bench_fs` report as JSON and Markdown (default: ``fsbench-TIME.json`` and
        ``.md`` in the instance directory); returns the paths written."""
        from vmkit.bench import fs as fsbench

        def write() -> builtins.list[Path]:
            default_json, default_md = fsbench.default_output_paths(self.name, report.started)
            return fsbench.write_report(report, _path(json_path) or default_json, _path(markdown_path) or default_md)

        return self._call(write)

    # -- events ------------------------------------------------------------------------------------
    def events(self) -> Iterator[models.Event]:
        """The machine's events as they happen (the first says its state now); ends when it stops.

        Close the iterator (or leave the ``for`` loop) to stop listening."""
        import asyncio
        import queue
        import threading

        from vmkit.backends.local import control

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


class RemoteClient(Client):
    """:class:`Client` for another host (what ``Client(host=URI)`` makes): each public method runs in
    that host's vmkit (:mod:`vmkit.client.remote`)."""

    def __init__(self, home: str | Path | None = None, *, host: str | None = None) -> None:
        from vmkit.backends import resolve
        from vmkit.errors import ConfigError

        if home is not None:
            raise ConfigError.single("home", "a vmkit home belongs to one host: give home (this host) or host")
        remote = resolve(host, field="host")
        assert remote is not None
        super().__init__()
        self.host = remote.uri
        self.remote: SshHost = remote

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name in ("home", "host", "remote"):
            return object.__getattribute__(self, name)
        from vmkit.client import remote

        got = remote.bind(object.__getattribute__(self, "remote"), self, Instance, Client, None, name)
        return got if got is not None else object.__getattribute__(self, name)

    def __repr__(self) -> str:
        return f"vmkit.Client(host={self.host!r})"


class RemoteInstance(Instance):
    """:class:`Instance` of a machine on another host."""

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name in ("client", "name"):
            return object.__getattribute__(self, name)
        from vmkit.client import remote

        client = object.__getattribute__(self, "client")
        got = remote.bind(client.remote, client, Instance, Instance, object.__getattribute__(self, "name"), name)
        return got if got is not None else object.__getattribute__(self, name)

    def __repr__(self) -> str:
        return f"<vmkit.Instance {self.name} on {self.client.host}>"
