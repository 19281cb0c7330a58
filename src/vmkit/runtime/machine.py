"""The virtual machine object: one QEMU process, its QMP session and serial console.

Lifecycle (an explicit state enum with guarded transitions)::

    stopped --start()--> starting --> running --pause()--> pausing --> paused
    paused --resume()--> resuming --> running
    running --request_stop()--> stopping --(guest powers off)--> stopped
    any live state --stop()--> stopping --> stopped
    QEMU dies unexpectedly / guest panics --> error

Calling an operation in the wrong state raises :class:`~vmkit.errors.StateError` naming the
current and the required states. State changes come from QMP events (STOP, RESUME,
SHUTDOWN, GUEST_PANICKED...) and from the process exiting, never from polling.

The object is an async context manager: leaving the block stops the guest (ACPI power
button with a timeout, then ``quit``, then SIGKILL), and no QEMU process outlives it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from vmkit.config import MachineConfig
from vmkit.errors import QemuError, StateError, VmTimeoutError
from vmkit.runtime import balloon, hotplug
from vmkit.runtime.guest.agent import AGENT_SOCKET_NAME
from vmkit.runtime.guest.channel import AgentChannel
from vmkit.runtime.hotplug import HotDisk
from vmkit.runtime.nbdwatch import NbdWatcher
from vmkit.runtime.proc import owned
from vmkit.runtime.qemu import accel as accel_mod
from vmkit.runtime.qemu import dirtysync
from vmkit.runtime.qemu.cmdline import AGENT_PORT_ID, NicBackend, Runtime, build_argv
from vmkit.runtime.qemu.monitor import Monitor
from vmkit.runtime.serial import SerialConsole
from vmkit.runtime.sshfs import SshfsMounts
from vmkit.runtime.states import LIVE_STATES as LIVE_STATES  # re-exported: the machine's public names
from vmkit.runtime.states import VmState as VmState
from vmkit.runtime.virtiofs import ShareDaemons

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VmEvent:
    """Something that happened to the machine.

    ``kind`` is one of: ``state-changed``, ``guest-stopped`` (clean power-off or quit),
    ``stopped-with-error`` (QEMU died, guest panicked), ``qmp`` (any other QMP event, its
    name in ``detail['event']``).
    """

    kind: str
    state: VmState
    detail: dict[str, Any] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "state": self.state.value, "detail": self.detail,
                "timestamp": self.timestamp}


@dataclass(frozen=True)
class ExitInfo:
    """How the QEMU process ended."""

    returncode: int | None
    clean: bool
    reason: str


_live_pids: weakref.WeakValueDictionary[int, VirtualMachine] = weakref.WeakValueDictionary()


def _kill_leftovers() -> None:  # pragma: no cover - exercised only when the interpreter dies dirty
    for pid in list(_live_pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


atexit.register(_kill_leftovers)

class VirtualMachine:
    def __init__(
        self,
        config: MachineConfig,
        workdir: Path,
        *,
        accel: accel_mod.AccelChoice | None = None,
        qemu_binary: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.accel = accel or accel_mod.choose(config.accel.value, arch=config.arch)
        self.qemu_binary = qemu_binary
        self.extra_args = list(extra_args or [])
        self.serial = SerialConsole(workdir / "serial.log" if config.serial.log else None,
                                    log_max=config.serial.log_max)
        self.qmp: Monitor | None = None
        self.exit_info: ExitInfo | None = None
        self.started_at: float | None = None
        self.guest_clock_stopped_at: float | None = None
        """Host wall-clock time (``time.time()``) since which the guest's clock stands still: set
        when the machine pauses; a restore or snapshot revert sets it to when that state was
        taken. None while the guest runs."""
        self.clock_behind_seconds: float | None = None
        """How far behind the guest clock was when the machine last resumed (None if unknown)."""
        self._state = VmState.STOPPED
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribers: list[asyncio.Queue[VmEvent]] = []
        self._callbacks: list[Callable[[VmEvent], None]] = []
        self._state_changed = asyncio.Event()
        self._exited = asyncio.Event()
        self._shutdown_event: dict[str, Any] | None = None
        self._panicked = False
        self._stop_requested = False
        self.nbd = NbdWatcher(self, self._emit)
        self.hot_disks: dict[str, HotDisk] = {}  # see vmkit.runtime.hotplug
        self.unplugs: dict[str, asyncio.Future[None]] = {}  # hot disks being detached (see vmkit.runtime.hotplug)
        self.detached_late: set[str] = set()  # ... and those released after their detach_disk gave up
        self.cow_memory_file: Path | None = None
        """The file the guest's RAM maps copy-on-write (a warm template's, which other clones map too)."""
        self.vcpus_removed = 0
        """vCPUs this QEMU process was asked to remove (vmkit.runtime.vcpus: under TCG none are added after)."""
        self.vcpus_parked: set[int] = set()
        """vCPUs QEMU has that vmkit took offline in the guest (vmkit.runtime.vcpus), until the next boot."""
        self.shares = ShareDaemons(config, workdir, self._emit, self._gone_or_stopping)
        self.agent: AgentChannel | None = AgentChannel(workdir / AGENT_SOCKET_NAME) if config.agent else None
        """The one connection to the guest agent, shared by every caller (see vmkit.runtime.guest.channel)."""
        self._agent_port_open = asyncio.Event()  # VSERPORT_CHANGE: the guest opened the agent's port
        self.sshfs = SshfsMounts(config, workdir, self._emit, self._gone_or_stopping)
        self.nics: tuple[NicBackend, ...] = ()
        """How each ``config.networks`` NIC reaches its network (the supervisor opens the taps
        before the start; QEMU gets the tap file descriptors)."""

    # -- introspection ------------------------------------------------------------------------
    @property
    def state(self) -> VmState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "qemu.log"

    def argv(self, runtime: Runtime) -> list[str]:
        return build_argv(self.config, self.accel, runtime, binary=self.qemu_binary) + self.extra_args

    # -- events ---------------------------------------------------------------------------------
    def add_listener(self, callback: Callable[[VmEvent], None]) -> Callable[[], None]:
        """Call ``callback`` for every event; returns a function that removes it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    @contextlib.asynccontextmanager
    async def subscribe(self, limit: int = 0) -> AsyncIterator[asyncio.Queue[VmEvent]]:
        """A queue receiving every event from now on, for the life of the block.

        With ``limit``, at most that many events wait in it: a subscriber that falls further
        behind is unsubscribed, its waiting events are replaced by one ``events-dropped`` event
        (say so, and stop reading), and nothing more arrives.
        """
        q: asyncio.Queue[VmEvent] = asyncio.Queue(limit)
        self._subscribers.append(q)
        try:
            yield q
        finally:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def emit(self, kind: str, **detail: Any) -> None:
        """Report something that happened to the machine, observed by its owner (the supervisor), to every
        subscriber (``cpus-changed``, ``clock-fixed`` ...)."""
        self._emit(kind, **detail)

    def _emit(self, kind: str, **detail: Any) -> None:
        ev = VmEvent(kind, self._state, detail)
        for q in list(self._subscribers):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                self._drop_subscriber(q)
        for cb in list(self._callbacks):
            try:
                cb(ev)
            except Exception:  # a listener's bug must not break the machine
                log.exception("event listener failed")

    def _drop_subscriber(self, q: asyncio.Queue[VmEvent]) -> None:
        self._subscribers.remove(q)
        waiting = q.qsize()
        while not q.empty():
            q.get_nowait()
        log.warning("an event subscriber fell %d events behind: dropped", waiting)
        q.put_nowait(VmEvent("events-dropped", self._state, {
            "message": f"this event stream fell {waiting} events behind and was ended: "
                       "read events as they come, and subscribe again"}))

    def _set_state(self, new: VmState, **detail: Any) -> None:
        if new == self._state:
            return
        old = self._state
        self._state = new
        self._track_guest_clock(old, new)
        self._state_changed.set()
        self._state_changed = asyncio.Event()
        self._emit("state-changed", previous=old.value, **detail)

    def _track_guest_clock(self, old: VmState, new: VmState) -> None:
        """The guest's clock stands still while the machine is paused (QEMU stops its virtual clock)."""
        if new == VmState.PAUSED and old in (VmState.RUNNING, VmState.PAUSING):
            if self.guest_clock_stopped_at is None:
                self.guest_clock_stopped_at = time.time()
        elif new == VmState.RUNNING and old in (VmState.PAUSED, VmState.RESUMING):
            since = self.guest_clock_stopped_at
            self.clock_behind_seconds = max(0.0, time.time() - since) if since is not None else None
            self.guest_clock_stopped_at = None
        elif new in (VmState.STARTING, VmState.STOPPED, VmState.ERROR):
            self.guest_clock_stopped_at = None  # a booting guest reads the host's time from its RTC

    def _require(self, operation: str, *allowed: VmState) -> None:
        if self._state not in allowed:
            raise StateError(operation, self._state.value, [s.value for s in allowed])

    async def wait_for_state(self, *states: VmState, timeout: float | None = None) -> VmState:
        async def _wait() -> VmState:
            while self._state not in states:
                await self._state_changed.wait()
            return self._state

        try:
            return await asyncio.wait_for(_wait(), timeout)
        except TimeoutError:
            raise VmTimeoutError(
                f"{self.config.name}: still {self._state.value} after {timeout} s, "
                f"expected {' or '.join(s.value for s in states)}"
            ) from None

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, *, paused: bool = False, incoming: bool = False, machine_type: str | None = None,
                    memory_file: Path | None = None, memory_shared: bool = False, ram_pad: int | None = None,
                    spare_netdev: str | None = None) -> None:
        """Launch QEMU, open QMP, subscribe to events, and (unless ``paused``) run the guest.

        ``incoming=True`` starts QEMU waiting for a migration stream (``-incoming defer``).
        ``machine_type`` runs that versioned machine type instead of the configuration's alias.
        ``memory_file``: the guest's RAM is that file, mapped shared (``memory_shared``: a warm
        template writes it) or copy-on-write (a clone of the template).
        ``ram_pad``: bytes of RAM over the configured memory (None: what this host's QEMU needs for
        correct dirty tracking, :func:`vmkit.runtime.qemu.dirtysync.config_ram_pad`; a migration's target
        takes the source's).
        ``spare_netdev``: a user-mode netdev of that name without a NIC (it takes a warm template's NAT state,
        :data:`vmkit.state.template.SPARE_NETDEV`).
        """
        self._require("start", VmState.STOPPED, VmState.ERROR)
        self._set_state(VmState.STARTING)
        self.cow_memory_file = memory_file if not memory_shared else None
        self.exit_info = None
        self._shutdown_event = None
        self._panicked = False
        self._stop_requested = False
        self._exited = asyncio.Event()
        self.hot_disks.clear()
        self.unplugs.clear()
        self.detached_late.clear()
        self.vcpus_removed = 0
        self.vcpus_parked.clear()
        self.workdir.mkdir(parents=True, exist_ok=True)
        qmp_parent, qmp_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ser_parent, ser_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if ram_pad is None:
            ram_pad = dirtysync.config_ram_pad(self.config, self.accel.name, self.qemu_binary)
        runtime = Runtime(qmp_fd=qmp_child.fileno(), serial_fd=ser_child.fileno(),
                          pidfile=self.workdir / "qemu.pid", share_dir=self.workdir, machine_type=machine_type,
                          nics=self.nics, memory_file=memory_file, memory_shared=memory_shared, ram_pad=ram_pad,
                          spare_netdev=spare_netdev)
        argv = self.argv(runtime)
        if incoming:
            argv += ["-incoming", "defer"]
        try:
            await self.shares.start(runtime)
            with self.stderr_path.open("ab") as errlog:
                errlog.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
                errlog.flush()
                try:
                    self._proc = await asyncio.create_subprocess_exec(
                        *owned(argv), stdin=asyncio.subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                        pass_fds=(qmp_child.fileno(), ser_child.fileno(),
                                  *(n.tap_fd for n in self.nics if n.tap_fd is not None)),
                        start_new_session=True,
                    )
                except FileNotFoundError:
                    raise QemuError(f"{argv[0]} is not installed",
                                    hint="install it: apt-get install qemu-system-x86 (see `vmkit doctor`)") from None
        except BaseException:
            qmp_parent.close()
            ser_parent.close()
            await self.shares.stop()
            self._set_state(VmState.ERROR, reason="QEMU could not be launched")
            raise
        finally:
            qmp_child.close()
            ser_child.close()
        _live_pids[self._proc.pid] = self
        self.started_at = time.time()
        self._tasks.append(asyncio.create_task(self._watch_process(), name="vmkit-process"))
        self.serial.attach(ser_parent)
        try:
            self.qmp = Monitor(self.config.name)
            await self._connect_qmp(qmp_parent)
            self._tasks.append(asyncio.create_task(self._watch_events(), name="vmkit-events"))
            if self.config.display is not None:  # QEMU made it with its umask: the screen is the owner's alone
                (self.workdir / "vnc.sock").chmod(0o600)
            if self.config.balloon:
                await balloon.enable_stats(self.qmp)
            if incoming or paused:
                self._set_state(VmState.PAUSED)
            else:
                await self.qmp.execute("cont")
                self._set_state(VmState.RUNNING)
            self.nbd.started()
        except BaseException as exc:
            await self._kill()
            reason = self._qemu_failure_reason()
            self._set_state(VmState.ERROR, reason=reason)
            if isinstance(exc, QemuError | OSError):
                raise QemuError(f"{self.config.name}: QEMU failed to start: {reason}",
                                hint=f"see {self.stderr_path}") from exc
            raise

    async def _connect_qmp(self, sock: socket.socket) -> None:
        assert self.qmp is not None
        connect = asyncio.ensure_future(self.qmp.connect(sock))
        died = asyncio.ensure_future(self._exited.wait())
        done, _ = await asyncio.wait({connect, died}, return_when=asyncio.FIRST_COMPLETED)
        if connect not in done:
            connect.cancel()
            with contextlib.suppress(BaseException):
                await connect
            raise QemuError("QEMU exited before its monitor answered")
        died.cancel()
        connect.result()

    async def pause(self) -> None:
        self._require("pause", VmState.RUNNING)
        assert self.qmp is not None
        self._set_state(VmState.PAUSING)
        try:
            await self.qmp.execute("stop")
        except QemuError:
            self._set_state(VmState.RUNNING)
            raise
        self._set_state(VmState.PAUSED)

    async def resume(self) -> None:
        self._require("resume", VmState.PAUSED)
        assert self.qmp is not None
        self._set_state(VmState.RESUMING)
        try:
            await self.qmp.execute("cont")
        except QemuError:
            self._set_state(VmState.PAUSED)
            raise
        self._set_state(VmState.RUNNING)

    async def request_stop(self, timeout: float | None = None) -> None:
        """Press the ACPI power button; the guest shuts itself down cleanly.

        With ``timeout``, wait that long for QEMU to exit (else :class:`VmTimeoutError`).
        """
        self._require("request a stop", VmState.RUNNING)
        assert self.qmp is not None
        self._stop_requested = True
        try:
            await self.qmp.execute("system_powerdown")
        except QemuError:
            # a quick guest powers off before QEMU has sent its reply: that is success
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), 2.0)
            if not self._exited.is_set():
                raise
        if not self._exited.is_set():
            self._set_state(VmState.STOPPING, reason="power button pressed")
        if timeout is not None:
            await self.wait(timeout)

    async def stop(self, timeout: float = 5.0) -> ExitInfo:
        """Hard stop: tell QEMU to quit (the guest gets no say); SIGKILL if it does not."""
        self._require("stop", *LIVE_STATES)
        self._stop_requested = True
        self._set_state(VmState.STOPPING, reason="stop requested")
        if self.qmp is not None:
            with contextlib.suppress(QemuError):
                await self.qmp.execute("quit", timeout=timeout)
        try:
            return await self.wait(timeout)
        except VmTimeoutError:
            await self._kill()
            return await self.wait(timeout)

    async def wait(self, timeout: float | None = None) -> ExitInfo:
        """Wait until QEMU has exited; how it ended."""
        if self._proc is None:
            if self.exit_info is not None:
                return self.exit_info
            raise StateError("wait", self._state.value, [s.value for s in LIVE_STATES])
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            raise VmTimeoutError(f"{self.config.name}: QEMU still running after {timeout} s") from None
        assert self.exit_info is not None
        return self.exit_info

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the configured readiness signals: a serial console marker, the guest agent."""
        ready = self.config.readiness
        if ready.serial_marker is None and not ready.agent:
            return
        limit = timeout if timeout is not None else ready.timeout

        async def signals() -> None:
            if ready.serial_marker is not None:
                await self.serial.wait_for(ready.serial_marker)
            if ready.agent:
                await self._wait_agent()

        found = asyncio.ensure_future(signals())
        died = asyncio.ensure_future(self._exited.wait())
        done, _ = await asyncio.wait({found, died}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        found.cancel()
        died.cancel()
        if found in done and not found.cancelled() and found.exception() is None:
            return
        tail = self.serial.tail_text(lines=15)
        if died in done:
            raise QemuError(f"{self.config.name}: QEMU exited before the guest was ready "
                            f"({self.exit_info.reason if self.exit_info else 'unknown'}). Last console lines:\n{tail}")
        what = " and ".join(filter(None, [f"{ready.serial_marker!r} on the serial console" if ready.serial_marker
                                          else "", "an answer from the guest agent" if ready.agent else ""]))
        raise VmTimeoutError(f"{self.config.name}: no {what} within {limit:.0f} s. Last console lines:\n{tail}")

    async def mount_sshfs(self, timeout: float | None = None) -> None:
        """Mount the sshfs shares in the ready guest (see :mod:`vmkit.runtime.sshfs`); return once all are mounted.

        The supervisor calls this right after :meth:`wait_ready`, before ``vmkit start`` returns:
        that is what "mounted at boot" means for sshfs shares. Raises :class:`QemuError` if QEMU
        exits meanwhile, and the error of the first share that cannot be mounted.
        """
        self._require("mount sshfs shares", VmState.RUNNING)
        mount = asyncio.ensure_future(
            self.sshfs.mount_all(timeout if timeout is not None else self.config.readiness.timeout))
        died = asyncio.ensure_future(self._exited.wait())
        try:
            await asyncio.wait({mount, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
            if not mount.done():
                mount.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await mount
        if mount.cancelled():
            raise QemuError(f"{self.config.name}: QEMU exited before the sshfs shares were mounted "
                            f"({self.exit_info.reason if self.exit_info else 'unknown'})")
        mount.result()

    async def _gone_or_stopping(self, timeout: float) -> bool:
        """Whether the machine is stopping or stopped, allowing ``timeout`` s for QEMU to exit."""
        if self._stop_requested or self._exited.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), timeout)
        return (self._stop_requested or self._exited.is_set()
                or self._state in (VmState.STOPPING, VmState.STOPPED, VmState.ERROR))

    async def _wait_agent(self) -> None:
        """Until qemu-guest-agent answers: QEMU says when the guest opens the agent's port
        (VSERPORT_CHANGE), then a ``guest-ping`` through the shared channel confirms it. The ping is
        retried every few seconds in case the event came before the agent could answer."""
        if self.agent is None:
            raise QemuError(f"{self.config.name}: readiness waits for the guest agent, but the machine "
                            "has no agent channel (agent: false)")
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._agent_port_open.wait(), 5.0)
            if await self.agent.ping(3.0):
                return
            await asyncio.sleep(0.5)

    async def shutdown(self, timeout: float = 10.0) -> ExitInfo | None:
        """Graceful if possible (power button, ``timeout``), then hard. Always reaps QEMU."""
        if self._proc is None or self._exited.is_set():
            await self._cleanup()
            return self.exit_info
        try:
            if self._state == VmState.RUNNING:
                with contextlib.suppress(QemuError, VmTimeoutError):
                    await self.request_stop(timeout=timeout)
            if not self._exited.is_set() and self._state in LIVE_STATES:
                with contextlib.suppress(QemuError, VmTimeoutError):
                    await self.stop(timeout=min(timeout, 5.0))
        finally:
            if not self._exited.is_set():
                await self._kill()
            await self._cleanup()
        return self.exit_info

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any:
        """Run a raw QMP command (for features vmkit does not wrap yet)."""
        self._require(f"run QMP {command}", *(s for s in LIVE_STATES if s != VmState.STARTING))
        assert self.qmp is not None
        return await self.qmp.execute(command, arguments, timeout=timeout)

    # -- context manager ------------------------------------------------------------------------
    async def __aenter__(self) -> VirtualMachine:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.shield(self.shutdown())

    # -- internals --------------------------------------------------------------------------------
    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), 10)

    async def _cleanup(self) -> None:
        self.nbd.close()
        if self.agent is not None:
            await self.agent.close()
        self._agent_port_open.clear()
        await self.sshfs.stop()
        await self.shares.stop()
        for t in self._tasks:
            if not t.done():
                t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.qmp is not None:
            await self.qmp.close()
            self.qmp = None
        self.serial.close()

    async def _watch_events(self) -> None:
        assert self.qmp is not None
        async for ev in self.qmp.events():
            name = ev.get("event", "")
            data = ev.get("data", {})
            if name == "STOP" and self._state == VmState.RUNNING:
                self._set_state(VmState.PAUSED, reason=data.get("reason", "stopped by QEMU"))
            elif name == "RESUME" and self._state == VmState.PAUSED:
                self._set_state(VmState.RUNNING)
            elif name == "SHUTDOWN":
                self._shutdown_event = data
                self._set_state(VmState.STOPPING, reason=data.get("reason", "shutdown"))
            elif name == "GUEST_PANICKED":
                self._panicked = True
            elif name == "RESET":  # the guest reboots and brings every vCPU QEMU has online
                self.vcpus_parked.clear()
            elif name == "VSERPORT_CHANGE" and data.get("id") == AGENT_PORT_ID:
                if data.get("open"):
                    self._agent_port_open.set()
                else:
                    self._agent_port_open.clear()
            elif name == "DEVICE_DELETED":
                hotplug.device_deleted(self, data)
            if not self.nbd.on_qmp_event(name, data):
                continue  # coalesced I/O-error flood
            self._emit("qmp", event=name, data=data)

    async def _watch_process(self) -> None:
        assert self._proc is not None
        proc = self._proc
        rc = await proc.wait()
        _live_pids.pop(proc.pid, None)
        # let the QMP reader deliver the SHUTDOWN event that preceded the exit
        await asyncio.sleep(0)
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / "qemu.pid").unlink()
        self.exit_info = self._classify_exit(rc)
        self._exited.set()
        await self.serial.drain()
        if self.exit_info.clean:
            self._set_state(VmState.STOPPED, reason=self.exit_info.reason)
            self._emit("guest-stopped", reason=self.exit_info.reason, returncode=rc)
        else:
            self._set_state(VmState.ERROR, reason=self.exit_info.reason)
            self._emit("stopped-with-error", reason=self.exit_info.reason, returncode=rc)

    def _classify_exit(self, rc: int) -> ExitInfo:
        if self._panicked:
            return ExitInfo(rc, False, "the guest kernel panicked")
        if rc == 0 and self._shutdown_event is not None:
            reason = str(self._shutdown_event.get("reason", "shutdown"))
            who = "guest" if self._shutdown_event.get("guest") else "host"
            return ExitInfo(rc, True, f"{who} shutdown ({reason})")
        if rc < 0 and self._stop_requested:
            return ExitInfo(rc, True, f"killed by vmkit (signal {-rc})")
        if rc < 0:
            return ExitInfo(rc, False, f"QEMU was killed by signal {-rc} ({signal.Signals(-rc).name})")
        if rc == 0:
            return ExitInfo(rc, self._stop_requested, "QEMU exited")
        return ExitInfo(rc, False, f"QEMU exited with status {rc}: {self._qemu_failure_reason()}")

    def _qemu_failure_reason(self) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "no output"
        tail = [ln for ln in lines[-10:] if ln and not ln.startswith("--- ")]
        return "; ".join(tail[-3:]) or "no output"
