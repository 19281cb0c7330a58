"""The per-instance supervisor: owns QEMU and serves a JSON HTTP API on ``api.sock``.

Started detached by :func:`vmkit.backends.local.control.start` as ``python -m vmkit.daemon.supervisor DIR``. It
holds the instance lock for its whole life, starts the machine, reports the outcome on a
pipe (so ``vmkit start`` returns exactly when the guest is running or has failed), then
serves until QEMU exits, records why in ``state.json`` and exits itself.

API (all JSON; every error, bad input, unknown path or method and unexpected failure alike, is
``{"error": {"type", "message", "hint", "exit_code"}}``, plus ``"field"`` for bad input; bodies
are checked as vm.yaml is, and are at most 64 KiB)::

    GET  /v1/state            runtime status
    GET  /v1/info             configuration + runtime status
    POST /v1/pause | /v1/resume
    POST /v1/request-stop     {"timeout": s}  ACPI power button, wait up to timeout
    POST /v1/stop             hard stop
    GET  /v1/events           newline-delimited JSON events as they happen
    GET  /v1/console          websocket: binary frames both ways (the serial console)
    GET  /v1/disks            disks: boot and hot-plugged, with NBD connection state
    POST /v1/disks            attach a disk (a StorageDevice as JSON)
    DELETE /v1/disks/ID       detach a hot-plugged disk
    POST /v1/balloon          {"target": bytes}  move the guest's usable memory (memory balloon)
    POST /v1/cpus             {"cpus": n}  add or remove vCPUs live (written to vm.yaml)
    POST /v1/memory           {"memory": bytes}  grow or shrink the memory live (virtio-mem; written to vm.yaml)
    GET  /v1/stats            memory (balloon, guest, QEMU's RSS, KSM), CPU use, steal and the limits now
    PUT  /v1/limits           change the cgroup limits live (see vmkit.host.cgroups)
    GET  /v1/screenshot       the screen as PNG          POST /v1/keys | /v1/type   key presses, typed text
    GET|POST /v1/display      the display's size; ask for another one
    POST /v1/web-console      serve the web console on a loopback port; a one-time URL (vmkit.daemon.webconsole)
    POST /v1/save, GET|POST /v1/snapshots, POST /v1/snapshots/TAG/revert, DELETE /v1/snapshots/TAG
                              save/restore and snapshots (see vmkit.daemon.state_routes)
    POST /v1/migrate, /v1/migrate/finish, /v1/migrate/cancel, /v1/memory-digest, GET /v1/migration
                              live migration (see vmkit.daemon.migrate_routes)

Beside it, ``console.sock`` carries the raw console byte stream for tools such as socat.

Console clients (``console.sock`` and ``/v1/console``) each get at most
:data:`CONSOLE_BACKLOG` bytes of output waiting for them; a client that reads more slowly than
the guest prints loses what does not fit, and reads a notice saying how much once it catches up
(see :class:`vmkit.runtime.serial.Backlog`). An ``/v1/events`` reader more than :data:`EVENTS_BACKLOG`
events behind gets an ``events-dropped`` event and the stream ends. Save and snapshot operations
exclude every other operation that changes the machine (see
:class:`vmkit.daemon.state_routes.OperationGate`): those are refused with HTTP 409.

The supervisor runs in the instance directory (its working directory), so nothing it opens
can depend on where ``vmkit`` was started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

from aiohttp import WSMsgType, web

from vmkit.api import models, spec
from vmkit.config import Display, Limits, PortForward, StorageDevice, port_is_free, validate_model
from vmkit.daemon.migrate_routes import MigrateRoutes, start_incoming
from vmkit.daemon.state_routes import (
    OperationGate,
    StartPlan,
    StateRoutes,
    body_as,
    json_body,
    start_from_plan,
    unexpected_error,
)
from vmkit.daemon.webconsole import Actions, WebConsole
from vmkit.errors import (
    ConfigError,
    ExitCode,
    HostError,
    NotFoundError,
    QemuError,
    StateError,
    VmkitError,
    error_fields,
)
from vmkit.host import cgroups, ksm
from vmkit.host.instance import Instance, Status, take_exclusive
from vmkit.net.forward import Forwarder
from vmkit.net.store import NetworkStore, close_nics
from vmkit.runtime import balloon, display, hotmem, hotplug, proc, vcpus, vcputhreads
from vmkit.runtime.guest import binfmt
from vmkit.runtime.guest.agent import GuestAgentError
from vmkit.runtime.guest.channel import AgentChannel
from vmkit.runtime.guest.clock import ClockKeeper, ClockReading
from vmkit.runtime.guest.execute import guest_exec
from vmkit.runtime.guest.files import CHUNK as FILE_CHUNK
from vmkit.runtime.guest.files import check_remote, read_guest_file, write_guest_file
from vmkit.runtime.hotplug import disk_table
from vmkit.runtime.machine import VirtualMachine, VmEvent
from vmkit.runtime.serial import Backlog
from vmkit.runtime.states import LIVE_STATES, VmState
from vmkit.state import savestate

log = logging.getLogger("vmkit.daemon.supervisor")

MAX_BODY = 64 << 10
"""Largest request body (and console input message) the API accepts."""
CONSOLE_BACKLOG = 256 << 10
"""Most console output bytes that wait for one console client (see :class:`vmkit.runtime.serial.Backlog`)."""
START_REQUEST_WAIT = 60.0
"""How long a new supervisor waits for ``POST /v1/start`` before it gives up and exits."""
CONSOLE_TICK = 0.25
"""How often the start's stream reports the guest's last console line while it boots."""
EVENTS_BACKLOG = 1000
"""Most events that wait for one ``/v1/events`` reader."""


def error_body(exc: VmkitError) -> dict[str, Any]:
    return {"error": error_fields(exc)}


class Supervisor:
    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self._start: asyncio.Task[None] | None = None
        self._start_outcome: asyncio.Future[int | None] | None = None
        self.start_began = time.monotonic()
        """When ``POST /v1/start`` began the start (the phases of a warm start are measured from it)."""
        self._start_requested = asyncio.Event()
        """Set once the start has finished: None (the guest is ready) or the exit code of its failure."""
        self._start_asked = asyncio.Event()
        """Set once ``POST /v1/start`` came (or the supervisor was asked to go before it did)."""
        self.exit_reason: str | None = None  # why QEMU was stopped on purpose (e.g. "state saved to ...")
        self.config = instance.load_config()
        self.vm = VirtualMachine(self.config, instance.dir)
        self.status = Status()
        self._done = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._console_server: asyncio.Server | None = None
        self.ops = OperationGate()
        self._cpu = balloon.CpuMeter()
        self._steal = vcputhreads.StealMeter()
        self.cgroup: cgroups.MachineCgroup | None = None
        """The machine's cgroup while it runs (None: the host offers none, and no limits were asked for)."""
        self.cgroup_notes: list[str] = []
        self._resizing = asyncio.Lock()  # one vCPU or memory change at a time
        self._clock_task: asyncio.Task[None] | None = None
        self.forwarder: Forwarder | None = None
        """Host port forwards of a machine without a user-mode NIC (to its address on its first network)."""
        self.web = WebConsole(self.config.name, Actions(
            serial_add_listener=self.vm.serial.add_listener, serial_write=self.vm.serial.write,
            serial_log=instance.serial_log, vnc_socket=instance.dir / display.VNC_SOCKET_NAME,
            keys=self._send_keys, type_text=self._type_text, screenshot=self._screenshot))
        self.migration = MigrateRoutes(self)

    # -- status bookkeeping -------------------------------------------------------------------------
    def _record(self, ev: VmEvent) -> None:
        if ev.kind == "share-failed":
            reason = str(ev.detail.get("reason"))
            old = self.status.degraded
            self.status.degraded = f"{old}; {reason}" if old and reason not in old else reason
            self.instance.write_status(self.status)
            return
        if ev.kind not in ("state-changed", "guest-stopped", "stopped-with-error"):
            return
        self.status.state = ev.state.value
        if "reason" in ev.detail:
            self.status.reason = str(ev.detail["reason"])
        self.status.qemu_pid = self.vm.pid if ev.state in LIVE_STATES else None
        self.instance.write_status(self.status)

    def info(self) -> dict[str, Any]:
        return {"name": self.config.name, "config": self.config.to_dict(), "runtime": self.status.to_dict()}

    # -- run ------------------------------------------------------------------------------------------
    async def run(self, listen_fd: int | None = None) -> int:
        """Serve the API at once, start the machine when ``POST /v1/start`` asks, then supervise it
        until QEMU exits. Returns the process's exit code."""
        self.status = Status(state="starting", supervisor_pid=os.getpid(), accel=self.vm.accel.name,
                             accel_reason=self.vm.accel.reason)
        self.instance.write_status(self.status)
        self.vm.add_listener(self._record)
        self.vm.add_listener(self._cpu_released)
        self._start_outcome = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self._graceful_exit()))
        await self._serve_api(listen_fd)
        # wait for the request (not for the start itself: a guest may take longer than this to boot)
        outcome = self._start_outcome
        try:
            await asyncio.wait_for(self._start_asked.wait(), START_REQUEST_WAIT)
        except TimeoutError:
            log.error("nobody asked to start the machine within %.0f s: exiting", START_REQUEST_WAIT)
            failed: int | None = int(ExitCode.TIMEOUT)
        else:
            failed = await outcome
        if failed is not None:
            if self._start is None:
                self._record_failure("never started")
            self._remove_cgroup()
            await self._stop_api()
            return failed
        exit_info = await self.vm.wait()
        log.info("QEMU exited: %s", exit_info.reason)
        if self._clock_task is not None:
            self._clock_task.cancel()
        if self.forwarder is not None:
            await self.forwarder.close()
        await self.vm.shutdown()
        self._remove_cgroup()
        self.status.state = "stopped" if exit_info.clean else "error"
        self.status.reason = self.exit_reason or exit_info.reason
        self.status.qemu_pid = None
        self.instance.write_status(self.status)
        await self._stop_api()
        return 0 if exit_info.clean else 5

    def _record_failure(self, reason: str) -> None:
        self.status.state = "error"
        self.status.reason = reason
        self.status.qemu_pid = None
        self.instance.write_status(self.status)

    async def _start_machine(self, plan: StartPlan, emit: Callable[[dict[str, Any]], None]) -> None:
        """The start (boot, or from saved state); emits its progress and one ``result`` or ``error``."""
        assert self._start_outcome is not None
        ready = False
        self.start_began = time.monotonic()
        try:
            lock = _Lock(await self._make_cgroup())
            for note in self.cgroup_notes:
                emit({"note": note})
            joined = asyncio.create_task(self._unlock_when_joined(lock), name="vmkit-cgroup-joined")
            try:
                await self._attach_networks(emit)
                if plan.incoming is not None:
                    emit({"started": await start_incoming(self, plan.incoming)})
                    self.migration.incoming = plan.incoming.uri
                elif plan.active:
                    await start_from_plan(self, plan, emit)
                else:
                    await self.vm.start()
            finally:  # QEMU holds the taps now (or failed): the kernel removes them when it exits
                close_nics(self.vm.nics, sockets=False)
                joined.cancel()
                lock.close()
            await self._pin(self.config.limits)
            await self._start_forwards()
            self.status.qemu_pid = self.vm.pid
            self.status.started_at = self.vm.started_at
            self.status.qemu_version = self.vm.qmp.qemu_version if self.vm.qmp else None
            self.instance.write_status(self.status)
            if not plan.active:  # a restored guest printed its readiness marker long ago
                await self.vm.wait_ready()
            ready = True
            if self.config.binfmt and not plan.active and plan.incoming is None:  # restored: still registered
                await self._install_binfmt(emit)
            self._keep_clock()
            if self.vm.state == VmState.RUNNING:  # sshfs shares: mounted before `vmkit start` returns
                await self.vm.mount_sshfs()
        except Exception as raised:
            exc = raised if isinstance(raised, VmkitError) else unexpected_error(raised)
            log.error("start failed: %s", exc)
            if ready:  # the guest is up (an sshfs share failed): let it power off cleanly, so that
                await self.vm.shutdown(timeout=20)  # what its first boot wrote reaches the disk
            emit(error_body(exc))
            await self.vm.shutdown(timeout=2)
            self._remove_cgroup()
            self._record_failure(exc.message.splitlines()[0])
            self._start_outcome.set_result(int(exc.exit_code))
            return
        emit({"result": self.status.to_dict()})
        self._start_outcome.set_result(None)

    # -- the machine's cgroup (vmkit.host.cgroups) -------------------------------------------------------
    async def _make_cgroup(self) -> int | None:
        """Create the machine's cgroup with its limits and make every child join it; returns the parent
        lock, held until the first child is in (close it then). Empty cgroups left by supervisors
        that were killed are removed first, and said so in the log and the events."""
        limits = self.config.limits
        driver = cgroups.detect()
        if driver is None or not driver.controllers:
            if not limits.is_empty():
                raise HostError("this host offers no cgroup controllers: the machine's limits cannot be applied",
                                hint="remove `limits:` from vm.yaml, or see `vmkit doctor`")
            log.warning("no cgroup controllers on this host: the machine runs without a cgroup")
            return None
        try:
            lock = await asyncio.to_thread(cgroups.lock_parent, driver)
        except HostError as exc:
            if not limits.is_empty():
                raise
            log.warning("the machine runs without a cgroup: %s", exc.message)
            return None
        try:
            cleaned = cgroups.clean_stale(driver)
            for rel in cleaned:
                note = f"removed the stale empty cgroup {rel} (left by a supervisor that was killed)"
                log.info("%s", note)
                self.cgroup_notes.append(note)
            self.cgroup = cgroups.create(driver, self.config.name, limits)
        except HostError as exc:
            os.close(lock)
            if not limits.is_empty():
                raise
            log.warning("the machine runs without a cgroup: %s", exc.message)
            return None
        except BaseException:
            os.close(lock)
            raise
        log.info("cgroup %s (%s), limits: %s", self.cgroup.path, driver.describe(), cgroups.summary(limits))
        proc.place_children([str(p) for p in driver.procs_files(self.cgroup.rel)])
        return lock

    async def _unlock_when_joined(self, lock: _Lock) -> None:
        """Release the parent lock as soon as a child (virtiofsd or QEMU) is in the machine's cgroup: from
        then on a cleaner sees it in use, and other supervisors need not wait for this start to end."""
        while lock.fd is not None and self.cgroup is not None:
            if self.cgroup.pids():
                lock.close()
                return
            await asyncio.sleep(0.02)

    def _remove_cgroup(self) -> None:
        group, self.cgroup = self.cgroup, None
        proc.place_children(())
        if group is not None:
            try:
                group.remove()
                log.info("removed the cgroup %s", group.rel)
            except HostError as exc:
                log.error("%s", exc.message)

    async def _pin(self, limits: Limits) -> list[int]:
        """Pin each vCPU thread to one CPU of ``limits.cpu_pin`` (round robin), or let them run on every
        CPU of the cgroup again. Returns the CPU of each vCPU (empty: not pinned)."""
        if self.vm.qmp is None:
            return []
        threads = await vcputhreads.vcpu_threads(self.vm)
        if not limits.cpus:
            if self.cgroup is not None:
                vcputhreads.unpin(threads, self.cgroup.driver.host_cpus())
            return []
        placed = vcputhreads.pin(threads, limits.cpus, parked=self.vm.vcpus_parked)
        return [placed[t] for t in threads if t in placed]

    async def _h_limits(self, request: web.Request) -> web.Response:
        body = await body_as(request, models.LimitsRequest)
        self._live("change the limits")
        current = self.config.limits
        merged = {**current.model_dump(mode="json"), **{k: getattr(body, k) for k in body.model_fields_set}}
        new = validate_model(Limits, merged, context="limits")
        problems = new.problems(self.config.total_memory, prefix="")
        if problems:
            raise ConfigError(problems)
        if self.cgroup is None:
            raise HostError(f"{self.config.name} runs without a cgroup (this host offered none when it started)",
                            hint="see `vmkit doctor`")
        with self.ops.shared("change the limits", "changing the limits"):
            written = await asyncio.to_thread(self.cgroup.apply, new)  # may wait for the parent lock
            pinned = await self._pin(new)
        self.config = self.config.model_copy(update={"limits": new})
        self.vm.config = self.config
        self.instance.save_config(self.config)
        result = models.LimitsResult(limits=new, cgroup=self.cgroup.path, cgroup_version=self.cgroup.driver.version,
                                     written=[str(w) for w in written], pinned=pinned)
        self.vm.emit("limits-changed", limits=new.model_dump(mode="json"), cgroup=result.cgroup,
                     written=result.written)
        return web.json_response(result.model_dump(mode="json"))

    async def _install_binfmt(self, emit: Callable[[dict[str, Any]], None]) -> None:
        """``binfmt:``: the guest runs other architectures' programs (:mod:`vmkit.runtime.guest.binfmt`)."""
        agent = self._agent("install binfmt handlers")
        names = await binfmt.install(agent, list(self.config.binfmt))
        emit({"note": f"binfmt: the guest runs {', '.join(self.config.binfmt)} programs ({', '.join(names)})"})
        self.vm.emit("binfmt-installed", arches=list(self.config.binfmt), entries=names)

    def _keep_clock(self) -> None:
        """The periodic clock fix-up (``clock_sync`` in vm.yaml; needs the guest agent)."""
        sync = self.config.clock_sync
        if self.vm.agent is None or not sync.enabled:
            return

        def fixed(reading: ClockReading) -> None:
            self.vm.emit("clock-fixed", offset_seconds=round(reading.offset, 3), periodic=True)

        keeper = ClockKeeper(self.vm.agent, interval=sync.interval, threshold=sync.threshold, on_fix=fixed,
                             running=lambda: self.vm.state == VmState.RUNNING and self.ops.busy is None)
        self._clock_task = asyncio.create_task(keeper.run(), name="vmkit-clock")

    async def _attach_networks(self, emit: Callable[[dict[str, Any]], None]) -> None:
        """Bring the machine's networks up and open its NICs' host ends (taps), after removing what an
        earlier crash may have left on the host (and saying what)."""
        if not self.config.networks:
            return
        store = NetworkStore(self.instance.root.parent / "networks")
        cleaned = await asyncio.to_thread(store.sweep)
        for item in cleaned:
            log.warning("removed a leftover: %s", item)
            emit({"note": f"removed a leftover: {item}"})
        self.vm.nics = await asyncio.to_thread(store.attach, self.instance.dir, self.config.name,
                                               self.config.networks)

    async def _start_forwards(self) -> None:
        net = self.config.network
        if net is None or net.mode != "none" or not self.config.networks:
            return
        address = self.config.networks[0].address
        if address is None:
            return
        self.forwarder = Forwarder(address)
        for fwd in net.forwards:
            await self.forwarder.add(fwd)

    async def _graceful_exit(self) -> None:
        if self._start is None and self._start_outcome is not None and not self._start_outcome.done():
            self._start_outcome.set_result(int(ExitCode.INTERRUPTED))  # asked to go before any start
            self._start_asked.set()
        if self.vm.state in LIVE_STATES:
            await self.vm.shutdown(timeout=10)

    async def _h_start(self, request: web.Request) -> web.StreamResponse:
        plan = await body_as(request, models.StartRequest)
        if self._start is not None or self._start_outcome is None or self._start_outcome.done():
            raise StateError("start the machine", self.vm.state.value, ["a supervisor that has not started it yet"])
        lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._start = asyncio.create_task(self._start_machine(plan, lines.put_nowait), name="vmkit-start")
        self._start_asked.set()
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        shown = ""
        while True:
            try:
                line = await asyncio.wait_for(lines.get(), CONSOLE_TICK)
            except TimeoutError:  # while the guest boots: its last console line, for spinners
                last = self.vm.serial.tail_text(lines=1).strip()[:120]
                if last == shown:
                    continue
                shown = last
                line = {"console": last}
            with contextlib.suppress(ConnectionError):  # the client left: the start goes on
                await resp.write((json.dumps(line) + "\n").encode())
            if "result" in line or "error" in line:
                break
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    # -- HTTP API -------------------------------------------------------------------------------------
    async def _serve_api(self, listen_fd: int | None = None) -> None:
        """Serve the API on ``listen_fd`` (the listening ``api.sock`` that ``vmkit start`` made and
        passed on, so a client can connect before this process is even up), else on a new socket."""
        app = web.Application(middlewares=[_errors_middleware], client_max_size=MAX_BODY)
        app.add_routes([
            web.post("/v1/start", self._h_start),
            web.get("/v1/state", self._h_state),
            web.get("/v1/info", self._h_info),
            web.post("/v1/pause", self._h_pause),
            web.post("/v1/resume", self._h_resume),
            web.post("/v1/request-stop", self._h_request_stop),
            web.post("/v1/stop", self._h_stop),
            web.get("/v1/events", self._h_events),
            web.get("/v1/console", self._h_console),
            web.get("/v1/openapi.json", self._h_openapi),
            web.post("/v1/exec", self._h_exec),
            web.get("/v1/files", self._h_read_file),
            web.put("/v1/files", self._h_write_file),
            web.post("/v1/ports", self._h_port_add),
            web.get("/v1/disks", self._h_disks),
            web.post("/v1/disks", self._h_disk_attach),
            web.delete("/v1/disks/{id}", self._h_disk_detach),
            web.post("/v1/balloon", self._h_balloon),
            web.post("/v1/cpus", self._h_cpus),
            web.post("/v1/memory", self._h_memory),
            web.get("/v1/stats", self._h_stats),
            web.put("/v1/limits", self._h_limits),
            web.get("/v1/screenshot", self._h_screenshot),
            web.post("/v1/keys", self._h_keys),
            web.post("/v1/type", self._h_type),
            web.get("/v1/display", self._h_display),
            web.post("/v1/display", self._h_resize_display),
            web.post("/v1/web-console", self._h_web_console),
            *StateRoutes(self).routes(),
            *self.migration.routes(),
        ])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        if listen_fd is not None:
            await web.SockSite(self._runner, socket.socket(fileno=listen_fd)).start()
        else:
            sock = self.instance.api_socket
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            await web.UnixSite(self._runner, str(sock)).start()
            sock.chmod(0o600)
        console = self.instance.console_socket
        with contextlib.suppress(FileNotFoundError):
            console.unlink()
        self._console_server = await asyncio.start_unix_server(self._raw_console, path=str(console))
        console.chmod(0o600)

    async def _raw_console(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """``console.sock``: the serial console as a plain byte stream, both ways."""
        backlog = Backlog("a console.sock client", CONSOLE_BACKLOG)
        remove = self.vm.serial.add_listener(backlog.put)

        async def pump() -> None:
            while (data := await backlog.get()) is not None:
                writer.write(data)
                await writer.drain()

        task = asyncio.create_task(pump())
        try:
            while data := await reader.read(4096):
                await self.vm.serial.write(data)
        except (EOFError, ConnectionError):
            pass
        finally:
            remove()
            backlog.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
            writer.close()

    async def _stop_api(self) -> None:
        await self.web.close()
        if self._console_server is not None:
            self._console_server.close()
            self._console_server = None
        with contextlib.suppress(FileNotFoundError):
            self.instance.console_socket.unlink()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            self.instance.api_socket.unlink()

    async def _h_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.status.to_dict())

    async def _h_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.info())

    async def _h_pause(self, request: web.Request) -> web.Response:
        await body_as(request, models.Empty)
        with self.ops.shared("pause", "pausing"):
            await self.vm.pause()
        return web.json_response(self.status.to_dict())

    async def _h_resume(self, request: web.Request) -> web.Response:
        await body_as(request, models.Empty)
        self.migration.refuse_handed_over("resume the machine")
        with self.ops.shared("resume", "resuming"):
            clock = await savestate.resume_and_fix_clock(self.vm)  # it stood still while paused
            if self.vm.sshfs.shares and not self.vm.sshfs.links:  # started or restored paused: mount them now
                await self.vm.mount_sshfs()
        return web.json_response({**self.status.to_dict(), "clock": clock.to_dict()})

    async def _h_request_stop(self, request: web.Request) -> web.Response:
        body = await body_as(request, models.RequestStop)
        with self.ops.shared("request a stop", "stopping"):
            await self.vm.request_stop(timeout=body.timeout)
        return web.json_response(self.status.to_dict())

    async def _h_stop(self, request: web.Request) -> web.Response:
        await body_as(request, models.Empty)
        with self.ops.shared("stop", "stopping"):
            info = await self.vm.stop()
        return web.json_response({**self.status.to_dict(), "exit": info.reason})

    async def _h_events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        async with self.vm.subscribe(limit=EVENTS_BACKLOG) as q:
            await resp.write((json.dumps({"kind": "hello", "state": self.vm.state.value}) + "\n").encode())
            while True:
                ev = await q.get()
                await resp.write((json.dumps(ev.to_dict()) + "\n").encode())
                if ev.kind == "events-dropped":
                    break
                if ev.state in (VmState.STOPPED, VmState.ERROR) and ev.kind != "state-changed":
                    break
        return resp

    async def _h_port_add(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        fwd = validate_model(PortForward, body, context="port forward")
        if self.config.network is None:
            raise ConfigError.single("network", "this machine has no network: port forwards need one")
        if not port_is_free(fwd.host_addr, fwd.host_port, fwd.protocol):
            raise ConfigError.single("host_port", f"host port {fwd.host_addr}:{fwd.host_port}/{fwd.protocol} "
                                     "is already taken on this host: pick a free port")
        if self.config.user_nic is None:  # on a vmkit network: forwarded here, to the guest's address
            if self.forwarder is None:
                address = self.config.networks[0].address if self.config.networks else None
                if address is None:
                    raise ConfigError.single("network", "this machine has no address to forward to: "
                                             "join a vmkit network (--network NAME)")
                self.forwarder = Forwarder(address)
            with self.ops.shared("add a port forward", "adding a port forward"):
                await self.forwarder.add(fwd)
            return web.json_response({"forward": str(fwd)})
        rule = f"{fwd.protocol}:{fwd.host_addr}:{fwd.host_port}-:{fwd.guest_port}"
        with self.ops.shared("add a port forward", "adding a port forward"):
            reply = await self.vm.execute("human-monitor-command", {"command-line": f"hostfwd_add net0 {rule}"})
        if reply:  # HMP answers with text only when it fails
            raise QemuError(f"QEMU refused the port forward {fwd}: {str(reply).strip()}")
        return web.json_response({"forward": str(fwd)})

    async def _h_openapi(self, request: web.Request) -> web.Response:
        return web.Response(text=spec.openapi_json(), content_type="application/json")

    def _agent(self, operation: str) -> AgentChannel:
        """The shared agent channel of the running guest, or a clear error."""
        if self.vm.agent is None:
            raise ConfigError.single("agent", f"{self.config.name} has no guest agent channel: use `vmkit shell`, "
                                     "or create it from a cloud image")
        if self.vm.state != VmState.RUNNING:
            raise StateError(operation, self.vm.state.value, [VmState.RUNNING.value])
        return self.vm.agent

    async def _h_exec(self, request: web.Request) -> web.Response:
        req = await body_as(request, models.ExecRequest)
        agent = self._agent("run a command in the guest")
        res = await guest_exec(agent, req.argv, timeout=req.timeout, stdin=req.stdin)
        return web.json_response(models.ExecResult.of(res.exit_code, res.stdout, res.stderr, res.signal)
                                 .model_dump(mode="json"))

    @staticmethod
    def _guest_path(request: web.Request) -> str:
        path = request.query.get("path")
        if not path:
            raise ConfigError.single("path", "give the guest file's absolute path (?path=/...)")
        check_remote(path)
        return path

    async def _h_read_file(self, request: web.Request) -> web.StreamResponse:
        path = self._guest_path(request)
        pieces = read_guest_file(self._agent("read a file in the guest"), path)
        try:
            try:
                first = await anext(pieces, b"")  # opens the file: a failure is still an error response
            except GuestAgentError as exc:
                raise _guest_file_error(exc, path) from None
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await resp.prepare(request)
            if first:
                await resp.write(first)
            async for piece in pieces:  # a failure from here on ends the stream early: the client sees it
                await resp.write(piece)
            await resp.write_eof()
            return resp
        finally:
            await pieces.aclose()  # closes the guest file also when the client went away

    async def _h_write_file(self, request: web.Request) -> web.Response:
        path = self._guest_path(request)
        agent = self._agent("write a file in the guest")

        async def body() -> AsyncIterator[bytes]:
            while chunk := await request.content.read(FILE_CHUNK):
                yield chunk

        try:
            written = await write_guest_file(agent, path, body())
        except GuestAgentError as exc:
            raise _guest_file_error(exc, path) from None
        return web.json_response(models.FileWritten(path=path, bytes=written).model_dump(mode="json"))

    async def _h_disks(self, request: web.Request) -> web.Response:
        return web.json_response(disk_table(self.vm))

    async def _h_disk_attach(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        dev = validate_model(StorageDevice, body, context="disk")
        with self.ops.shared("attach a disk", "attaching a disk"):
            disk = await hotplug.attach_disk(self.vm, dev)
        return web.json_response({"id": disk.id, "port": disk.port})

    async def _h_disk_detach(self, request: web.Request) -> web.Response:
        body = await body_as(request, models.DetachDisk)
        disk_id = request.match_info["id"]
        with self.ops.shared("detach a disk", f"detaching disk {disk_id}"):
            await hotplug.detach_disk(self.vm, disk_id, timeout=body.timeout)
        return web.json_response({"id": disk_id, "detached": True})

    def _live(self, operation: str) -> int:
        """QEMU's pid, if the machine is running or paused (else a StateError)."""
        pid = self.vm.pid
        if self.vm.state not in (VmState.RUNNING, VmState.PAUSED) or pid is None:
            raise StateError(operation, self.vm.state.value, [VmState.RUNNING.value, VmState.PAUSED.value])
        return pid

    async def _h_balloon(self, request: web.Request) -> web.Response:
        body = await body_as(request, models.BalloonRequest)
        target = balloon.check_target(self.config, body.target)
        if self.vm.cow_memory_file is not None and target < self.config.memory:
            refused = StateError("inflate the memory balloon", "running on its warm template's memory "
                                 "(copy-on-write)", ["saved and resumed, or booted (its RAM is its own then)"])
            refused.hint = (f"`vmkit save {self.config.name} && vmkit start {self.config.name}`; QEMU 7.2 gives "
                            "ballooned pages back by punching holes in the RAM's file, here the template's, which "
                            "every clone of it reads")
            raise refused
        self._live("set the memory balloon")
        with self.ops.shared("set the memory balloon", "moving the memory balloon"):
            actual = await balloon.set_target(self.vm, target, memory=self.config.memory, timeout=body.timeout)
        result = models.BalloonResult(target_bytes=target, actual_bytes=actual,
                                      reached=abs(actual - target) < balloon.CLOSE_ENOUGH)
        return web.json_response(result.model_dump(mode="json"))

    # -- vCPUs and memory, live (see vmkit.runtime.vcpus and vmkit.runtime.hotmem) ------------------------
    def _persist(self, **changes: Any) -> None:
        """Apply ``changes`` to the running machine's configuration and to vm.yaml (what the next boot and a
        restore start from). vm.yaml is read again first: only these fields change in it."""
        self.config = self.config.model_copy(update=changes)
        self.vm.config = self.config
        try:
            on_disk = self.instance.load_config()
        except ConfigError as exc:  # edited into something invalid meanwhile: keep the running machine's
            log.warning("vm.yaml cannot be read (%s): writing the running machine's configuration", exc)
            on_disk = self.config
        updated = validate_model(type(on_disk), {**on_disk.to_dict(), **self.config.model_dump(
            mode="json", include=set(changes))}, context="vm.yaml")
        self.instance.save_config(updated)

    async def _sync_cpus(self) -> int:
        """vm.yaml's ``cpus`` made what QEMU has (after a change, or a release that came late)."""
        count = await vcpus.online(self.vm)
        if count != self.config.cpus:
            self._persist(cpus=count)
        return count

    def _cpu_released(self, ev: VmEvent) -> None:
        """A vCPU the guest released after ``set_cpus`` stopped waiting: vm.yaml follows."""
        if (ev.kind == "qmp" and ev.detail.get("event") == "DEVICE_DELETED" and not self._resizing.locked()
                and self.vm.state in (VmState.RUNNING, VmState.PAUSED)):
            task = asyncio.ensure_future(self._sync_cpus())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _h_cpus(self, request: web.Request) -> web.Response:
        body = await body_as(request, models.CpusRequest)
        vcpus.check_cpus(self.config, body.cpus)
        self._live("change the vCPUs")
        before = self.config.cpus
        change: vcpus.CpuChange | None = None
        parked = len(self.vm.vcpus_parked)
        with self.ops.shared("change the vCPUs", "changing the vCPUs"):
            async with self._resizing:
                try:
                    change = await vcpus.set_cpus(self.vm, body.cpus, timeout=body.timeout)
                finally:
                    with contextlib.suppress(VmkitError):
                        now = await self._sync_cpus()
                        if self.config.limits.cpus:  # vCPUs added, or back online: placed as the rest
                            await self._pin(self.config.limits)
                        if now != before:
                            method = change.method if change else (  # partly done, then failed
                                ("guest-offline" if len(self.vm.vcpus_parked) > parked else "unplug") if now < before
                                else "guest-online" if len(self.vm.vcpus_parked) < parked else "hotplug")
                            self.vm.emit("cpus-changed", cpus=now, vcpus_online=now, previous=before,
                                         method=method, note=vcpus.METHODS[method],
                                         offlined=sorted(self.vm.vcpus_parked))
        assert change is not None
        result = models.CpusResult(cpus=body.cpus, vcpus_online=change.online, max_cpus=change.ceiling,
                                   added=list(change.added), removed=list(change.removed),
                                   offlined=list(change.offlined), onlined=list(change.onlined),
                                   method=cast(models.CpuMethod, change.method), note=vcpus.METHODS[change.method])
        return web.json_response(result.model_dump(mode="json"))

    async def _h_memory(self, request: web.Request) -> web.Response:
        body = await body_as(request, models.MemoryRequest)
        requested = hotmem.check_memory(self.config, body.memory)
        self._live("change the memory")
        with self.ops.shared("change the memory", "changing the memory"):
            async with self._resizing:
                now = await hotmem.set_plugged(self.vm, requested, timeout=body.timeout)
                self._persist(plugged_memory=requested)
        assert self.config.max_memory is not None
        self.vm.emit("memory-changed", memory_bytes=body.memory, plugged_bytes=now.plugged)
        result = models.MemoryResult(memory_bytes=body.memory, plugged_bytes=now.plugged,
                                     boot_memory_bytes=self.config.memory, max_memory_bytes=self.config.max_memory,
                                     reached=now.plugged == requested)
        return web.json_response(result.model_dump(mode="json"))

    async def _h_stats(self, request: web.Request) -> web.Response:
        pid = self._live("read the machine's statistics")
        size: int | None = None
        guest = balloon.GuestMemory(None, None)
        if self.config.balloon:
            size = await balloon.actual(self.vm, self.config.memory)
            guest = await balloon.guest_memory(self.vm)
        threads = await vcputhreads.vcpu_threads(self.vm)
        running = [t for i, t in enumerate(threads) if i not in self.vm.vcpus_parked]  # parked ones are halted
        cpu, steal = await asyncio.gather(self._cpu.percent(pid), self._steal.percent(pid, running))
        group = self.cgroup
        plugged = (await hotmem.plugged(self.vm)).plugged if self.config.max_memory is not None else None
        stats = models.MachineStats(
            balloon_bytes=size, memory_bytes=self.config.memory, guest_mem_total_bytes=guest.total,
            guest_mem_available_bytes=guest.available, host_rss_bytes=balloon.rss_bytes(pid),
            ksm_shared_bytes=ksm.shared_bytes(), ksm_merged_bytes=balloon.ksm_merged_bytes(pid),
            vcpus=self.config.cpus, vcpus_online=await vcpus.online(self.vm), vcpus_offlined=len(self.vm.vcpus_parked),
            max_cpus=self.config.cpu_ceiling, memory_plugged_bytes=plugged, max_memory_bytes=self.config.max_memory,
            cpu_percent=cpu, steal_percent=steal, limits=self.config.limits,
            cgroup=group.path if group else None, cgroup_version=group.driver.version if group else None,
            cgroup_files=cgroups.kernel_values(group.driver, group.rel) if group else {})
        return web.json_response(stats.model_dump(mode="json"))

    # -- screen and keyboard ----------------------------------------------------------------------
    def _display(self, operation: str, *allowed: VmState) -> tuple[Display, Path]:
        """The display's configuration and VNC socket, if the machine has one and is in ``allowed``."""
        if self.config.display is None:
            raise ConfigError.single("display", f"{self.config.name} has no display: add one with `vmkit create "
                                     "--display` (or display: in vm.yaml) and start the machine again")
        allowed = allowed or (VmState.RUNNING, VmState.PAUSED)
        if self.vm.state not in allowed:
            raise StateError(operation, self.vm.state.value, [s.value for s in allowed])
        return self.config.display, self.instance.dir / display.VNC_SOCKET_NAME

    async def _screenshot(self) -> bytes:
        self._display("take a screenshot")
        return await display.screenshot(self.vm, self.instance.dir)

    async def _send_keys(self, req: models.KeysRequest) -> models.KeysSent:
        self._display("press keys", VmState.RUNNING)
        presses = [display.parse_combo(k, field=f"keys[{i}]") for i, k in enumerate(req.keys)]
        return models.KeysSent(presses=await display.send_presses(self.vm, presses, req.hold_ms))

    async def _type_text(self, req: models.TypeRequest) -> models.KeysSent:
        self._display("type text", VmState.RUNNING)
        presses = display.text_keys(req.text)
        return models.KeysSent(presses=await display.send_presses(self.vm, presses, req.hold_ms))

    async def _h_screenshot(self, request: web.Request) -> web.Response:
        return web.Response(body=await self._screenshot(), content_type="image/png")

    async def _h_keys(self, request: web.Request) -> web.Response:
        sent = await self._send_keys(await body_as(request, models.KeysRequest))
        return web.json_response(sent.model_dump(mode="json"))

    async def _h_type(self, request: web.Request) -> web.Response:
        sent = await self._type_text(await body_as(request, models.TypeRequest))
        return web.json_response(sent.model_dump(mode="json"))

    async def _h_display(self, request: web.Request) -> web.Response:
        conf, sock = self._display("read the display's size")
        width, height = await display.desktop_size(sock)
        info = models.DisplayInfo(type=conf.type, width=width, height=height, boot_width=conf.width,
                                  boot_height=conf.height)
        return web.json_response(info.model_dump(mode="json"))

    async def _h_resize_display(self, request: web.Request) -> web.Response:
        body = await body_as(request, models.DisplayResize)
        _, sock = self._display("resize the display", VmState.RUNNING)
        width, height = await display.set_desktop_size(sock, body.width, body.height, timeout=body.timeout)
        result = models.DisplayResized(width=width, height=height, requested_width=body.width,
                                       requested_height=body.height,
                                       reached=(width, height) == (body.width, body.height))
        return web.json_response(result.model_dump(mode="json"))

    async def _h_web_console(self, request: web.Request) -> web.Response:
        body = await body_as(request, models.WebConsoleRequest)
        self._display("open the web console")
        return web.json_response((await self.web.url(body.port)).model_dump(mode="json"))

    async def _h_console(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_BODY)
        backlog = Backlog("a /v1/console client", CONSOLE_BACKLOG)
        remove = self.vm.serial.add_listener(backlog.put)  # before the handshake: nothing is missed
        try:
            await ws.prepare(request)
        except BaseException:
            remove()
            raise

        async def pump() -> None:
            while (data := await backlog.get()) is not None:
                await ws.send_bytes(data)

        task = asyncio.create_task(pump())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    await self.vm.serial.write(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await self.vm.serial.write(msg.data.encode())
        except EOFError:
            pass
        finally:
            remove()
            backlog.close()
            task.cancel()
        return ws


class _Lock:
    """A lock's descriptor that can be closed more than once."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def _guest_file_error(exc: GuestAgentError, path: str) -> VmkitError:
    if exc.error_class is not None and "No such file" in exc.message:  # the agent's strerror
        return NotFoundError("guest file", path)
    return exc


_HTTP_STATUS = {2: 400, 3: 404, 4: 409, 8: 504, 9: 409}


@web.middleware
async def _errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure as the one JSON error object: vmkit's errors, aiohttp's HTTP errors (unknown
    path or method, body too large, bad websocket handshake) and anything unexpected."""
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except VmkitError as exc:
        return web.json_response(error_body(exc), status=_HTTP_STATUS.get(int(exc.exit_code), 500))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(error_body(_http_error(request, exc)), status=exc.status)
    except (ConnectionError, asyncio.CancelledError):
        raise  # the client went away
    except Exception as exc:
        return web.json_response(error_body(unexpected_error(exc)), status=500)


def _http_error(request: web.Request, exc: web.HTTPException) -> VmkitError:
    where = f"{request.method} {request.path}"
    if exc.status == 404:
        return NotFoundError("API path", request.path, hint="see the routes in `vmkit.daemon.supervisor`")
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return ConfigError.single("<method>", f"{where} is not allowed: use {allowed or 'another method'}")
    if exc.status == 413:
        return ConfigError.single("<body>", f"the request body is too large: at most {MAX_BODY} bytes")
    if exc.status < 500:
        return ConfigError.single("<request>", f"{where}: {exc.reason}: {exc.text or ''}".rstrip(": "))
    err = VmkitError(f"{where} failed: {exc.reason}")
    err.exit_code = ExitCode.ERROR
    return err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmkit-supervisor")
    parser.add_argument("instance_dir", type=Path)
    parser.add_argument("--lock-fd", type=int, default=None,
                        help="the instance lock, already taken by the caller (else this process takes it)")
    parser.add_argument("--listen-fd", type=int, default=None,
                        help="the listening api.sock made by the caller (else this process makes it)")
    args = parser.parse_args(argv)
    os.umask(0o077)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    inst_dir: Path = args.instance_dir.resolve()
    os.chdir(inst_dir)  # nothing may resolve against wherever `vmkit` was run
    instance = Instance(inst_dir.name, inst_dir.parent)
    lock_fd = args.lock_fd if args.lock_fd is not None else instance.open_lock()
    if args.lock_fd is None and not take_exclusive(lock_fd):
        os.close(lock_fd)
        log.error("%s already has a supervisor", instance.name)
        return int(ExitCode.WRONG_STATE)
    try:
        return asyncio.run(Supervisor(instance).run(args.listen_fd))
    except VmkitError as exc:
        log.error("%s", exc)
        return int(exc.exit_code)
    finally:
        os.close(lock_fd)  # releases the lock: the instance is no longer supervised


if __name__ == "__main__":
    sys.exit(main())
