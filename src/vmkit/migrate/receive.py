"""The target side of a migration: ``vmkit migrate-receive``, run on the target host over SSH by
:func:`vmkit.migrate.send.migrate`, speaking newline-delimited JSON on stdin/stdout.

1. The source sends ``{"prepare": Manifest}``: the machine's configuration and small files.
   This side checks what the machine needs here (a free name, its image files, QEMU's machine
   type, disk space), makes the instance directory, starts a supervisor whose QEMU waits for
   the migration (``-incoming defer``) and answers ``{"ready": {"uri": "tcp:ADDR:PORT"}}``.
2. Optionally ``{"digest": {}}``: once the migration has completed, a hash of every page of the
   guest's memory (the migration check), answered as ``{"digest": MemoryDigest}``.
3. ``{"commit": {}}``: once QEMU here has the whole machine, run it; answered ``{"running": status}``.

An offline move (``vmkit migrate --offline``, a stopped or saved machine) sends ``{"offline":
Manifest}`` instead (answered ``{"ready": {}}``), then ``{"chunk": {"path", "offset", "data"}}`` lines
with the disks' bytes (runs of zeros left out) and ``{"size": {"path", "size"}}``, then the saved
state, if any: ``{"state": {"header", "chunk_size", "compression"}}`` and its records
``{"record": {"final", "compressed", "size", "stored"}}`` as stored (compressed), re-sealed here with
this user's state-file key; ``{"commit": {}}`` puts the files in place: ``{"moved": {...}}``.

Anything else, ``{"abort": {}}``, or the end of stdin before the commit (the source failed, was
interrupted or lost the connection) stops the machine here and removes its directory: a migration
that did not complete leaves nothing behind on the target. Every failure is ``{"error": ...}``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from vmkit.api import SupervisorClient, models
from vmkit.backends.local import control
from vmkit.config import MachineConfig, validate_model
from vmkit.errors import AlreadyExistsError, ConfigError, HostError, NotFoundError, StateError, VmkitError, error_fields
from vmkit.host import paths, provision
from vmkit.host.instance import Instance
from vmkit.migrate import tls
from vmkit.net.store import NetworkStore
from vmkit.runtime import migration

if TYPE_CHECKING:
    from vmkit.state.file import StateFileWriter

COMMIT_WAIT = 120.0
"""How long the commit waits for QEMU here to report the migration completed (seconds)."""


class DiskToCopy(BaseModel):
    """A local disk the target makes empty (same size, format and backing image) for the mirror to fill."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
    path: str = Field(description="its path on the source (under the source's instance directory)")
    format: str = Field(pattern=r"^(raw|qcow2)$")
    virtual_size: int = Field(ge=0)
    allocated: int = Field(ge=0, description="bytes the source's image takes (for the disk-space check)")
    backing: str | None = None
    backing_format: str | None = Field(default=None, pattern=r"^(raw|qcow2)$")


class Manifest(BaseModel):
    """What the target needs to make the same machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    config: dict[str, Any]
    source_dir: str = Field(description="the instance directory on the source (paths under it move here)")
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> base64 content")
    postcopy: bool = False
    disks: list[DiskToCopy] = Field(default_factory=list, description="local disks copied while the guest runs")
    listen: str | None = Field(default=None, description="the address QEMU listens on (default: the one the "
                                                         "SSH connection came to)")
    tls: bool = Field(default=False, description="TLS for the migration stream (certificates made here)")
    networks: dict[str, str] = Field(default_factory=dict, description="each vmkit network the machine is on -> "
                                                                       "its subnet on the source")
    ram_pad: int | None = Field(default=None, description="bytes of RAM over the configured memory on the source "
                                                          "(QEMU's RAM blocks must match; None: the target's own)")


def rebase(config: MachineConfig, source_dir: Path, target_dir: Path) -> MachineConfig:
    """``config`` with every path under the source's instance directory moved under ``target_dir``."""
    data = config.to_dict()

    def move(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(str(source_dir) + "/"):
            return str(target_dir / Path(value).relative_to(source_dir))
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return validate_model(MachineConfig, move(data), context="the migrated machine's configuration")


def needed_files(config: MachineConfig, own_dir: Path) -> list[Path]:
    """The files outside the instance directory this machine needs on the target (kernel, initrd, shared disks)."""
    out: list[Path] = []
    boot = getattr(config, "boot", None)
    for attr in ("kernel", "initrd"):
        p = getattr(boot, attr, None)
        if p is not None:
            out.append(Path(p))
    for dev in config.storage:
        p = getattr(dev.attachment, "path", None)
        if p is not None and not Path(p).is_relative_to(own_dir):
            out.append(Path(p))
    return out


def check_machine_type(machine: str, binary: str = "qemu-system-x86_64") -> None:
    try:
        out = subprocess.run([binary, "-machine", "help"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        package = "qemu-system-x86" if binary.endswith("x86_64") else "qemu-system-arm"
        raise HostError(f"QEMU cannot run on this host: {exc}", hint=f"apt-get install {package}") from None
    if not any(line.split()[:1] == [machine] or f"(alias of {machine}" in line or line.startswith(machine + " ")
               for line in out.splitlines()):
        raise HostError(f"this host's QEMU has no machine type {machine!r}",
                        hint="install the same QEMU on both hosts")


def check_networks(config: MachineConfig, subnets: dict[str, str]) -> None:
    """Each vmkit network the machine is on exists here, with the subnet it has on the source, and the
    machine's address and MAC on it are free here (its static lease moves with it: the supervisor's
    start registers them)."""
    store = NetworkStore()
    for i, iface in enumerate(config.networks):
        name = iface.network
        if not store.exists(name):
            missing = NotFoundError("network", name, hint=f"create it on the target with the same subnet "
                                    f"(vmkit network create {name} --subnet {subnets.get(name, 'SUBNET')}), "
                                    "joined to the source's at layer 2, then migrate again")
            missing.message = f"network {name!r} does not exist on the target (networks[{i}]: the machine is on it)"
            raise missing
        net = store.get(name, field=f"networks[{i}].network")
        if name in subnets and net.subnet != subnets[name]:
            raise ConfigError.single(f"networks[{i}].network", f"network {name!r} is {net.subnet} on the target "
                                     f"and {subnets[name]} on the source: the machine's address would not fit")
        members = store.members(name)
        owner = members.owner_of(iface.address) if iface.address else None
        if owner is not None and owner != config.name:
            taken = AlreadyExistsError("address", str(iface.address), hint=f"the two hosts' machines on {name} "
                                       "must have distinct addresses: move or re-join one of them")
            taken.message = f"address {iface.address} on network {name!r} belongs to machine {owner!r} on the target"
            raise taken
        mac_owner = next((n for n, m in members.machines.items() if m.mac == iface.mac and n != config.name), None)
        if mac_owner is not None:
            taken = AlreadyExistsError("MAC", str(iface.mac), hint="the two hosts' machines on a network must have "
                                       "distinct MACs")
            taken.message = f"MAC {iface.mac} on network {name!r} belongs to machine {mac_owner!r} on the target"
            raise taken


WARM = False
"""Whether this receiver is the child of a warm receiver (:mod:`vmkit.migrate.warm`), not a command of its own."""
STARTED_BY = "self"
"""The process whose age :func:`_process_age` gives: a warm receiver's child gives its connecting command's."""


def _process_age() -> float:
    """Seconds since this command started (Python's start and vmkit's imports, for the timings)."""
    try:
        ticks = int(Path(f"/proc/{STARTED_BY}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def listen_address() -> str:
    """The address the SSH connection came to (so the source reaches QEMU where it reached sshd)."""
    conn = os.environ.get("SSH_CONNECTION", "").split()
    return conn[2] if len(conn) >= 3 else "127.0.0.1"


def free_port(address: str) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class Receiver:
    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.inst: Instance | None = None
        self.committed = False
        self.offline = False
        self.writer: StateFileWriter | None = None
        self.files: dict[str, int] = {}

    def say(self, payload: dict[str, Any]) -> None:
        self.out.write(json.dumps(payload) + "\n")
        self.out.flush()

    def prepare(self, manifest: Manifest, *, offline: bool = False) -> None:
        began = time.monotonic()
        age = _process_age()
        inst = Instance(manifest.name)
        if inst.exists():
            raise StateError(f"receive {manifest.name}", "a machine of that name exists on the target",
                             ["no machine of that name"])
        source_config = validate_model(MachineConfig, manifest.config, context="the migrated machine's configuration")
        config = rebase(source_config, Path(manifest.source_dir), inst.dir)
        missing = [p for p in needed_files(config, inst.dir) if not p.exists()]
        if missing:
            image = f" (image {config.image})" if config.image else ""
            raise HostError(f"the target lacks {', '.join(map(str, missing))}{image}",
                            hint=f"build or pull the image there first (vmkit image build {config.image or 'NAME'}), "
                                 "or put shared disks at the same paths")
        check_machine_type(config.machine, config.arch_info.qemu_system)
        check_networks(config, manifest.networks)
        need = sum(len(base64.b64decode(v)) for v in manifest.files.values()) + (16 << 20)
        need += sum(d.allocated for d in manifest.disks)
        for d in manifest.disks:
            if d.backing is not None and not Path(d.backing).exists():
                raise HostError(f"the target lacks {d.backing}, the backing image of disk {d.node}"
                                + (f" (image {config.image})" if config.image else ""),
                                hint="build or pull the image there first "
                                     f"(vmkit image build {config.image or 'NAME'})")
        where = paths.instances_dir()
        free = shutil.disk_usage(where if where.exists() else where.parent).free
        if free < need:
            raise HostError(f"the target has {free >> 20} MiB free, the machine needs {need >> 20} MiB",
                            hint="free some space on the target")
        self.inst = Instance.create(config)
        for rel, content in manifest.files.items():
            rp = PurePosixPath(rel)
            if rp.is_absolute() or ".." in rp.parts:
                raise ConfigError.single("files", f"{rel!r} is not a path inside the instance directory")
            dest = self.inst.dir / rp
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(base64.b64decode(content))
        if provision.is_cloud_instance(self.inst.dir):  # its ssh_config names files in its own directory
            provision.write_ssh_config(self.inst.dir, config.name, provision.ssh_port(config))
        if offline:
            self.offline = True
            self.say({"ready": {}})
            return
        for d in manifest.disks:
            dest = self.inst.dir / Path(d.path).relative_to(manifest.source_dir)
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            args = ["qemu-img", "create", "-q", "-f", d.format]
            if d.backing is not None:
                args += ["-b", d.backing, "-F", d.backing_format or "qcow2"]
            res = subprocess.run([*args, str(dest), str(d.virtual_size)], capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise HostError(f"cannot make disk {d.node} on the target: {res.stderr.strip()}")
            dest.chmod(0o600)
        address = manifest.listen or listen_address()
        uri = migration.tcp_uri(address, free_port(address))
        nbd_port = free_port(address) if manifest.disks else None
        ready: dict[str, Any] = {"uri": uri}
        if manifest.tls:  # the target's QEMU gets the server's files; the source the client's
            creds = tls.make(address)
            tls.write(self.inst.dir, creds, tls.SERVER_FILES)
            ready["tls"] = {n: base64.b64encode(creds[n]).decode("ascii") for n in tls.CLIENT_FILES}
        plan = models.StartRequest(incoming=models.IncomingRequest(
            uri=uri, postcopy=manifest.postcopy, nbd_port=nbd_port, exports=[d.node for d in manifest.disks],
            ram_pad=manifest.ram_pad,
            tls=manifest.tls))
        starting = time.monotonic()
        control.start(manifest.name, plan=plan, timeout=120)
        ready["timings"] = {"prepare_s": round(starting - began, 3), "receiver_up_s": round(age, 3),
                            "qemu_start_s": round(time.monotonic() - starting, 3), "warm": WARM}
        if nbd_port is not None:
            host = f"[{address}]" if ":" in address else address
            ready["disks"] = {d.node: f"nbd://{host}:{nbd_port}/{d.node}" for d in manifest.disks}
        self.say({"ready": ready})

    def _own(self, rel: str) -> Path:
        assert self.inst is not None and self.offline
        rp = PurePosixPath(rel)
        if rp.is_absolute() or ".." in rp.parts or not rp.parts or rp.parts[0] in ("vm.yaml", "saved.vmstate"):
            raise ConfigError.single("path", f"{rel!r} is not a disk inside the instance directory")
        return self.inst.dir / rp

    def chunk(self, rel: str, offset: int, data: bytes) -> None:
        path = self._own(rel)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def size(self, rel: str, size: int) -> None:
        path = self._own(rel)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def state(self, header: dict[str, Any], chunk_size: int, compression: bool) -> None:
        from vmkit.runtime.qemu import accel as accel_mod
        from vmkit.state import key as keys
        from vmkit.state import savestate
        from vmkit.state.file import DEFAULT_COMPRESSION_LEVEL, StateFileWriter

        assert self.inst is not None and self.offline
        config = self.inst.load_config()
        doc = savestate.moved_header(header, config, accel_mod.choose(config.accel.value, arch=config.arch))
        parsed = savestate.VmStateHeader.model_validate(doc)
        self.writer = StateFileWriter(self.inst.saved_state_path, parsed, keys.load_or_create_key(),
                                      chunk_size=chunk_size, header_document=doc,
                                      compression_level=DEFAULT_COMPRESSION_LEVEL if compression else None)

    def record(self, final: bool, compressed: bool, size: int, stored: bytes) -> None:
        if self.writer is None:
            raise ConfigError.single("record", "a state record before the state header")
        self.writer._put_record(stored, size, compressed=compressed, final=final)
        self.writer.payload_bytes += size

    def commit_offline(self) -> None:
        assert self.inst is not None
        moved: dict[str, Any] = {"state": False}
        if self.writer is not None:
            self.writer.prepare()
            self.writer.commit()
            self.writer = None
            moved["state"] = True
        self.committed = True
        self.say({"moved": moved})

    def api(self) -> SupervisorClient:
        assert self.inst is not None
        return SupervisorClient(self.inst.api_socket, timeout=600)

    def digest(self) -> None:
        self.wait_completed()
        self.say({"digest": self.api().call("POST", "/v1/memory-digest")})

    def wait_completed(self) -> None:
        deadline = time.monotonic() + COMMIT_WAIT
        while True:
            info = self.api().call("GET", "/v1/migration")
            if info["status"] == "completed" or info["state"] == "running":  # running: post-copy
                return
            if info["status"] in ("failed", "cancelled") or info["state"] in ("stopped", "error"):
                raise StateError("take over the migrated machine", f"migration {info['status']}", ["completed"])
            if time.monotonic() > deadline:
                raise StateError("take over the migrated machine", f"migration still {info['status']}",
                                 ["completed"])
            time.sleep(0.02)

    def commit(self) -> None:
        api = self.api()
        api.call("POST", "/v1/migrate/takeover", {"timeout": COMMIT_WAIT})
        self.committed = True
        self.say({"running": api.call("GET", "/v1/state")})

    def abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.abort()
            self.writer = None
        if self.inst is None or self.committed:
            return
        inst, self.inst = self.inst, None
        with contextlib.suppress(VmkitError, OSError):
            if inst.is_supervised():
                control.stop(inst.name, force=True)
        with contextlib.suppress(VmkitError, OSError):  # the start registered its static leases here
            store = NetworkStore()
            for iface in inst.load_config().networks:
                store.leave(iface.network, inst.name)
        shutil.rmtree(inst.dir, ignore_errors=True)


def serve(inp: IO[str] | None = None, out: IO[str] | None = None) -> int:
    """Run the target side until the source commits or goes away; returns the exit code."""
    inp = inp or sys.stdin
    rx = Receiver(out or sys.stdout)
    try:
        for raw in inp:
            if not raw.strip():
                continue
            try:
                msg = json.loads(raw)
            except ValueError:
                raise ConfigError.single("<stdin>", "not a JSON line") from None
            if not isinstance(msg, dict) or len(msg) != 1:
                raise ConfigError.single("<stdin>", "each line is one JSON object with one key")
            (kind, body), = msg.items()
            if kind == "prepare":
                rx.prepare(validate_model(Manifest, body, context="migration manifest"))
            elif kind == "offline":
                rx.prepare(validate_model(Manifest, body, context="migration manifest"), offline=True)
            elif kind == "chunk" and rx.offline:
                rx.chunk(str(body["path"]), int(body["offset"]), base64.b64decode(body["data"]))
            elif kind == "size" and rx.offline:
                rx.size(str(body["path"]), int(body["size"]))
            elif kind == "state" and rx.offline:
                rx.state(dict(body["header"]), int(body["chunk_size"]), bool(body["compression"]))
            elif kind == "record" and rx.offline:
                rx.record(bool(body["final"]), bool(body["compressed"]), int(body["size"]),
                          base64.b64decode(body["stored"]))
            elif kind == "digest":
                rx.digest()
            elif kind == "commit":
                if rx.offline:
                    rx.commit_offline()
                else:
                    rx.commit()
                return 0
            else:
                break  # abort, or anything unknown
        rx.abort()
        rx.say({"aborted": {}})
        return 1
    except VmkitError as exc:
        rx.abort()
        rx.say({"error": error_fields(exc)})
        return int(exc.exit_code)
    except BaseException:
        rx.abort()
        raise
