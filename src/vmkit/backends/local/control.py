"""Operations on instances, as the CLI and scripts use them.

Each function is the whole of one user-level action (create, start, stop, ...): it checks
input and state, talks to the instance's supervisor, and returns plain data. The CLI only
parses arguments, calls these, and renders.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from vmkit.api import SupervisorClient, models
from vmkit.api.transport import SupervisorGone
from vmkit.backends.local import networks, spawn
from vmkit.backends.local.listing import BROKEN as BROKEN  # re-exported: the operations on instances, in one place
from vmkit.backends.local.listing import inspect as inspect
from vmkit.backends.local.listing import list_instances as list_instances
from vmkit.backends.local.listing import view as view
from vmkit.config import (
    Limits,
    MachineConfig,
    NbdAttachment,
    PortForward,
    parse_size,
    port_is_free,
    problems_from_validation,
    validate_disk_id,
    validate_model,
    validate_name,
)
from vmkit.errors import (
    AlreadyExistsError,
    ConfigError,
    NotFoundError,
    Problem,
    QemuError,
    StateError,
    VmkitError,
    VmTimeoutError,
    error_from_fields,
)
from vmkit.host import cgroups, paths
from vmkit.host.images.store import Image, ImageStore
from vmkit.host.instance import LIVE, Instance, Status, take_exclusive
from vmkit.host.provision import (
    EXTRA_USER_DATA,
    CloudOptions,
    claim_ssh_port,
    free_port,
    is_cloud_instance,
    provision,
    reidentify,
    ssh_config_text,
    ssh_port,
)
from vmkit.host.provision import ssh_argv as cloud_ssh_argv
from vmkit.runtime import migration
from vmkit.runtime.qemu import accel as accel_mod
from vmkit.runtime.qemu.cmdline import Runtime, build_argv

if TYPE_CHECKING:  # imported where used: `vmkit stop`, `pause`, `stats` or `migrate` need none of them
    from vmkit.host.builder import CreateOptions
    from vmkit.runtime.guest.execute import ExecResult
    from vmkit.state import template

Progress = Callable[[str], None]


InstanceView = models.InstanceRow  # one row of ``vmkit list`` (see .listing: BROKEN, view, list_instances)


def create(config: MachineConfig) -> Instance:
    """Validate ``config`` (every problem at once) and create its instance directory (joining its
    vmkit networks: a MAC and an address on each)."""
    config.ensure_valid(host=True)
    if Instance(config.name).exists():
        raise AlreadyExistsError("instance", config.name, hint=f"delete it first: vmkit delete {config.name}")
    joined = networks.join_all(config)
    try:
        return Instance.create(joined)
    except BaseException:
        if joined.networks:
            networks.leave_all(joined)
        raise


def usable_template(config: MachineConfig, image: Image) -> template.Template | None:
    """The warm template a new machine ``config`` of ``image`` starts from (None: it boots cold)."""
    from vmkit.state import template

    tpl = template.find(image.name, config.memory, config.cpus)
    if tpl is None or template.unusable_reasons(tpl, config, accel_mod.choose(config.accel.value), image=image,
                                                qemu_version=migration.host_qemu_version()):
        return None
    return tpl


def create_from_options(opts: CreateOptions) -> Instance:
    """``vmkit create``: build the configuration and the instance directory; for cloud images also
    the overlay disk, keys and NoCloud seed. All or nothing: a failure leaves no directory."""
    from vmkit.host.builder import config_from_options, disk_size_option
    from vmkit.state import template

    config = config_from_options(opts)
    if config.image is None:
        return create(config)
    image = ImageStore().get(config.image)
    warm = usable_template(config, image)
    if warm is not None:
        config = template.clone_config(config, warm)
    if not config.agent:
        inst = create(config)
        if warm is not None:
            template.write_reference(inst.dir, warm)  # an image without a disk: the template is RAM and devices
        return inst
    user_data = None
    if opts.user_data is not None:
        try:
            user_data = opts.user_data.read_text()
        except OSError as exc:
            raise ConfigError.single("--user-data", f"{opts.user_data}: {exc.strerror}") from None
    config.ensure_valid(host=False)
    if Instance(config.name).exists():
        raise AlreadyExistsError("instance", config.name, hint=f"delete it first: vmkit delete {config.name}")
    config = networks.join_all(config)
    try:
        inst = Instance.create(config)
    except BaseException:
        networks.leave_all(config)
        raise
    try:
        provision(inst.dir, config, image, CloudOptions(disk_size=disk_size_option(opts), user_data=user_data,
                                                        resolv_conf=networks.resolv_conf(config)),
                  base=warm.disk if warm is not None else None)
        if warm is not None:
            template.write_reference(inst.dir, warm)
        config.ensure_valid(host=True)
    except BaseException:
        shutil.rmtree(inst.dir, ignore_errors=True)
        networks.leave_all(config)
        raise
    return inst


def delete_network(name: str, *, force: bool = False) -> models.NetworkDeleted:
    """``vmkit network delete``: refused while machines on it run, unless ``force`` (they are stopped hard)."""
    removed = networks.delete(name, force=force, stop=lambda machine: stop(machine, force=True))
    return models.NetworkDeleted(name=name, removed=removed)


def get(name: str) -> Instance:
    return Instance(name).require()


def dry_run_argv(name: str) -> list[str]:
    """The QEMU command line ``start`` would run (fds shown as the supervisor passes them)."""
    inst = get(name)
    config = inst.load_config()
    accel = accel_mod.choose(config.accel.value, arch=config.arch)
    return build_argv(config, accel, Runtime(qmp_fd=3, serial_fd=4, pidfile=inst.qemu_pidfile,
                                             ram_pad=migration.config_ram_pad(config, accel.name)))


def start(name: str, *, progress: Progress | None = None, timeout: float | None = None,
          plan: models.StartRequest | None = None,
          on_message: Callable[[dict[str, Any]], None] | None = None) -> Status:
    """Start ``name`` under a new supervisor; return once the guest is ready (or raise why not).

    Ready includes shared folders: virtiofs and 9p shares are mounted by the guest at boot, before
    its agent answers, and the supervisor mounts sshfs shares before it reports success, so a
    returned start means every share is mounted ("mounted at boot" for sshfs; see vmkit.runtime.sshfs).

    This process takes the instance lock and makes the listening ``api.sock`` (no other start can
    race it, and a client can connect before the supervisor is up), hands both to the supervisor,
    and asks it to start with ``POST /v1/start`` (``plan``: from a state file or a snapshot, see
    :class:`vmkit.api.models.StartRequest`). ``progress`` receives the guest's last console line
    while it boots; ``on_message`` the other interim lines (restore progress, what was restored).
    """
    import asyncio

    from vmkit.runtime.serial import rotated_path

    inst = get(name)
    status = inst.reconcile()
    if inst.is_supervised():
        raise StateError("start", status.state, ["stopped", "error"])
    if inst.migrated_to is not None:
        gone = StateError("start", f"migrated (it runs on {inst.migrated_to})", ["stopped", "error"])
        gone.hint = f"it runs there: `vmkit --host {inst.migrated_to} list`; `vmkit delete {name}` removes this copy"
        raise gone
    if plan is None or plan.template is None:  # any other start moves its disk on from a warm template's
        from vmkit.state import template

        template.consume_reference(inst.dir)
    config = inst.load_config()
    config, moved = claim_ssh_port(inst.dir, config)
    if moved is not None:
        inst.save_config(config)
        if on_message is not None:
            on_message({"note": moved})
    config.ensure_valid(host=True)
    if config.networks:
        networks.check_can_start(config)
        joined = networks.join_all(config)  # a vm.yaml written by hand, or a home where the network is new
        if joined != config:
            inst.save_config(joined)
            config = joined
    # fail here, with the reason, if KVM was asked for and is unusable
    accel_mod.choose(config.accel.value, arch=config.arch)
    limit = timeout if timeout is not None else config.readiness.timeout + 30
    lock_fd = inst.open_lock()
    try:
        if not take_exclusive(lock_fd):
            raise StateError("start", "running (another start got there first)", ["stopped", "error"])
        if inst.serial_log.exists():
            inst.serial_log.replace(inst.dir / "serial.log.prev")
        with contextlib.suppress(FileNotFoundError):  # the previous run's older part (see vmkit.runtime.serial)
            rotated_path(inst.serial_log).unlink()
        with contextlib.suppress(FileNotFoundError):
            inst.api_socket.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(inst.api_socket))  # the instance directory is 0700: nobody else reaches it
            inst.api_socket.chmod(0o600)
            listener.listen(16)
            with inst.supervisor_log.open("ab") as logf:
                proc = spawn.start_supervisor(
                    [str(inst.dir), "--lock-fd", str(lock_fd), "--listen-fd", str(listener.fileno())],
                    pass_fds=(lock_fd, listener.fileno()), log=logf.fileno(), cwd=inst.dir, env=paths.child_env())
        finally:
            listener.close()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            inst.api_socket.unlink()
        raise
    finally:
        os.close(lock_fd)  # the supervisor holds the lock now (it shares this open file)
    body = (plan or models.StartRequest()).model_dump(mode="json", exclude_defaults=True)
    api = SupervisorClient(inst.api_socket, timeout=limit)

    async def follow() -> dict[str, Any] | None:
        async for line in api.stream("POST", "/v1/start", body, timeout=limit):
            if "result" in line or "error" in line:
                return line
            if "console" in line:
                if progress is not None:
                    progress(str(line["console"]))
            elif on_message is not None:
                on_message(line)
        return None

    try:
        final = asyncio.run(follow())
    except SupervisorGone:
        final = None
    except VmTimeoutError:
        _terminate(proc)  # take the half-started VM down with its supervisor
        raise VmTimeoutError(f"{name}: not ready after {limit:.0f} s",
                             hint=f"last console lines:\n{_tail(inst.serial_log, 10)}") from None
    except BaseException:
        _terminate(proc)  # interrupted: take the half-started VM down with its supervisor
        raise
    if final is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        raise QemuError(f"{name}: the supervisor exited without reporting ({spawn.exit_text(proc)})",
                        hint=f"see {inst.supervisor_log}:\n{_tail(inst.supervisor_log, 8)}")
    if "error" in final:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        raise error_from_fields(final["error"])
    return inst.read_status()


def _terminate(proc: spawn.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()  # its QEMU dies with it (parent-death signal)
        proc.wait(5)


def last_console_line(inst: Instance) -> str:
    """The last non-empty line the guest printed (a boot-stage hint for spinners)."""
    try:
        with inst.serial_log.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
            data = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    lines = [ln.strip() for ln in data.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][:120] if lines else ""


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").replace("\r", "").splitlines()[-n:])
    except FileNotFoundError:
        return "(none)"


def client(name: str) -> SupervisorClient:
    inst = get(name)
    status = inst.reconcile()
    if not inst.is_supervised():
        raise StateError("reach the supervisor", status.state, ["running", "paused"])
    return SupervisorClient(inst.api_socket)


def pause(name: str) -> Status:
    return Status.from_dict(client(name).call("POST", "/v1/pause"))


@dataclass(frozen=True)
class Resumed:
    status: Status
    clock: dict[str, Any] | None
    """The clock fix-up (corrected, behind_seconds, message): the guest's clock stood still while paused."""


def resume(name: str) -> Resumed:
    data = client(name).call("POST", "/v1/resume")
    return Resumed(status=Status.from_dict(data), clock=data.get("clock"))


def stop(name: str, *, force: bool = False, timeout: float = 30.0) -> Status:
    """Stop ``name``: ACPI power button and wait ``timeout`` s, then hard stop; ``force``: hard now."""
    inst = get(name)
    status = inst.reconcile()
    if not inst.is_supervised():
        raise StateError("stop", status.state, list(LIVE))
    api = SupervisorClient(inst.api_socket, timeout=timeout + 15)
    try:
        if force or status.state != "running":
            api.call("POST", "/v1/stop")
        else:
            try:
                api.call("POST", "/v1/request-stop", {"timeout": timeout})
            except (VmTimeoutError, StateError, QemuError):
                api.call("POST", "/v1/stop")
    except VmkitError:
        if inst.is_supervised():
            raise
    wait_unsupervised(inst, 15.0)
    return inst.reconcile()


def wait_unsupervised(inst: Instance, timeout: float) -> None:
    """Wait until the instance's supervisor has exited (its lock is free, and its process gone).

    The kernel says when the process ends (a pidfd becomes readable), so nothing polls; the lock is
    checked once more afterwards. The supervisor releases its lock just before it exits, so a free lock
    alone does not mean it is gone: its recorded pid is waited for while that process still runs in the
    instance's directory (a supervisor does; a reused pid does not)."""
    deadline = time.monotonic() + timeout
    pid = inst.read_status().supervisor_pid
    if pid is not None and _runs_in(pid, inst.dir):
        with contextlib.suppress(ProcessLookupError, OSError):
            fd = os.pidfd_open(pid)
            try:
                select.select([fd], [], [], timeout)
            finally:
                os.close(fd)
    while inst.is_supervised():  # no pidfd (an old kernel) or a recorded pid that is not the holder
        if time.monotonic() > deadline:
            raise VmTimeoutError(f"{inst.name}: the supervisor did not exit within {timeout:.0f} s",
                                 hint=f"see {inst.supervisor_log}")
        time.sleep(0.05)


def _runs_in(pid: int, directory: Path) -> bool:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == directory.resolve()
    except OSError:
        return False


def delete(name: str, *, force: bool = False) -> None:
    inst = get(name)
    if force and inst.is_supervised():
        stop(name, force=True)
    try:
        config: MachineConfig | None = inst.load_config()
    except VmkitError:
        config = None
    inst.delete()
    if config is not None and config.networks:
        networks.leave_all(config)


def wait_console(name: str, pattern: str, timeout: float = 60.0) -> str:
    """Wait until the console log matches ``pattern`` (a multiline regex); return the log so far.

    Follows the live console stream (no polling); a stopped machine's log is checked once.
    """
    import asyncio

    from vmkit.runtime.serial import read_log

    inst = get(name)
    rx = re.compile(pattern, re.MULTILINE)

    def log_text() -> str:  # both parts of the log (it rotates, see vmkit.runtime.serial)
        return read_log(inst.serial_log).decode("utf-8", errors="replace").replace("\r", "")

    if not inst.is_supervised():
        text = log_text()
        if rx.search(text):
            return text
        raise StateError(f"wait for /{pattern}/ on the console", inst.reconcile().state, ["running"])
    api = SupervisorClient(inst.api_socket)

    async def follow() -> str:
        changed = asyncio.Event()

        def output(_: bytes = b"") -> None:  # cheap: the stream is read as fast as it comes
            changed.set()

        async def matched() -> None:  # one look at the log per burst of output, however fast it comes
            while True:
                await changed.wait()
                changed.clear()
                if rx.search(log_text()):  # the supervisor logs a chunk before it streams it
                    return

        stream = asyncio.create_task(api.console(output, asyncio.Queue(), on_connected=output))
        waiter = asyncio.create_task(matched())
        try:
            done, _ = await asyncio.wait({stream, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stream.cancel()
            waiter.cancel()
        if rx.search(text := log_text()):
            return text
        if stream in done:
            raise StateError(f"wait for /{pattern}/ on the console", inst.reconcile().state, ["running"])
        raise VmTimeoutError(f"{name}: /{pattern}/ did not appear on the console within {timeout:.0f} s",
                             hint=f"last console lines:\n{_tail(inst.serial_log, 10)}")

    return asyncio.run(follow())


DETACH = b"\x1d"
"""Ctrl-]: the byte that detaches from an attached console (as telnet and ``virsh console``)."""


def attach_console(name: str, input_fd: int, on_output: Callable[[bytes], None], *, detach: bytes | None = None,
                   on_connected: Callable[[], None] | None = None) -> None:
    """Connect ``input_fd`` and ``on_output`` to the running machine's serial console.

    What is read from ``input_fd`` goes to the guest until end of file or the ``detach`` byte (what
    came before it is still sent); everything the guest prints goes to ``on_output``. Returns when
    the user detaches or the machine stops (``detach`` defaults to :data:`DETACH`). ``on_connected``
    runs once the console is reached (a machine that is not running raises :class:`StateError` before).
    """
    import asyncio

    api = client(name)
    detach = detach or DETACH

    async def attach() -> None:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[bytes | None] = asyncio.Queue()

        def on_input() -> None:
            data = os.read(input_fd, 1024)
            if not data or detach in data:
                loop.remove_reader(input_fd)
                q.put_nowait(data.split(detach)[0] or None)
                q.put_nowait(None)
                return
            q.put_nowait(data)

        loop.add_reader(input_fd, on_input)
        try:
            await api.console(on_output, q, on_connected=on_connected)
        finally:
            loop.remove_reader(input_fd)

    asyncio.run(attach())


def list_disks(name: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = client(name).call("GET", "/v1/disks")
    return rows


def attach_disk(name: str, spec: str, *, disk_id: str | None = None) -> dict[str, Any]:
    """Attach a disk (a ``--disk`` style SPEC) to a running instance; returns its id."""
    from vmkit.host.builder import parse_disk

    try:
        device = parse_disk(spec)
    except ValueError as exc:
        raise ConfigError.single("SPEC", str(exc)) from None
    if disk_id is not None:
        device["id"] = disk_id
    result: dict[str, Any] = client(name).call("POST", "/v1/disks", device)
    return result


def detach_disk(name: str, disk_id: str, *, timeout: float = 30.0) -> None:
    validate_disk_id(disk_id, field="ID")  # it goes into the request's URL
    client(name).call("DELETE", f"/v1/disks/{disk_id}", {"timeout": timeout}, timeout=timeout + 15)


def set_balloon(name: str, size: int | str, *, timeout: float = 10.0, field: str = "size") -> models.BalloonResult:
    """Move the running guest's usable memory to ``size`` (bytes, or ``512M``) with its balloon; waits up
    to ``timeout`` s for the guest to get there. ``field`` names the input in errors."""
    from vmkit.runtime import balloon

    try:
        target = parse_size(size)
    except ValueError as exc:
        raise ConfigError.single(field, str(exc)) from None
    balloon.check_target(get(name).load_config(), target, field=field)
    data = client(name).call("POST", "/v1/balloon", {"target": target, "timeout": timeout}, timeout=timeout + 15)
    return models.BalloonResult.model_validate(data)


def set_limits(name: str, changes: dict[str, int | str | None]) -> models.LimitsResult:
    """Change ``name``'s cgroup limits (see :class:`vmkit.config.Limits`): live through its supervisor
    when it runs (also written to vm.yaml), else in vm.yaml for its next start. A value of ``None`` or
    ``"none"`` removes that limit; fields not given stay."""
    values = cgroups.parse_limit_changes(changes)
    if not values:
        raise ConfigError.single("limits", "say what to change, e.g. cpu_max=50")
    inst = get(name)
    config = inst.load_config()
    merged = validate_model(Limits, {**config.limits.model_dump(mode="json"), **values}, context="limits")
    problems = merged.problems(config.total_memory, prefix="")
    if problems:
        raise ConfigError(problems)
    driver = cgroups.detect()
    if driver is not None and not merged.is_empty():
        driver.check(merged)  # what this host cannot do, each problem naming its field
    if inst.is_supervised():
        data = client(name).call("PUT", "/v1/limits", values)
        return models.LimitsResult.model_validate(data)
    lock = inst.open_lock()
    try:
        if not take_exclusive(lock):
            raise StateError("change the limits", "starting", ["stopped", "running"])
        inst.save_config(inst.load_config().model_copy(update={"limits": merged}))
    finally:
        os.close(lock)
    return models.LimitsResult(limits=merged, cgroup=None, cgroup_version=None, written=[], pinned=[])
def set_cpus(name: str, count: int, *, timeout: float = 30.0, field: str = "cpus") -> models.CpusResult:
    """Give the machine ``count`` vCPUs: live if it runs (waiting up to ``timeout`` s for the guest to
    release vCPUs it gives up), else in vm.yaml for its next start (``vcpus_online`` is None then)."""
    inst = get(name)
    config = inst.load_config()
    if isinstance(count, bool) or not isinstance(count, int):
        raise ConfigError.single(field, f"{count!r} is not a number of vCPUs: give a whole number, e.g. 2")
    from vmkit.runtime import vcpus

    vcpus.check_cpus(config, count, field=field)
    if _running(inst):
        data = client(name).call("POST", "/v1/cpus", {"cpus": count, "timeout": timeout}, timeout=timeout + 15)
        return models.CpusResult.model_validate(data)
    _edit_stopped(inst, field, cpus=count)
    return models.CpusResult(cpus=count, vcpus_online=None, max_cpus=config.cpu_ceiling, added=[], removed=[],
                             method="next-boot", note="in vm.yaml, from the next start")


def set_memory(name: str, size: int | str, *, timeout: float = 10.0, field: str = "memory") -> models.MemoryResult:
    """Give the machine ``size`` of memory (bytes or ``3G``; boot memory plus its virtio-mem region's plugged
    part): live if it runs (waiting up to ``timeout`` s for the guest), else in vm.yaml for its next start."""
    try:
        total = parse_size(size)
    except ValueError as exc:
        raise ConfigError.single(field, str(exc)) from None
    inst = get(name)
    config = inst.load_config()
    from vmkit.runtime import hotmem

    requested = hotmem.check_memory(config, total, field=field)
    assert config.max_memory is not None  # check_memory says so otherwise
    if _running(inst):
        data = client(name).call("POST", "/v1/memory", {"memory": total, "timeout": timeout}, timeout=timeout + 15)
        return models.MemoryResult.model_validate(data)
    _edit_stopped(inst, field, plugged_memory=requested)
    return models.MemoryResult(memory_bytes=total, plugged_bytes=None, boot_memory_bytes=config.memory,
                               max_memory_bytes=config.max_memory, reached=False)


def _running(inst: Instance) -> bool:
    status = inst.reconcile()
    if inst.is_supervised():
        if status.state not in LIVE:
            raise StateError("change a machine's resources", status.state, ["running", "paused", "stopped"])
        return True
    return False


def _edit_stopped(inst: Instance, field: str, **changes: Any) -> None:
    """Change vm.yaml of a stopped machine, holding its lock (nothing starts it meanwhile)."""
    fd = inst.open_lock()
    try:
        if not take_exclusive(fd, patience=0.5):
            raise StateError("change a machine's resources", inst.read_status().state, ["running", "stopped"])
        if inst.saved_state_path.exists():
            raise ConfigError.single(field, f"{inst.name} has a saved state, which must resume with the vCPUs and "
                                     f"memory it was saved with: resume it first (vmkit start {inst.name}), then "
                                     "change them live")
        config = inst.load_config()
        inst.save_config(validate_model(MachineConfig, {**config.to_dict(), **config.model_copy(update=changes)
                                                        .model_dump(mode="json", include=set(changes))},
                                        context="vm.yaml"))
    finally:
        os.close(fd)


def set_balloon_policy(name: str, *, balloon_min: int | str | None = None,
                       balloon_shares: int | None = None) -> MachineConfig:
    """Change what automatic ballooning may do with this machine (its vm.yaml; the controller reads it
    every round, so it holds at once, running or not). Errors name ``--balloon-min`` and
    ``--balloon-shares``."""
    inst = get(name)
    config = inst.load_config()
    fields: dict[str, Any] = {}
    if balloon_min is not None:
        try:
            fields["balloon_min"] = parse_size(balloon_min)
        except ValueError as exc:
            raise ConfigError.single("--balloon-min", str(exc)) from None
    if balloon_shares is not None:
        fields["balloon_shares"] = balloon_shares
    if not fields:
        return config
    try:
        new = MachineConfig.model_validate({**config.to_dict(), **fields})
    except ValidationError as exc:
        raise ConfigError([Problem("--" + p.field.replace("_", "-"), p.message)
                           for p in problems_from_validation(exc)]) from None
    inst.save_config(new)
    return new


def stats(name: str) -> models.MachineStats:
    """The running machine's memory and CPU use now."""
    return models.MachineStats.model_validate(client(name).call("GET", "/v1/stats"))


# -- screen and keyboard ------------------------------------------------------------------------------
def _display_client(name: str) -> SupervisorClient:
    """The supervisor of a running machine that has a display (else a ConfigError naming ``display``)."""
    inst = get(name)
    if inst.load_config().display is None:
        raise ConfigError.single("display", f"{name} has no display: create it with `vmkit create --display` "
                                 "(or add display: to its vm.yaml while it is stopped) and start it again")
    return client(name)


def screenshot(name: str) -> bytes:
    """The running machine's screen now, as PNG bytes."""
    import asyncio

    api = _display_client(name)

    async def fetch() -> bytes:
        return b"".join([piece async for piece in api.download("/v1/screenshot", {})])

    return asyncio.run(fetch())


def send_keys(name: str, keys: list[str], *, hold_ms: int = 50) -> models.KeysSent:
    """Press ``keys`` in turn (QEMU key names; ``ctrl-alt-delete`` pressed together)."""
    from vmkit.runtime import display

    for i, combo in enumerate(keys):
        display.parse_combo(combo, field=f"KEY {i + 1}")  # bad names are refused before anything is sent
    data = _display_client(name).call("POST", "/v1/keys", {"keys": keys, "hold_ms": hold_ms})
    return models.KeysSent.model_validate(data)


def type_text(name: str, text: str, *, hold_ms: int = 50) -> models.KeysSent:
    """Type ``text`` on the machine's keyboard (US layout)."""
    from vmkit.runtime import display

    display.text_keys(text, field="TEXT")
    data = _display_client(name).call("POST", "/v1/type", {"text": text, "hold_ms": hold_ms})
    return models.KeysSent.model_validate(data)


def display_info(name: str) -> models.DisplayInfo:
    return models.DisplayInfo.model_validate(_display_client(name).call("GET", "/v1/display"))


def resize_display(name: str, size: str, *, timeout: float = 10.0) -> models.DisplayResized:
    """Ask the running guest for display size ``size`` (``WIDTHxHEIGHT``)."""
    from vmkit.runtime import display

    width, height = display.parse_size(size)
    data = _display_client(name).call("POST", "/v1/display", {"width": width, "height": height, "timeout": timeout},
                                      timeout=timeout + 15)
    return models.DisplayResized.model_validate(data)


def web_console(name: str, *, port: int = 0) -> models.WebConsole:
    """Have the machine's supervisor serve the web console; a URL that works once."""
    if not 0 <= port <= 65535:
        raise ConfigError.single("--port", f"{port} is not a port: give 1-65535, or 0 for any free port")
    return models.WebConsole.model_validate(_display_client(name).call("POST", "/v1/web-console", {"port": port}))


def list_mounts(name: str) -> list[dict[str, Any]]:
    """The instance's shares; ``state`` says whether the machine is up and its virtiofsd or sshfs link alive."""
    inst = get(name)
    config = inst.load_config()
    status = inst.reconcile()
    running = inst.is_supervised() and status.state in LIVE
    rows = []
    for i, share in enumerate(config.shares):
        tag = config.share_tag(i)
        if not running:
            state = "stopped"
        elif status.degraded and f"share {tag!r}" in status.degraded:
            state = "failed (sshfs link ended)" if share.type == "sshfs" else "failed (virtiofsd died)"
        else:
            state = "active"
        rows.append({"tag": tag, "type": share.type, "host_path": str(share.host_path),
                     "guest_path": share.mount_point(), "read_only": share.read_only, "state": state})
    return rows


def exec_in_guest(name: str, argv: list[str], *, timeout: float = 60.0, stdin: bytes | None = None) -> ExecResult:
    """Run a command in a running guest through its agent."""
    from vmkit.runtime.guest.execute import ExecResult

    inst = get(name)
    config = inst.load_config()
    status = inst.reconcile()
    if not inst.is_supervised() or status.state != "running":
        raise StateError("run a command in the guest", status.state, ["running"])
    if not config.agent:
        raise ConfigError.single("agent", f"{name} has no guest agent channel: use `vmkit shell`, "
                                 "or create it from a cloud image")
    if not argv:
        raise ConfigError.single("CMD", "give the command to run after --")
    body: dict[str, Any] = {"argv": argv, "timeout": timeout}
    if stdin is not None:
        body["stdin"] = base64.b64encode(stdin).decode()
    data = SupervisorClient(inst.api_socket, timeout=timeout + 30).call("POST", "/v1/exec", body)
    return ExecResult(exit_code=int(data["exit_code"]), stdout=base64.b64decode(data["stdout"]),
                      stderr=base64.b64decode(data["stderr"]), signal=data.get("signal"))


def ssh_argv(name: str, command: list[str], *, tty: bool) -> list[str]:
    """The ``ssh`` command line for ``vmkit shell`` (pinned host key, the instance's key)."""
    inst = get(name)
    config = inst.load_config()
    if not (inst.dir / "ssh_config").exists():
        raise ConfigError.single("NAME", f"{name} has no SSH identity: only instances of cloud images "
                                 "(e.g. --image debian-12) have one")
    status = inst.reconcile()
    if not inst.is_supervised():
        raise StateError("open a shell", status.state, ["running"])
    ssh_port(config)  # clear error if the forward was removed
    return cloud_ssh_argv(inst.dir, name, command, tty=tty)


def ssh_config(name: str) -> str:
    inst = get(name)
    return ssh_config_text(inst.dir, name, ssh_port(inst.load_config()))


def port_add(name: str, spec: str) -> PortForward:
    """Forward a host port to the guest: live if the machine runs, and recorded in vm.yaml."""
    inst = get(name)
    config = inst.load_config()
    try:
        fwd = PortForward.parse(spec)
    except ValueError as exc:
        raise ConfigError.single("SPEC", str(exc)) from None
    if config.network is None:
        raise ConfigError.single("network", f"{name} has no network: port forwards need one")
    for existing in config.network.forwards:
        if (existing.protocol, existing.host_port) == (fwd.protocol, fwd.host_port):
            raise ConfigError.single("SPEC", f"host port {fwd.host_port}/{fwd.protocol} is already forwarded "
                                     f"({existing}): pick another host port")
    if not port_is_free(fwd.host_addr, fwd.host_port, fwd.protocol):
        raise ConfigError.single("SPEC", f"host port {fwd.host_addr}:{fwd.host_port} is taken on this host: "
                                 "pick a free port")
    inst.reconcile()
    if inst.is_supervised():
        SupervisorClient(inst.api_socket).call("POST", "/v1/ports", fwd.model_dump(mode="json"))
    network = config.network.model_copy(update={"forwards": (*config.network.forwards, fwd)})
    inst.save_config(config.model_copy(update={"network": network}))
    return fwd


def port_list(name: str) -> list[PortForward]:
    config = get(name).load_config()
    return list(config.network.forwards) if config.network else []


def clone(src: str, dst: str) -> tuple[Instance, list[str]]:
    """An independent copy of the stopped instance ``src``; returns it and notes for the user.

    Disks inside the instance directory are copied (sparse); read-only disks elsewhere are shared;
    a writable disk elsewhere is refused (both machines would write one file). The clone gets a
    new MAC, and cloud instances a new instance-id, keys, host keys and SSH port. Other host port
    forwards are not copied, so both machines can run at once.
    """
    source = get(src)
    status = source.reconcile()
    if source.is_supervised():
        raise StateError(f"clone {src}", status.state, ["stopped"])
    config = source.load_config()
    notes: list[str] = []
    storage = []
    copies: list[tuple[Path, Path]] = []
    target_dir = Instance(dst).dir
    for i, dev in enumerate(config.storage):
        att = dev.attachment
        if isinstance(att, NbdAttachment) or (att.read_only and not att.path.is_relative_to(source.dir)):
            storage.append(dev)
            continue
        if not att.path.is_relative_to(source.dir):
            raise ConfigError.single(f"storage[{i}]", f"{att.path} is outside {src}'s directory and writable: "
                                     "copy it yourself and attach the copy to the clone")
        new_path = target_dir / att.path.relative_to(source.dir)
        copies.append((att.path, new_path))
        storage.append(dev.model_copy(update={"attachment": att.model_copy(update={"path": new_path})}))
    network = config.network
    cloud = is_cloud_instance(source.dir)
    if network is not None:
        kept = []
        for fwd in network.forwards:
            if cloud and fwd.guest_port == 22 and fwd.protocol == "tcp":
                kept.append(fwd.model_copy(update={"host_port": free_port(fwd.host_addr)}))
            else:
                notes.append(f"port forward {fwd} not copied (the host port belongs to {src})")
        from vmkit.host.builder import random_mac

        network = network.model_copy(update={"mac": random_mac(), "forwards": tuple(kept)})
    fresh_nics = tuple(n.model_copy(update={"mac": None, "address": None}) for n in config.networks)
    new_config = config.model_copy(update={"name": validate_name(dst), "storage": tuple(storage),
                                           "network": network, "networks": fresh_nics})
    if Instance(dst).exists():
        raise AlreadyExistsError("instance", dst, hint=f"delete it first: vmkit delete {dst}")
    new_config = networks.join_all(new_config)  # the clone's own MAC and address on each network
    try:
        inst = Instance.create(new_config)
    except BaseException:
        networks.leave_all(new_config)
        raise
    try:
        for a, b in copies:
            b.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(a), str(b)], check=True)
        if cloud:
            extra = source.dir / EXTRA_USER_DATA
            if extra.exists():
                shutil.copy2(extra, inst.dir / EXTRA_USER_DATA)
            reidentify(inst.dir, new_config, resolv_conf=networks.resolv_conf(new_config))
        new_config.ensure_valid(host=True)
    except BaseException:
        shutil.rmtree(inst.dir, ignore_errors=True)
        networks.leave_all(new_config)
        raise
    return inst, notes


def copy(src: str, dst: str) -> int:
    """``vmkit cp``: exactly one side is ``NAME:/guest/path``; the other a host path. Returns bytes copied."""
    import asyncio

    from vmkit.runtime.guest.files import STAT_ARGV, copy_in, copy_out, parse_guest_mode

    src_guest, dst_guest = guest_side(src), guest_side(dst)
    if (src_guest is None) == (dst_guest is None):
        raise ConfigError.single("SRC/DST", "give exactly one guest side as NAME:/path "
                                 "(e.g. vmkit cp f.txt web:/tmp/f.txt)")
    name = (src_guest or dst_guest or ("", ""))[0]
    inst = get(name)
    status = inst.reconcile()
    if not inst.is_supervised() or status.state != "running":
        raise StateError("copy files", status.state, ["running"])
    if not inst.load_config().agent:
        raise ConfigError.single("agent", f"{name} has no guest agent channel: use scp with `vmkit ssh-config`")
    api = SupervisorClient(inst.api_socket, timeout=3600)
    if src_guest is not None:
        if dst.endswith("/") and not Path(dst).is_dir():
            raise ConfigError.single("DST", f"{dst} is not a directory: create it first, or drop the final '/'")

        async def probe(path: str) -> int | None:
            try:
                res = await api.request("POST", "/v1/exec", {"argv": [*STAT_ARGV, path], "timeout": 10.0})
            except VmkitError:
                return None
            return parse_guest_mode(int(res["exit_code"]), base64.b64decode(res["stdout"]))

        return asyncio.run(copy_out(lambda path: api.download("/v1/files", {"path": path}), probe,
                                    src_guest[1], Path(dst)))
    local = Path(src)
    if not local.is_file():
        raise NotFoundError("file", src)
    assert dst_guest is not None

    async def write(path: str, pieces: AsyncIterator[bytes]) -> int:
        return int((await api.upload("/v1/files", {"path": path}, pieces))["bytes"])

    return asyncio.run(copy_in(write, local, dst_guest[1]))


def guest_side(spec: str) -> tuple[str, str] | None:
    """``NAME:/path`` as (NAME, path); None for a host path (``vmkit cp``'s two sides)."""
    name, sep, path = spec.partition(":")
    if not sep or "/" in name or not name:
        return None
    return name, path
