"""vmkit's machine operations on a libvirt host (``vmkit --connect URI ...``, ``vmkit.Client(connect=URI)``).

Where things live:

* the machine is a persistent libvirt domain of the same name, defined from
  :func:`vmkit.libvirt.domain.domain_xml`; its vm.yaml travels in the domain's ``<metadata>``
  (so ``vmkit --connect URI list`` from any client sees it, and a machine without that element is
  not vmkit's and is left alone);
* its files are volumes of the host's ``vmkit`` storage pool (:mod:`.storage`): nothing of vmkit is
  needed on that host;
* what must stay with the client, a cloud guest's SSH key, host keys and ssh_config, is in
  ``$VMKIT_HOME/libvirt/<host>/instances/<name>/`` (0700; ``<host>`` is a digest of the URI).

The guest is reached through libvirt: the agent with ``qemuAgentCommand`` (exec, cp), the serial
console with ``virDomainOpenConsole`` (interactive) and the log volume (``console --log``,
readiness markers), events with domain event callbacks, save/restore with managed save,
snapshots with libvirt's internal snapshots, migration with ``virDomainMigrate3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from vmkit.api import models
from vmkit.backends.libvirt import storage
from vmkit.backends.libvirt.connection import check_uri, open_connection, translated
from vmkit.backends.local.control import guest_side
from vmkit.config import DiskImage, MachineConfig
from vmkit.errors import ConfigError, NotFoundError, StateError, VmkitError, VmTimeoutError
from vmkit.host import paths
from vmkit.host.builder import CreateOptions, config_from_options, disk_size_option
from vmkit.host.images.store import Image, ImageStore
from vmkit.host.provision import DISK, SEED, CloudOptions, write_identity
from vmkit.libvirt.domain import (
    DomainFiles,
    DomainType,
    NicTarget,
    config_from_domain_xml,
    domain_xml,
    hostfwd_commands,
)
from vmkit.runtime.guest.agent import GuestAgentError
from vmkit.runtime.guest.execute import ExecResult, guest_exec
from vmkit.runtime.guest.files import copy_from_guest, copy_to_guest

if TYPE_CHECKING:
    import libvirt

# libvirt's domain states (virDomainState) as vmkit's
_STATES = {0: "stopped", 1: "running", 2: "running", 3: "paused", 4: "stopping", 5: "stopped", 6: "error",
           7: "paused"}
_LIVE = ("running", "paused", "stopping")


@dataclass(frozen=True)
class Started:
    status: models.RuntimeStatus
    restored: bool


class LibvirtHost:
    """One libvirt host (a URI) and the vmkit machines on it. Opened lazily; one connection reused."""

    def __init__(self, uri: str) -> None:
        self.uri = check_uri(uri)
        self._conn: libvirt.virConnect | None = None

    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None:
            self._conn = open_connection(self.uri)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    # -- where things are ------------------------------------------------------------------------
    def local_dir(self, name: str) -> Path:
        """This client's files of machine ``name`` (keys, ssh_config): ``$VMKIT_HOME/libvirt/<host>/instances/NAME``."""
        return self._home() / "instances" / name

    def _home(self) -> Path:
        digest = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        return paths.data_dir() / "libvirt" / digest

    def domain(self, name: str) -> libvirt.virDomain:
        """The vmkit machine ``name`` there (NotFoundError if there is none, or it is not vmkit's)."""
        with translated("find", name=name, uri=self.uri):
            dom = self.conn.lookupByName(name)
        if config_from_domain_xml(dom.XMLDesc(0)) is None:
            raise NotFoundError("machine", name, hint=f"{name} on {self.uri} was not made by vmkit")
        return dom

    def config(self, name: str) -> MachineConfig:
        cfg = config_from_domain_xml(self.domain(name).XMLDesc(0))
        assert cfg is not None
        return cfg

    def state(self, dom: libvirt.virDomain) -> str:
        with translated("read the state of", name=dom.name(), uri=self.uri):
            code = dom.state(0)[0]
        return _STATES.get(code, "error")

    def status(self, dom: libvirt.virDomain) -> models.RuntimeStatus:
        state = self.state(dom)
        reason = ""
        if state == "stopped" and dom.hasManagedSaveImage(0):
            reason = "saved: start resumes it"
        return models.RuntimeStatus.model_validate({"state": state, "reason": reason,
                                                    "accel": "tcg" if _domain_type(dom) == "qemu" else "kvm"})

    def _require(self, dom: libvirt.virDomain, operation: str, *allowed: str) -> str:
        state = self.state(dom)
        if state not in allowed:
            raise StateError(operation, state, list(allowed))
        return state

    # -- create and delete ---------------------------------------------------------------------------
    def create_from_options(self, opts: CreateOptions, *, progress: Callable[[str], None] | None = None) -> str:
        """``vmkit --connect URI create NAME --image ...``: the configuration is built here as for a
        local machine, its files uploaded to the host's pool, the domain defined there. All or nothing."""
        self._check_free(opts.name)
        store = ImageStore()
        image = store.get(opts.image) if opts.image is not None else None
        local = self.local_dir(opts.name)
        with paths.using_home(self._home()):
            config = config_from_options(opts, store)
        if image is not None and image.manifest.kind == "disk" and config.agent:
            user_data = opts.user_data.read_text() if opts.user_data is not None else None
            paths.make_dirs(local.parent)
            shutil.rmtree(local, ignore_errors=True)
            local.mkdir(mode=0o700)
            try:
                write_identity(local, config, CloudOptions(user_data=user_data), _instance_id())
                return self._define(config, image=image, disk_size=disk_size_option(opts), progress=progress)
            except BaseException:
                shutil.rmtree(local, ignore_errors=True)
                raise
        return self._define(config, image=image, progress=progress)

    def create(self, config: MachineConfig, *, progress: Callable[[str], None] | None = None) -> str:
        """Define a machine from its configuration (its files uploaded to the host's pool)."""
        self._check_free(config.name)
        config.ensure_valid(host=False)
        return self._define(config, image=None, progress=progress)

    def _check_free(self, name: str) -> None:
        import libvirt

        try:
            self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            raise
        from vmkit.errors import AlreadyExistsError

        raise AlreadyExistsError("machine", name, hint=f"vmkit --connect {self.uri} delete {name}")

    def _define(self, config: MachineConfig, *, image: Image | None, disk_size: str | None = None,
                progress: Callable[[str], None] | None = None) -> str:
        say = progress or (lambda _m: None)
        nics = self._nic_targets(config)
        joined = config
        if config.networks and _is_local(self.uri):
            from vmkit.backends.local import networks

            joined = networks.join_all(config)  # its MAC and static address on each vmkit network
        try:
            return self._define_joined(joined, nics, image=image, disk_size=disk_size, say=say)
        except BaseException:
            if joined is not config:
                from vmkit.backends.local import networks

                networks.leave_all(joined)
            raise

    def _nic_targets(self, config: MachineConfig) -> dict[str, NicTarget]:
        """Where each NIC on a vmkit network plugs in there. On this host (``qemu:///system``) the vmkit
        network's bridge (``vmkbr-NAME``; rootless networks are refused by name). On another host vmkit's
        networks do not exist: a libvirt network of the same name there is used (its own DHCP gives the
        address), and without one the NIC is refused, naming the network."""
        if not config.networks:
            return {}
        if _is_local(self.uri):
            from vmkit.backends.local.export import nic_targets

            return nic_targets(config)
        import libvirt

        from vmkit.errors import Problem

        out: dict[str, NicTarget] = {}
        problems = []
        for i, iface in enumerate(config.networks):
            try:
                self.conn.networkLookupByName(iface.network)
            except libvirt.libvirtError:
                problems.append(Problem(f"networks[{i}].network", f"vmkit network {iface.network!r} is a bridge on "
                                        f"this host, and {self.uri} has no libvirt network of that name: define one "
                                        "there (virsh net-define), or leave --network out"))
                continue
            out[iface.network] = NicTarget("network", iface.network)
        if problems:
            raise ConfigError(problems, context="libvirt domain")
        return out

    def _networks_up(self, cfg: MachineConfig) -> None:
        """Bring the machine's vmkit networks up on this host before its domain starts (bridge, DHCP with
        its static lease): a start on the libvirt of this host, as the local supervisor does."""
        if not cfg.networks or not _is_local(self.uri):
            return
        from vmkit.backends.local import networks

        networks.check_can_start(cfg)
        joined = networks.join_all(cfg)
        if joined != cfg:
            raise ConfigError.single("networks", f"{cfg.name}'s NICs have no MAC or address on their vmkit networks "
                                     "(the network was made again?): delete the machine and create it again")
        for iface in cfg.networks:
            networks.store().ensure_up(iface.network)

    def _define_joined(self, config: MachineConfig, nics: dict[str, NicTarget], *, image: Image | None,
                       disk_size: str | None, say: Callable[[str], None]) -> str:
        pool = storage.pool(self.conn)
        name = config.name
        made: list[libvirt.virStorageVol] = []
        try:
            kernel = initrd = None
            if config.boot.kernel is not None:
                say(f"uploading the kernel {config.boot.kernel.name}")
                kernel = storage.upload_shared(self.conn, pool, config.boot.kernel).path()
            if config.boot.initrd is not None:
                say(f"uploading the initrd {config.boot.initrd.name}")
                initrd = storage.upload_shared(self.conn, pool, config.boot.initrd).path()
            disks: dict[str, str] = {}
            local = self.local_dir(name)
            for i, dev in enumerate(config.storage):
                att = dev.attachment
                if not isinstance(att, DiskImage):
                    continue  # NBD: the host reaches the server itself
                disk_id = dev.id or f"disk{i}"
                if image is not None and image.disk is not None and att.path == local / DISK:
                    say(f"uploading the image {image.name}'s disk (once per host)")
                    fmt = image.manifest.disk_format or "qcow2"
                    sha = image.manifest.files.get(image.manifest.disk or "", None)
                    base = storage.upload_shared(self.conn, pool, image.disk, fmt=fmt,
                                                 sha256=getattr(sha, "sha256", None))
                    size = _size(disk_size) if disk_size else None
                    vol = storage.overlay(pool, storage.own_volume(name, "root.qcow2"), base, base_format=fmt,
                                          size=size)
                elif att.path == local / SEED:
                    say("uploading the cloud-init seed")
                    vol = storage.upload(self.conn, pool, storage.own_volume(name, "seed.iso"), local / SEED)
                else:
                    if not att.path.is_file():
                        raise ConfigError.single(f"storage[{i}].attachment.path", f"{att.path} does not exist here "
                                                 "(it is uploaded to the host's storage pool)")
                    say(f"uploading disk {disk_id}")
                    vol = storage.upload(self.conn, pool, storage.own_volume(name, f"disk-{disk_id}"), att.path,
                                         fmt=att.format)
                made.append(vol)
                disks[disk_id] = vol.path()
            serial_log = f"{storage.POOL_PATH}/{storage.own_volume(name, 'serial.log')}"
            xml = domain_xml(config, domain_type=self._domain_type(), forwards="hostfwd", nics=nics,
                             files=DomainFiles(kernel=kernel, initrd=initrd, disks=disks, serial_log=serial_log))
            with translated("define", name=name, uri=self.uri):
                self.conn.defineXML(xml)
        except BaseException:
            for vol in made:
                with contextlib.suppress(Exception):  # best effort: the original error matters
                    vol.delete(0)
            raise
        return name

    def _domain_type(self) -> DomainType:
        """For ``accel: auto``: ``kvm`` when the host offers it and, on this host, vmkit's own probe says
        it works (nested KVM can be offered and still hang or abort); on another host ``qemu`` (TCG),
        since it cannot be probed from here: ask for ``accel: kvm`` (``--accel kvm``) there."""
        caps = self.conn.getCapabilities()
        if "<domain type='kvm'" not in caps or not _is_local(self.uri):
            return "qemu"
        from vmkit.runtime.qemu import accel

        try:
            return "kvm" if accel.choose("auto").name == "kvm" else "qemu"
        except Exception:
            return "qemu"

    def delete(self, name: str, *, force: bool = False) -> None:
        """Undefine the machine and remove its own volumes (``force``: stop it first)."""
        import libvirt

        dom = self.domain(name)
        state = self.state(dom)
        if state in _LIVE:
            if not force:
                raise StateError("delete", state, ["stopped"])
            with translated("stop", name=name, uri=self.uri):
                dom.destroy()
        cfg = self.config(name)
        files = [path for path, _fmt, _writable in _domain_files(dom)]
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        with translated("delete", name=name, uri=self.uri):
            dom.undefineFlags(flags)
        storage.delete_machine_volumes(storage.pool(self.conn), name, files)
        shutil.rmtree(self.local_dir(name), ignore_errors=True)
        if cfg.networks and _is_local(self.uri):
            from vmkit.backends.local import networks

            networks.leave_all(cfg)

    # -- listing -----------------------------------------------------------------------------------
    def rows(self) -> list[models.InstanceRow]:
        """Every vmkit machine there, as ``vmkit list`` shows it."""
        out = []
        with translated("list the machines", uri=self.uri):
            domains = self.conn.listAllDomains(0)
        for dom in sorted(domains, key=lambda d: d.name()):
            try:
                cfg = config_from_domain_xml(dom.XMLDesc(0))
            except ConfigError as exc:
                out.append(models.InstanceRow(name=dom.name(), state="broken", cpus=None, memory=None, accel=None,
                                              uptime=None, reason=exc.message))
                continue
            if cfg is None:
                continue
            st = self.status(dom)
            state = "saved" if st.state == "stopped" and st.reason.startswith("saved") else st.state
            out.append(models.InstanceRow(name=dom.name(), state=state, cpus=cfg.cpus, memory=_human(cfg.memory),
                                          accel=st.accel, uptime=None, reason=""))
        return out

    def inspect(self, name: str) -> dict[str, Any]:
        dom = self.domain(name)
        cfg = self.config(name)
        return {"name": name, "connect": self.uri, "uuid": dom.UUIDString(), "config": cfg.to_dict(),
                "runtime": self.status(dom).to_dict(),
                "client_files": str(self.local_dir(name)) if self.local_dir(name).exists() else None}

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, name: str, *, timeout: float | None = None,
              progress: Callable[[str], None] | None = None) -> Started:
        """Start (or resume its managed save); returns once the guest is ready (its readiness)."""
        dom = self.domain(name)
        self._require(dom, "start", "stopped")
        restored = bool(dom.hasManagedSaveImage(0))
        cfg = self.config(name)
        log_from = 0 if restored else self._log_size(name)
        self._networks_up(cfg)
        with translated("start", name=name, uri=self.uri):
            dom.create()
        self._add_forwards(dom, cfg)
        if not restored:
            self._wait_ready(name, cfg, log_from, timeout, progress)
        return Started(self.status(dom), restored)

    def _add_forwards(self, dom: libvirt.virDomain, cfg: MachineConfig, *, replace: bool = False) -> None:
        """The user-mode port forwards of vm.yaml, added to the domain's running QEMU (libvirt 9.0 has no
        element for them: HMP ``hostfwd_add`` through libvirt, :func:`vmkit.libvirt.domain.hostfwd_commands`).
        The ports are on the libvirt host's addresses (its loopback for the SSH forward). With ``replace``
        each is removed first where it exists (a snapshot's revert may or may not have kept them)."""
        import libvirt_qemu

        for command in hostfwd_commands(cfg):
            if replace:  # hostfwd_add NETDEV PROTO:ADDR:PORT-:GUEST -> hostfwd_remove NETDEV PROTO:ADDR:PORT
                _, netdev, rule = command.split(" ", 2)
                with translated("forward a port to", name=dom.name(), uri=self.uri):
                    libvirt_qemu.qemuMonitorCommand(dom, f"hostfwd_remove {netdev} {rule.split('-')[0]}",
                                                    libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
            with translated("forward a port to", name=dom.name(), uri=self.uri):
                answer = libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
            if answer.strip():
                from vmkit.errors import QemuError

                raise QemuError(f"cannot forward {command.split()[-1]} to {dom.name()}: {answer.strip()}",
                                hint="is the host port taken? vmkit --connect URI inspect NAME shows the forwards")

    def _wait_ready(self, name: str, cfg: MachineConfig, log_from: int, timeout: float | None,
                    progress: Callable[[str], None] | None) -> None:
        ready = cfg.readiness
        deadline = time.monotonic() + (timeout or ready.timeout)
        if ready.serial_marker:
            self.wait_console(name, re.escape(ready.serial_marker), max(1.0, deadline - time.monotonic()),
                              offset=log_from, progress=progress)
        if ready.agent and cfg.agent:
            dom = self.domain(name)
            while True:
                if self.state(dom) not in _LIVE:
                    raise VmkitError(f"{name} stopped while it was starting",
                                     hint=f"vmkit --connect {self.uri} console {name} --log")
                try:
                    self._agent(dom, "guest-ping", None, 5)
                    return
                except VmkitError:
                    if time.monotonic() > deadline:
                        raise VmTimeoutError(f"{name}'s guest agent did not answer within "
                                             f"{timeout or ready.timeout:.0f} s") from None
                if progress is not None:
                    progress(self._last_line(name))
                time.sleep(1.0)

    def stop(self, name: str, *, force: bool = False, timeout: float = 30.0) -> models.RuntimeStatus:
        """ACPI power button, then a hard stop after ``timeout`` s (``force``: hard stop now)."""
        dom = self.domain(name)
        self._require(dom, "stop", *_LIVE)
        if not force:
            with translated("stop", name=name, uri=self.uri):
                if self.state(dom) == "paused":
                    dom.resume()
                dom.shutdown()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.state(dom) in _LIVE:
                time.sleep(0.2)
        if self.state(dom) in _LIVE:
            with translated("stop", name=name, uri=self.uri):
                dom.destroy()
        return self.status(dom)

    def pause(self, name: str) -> models.RuntimeStatus:
        dom = self.domain(name)
        self._require(dom, "pause", "running")
        with translated("pause", name=name, uri=self.uri):
            dom.suspend()
        return self.status(dom)

    def resume(self, name: str) -> models.ResumeResult:
        dom = self.domain(name)
        self._require(dom, "resume", "paused")
        with translated("resume", name=name, uri=self.uri):
            dom.resume()
        clock = self._fix_clock(dom)
        return models.ResumeResult.model_validate({**self.status(dom).to_dict(), "clock": clock.model_dump()})

    def _fix_clock(self, dom: libvirt.virDomain) -> models.ClockFix:
        """The guest clock set from the host's (virDomainSetTime through the agent), if it has one."""
        import libvirt

        if not self.config(dom.name()).agent:
            return models.ClockFix(corrected=False, behind_seconds=None, message="no guest agent: clock not set")
        try:
            dom.setTime(None, libvirt.VIR_DOMAIN_TIME_SYNC)
        except libvirt.libvirtError as exc:
            return models.ClockFix(corrected=False, behind_seconds=None, message=f"clock not set: {exc}")
        return models.ClockFix(corrected=True, behind_seconds=None, message="guest clock set from the host's")

    # -- saved state and snapshots ------------------------------------------------------------------
    def save(self, name: str) -> models.RuntimeStatus:
        """Managed save: the running state is kept by libvirt; ``start`` resumes it."""
        dom = self.domain(name)
        self._require(dom, "save", "running", "paused")
        with translated("save", name=name, uri=self.uri):
            dom.managedSave(0)
        return self.status(dom)

    def restore(self, name: str, *, paused: bool = False) -> models.RuntimeStatus:
        import libvirt

        dom = self.domain(name)
        self._require(dom, "restore", "stopped")
        if not dom.hasManagedSaveImage(0):
            raise NotFoundError("saved state of", name, hint=f"vmkit --connect {self.uri} save {name} first")
        self._networks_up(self.config(name))
        with translated("restore", name=name, uri=self.uri):
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
        self._add_forwards(dom, self.config(name))
        return self.status(dom)

    def snapshots(self, name: str) -> list[models.SnapshotInfo]:
        import xml.etree.ElementTree as ET

        dom = self.domain(name)
        out = []
        with translated("list the snapshots of", name=name, uri=self.uri):
            snaps = dom.listAllSnapshots(0)
        for snap in snaps:
            root = ET.fromstring(snap.getXMLDesc(0))  # noqa: S314 - libvirt's own XML
            out.append(models.SnapshotInfo(tag=snap.getName(), created=float(root.findtext("creationTime") or 0),
                                           vm_state_bytes=0, guest_clock_seconds=0.0))
        return sorted(out, key=lambda s: s.created)

    def snapshot(self, name: str, tag: str | None) -> models.SnapshotInfo:
        """An internal snapshot of RAM and qcow2 disks (other disks are left out of it)."""
        from xml.sax.saxutils import escape, quoteattr

        from vmkit.config import validate_name

        dom = self.domain(name)
        self._require(dom, "snapshot", "running", "paused", "stopped")
        tag = tag or time.strftime("snap-%Y%m%d-%H%M%S")
        validate_name(tag, field="TAG")
        cfg = self.config(name)
        skip = "".join(f"<disk name={quoteattr(target)} snapshot='no'/>"
                       for target, fmt in _disk_targets(dom) if fmt != "qcow2")
        del cfg
        with translated("snapshot", name=name, uri=self.uri):
            dom.snapshotCreateXML(f"<domainsnapshot><name>{escape(tag)}</name><disks>{skip}</disks></domainsnapshot>",
                                  0)
        return next(s for s in self.snapshots(name) if s.tag == tag)

    def revert(self, name: str, tag: str) -> models.RuntimeStatus:
        dom = self.domain(name)
        was = self.state(dom)
        with translated("revert to snapshot", name=tag, uri=self.uri):
            dom.revertToSnapshot(dom.snapshotLookupByName(tag, 0), 0)
        if self.state(dom) in _LIVE:  # libvirt may have started a new QEMU, or loaded the state into this one
            self._add_forwards(dom, self.config(name), replace=was in _LIVE)
        return self.status(dom)

    def delete_snapshot(self, name: str, tag: str) -> None:
        dom = self.domain(name)
        with translated("delete snapshot", name=tag, uri=self.uri):
            dom.snapshotLookupByName(tag, 0).delete(0)

    # -- the guest ---------------------------------------------------------------------------------
    def _agent(self, dom: libvirt.virDomain, command: str, arguments: dict[str, Any] | None,
               timeout: float | None) -> Any:
        import libvirt
        import libvirt_qemu

        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(msg), int(timeout or 10), 0)
        except libvirt.libvirtError as exc:
            text = exc.get_error_message() or str(exc)
            refused = "unable to execute QEMU agent command" in text
            raise GuestAgentError(f"guest agent of {dom.name()}: {text}", error_class="GenericError" if refused
                                  else None, timed_out=exc.get_error_code() in (68, 86)) from None
        return json.loads(reply).get("return")

    def agent(self, name: str) -> LibvirtAgent:
        dom = self.domain(name)
        self._require(dom, "use the guest agent of", "running")
        if not self.config(name).agent:
            raise ConfigError.single("agent", f"{name} has no guest agent channel")
        return LibvirtAgent(self, dom)

    def exec(self, name: str, argv: list[str], *, timeout: float = 60.0, stdin: bytes | None = None) -> ExecResult:
        if not argv:
            raise ConfigError.single("COMMAND", "give the command to run")
        return asyncio.run(guest_exec(self.agent(name), argv, timeout=timeout, stdin=stdin))

    def copy(self, src: str, dst: str) -> int:
        """``vmkit cp``: exactly one side is ``NAME:/guest/path``."""
        src_guest, dst_guest = guest_side(src), guest_side(dst)
        if (src_guest is None) == (dst_guest is None):
            raise ConfigError.single("SRC/DST", "give exactly one guest side as NAME:/path")
        if src_guest is not None:
            return asyncio.run(copy_from_guest(self.agent(src_guest[0]), src_guest[1], Path(dst)))
        assert dst_guest is not None
        if not Path(src).is_file():
            raise NotFoundError("file", src)
        return asyncio.run(copy_to_guest(self.agent(dst_guest[0]), Path(src), dst_guest[1]))

    # -- the console -------------------------------------------------------------------------------
    def _log_volume(self, name: str) -> libvirt.virStorageVol | None:
        pool = storage.pool(self.conn)
        vol = storage.volume(pool, storage.own_volume(name, "serial.log"))
        if vol is None:
            pool.refresh(0)
            vol = storage.volume(pool, storage.own_volume(name, "serial.log"))
        return vol

    def _log_size(self, name: str) -> int:
        vol = self._log_volume(name)
        if vol is None:
            return 0
        return len(storage.download(self.conn, vol))

    def console_bytes(self, name: str, *, offset: int = 0) -> bytes:
        """What the guest printed on its serial console (its log volume on the host)."""
        self.domain(name)
        vol = self._log_volume(name)
        if vol is None:
            return b""
        return storage.download(self.conn, vol)[offset:]

    def _last_line(self, name: str) -> str:
        lines = self.console_bytes(name)[-400:].decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""

    def wait_console(self, name: str, pattern: str, timeout: float = 60.0, *, offset: int = 0,
                     progress: Callable[[str], None] | None = None) -> str:
        """Wait until the console log (from ``offset``) matches ``pattern``; the log so far."""
        try:
            rx = re.compile(pattern, re.MULTILINE)
        except re.error as exc:
            raise ConfigError.single("--until", f"not a regular expression: {exc}") from None
        dom = self.domain(name)
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_bytes(name, offset=offset).decode("utf-8", "replace")
            if rx.search(text):
                return text
            if self.state(dom) not in _LIVE:
                raise VmkitError(f"{name} stopped before its console showed {pattern!r}",
                                 hint=f"vmkit --connect {self.uri} console {name} --log")
            if time.monotonic() > deadline:
                raise VmTimeoutError(f"{name}'s console did not show {pattern!r} within {timeout:.0f} s")
            if progress is not None and text.strip():
                progress(text.strip().splitlines()[-1])
            time.sleep(0.3)

    def attach_console(self, name: str, input_fd: int, on_output: Callable[[bytes], None], *,
                       detach: bytes | None = None, on_connected: Callable[[], None] | None = None) -> None:
        """The serial console through libvirt (virDomainOpenConsole); see :meth:`vmkit.Instance.attach_console`."""
        import select

        import libvirt

        dom = self.domain(name)
        self._require(dom, "attach to the console of", "running", "paused")
        detach = b"\x1d" if detach is None else detach
        stream = self.conn.newStream(0)
        with translated("open the console of", name=name, uri=self.uri):
            dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        done = threading.Event()

        def pump() -> None:
            try:
                while not done.is_set():
                    data = stream.recv(4096)
                    if isinstance(data, int):
                        continue
                    if not data:
                        break
                    on_output(data)
            except libvirt.libvirtError:
                pass
            finally:
                done.set()

        reader = threading.Thread(target=pump, name="vmkit-libvirt-console", daemon=True)
        reader.start()
        if on_connected is not None:
            on_connected()
        try:
            while not done.is_set():
                ready, _, _ = select.select([input_fd], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(input_fd, 4096)
                if not data or (detach and detach in data):
                    if data and detach:
                        before = data.split(detach, 1)[0]
                        if before:
                            stream.send(before)
                    break
                stream.send(data)
        finally:
            done.set()
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()

    # -- events ------------------------------------------------------------------------------------
    def events(self, name: str, *, stop: threading.Event | None = None) -> Iterator[models.Event]:
        """The machine's events as libvirt reports them; the first (``hello``) says its state now; ends
        when it stops (or when ``stop`` is set). Lifecycle callbacks become vmkit's ``state-changed``,
        ``guest-stopped`` and ``stopped-with-error``; libvirt's other events that stand for a QEMU event
        become ``qmp`` events as vmkit's own supervisor reports them (``detail.event``: QEMU's name,
        ``detail.data``: its fields, :data:`_QMP_EQUIVALENTS`), with ``detail.libvirt_event`` too."""
        import libvirt

        _event_loop()
        conn = open_connection(self.uri)  # its own connection: callbacks run on the event thread
        self.domain(name)
        with translated("watch", name=name, uri=self.uri):
            dom = conn.lookupByName(name)
        items: queue.Queue[models.Event | None] = queue.Queue(maxsize=1000)
        now = self.state(dom)
        last = [now]

        def lifecycle(_conn: Any, _dom: Any, event: int, detail: int, _opaque: Any) -> None:
            kind, state = _LIFECYCLE.get(event, ("qmp", None))
            last[0] = st = state or last[0]
            items.put(models.Event(kind=kind, state=st,
                                   detail={"libvirt_event": event, "libvirt_detail": detail},
                                   timestamp=time.time()))
            if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
                items.put(None)

        def qmp(libvirt_event: str, convert: Callable[..., tuple[str, dict[str, Any]]]) -> Callable[..., None]:
            def callback(_conn: Any, _dom: Any, *args: Any) -> None:
                event, data = convert(*args[:-1])  # the last argument is the opaque value
                with contextlib.suppress(queue.Full):  # a flood (I/O errors) must not stall libvirt's loop
                    items.put_nowait(models.Event(kind="qmp", state=last[0], timestamp=time.time(), detail={
                        "event": event, "data": data, "libvirt_event": libvirt_event}))
            return callback

        callbacks = [conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None)]
        try:
            for event_id, (libvirt_event, convert) in _QMP_EQUIVALENTS.items():
                callbacks.append(conn.domainEventRegisterAny(dom, event_id, qmp(libvirt_event, convert), None))
            yield models.Event(kind="hello", state=now, detail={"connect": self.uri}, timestamp=time.time())
            while True:
                try:
                    item = items.get(timeout=0.5)
                except queue.Empty:
                    if stop is not None and stop.is_set():
                        return
                    continue
                if item is None:
                    return
                yield item
        finally:
            for cb in callbacks:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(cb)
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    # -- migration ---------------------------------------------------------------------------------
    def migrate(self, name: str, target: str, *, copy_storage: bool = False, offline: bool = False,
                method: str = "auto", bandwidth_mib: int | None = None,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """libvirt's migration of the machine to libvirt host ``target``.

        A running machine: ``method`` ``auto`` copies its memory while it runs (VIR_MIGRATE_LIVE) where
        that is safe (:func:`vmkit.runtime.migration.live_safety`: KVM, or QEMU >= 9.0), else with the guest
        paused (libvirt's non-live migration: it runs again on the target); ``paused`` always pauses;
        ``live`` asks for pre-copy and is refused where QEMU can lose pages of several vCPUs (libvirt
        cannot verify the copy as vmkit's own migration does). ``copy_storage``: its writable disks are
        copied too (VIR_MIGRATE_NON_SHARED_DISK); without it they must already be on the target at the
        same paths (shared storage), else it is refused before anything moves.

        ``offline`` (or a stopped machine): its definition and every volume, writable ones included,
        are copied to the target's pool (VIR_MIGRATE_OFFLINE); a managed save is not moved.

        Read-only volumes (kernel, initrd, seed) and base disks are copied to the target's pool first.
        The domain is then defined there and undefined here; its volumes here are removed when they were
        copied (``copy_storage``, ``offline``), else kept (the target uses them)."""
        import libvirt

        say = on_event or (lambda _e: None)
        check_uri(target, field="URI")
        if method not in ("auto", "live", "paused"):
            raise ConfigError.single("method", f"{method!r}: give auto, live or paused")
        dom = self.domain(name)
        state = self._require(dom, "migrate", *(("running", "paused", "stopped") if offline else ("running", "paused")))
        offline = offline or state == "stopped"
        if offline and dom.hasManagedSaveImage(0):
            raise StateError("move", "saved", ["stopped (not saved)", "running"])
        cfg = self.config(name)
        if cfg.networks and not (_is_local(self.uri) and _is_local(target)):
            raise ConfigError.single("networks[0].network", f"{name} is on vmkit network {cfg.networks[0].network!r}, "
                                     f"a bridge of this host that {target} does not have: vmkit networks do not "
                                     "span libvirt hosts (vmkit network leave, then migrate)")
        live, reason = (False, "offline: the definition and disks are copied") if offline \
            else self._live_method(dom, method)
        dest = LibvirtHost(target)
        try:
            dest._check_free(name)
            dpool = storage.pool(dest.conn)
            spool = storage.pool(self.conn)
            spool.refresh(0)
            dpool.refresh(0)
            copied = offline or copy_storage
            for path, fmt, writable in _domain_files(dom):
                vol = self.conn.storageVolLookupByPath(path) if path.startswith(storage.POOL_PATH) else None
                if vol is None:
                    continue
                if writable and not copied:
                    if storage.volume(dpool, vol.name()) is None:
                        raise ConfigError.single("--copy-storage", f"{name}'s disk {vol.name()} is not on {target} "
                                                 f"({path}): give --copy-storage to copy it while the machine runs")
                    continue
                base = _backing(vol) if writable else None
                if base is not None:  # an overlay: its backing goes first (once per host)
                    say({"step": f"copying volume {os.path.basename(base)} to the target's pool"})
                    storage.copy_volume(self.conn, self.conn.storageVolLookupByPath(base), dest.conn, dpool,
                                        fmt="qcow2")
                if writable and not offline:
                    continue  # libvirt makes it there and copies it while the guest runs
                say({"step": f"copying volume {vol.name()} to the target's pool"})
                storage.copy_volume(self.conn, vol, dest.conn, dpool, fmt=fmt)
            files = [path for path, _fmt, _writable in _domain_files(dom)]
            flags = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            if offline:
                flags |= libvirt.VIR_MIGRATE_OFFLINE
            elif live:
                flags |= libvirt.VIR_MIGRATE_LIVE
            if copy_storage and not offline:
                flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
            params: dict[str, Any] = {}
            host = urlsplit(target).hostname
            if host and not offline:
                params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{host}"
            if bandwidth_mib:
                params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib
            shown = "offline" if offline else "live" if live else "paused"
            say({"step": f"migrating {name} to {target} ({shown}: {reason}; libvirt flags {flags:#x})"})
            started = time.monotonic()
            with translated("migrate", name=name, uri=self.uri):
                dom.migrate3(dest.conn, params, flags)
            seconds = time.monotonic() - started
            moved = dest.domain(name)
            if not offline:
                dest._add_forwards(moved, dest.config(name))
            result = {"backend": "libvirt", "name": name, "target": target, "seconds": round(seconds, 2),
                      "state": dest.state(moved), "copy_storage": copy_storage, "method": shown,
                      "method_reason": reason}
            if copied and not self._still_defined(name):  # the target has its own copies now
                storage.delete_machine_volumes(storage.pool(self.conn), name, files)
            local, there = self.local_dir(name), dest.local_dir(name)
            if local.exists() and not there.exists():
                paths.make_dirs(there.parent)
                shutil.move(str(local), str(there))
            return result
        finally:
            dest.close()

    def _live_method(self, dom: libvirt.virDomain, method: str) -> tuple[bool, str]:
        """Whether to migrate the running ``dom`` live (pre-copy while it runs), and why. libvirt aligns a
        domain's memory to whole MiB, so vmkit's RAM pad (see :mod:`vmkit.runtime.qemu.dirtysync`) cannot
        apply: on TCG with QEMU < 9.0 pre-copy may lose pages, with one vCPU too, and libvirt cannot check
        the copy page by page, so only the paused method is offered there."""
        from vmkit.runtime import migration

        accel = "tcg" if _domain_type(dom) == "qemu" else "kvm"
        with translated("read the QEMU version of", uri=self.uri):
            v = self.conn.getVersion()
            memory = dom.maxMemory() << 10
        safety = migration.live_safety(accel, (v // 1_000_000, v // 1000 % 1000, v % 1000), [memory])
        if method == "paused":
            return False, "asked for (--paused): the guest is paused while its memory is copied"
        if method == "auto" or safety.live:
            return safety.live, safety.reason
        raise ConfigError.single("--live", f"{safety.reason}. A libvirt migration cannot be verified page by "
                                 f"page: leave out --live")

    def _still_defined(self, name: str) -> bool:
        import libvirt

        try:
            self.conn.lookupByName(name)
        except libvirt.libvirtError:
            return False
        return True

    def _ssh_dir(self, name: str) -> tuple[Path, int]:
        """The client's SSH files of a cloud guest on a LOCAL libvirt host, and its forwarded port there."""
        from vmkit.host.provision import ssh_port

        if not _is_local(self.uri):
            raise ConfigError.single("--connect", f"{self.uri} is another host: its guests' forwarded ports are on "
                                     "that host's loopback (ssh there, then to the port)")
        cfg = self.config(name)
        local = self.local_dir(name)
        if not (local / "known_hosts").exists():
            raise ConfigError.single("image", f"{name} was not made from a cloud image by this client: no SSH key")
        return local, ssh_port(cfg)

    def ssh_argv(self, name: str, command: list[str], *, tty: bool) -> list[str]:
        """``ssh`` into a cloud guest on a LOCAL libvirt host (its forwarded port on 127.0.0.1)."""
        from vmkit.host.provision import ssh_argv, write_ssh_config

        local, port = self._ssh_dir(name)
        write_ssh_config(local, name, port)
        return ssh_argv(local, name, command, tty=tty)

    def ssh_config(self, name: str) -> str:
        from vmkit.host.provision import ssh_config_text

        local, port = self._ssh_dir(name)
        return ssh_config_text(local, name, port)


class LibvirtAgent:
    """The guest agent of one domain through libvirt (:class:`vmkit.runtime.guest.channel.AgentCommands`)."""

    def __init__(self, host: LibvirtHost, dom: libvirt.virDomain) -> None:
        self.host = host
        self.dom = dom

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        return await asyncio.to_thread(self.host._agent, self.dom, command, arguments, timeout)


_LIFECYCLE: dict[int, tuple[str, str | None]] = {
    0: ("state-changed", "stopped"),   # DEFINED
    1: ("state-changed", "stopped"),   # UNDEFINED
    2: ("state-changed", "running"),   # STARTED
    3: ("state-changed", "paused"),    # SUSPENDED
    4: ("state-changed", "running"),   # RESUMED
    5: ("guest-stopped", "stopped"),   # STOPPED
    6: ("state-changed", "stopping"),  # SHUTDOWN
    7: ("state-changed", "paused"),    # PMSUSPENDED
    8: ("stopped-with-error", "error"),  # CRASHED
}

_BLOCK_JOB_TYPES = {0: "unknown", 1: "stream", 2: "mirror", 3: "commit", 4: "active-commit", 5: "backup"}
_BLOCK_JOB_END = {0: "BLOCK_JOB_COMPLETED", 1: "BLOCK_JOB_COMPLETED", 2: "BLOCK_JOB_CANCELLED", 3: "BLOCK_JOB_READY"}


def _block_job(disk: str, job: int, status: int) -> tuple[str, dict[str, Any]]:
    data: dict[str, Any] = {"device": disk, "type": _BLOCK_JOB_TYPES.get(job, str(job))}
    if status == 1:
        data["error"] = "the block job failed"
    return _BLOCK_JOB_END.get(status, "BLOCK_JOB_COMPLETED"), data


def _qmp_equivalents() -> dict[int, tuple[str, Callable[..., tuple[str, dict[str, Any]]]]]:
    from vmkit.runtime.qemu.cmdline import AGENT_PORT_ID

    return {
        1: ("reboot", lambda: ("RESET", {"guest": True})),
        2: ("rtc-change", lambda offset: ("RTC_CHANGE", {"offset": offset})),
        3: ("watchdog", lambda action: ("WATCHDOG", {"action": _WATCHDOG.get(action, str(action))})),
        6: ("io-error", lambda _path, alias, action, reason: (
            "BLOCK_IO_ERROR", {"device": alias, "action": _IO_ACTION.get(action, str(action)), "reason": reason})),
        13: ("balloon-change", lambda kib: ("BALLOON_CHANGE", {"actual": kib * 1024})),
        15: ("device-removed", lambda alias: ("DEVICE_DELETED", {"device": alias})),
        16: ("block-job", _block_job),
        18: ("agent-lifecycle", lambda state, _reason: (
            "VSERPORT_CHANGE", {"id": AGENT_PORT_ID, "open": state == 1})),
        26: ("memory-device-size-change", lambda alias, kib: (
            "MEMORY_DEVICE_SIZE_CHANGE", {"id": alias, "size": kib * 1024})),
    }


_WATCHDOG = {0: "none", 1: "pause", 2: "reset", 3: "poweroff", 4: "shutdown", 5: "debug", 6: "inject-nmi"}
_IO_ACTION = {0: "ignore", 1: "stop", 2: "report"}
_QMP_EQUIVALENTS = _qmp_equivalents()
"""libvirt's domain event ids that stand for a QEMU event, with the name vmkit's ``qmp`` events give it
and the conversion of the callback's arguments to QEMU's fields: REBOOT -> RESET, RTC_CHANGE,
WATCHDOG, IO_ERROR_REASON -> BLOCK_IO_ERROR, BALLOON_CHANGE (``actual`` in bytes), DEVICE_REMOVED ->
DEVICE_DELETED, BLOCK_JOB_2 -> BLOCK_JOB_COMPLETED/CANCELLED/READY, AGENT_LIFECYCLE -> VSERPORT_CHANGE
of the agent's port (``open``: it connected), MEMORY_DEVICE_SIZE_CHANGE."""

_loop_started = False
_loop_lock = threading.Lock()


def _event_loop() -> None:
    """libvirt's default event loop, in a daemon thread (needed for domain event callbacks)."""
    global _loop_started
    import libvirt

    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="vmkit-libvirt-events", daemon=True).start()
        _loop_started = True


def _domain_type(dom: libvirt.virDomain) -> str:
    m = re.search(r"<domain type='(\w+)'", dom.XMLDesc(0))
    return m.group(1) if m else "qemu"


def _domain_files(dom: libvirt.virDomain) -> list[tuple[str, str, bool]]:
    """Every file the domain uses: (path, format, writable): kernel, initrd, disks."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - libvirt's own XML
    out = [(p, "raw", False) for p in (root.findtext("os/kernel"), root.findtext("os/initrd")) if p]
    for disk in root.findall("devices/disk"):
        src = disk.find("source")
        if src is None or not src.get("file"):
            continue
        drv = disk.find("driver")
        out.append((src.get("file", ""), drv.get("type", "raw") if drv is not None else "raw",
                    disk.find("readonly") is None))
    return out


def _disk_targets(dom: libvirt.virDomain) -> list[tuple[str, str]]:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - libvirt's own XML
    out = []
    for disk in root.findall("devices/disk"):
        tgt, drv = disk.find("target"), disk.find("driver")
        if tgt is not None:
            out.append((tgt.get("dev", ""), drv.get("type", "raw") if drv is not None else "raw"))
    return out


def _backing(vol: libvirt.virStorageVol) -> str | None:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(vol.XMLDesc(0))  # noqa: S314 - libvirt's own XML
    return root.findtext("backingStore/path")


def _is_local(uri: str) -> bool:
    parts = urlsplit(uri)
    return (parts.hostname in (None, "", "localhost") and "+" not in parts.scheme) or parts.scheme == "qemu+unix"


def _size(spec: str) -> int:
    from vmkit.config import parse_size

    return parse_size(spec)


def _human(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _instance_id() -> str:
    from vmkit.host.cloudinit import new_instance_id

    return new_instance_id()
