"""The source side of a migration (``vmkit migrate NAME ssh://HOST``): it drives both hosts.

1. ``vmkit migrate-receive`` starts on the target over SSH (:mod:`vmkit.migrate.receive`) and gets
   the machine's configuration and small files; it prepares the same machine there, its QEMU waiting
   for the migration (``-incoming defer``) at an address this host reaches.
2. This host's supervisor sends the machine (``POST /v1/migrate``): pre-copy while it runs where
   that is safe, else with the guest paused (:func:`vmkit.runtime.migration.live_safety`); progress
   lines come back while it runs. On completion the guest stands paused on both hosts.
3. With ``verify``, both sides hash every page of the guest's memory; any difference is a lost page,
   and the migration is taken back (the machine runs on here, the copy there is removed).
4. The target runs the guest (commit), then the supervisor here ends QEMU (``POST /v1/migrate/finish``)
   and the instance directory stays as ``migrated`` until ``vmkit delete``. Without ``verify`` the
   commit goes the moment this host's QEMU says the copy completed (the supervisor's ``completed``
   line), so the guest's pause is QEMU's downtime plus one message to the target; should this host's
   part fail after that, the target's answer decides: if it ran the guest, the copy here stays
   paused for good (never two running copies), else it runs on here.

Every failure before the target runs the guest (it cannot be reached, lacks the image or machine
type or disk space, dies mid-way, a cancel or Ctrl-C) ends with the machine running here as it was
and nothing left on the target (its receiver removes what it made when its stdin closes).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vmkit.api import SupervisorClient, models
from vmkit.api.transport import SupervisorGone
from vmkit.backends import ssh
from vmkit.backends.local import control, networks
from vmkit.config import NbdAttachment
from vmkit.errors import ConfigError, MigrationError, StateError, VmkitError, error_from_fields
from vmkit.host.images import qemuimg
from vmkit.host.instance import Instance
from vmkit.host.provision import is_cloud_instance
from vmkit.migrate import early, tls
from vmkit.migrate.receive import DiskToCopy, Manifest
from vmkit.runtime import migration
from vmkit.runtime.qemu.cmdline import device_id

PREPARE_WAIT = 180.0
"""How long the target may take to prepare the machine (seconds)."""
COMMIT_WAIT = 150.0
SMALL_FILE = 4 << 20
"""Instance files up to this size travel with the configuration (keys, seed, known_hosts...)."""
KEEP = ("vm.yaml", "state.json", "lock", "api.sock", "console.sock", "qga.sock", "supervisor.log", "qemu.log",
        "qemu.pid", "serial.log", "serial.log.1", "serial.log.prev", "migrated.json", "memory.scratch",
        migration.TLS_DIR)
"""Files of the instance directory that do not travel (the target makes its own)."""

Event = Callable[[dict[str, Any]], None]


@dataclass
class Options:
    method: str = "auto"
    downtime_limit_ms: int | None = None
    bandwidth_bytes: int | None = None
    auto_converge: bool = True
    postcopy: bool = False
    max_rounds: int = 30
    verify: bool = False
    shared_storage: bool = False
    copy_storage: bool = False
    tls: bool = False


@dataclass
class Outcome:
    name: str
    target: str
    report: models.MigrationReport
    seconds: float = 0.0
    bad_pages: int | None = None
    pages_given_back: int | None = None
    """Pages that differ only because the guest reported them free during the copy (not lost)."""
    pages_checked: int | None = None
    notes: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    """Where the seconds went: ssh (connection and the receiver's start), prepare (the machine made on
    the target), qemu_start (the target's QEMU waiting), copy (the migration itself), verify (the
    page check, if any), takeover (until the target runs the guest), source_end (QEMU here ends, its
    network leases released)."""
    receiver: str = "cold"
    """``warm``: the target's half was a warm receiver's child (:mod:`vmkit.migrate.warm`), no Python start
    there; ``cold``: a ``vmkit migrate-receive`` of its own."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "seconds": round(self.seconds, 3),
                "bad_pages": self.bad_pages, "pages_given_back": self.pages_given_back,
                "pages_checked": self.pages_checked, "notes": self.notes,
                "phases": {k: round(v, 3) for k, v in self.phases.items()}, "receiver": self.receiver,
                "report": self.report.model_dump(mode="json")}


class Remote:
    """The target's ``vmkit migrate-receive``: JSON lines both ways, over SSH."""

    def __init__(self, host: ssh.SshHost) -> None:
        self.host = host
        try:
            self.proc = early.adopt(host) or early.spawn(host)
        except FileNotFoundError:
            raise MigrationError("ssh is not installed", hint="apt-get install openssh-client") from None
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True).start()

    def _read(self, pipe: IO[str] | None) -> None:
        assert pipe is not None
        for raw in pipe:
            with contextlib.suppress(ValueError):
                msg = json.loads(raw)
                if isinstance(msg, dict):
                    self.lines.put(msg)
        self.lines.put(None)

    def _drain(self, pipe: IO[str] | None) -> None:
        assert pipe is not None
        for raw in pipe:
            self._stderr.append(raw.rstrip())
            del self._stderr[:-20]

    def send(self, kind: str, body: Any = None) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({kind: body if body is not None else {}}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it is gone: the next answer says so

    def answer(self, expect: str, timeout: float) -> dict[str, Any]:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise MigrationError(f"{self.host.uri}: the target did not answer within {timeout:.0f} s") from None
        if msg is None:
            self.proc.wait(10)
            why = " ".join(ln for ln in self._stderr if ln)[-400:] or f"ssh exited with status {self.proc.returncode}"
            raise ssh.unreachable(self.host, why)
        if "error" in msg:
            raise error_from_fields(msg["error"])
        if expect not in msg:
            raise MigrationError(f"{self.host.uri}: unexpected answer from the target: {msg}")
        body = msg[expect]
        return body if isinstance(body, dict) else {}

    def close(self, abort: bool) -> None:
        """End the receiver; ``abort``: it removes what it made (its stdin closing says so too)."""
        if abort:
            self.send("abort")
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(60 if abort else 20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def manifest(inst: Instance, opts: Options) -> Manifest:
    """The configuration and the small files of ``inst`` that the target needs."""
    config = inst.load_config()
    disks: list[DiskToCopy] = []
    read_only: list[Path] = []
    for i, dev in enumerate(config.storage):
        att = dev.attachment
        if isinstance(att, NbdAttachment):
            continue  # shared storage: the NBD server is reached from both hosts
        path = Path(att.path)
        local = path.is_relative_to(inst.dir)
        if local and att.read_only:  # a seed, say: it travels as a file
            read_only.append(path)
        elif opts.copy_storage and local:  # disks elsewhere are shared: the target must see them at their path
            info = qemuimg.info(path)
            backing = info.backing_file
            disks.append(DiskToCopy(node=device_id(i, dev), path=str(path), format=info.format,
                                    virtual_size=info.virtual_size, allocated=info.actual_size or info.virtual_size,
                                    backing=str(Path(path.parent, backing)) if backing else None,
                                    backing_format=info.backing_format))
        elif local and not opts.shared_storage:
            raise ConfigError.single(f"storage[{i}]", f"{path} lives in the machine's directory: copy it with "
                                     "--copy-storage, or, if the target sees it at the same path (a shared "
                                     "filesystem), say --shared-storage")
    files: dict[str, str] = {}
    if is_cloud_instance(inst.dir):
        for p in sorted(inst.dir.rglob("*")):
            rel = p.relative_to(inst.dir)
            if not p.is_file() or p.is_symlink() or rel.parts[0] in KEEP or p.suffix in (".qcow2", ".raw", ".img"):
                continue
            if p.stat().st_size <= SMALL_FILE:
                files[str(rel)] = base64.b64encode(p.read_bytes()).decode("ascii")
    for p in read_only:
        files[str(p.relative_to(inst.dir))] = base64.b64encode(p.read_bytes()).decode("ascii")
    subnets = {iface.network: networks.store().get(iface.network, field=f"networks[{i}].network").subnet
               for i, iface in enumerate(config.networks)}
    return Manifest(name=inst.name, config=config.to_dict(), source_dir=str(inst.dir), files=files,
                    postcopy=opts.postcopy, disks=disks, networks=subnets, tls=opts.tls)


def _request(opts: Options, uri: str, man: Manifest, targets: dict[str, str], host: str) -> dict[str, Any]:
    mirror = [models.MirrorDisk(node=d.node, target=targets[d.node], sync="top" if d.backing else "full")
              for d in man.disks]
    return models.MigrateRequest(
        uri=uri, mirror=mirror, method=opts.method, downtime_limit_ms=opts.downtime_limit_ms,
        bandwidth_bytes=opts.bandwidth_bytes, auto_converge=opts.auto_converge, postcopy=opts.postcopy,
        max_rounds=opts.max_rounds, tls=opts.tls, host=host).model_dump(mode="json", exclude_defaults=True)


def migrate(name: str, target: str, opts: Options | None = None, *, on_event: Event | None = None) -> Outcome:
    """Move the running (or paused) machine ``name`` to ``target`` (``ssh://[user@]HOST[:PORT]``).

    Live pre-copy asked for where QEMU can lose dirty pages (:func:`vmkit.runtime.migration.live_safety`)
    is verified page by page; if a page was lost, the migration is undone and done again paused."""
    opts = opts or Options()
    emit = on_event or (lambda _: None)
    if opts.method == "live":
        inst = control.get(name)
        if inst.is_supervised() and _info(inst).method != "live":
            emit({"note": "live pre-copy of this machine on this QEMU can lose pages under TCG: every page is "
                          "compared before the target runs the guest"})
            opts = dataclasses.replace(opts, verify=True)
            try:
                return _migrate(name, target, opts, emit, verified=True)
            except PagesLost as lost:
                note = f"{lost.message}; done again with the guest paused"
                emit({"note": note})
                out = _migrate(name, target, dataclasses.replace(opts, method="paused"), emit)
                out.notes.append(note)
                return out
    return _migrate(name, target, opts, emit)


def _info(inst: Instance) -> models.MigrationInfo:
    """The supervisor's ``GET /v1/migration``: the method ``auto`` picks for the machine, its RAM pad."""
    api = SupervisorClient(inst.api_socket, timeout=30)
    return models.MigrationInfo.model_validate(api.call("GET", "/v1/migration"))


class PagesLost(MigrationError):
    """The memory check found pages that differ on the target (the migration was undone)."""


def _migrate(name: str, target: str, opts: Options, emit: Event, *, verified: bool = False) -> Outcome:
    host = ssh.parse(target, field="TARGET")
    inst = control.get(name)
    status = inst.reconcile()
    if not inst.is_supervised() or status.state not in ("running", "paused"):
        raise StateError(f"migrate {name}", status.state, ["running", "paused"])
    t0 = time.monotonic()
    man = manifest(inst, opts).model_copy(update={"ram_pad": _info(inst).ram_pad})
    setup = time.monotonic() - t0
    emit({"step": f"preparing {name} on {host.uri}"})
    remote = Remote(host)
    api = SupervisorClient(inst.api_socket, timeout=3600)
    committed = False
    committing = False  # the target was told to run the guest (it answers "running" once it does)
    completed = False
    try:
        remote.send("prepare", man.model_dump(mode="json"))
        ready = remote.answer("ready", PREPARE_WAIT)
        phases = {"source_setup": setup, **_target_phases(ready, time.monotonic() - t0 - setup)}
        uri = str(ready["uri"])
        if opts.tls:
            if not isinstance(ready.get("tls"), dict):
                raise MigrationError(f"{host.uri}: the target's vmkit made no TLS certificates",
                                     hint="update vmkit there, or migrate without --tls")
            tls.write(inst.dir, {n: base64.b64decode(v) for n, v in ready["tls"].items()}, tls.CLIENT_FILES)
        emit({"step": f"the target waits at {uri}: sending"})
        request = _request(opts, uri, man, dict(ready.get("disks") or {}), host.uri)
        sending = time.monotonic()

        def take_over() -> None:  # the moment the copy completed (unless every page is compared first)
            nonlocal committing
            _fault("before-takeover")
            committing = True
            remote.send("commit")

        report = _send(api, {**request, "verified": True} if verified else request, emit,
                       on_completed=None if opts.verify else take_over)
        completed = True
        phases["copy"] = time.monotonic() - sending
        out = Outcome(name=name, target=host.uri, report=report, phases=phases,
                      receiver="warm" if (ready.get("timings") or {}).get("warm") else "cold")
        checking = time.monotonic()
        if opts.verify:
            emit({"step": "comparing every page of memory on both hosts"})
            remote.send("digest")  # both hosts hash at once
            here = models.MemoryDigest.model_validate(api.call("POST", "/v1/memory-digest"))
            there = models.MemoryDigest.model_validate(remote.answer("digest", COMMIT_WAIT))
            compared = migration.compare_pages(here.digest, there.digest)
            bad = compared.lost
            out.bad_pages, out.pages_given_back, out.pages_checked = len(bad), len(compared.given_back), here.pages
            if compared.given_back:
                out.notes.append(f"{len(compared.given_back)} more pages differ, in whole 2 MiB blocks the guest "
                                 "had reported free while the copy ran (zeros here, the source's QEMU discarded "
                                 "them): the guest keeps nothing there, so they are not counted as lost")
            if bad:
                shown = ", ".join(hex(p * here.page_size) for p in bad[:8])
                raise PagesLost(f"{name}: {len(bad)} of {here.pages} memory pages differ on the target "
                                f"(at {shown}{' ...' if len(bad) > 8 else ''}; "
                                f"{migration.describe_pages(here.digest, bad)}): the migration lost them",
                                hint="the machine runs on here; the copy on the target was removed")
            phases["verify"] = time.monotonic() - checking
        taking = time.monotonic()
        if not committing:
            committing = True
            remote.send("commit")
        remote.answer("running", COMMIT_WAIT)
        committed = True
        phases["takeover"] = time.monotonic() - taking
        ending = time.monotonic()
        try:
            _fault("after-takeover")
            api.call("POST", "/v1/migrate/finish", {"target": host.uri})
            control.wait_unsupervised(inst, 30)
        except (VmkitError, SupervisorGone, OSError) as exc:
            raise MigrationError(f"{name} runs on {host.uri} now, but ending its copy here failed: {exc}",
                                 hint=f"the copy here stays paused and must not run again (vmkit refuses to resume "
                                 f"it): `vmkit delete --force {name}` removes it") from exc
        with contextlib.suppress(VmkitError, OSError):  # its static leases here moved with it
            networks.leave_all(inst.load_config())
        marker = inst.dir / "migrated.json"
        marker.write_text(json.dumps({"target": host.uri, "at": time.time(), "report": report.model_dump(mode="json")}))
        marker.chmod(0o600)
        out.seconds = time.monotonic() - t0
        phases["source_end"] = time.monotonic() - ending
        emit({"step": f"{name} runs on {host.uri}"})
        return out
    except BaseException as exc:
        if not committed and committing and _ran_there(remote):
            committed = True  # the guest ran there: the copy here must never run again
            raise MigrationError(f"{name} runs on {host.uri} now, but this host's part of the migration failed "
                                 f"after the switch-over: {exc}", hint=f"the copy here stays paused and must not run "
                                 f"again: `vmkit delete --force {name}` removes it") from exc
        if not committed:
            _take_back(api, completed, exc)
        raise
    finally:
        tls.remove(inst.dir)
        remote.close(abort=not committed)


FAULT_ENV = "VMKIT_TEST_FAULT"
"""Failure injection for the tests of what a failure at the worst moment leaves (unset in normal use):
``before-takeover``: this process is killed (SIGKILL) the moment the copy completed, before the target is told
to run the guest; ``after-takeover``: ending the copy here fails once the target runs the guest."""


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) != point:
        return
    if point == "before-takeover":
        os.kill(os.getpid(), signal.SIGKILL)
    raise MigrationError(f"injected failure ({FAULT_ENV}={point})")


def cancel(name: str, *, force: bool = False) -> dict[str, Any]:
    """``vmkit migrate --cancel NAME``: cancel the machine's migration in flight (the guest runs on here), or take
    back a completed one whose target did not take over (``vmkit migrate`` was killed at that moment): the guest
    runs here again. Refused while the target has the machine (it may run it: never two running copies), and when
    the target cannot be asked, unless ``force``."""
    inst = control.get(name)
    status = inst.reconcile()
    if not inst.is_supervised():
        raise StateError(f"cancel the migration of {name}", status.state, ["migrating", "migrated (not taken over)"])
    api = SupervisorClient(inst.api_socket, timeout=60)
    info = models.MigrationInfo.model_validate(api.call("GET", "/v1/migration"))
    if info.handed_to is None:
        if info.status in (*migration.TERMINAL, "none"):  # nothing in flight
            raise StateError(f"cancel the migration of {name}", f"{info.state} (migration {info.status})",
                             ["migrating", "migrated (not taken over)"])
        api.call("POST", "/v1/migrate/cancel")
        return {"name": name, "cancelled": True, "taken_back": False, "state": _state_after(api)}
    if not force:
        if not info.handed_to.startswith("ssh://"):  # sent by another client of the API: no host to ask
            raise MigrationError(f"{name} was sent to {info.handed_to}; vmkit cannot ask that QEMU's host whether it "
                                 "runs the machine", hint=f"only if you know it does not: vmkit migrate --cancel "
                                 f"--force {name}")
        host = ssh.parse(info.handed_to, field="TARGET")
        res = host.run(["list", "--json"], timeout=60)
        if res.returncode != 0:
            why = (res.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            raise MigrationError(f"{name}: cannot ask {host.uri} whether it runs the machine: {why}",
                                 hint=f"only if you know it does not: vmkit migrate --cancel --force {name}")
        there = {str(r.get("name")): r for r in json.loads(res.stdout or b"[]")}
        if name in there:
            raise MigrationError(f"{name} is on {host.uri} ({there[name].get('state')}): the migration was taken "
                                 "over there, this copy must not run again",
                                 hint=f"end the copy here: vmkit delete --force {name}")
    api.call("POST", "/v1/migrate/cancel")
    return {"name": name, "cancelled": True, "taken_back": True, "state": _state_after(api)}


def _state_after(api: SupervisorClient) -> str:
    """The machine's state once its supervisor has settled after a cancel: the migration over (a completed one
    taken back keeps QEMU's status ``completed``) and the guest running or paused here (up to 30 s)."""
    for _ in range(300):
        st = models.MigrationInfo.model_validate(api.call("GET", "/v1/migration", timeout=30))
        if st.handed_to is None and st.status in (*migration.TERMINAL, "none") and st.state in ("running", "paused"):
            return st.state
        time.sleep(0.1)
    return st.state


def _ran_there(remote: Remote) -> bool:
    """After a failure here, once the target was told to take over: whether it ran the guest."""
    try:
        remote.answer("running", COMMIT_WAIT)
    except (VmkitError, KeyboardInterrupt):
        return False
    return True


def _target_phases(ready: dict[str, Any], waited: float) -> dict[str, float]:
    """The seconds until the target was ready, split by what the receiver measured there."""
    got = ready.get("timings")
    t: dict[str, Any] = got if isinstance(got, dict) else {}
    prepare, start, up = (float(t.get(k, 0.0)) for k in ("prepare_s", "qemu_start_s", "receiver_up_s"))
    up = min(up, max(0.0, waited - prepare - start))  # started before this clock (prestarted): only what was waited
    return {"ssh": max(0.0, waited - prepare - start - up), "receiver_start": up, "prepare": prepare,
            "qemu_start": start}


def _send(api: SupervisorClient, body: dict[str, Any], emit: Event,
          on_completed: Callable[[], None] | None = None) -> models.MigrationReport:
    """Follow the supervisor's ``POST /v1/migrate``; ``on_completed`` is called the moment QEMU says
    the copy completed (before the report: the target need not wait for it)."""
    def follow() -> dict[str, Any] | None:
        for line in api.lines("POST", "/v1/migrate", body, timeout=24 * 3600):
            if "result" in line or "error" in line:
                return line
            if line.get("completed"):
                if on_completed is not None:
                    on_completed()
                continue
            emit(line)
        return None

    try:
        final = follow()
    except SupervisorGone:
        final = None
    if final is None:
        raise MigrationError("the supervisor ended the migration without an outcome",
                             hint="see supervisor.log in the machine's directory")
    if "error" in final:
        err = error_from_fields(final["error"])
        raise MigrationError(err.message, hint=err.hint or "the machine runs on here as before") from None
    return models.MigrationReport.model_validate(final["result"])


def _take_back(api: SupervisorClient, completed: bool, exc: BaseException) -> None:
    """The machine runs on here: cancel the migration in flight, or resume a completed one."""
    with contextlib.suppress(VmkitError, SupervisorGone, OSError):
        info = api.call("GET", "/v1/migration", timeout=30)
        if info["status"] in ("active", "setup", "device", "pre-switchover", "completed") or completed:
            api.call("POST", "/v1/migrate/cancel", timeout=60)
            if isinstance(exc, KeyboardInterrupt):  # the stream was cut: wait for the supervisor to settle
                _state_after(api)


CHUNK = 1 << 20
"""Bytes of disk per line of an offline move."""


def move_offline(name: str, target: str, *, on_event: Event | None = None) -> dict[str, Any]:
    """Move the stopped or saved machine ``name`` to ``target``: its configuration, files and disks,
    and its saved state re-encrypted there with the target user's key, so ``vmkit start`` there
    resumes it. Here it stays as ``migrated`` until ``vmkit delete``."""
    from vmkit.state import key as keys
    from vmkit.state.file import StateFileReader

    emit = on_event or (lambda _: None)
    host = ssh.parse(target, field="TARGET")
    inst = control.get(name)
    status = inst.reconcile()
    if inst.is_supervised():
        raise StateError(f"move {name} offline", status.state, ["stopped", "saved"])
    if inst.migrated_to is not None:
        raise StateError(f"move {name}", f"migrated (it runs on {inst.migrated_to})", ["stopped", "saved"])
    man = manifest(inst, Options(copy_storage=True))
    saved = inst.saved_state_path if inst.saved_state_path.exists() else None
    t0 = time.monotonic()
    remote = Remote(host)
    committed = False
    sent = 0
    try:
        remote.send("offline", man.model_dump(mode="json"))
        remote.answer("ready", PREPARE_WAIT)
        for d in man.disks:
            rel = str(Path(d.path).relative_to(inst.dir))
            emit({"step": f"copying {rel}"})
            with open(d.path, "rb") as fh:
                offset = 0
                while chunk := fh.read(CHUNK):
                    if chunk.count(0) != len(chunk):  # runs of zeros stay holes
                        remote.send("chunk", {"path": rel, "offset": offset,
                                              "data": base64.b64encode(chunk).decode("ascii")})
                        sent += len(chunk)
                    offset += len(chunk)
                remote.send("size", {"path": rel, "size": offset})
        if saved is not None:
            emit({"step": "re-encrypting the saved state for the target"})
            with StateFileReader(saved, keys.load_key()) as reader:
                remote.send("state", {"header": reader.header_document, "chunk_size": reader.chunk_size,
                                      "compression": reader.compression == "zstd"})
                for final, compressed, size, stored in reader.records():
                    remote.send("record", {"final": final, "compressed": compressed, "size": size,
                                           "stored": base64.b64encode(bytes(stored)).decode("ascii")})
                    sent += len(stored)
        remote.send("commit")
        moved = remote.answer("moved", COMMIT_WAIT)
        committed = True
        with contextlib.suppress(VmkitError, OSError):
            networks.leave_all(inst.load_config())
        marker = inst.dir / "migrated.json"
        marker.write_text(json.dumps({"target": host.uri, "at": time.time(), "offline": True}))
        marker.chmod(0o600)
        return {"name": name, "target": host.uri, "seconds": round(time.monotonic() - t0, 3),
                "bytes_sent": sent, "state": bool(moved.get("state")), "disks": [d.node for d in man.disks]}
    finally:
        remote.close(abort=not committed)
