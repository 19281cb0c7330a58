"""The supervisor's part of save/restore and snapshots: its API routes and restored starts.

Routes (added to the supervisor's API; errors as everywhere else)::

    POST   /v1/save                  {"path": ABSOLUTE, "keep_running": bool, "force": bool} (all optional)
                                     newline-delimited JSON: {"progress": {"done", "total"}} lines,
                                     then {"result": {...}} or {"error": {...}}. Pauses a running
                                     machine, saves, then resumes it (keep_running) or stops it.
                                     The target is checked first (savestate.check_save_target:
                                     never a disk, an instance's file or a non-regular file; an
                                     existing non-state file only with "force").
    GET    /v1/snapshots             [SnapshotInfo...]
    POST   /v1/snapshots             {"tag": TAG} -> SnapshotInfo
    POST   /v1/snapshots/TAG/revert  -> {"tag", "state", "clock"}
    DELETE /v1/snapshots/TAG

Saves and snapshot operations are exclusive (:class:`OperationGate`): while one runs, every other
operation that changes the machine (pause, resume, stop, port forwards, disks, another save or
snapshot) is refused with a :class:`~vmkit.errors.StateError` (HTTP 409) naming what is in
progress, and a save or snapshot is refused while one of those runs.

A supervisor can also *start* a machine from saved state instead of booting it: the start request
(``POST /v1/start``, :class:`vmkit.api.models.StartRequest`) names a state file (``restore``, with
``force`` and ``consume``) or a ``snapshot``, and ``paused``. :func:`start_from_plan` then emits
``{"progress": {"done", "total"}}`` lines while the state loads, and one ``{"started": {...}}``
line saying what was restored and what happened to the guest clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiohttp import web
from pydantic import BaseModel

from vmkit.api import models
from vmkit.config import validate_model
from vmkit.errors import ConfigError, StateError, VmkitError, error_fields
from vmkit.host.instance import Instance, Status
from vmkit.net.store import NetworkStore
from vmkit.runtime.machine import VirtualMachine
from vmkit.runtime.states import VmState
from vmkit.state import savestate, template


class HandOver(Protocol):
    def refuse_handed_over(self, operation: str) -> None:
        """Refuse ``operation`` while a completed outgoing migration waits for the target to take over."""


class Supervisor(Protocol):
    """What these routes need of the supervisor (:class:`vmkit.daemon.supervisor.Supervisor`)."""

    vm: VirtualMachine
    instance: Instance
    status: Status
    ops: OperationGate
    exit_reason: str | None
    start_began: float

    @property
    def migration(self) -> HandOver: ...

log = logging.getLogger("vmkit.daemon.supervisor")

_PROGRESS_INTERVAL = 0.2


StartPlan = models.StartRequest
"""How a supervisor brings its machine up when it should not simply boot it."""


def _throttled(emit: Callable[[int, int | None], None]) -> Callable[[int, int | None], None]:
    last = [0.0]

    def report(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] >= _PROGRESS_INTERVAL or (total is not None and done >= total):
            last[0] = now
            emit(done, total)

    return report


async def start_from_plan(sup: Supervisor, plan: StartPlan, emit: Callable[[dict[str, Any]], None]) -> None:
    """Bring the machine up from a state file or a snapshot (instead of booting it)."""
    vm = sup.vm
    started: dict[str, Any] = {}
    progress = _throttled(lambda d, t: emit({"progress": {"done": d, "total": t}}))
    if plan.restore is not None:
        if not plan.restore.startswith("/") or "\0" in plan.restore:
            raise ConfigError.single("restore", "give the state file's absolute path")
        result = await savestate.restore_state(vm, Path(plan.restore), progress, force=plan.force)
        started["restored"] = result.to_dict()
        sup.status.reason = f"restored from {plan.restore}"
    elif plan.template is not None:
        await _start_from_template(sup, plan.template, emit)
        return
    elif plan.snapshot is not None:
        await vm.start(paused=True)
        try:
            await savestate.revert_snapshot(vm, plan.snapshot, resume=False)
        except BaseException:
            await vm.shutdown(timeout=2)
            raise
        started["snapshot"] = plan.snapshot
        sup.status.reason = f"started from snapshot {plan.snapshot}"
    if not plan.paused:  # the guest's clock stood still since the save or snapshot: put it right
        started["clock"] = (await savestate.resume_and_fix_clock(vm)).to_dict()
    if plan.consume and plan.restore is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(plan.restore)  # the machine has moved on: this state must not be resumed twice
    emit({"started": started})


async def _start_from_template(sup: Supervisor, path: str, emit: Callable[[dict[str, Any]], None]) -> None:
    """Clone the running machine from a warm template (checked by the caller), then make it its own."""
    if not path.startswith("/") or "\0" in path:
        raise ConfigError.single("template", "give the warm template's absolute path")
    vm = sup.vm
    phases = template.Phases(sup.start_began)
    phases.mark("cgroup and networks")
    tpl = template.load(Path(path))
    await template.restore(vm, tpl, phases)
    restored = phases.since_start()
    sup.status.reason = f"cloned from the warm template {tpl.directory.name}"
    await vm.resume()
    phases.mark("resumed")

    grown = await template.grow_root_disk(vm, tpl) if tpl.manifest.has_disk else None
    own = await template.personalize(vm, sup.instance.dir, template_mac=tpl.manifest.mac,  # fails: QEMU is ended
                                     nic=_clone_nic(sup), root_grown_to=grown)
    if own.clock_set:  # by the identity script, in the same program as the RNG's reseed
        clock = savestate.ClockResult(True, vm.clock_behind_seconds, "guest clock set to the host's time by the "
                                      "identity script")
    else:
        clock = await savestate.fix_guest_clock(vm)
    phases.mark("identity script and clock")
    log.info("%s: warm start phases: %s; the identity script's steps in the guest: %s", vm.config.name,
             phases.render(), ", ".join(f"{k} {v:.3f} s" for k, v in own.steps.items()))
    emit({"started": {"template": {"path": path, "restore_seconds": round(restored, 3),
                                   "personalize_seconds": round(own.seconds, 3),
                                   "phases": phases.as_dict(), "parallel": phases.parallel,
                                   "identity_steps": own.steps,
                                   "process_started": template.process_started(),
                                   "began_at": round(time.time() - (time.monotonic() - sup.start_began), 3)},
                      "clock": clock.to_dict()}})


def _clone_nic(sup: Supervisor) -> template.CloneNic | None:
    """The clone's NIC on its vmkit network, when it runs the template's NIC there (:func:`template.moves_nic`)."""
    config = sup.vm.config
    if not template.moves_nic(config):
        return None
    store = NetworkStore(sup.instance.root.parent / "networks")
    iface = config.networks[0]
    net = store.get(iface.network)
    return template.CloneNic(address=iface.address if net.bridged else None, resolv_conf=store.resolv_conf(config))


class OperationGate:
    """Which operations on the machine may run together: any number of *shared* ones (pause,
    resume, stop, disks, ports: the machine's state machine orders those), or one *exclusive*
    one (a save or snapshot operation) and nothing else. What cannot run now is refused at
    once, with a :class:`StateError` naming what is in progress."""

    def __init__(self) -> None:
        self._exclusive: str | None = None
        self._shared: Counter[str] = Counter()

    @property
    def busy(self) -> str | None:
        """What is in progress, if anything."""
        return self._exclusive or (", ".join(self._shared) if self._shared else None)

    def _refuse(self, operation: str, doing: str) -> StateError:
        return StateError(operation, f"busy {doing}", ["idle (try again once that has finished)"])

    @contextlib.contextmanager
    def shared(self, operation: str, doing: str) -> Iterator[None]:
        if self._exclusive is not None:
            raise self._refuse(operation, self._exclusive)
        self._shared[doing] += 1
        try:
            yield
        finally:
            self._shared[doing] -= 1
            if self._shared[doing] <= 0:
                del self._shared[doing]

    @contextlib.contextmanager
    def exclusive(self, operation: str, doing: str) -> Iterator[None]:
        busy = self.busy
        if busy is not None:
            raise self._refuse(operation, busy)
        self._exclusive = doing
        try:
            yield
        finally:
            self._exclusive = None


_B = TypeVar("_B", bound=BaseModel)


async def body_as(request: web.Request, model: type[_B]) -> _B:
    """The request's JSON body checked against ``model`` (problems name their fields, as for vm.yaml)."""
    return validate_model(model, await json_body(request), context="request")


class StateRoutes:
    """The save and snapshot handlers of one supervisor (exclusive operations, see :class:`OperationGate`)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/save", self.save),
            web.get("/v1/snapshots", self.snapshots),
            web.post("/v1/snapshots", self.snapshot_create),
            web.post("/v1/snapshots/{tag}/revert", self.snapshot_revert),
            web.delete("/v1/snapshots/{tag}", self.snapshot_delete),
        ]

    async def save(self, request: web.Request) -> web.StreamResponse:
        body = await body_as(request, models.SaveRequest)
        if body.path is None:
            path = self.sup.instance.saved_state_path
        elif body.path.startswith("/") and "\0" not in body.path:
            path = Path(body.path)
        else:
            raise ConfigError.single("path", "give the state file's absolute path")
        keep_running = body.keep_running
        vm = self.sup.vm
        if vm.state not in (VmState.RUNNING, VmState.PAUSED):
            raise StateError("save the machine state", vm.state.value, [VmState.RUNNING.value, VmState.PAUSED.value])
        self.sup.migration.refuse_handed_over("save the machine state")
        target_check = functools.partial(savestate.check_save_target, own=self.sup.instance, force=body.force)
        target_check(path)  # before the machine is paused: a refused target leaves it as it was
        with self.sup.ops.exclusive("save the machine state", f"saving its state to {path}"):
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
            progress = _throttled(lambda d, t: lines.put_nowait({"progress": {"done": d, "total": t}}))

            async def pump() -> None:
                while (line := await lines.get()) is not None:
                    await resp.write((json.dumps(line) + "\n").encode())

            writer = asyncio.create_task(pump())
            was_running = vm.state == VmState.RUNNING
            try:
                if was_running:
                    await vm.pause()
                self.sup.status.reason = f"saving state to {path}"
                info = await savestate.save_state(vm, path, progress, target_check=target_check)
            except Exception as raised:  # the answer has begun: every failure goes on its last line
                exc = raised if isinstance(raised, VmkitError) else unexpected_error(raised)
                log.error("save failed: %s", exc)
                if was_running and vm.state == VmState.PAUSED:
                    with contextlib.suppress(VmkitError):
                        await savestate.resume_and_fix_clock(vm)
                self.sup.status.reason = f"save failed: {exc.message.splitlines()[0]}"
                await _finish(writer, lines)
                await _last_line(resp, {"error": error_fields(exc)})
                return resp
            result = {"path": str(info.path), "payload_bytes": info.payload_bytes, "file_bytes": info.file_bytes,
                      "seconds": round(info.seconds, 3), "keep_running": keep_running}
            log.info("state saved to %s (%d bytes, %.2f s)", info.path, info.file_bytes, info.seconds)
            if keep_running:
                self.sup.status.reason = f"state saved to {path}"
                if was_running:  # the guest's clock stood still while the state was saved
                    result["clock"] = (await savestate.resume_and_fix_clock(vm)).to_dict()
            else:
                self.sup.exit_reason = f"state saved to {path}"
            await _finish(writer, lines)
            await _last_line(resp, {"result": result})
            if not keep_running:
                await vm.stop()
            return resp

    async def snapshots(self, request: web.Request) -> web.Response:
        return web.json_response([s.to_dict() for s in await savestate.list_snapshots(self.sup.vm)])

    async def snapshot_create(self, request: web.Request) -> web.Response:
        tag = (await body_as(request, models.SnapshotCreate)).tag
        self.sup.migration.refuse_handed_over("create a snapshot")
        with self.sup.ops.exclusive("create a snapshot", f"creating snapshot {tag!r}"):
            info = await savestate.create_snapshot(self.sup.vm, tag)
        return web.json_response(info.to_dict())

    async def snapshot_revert(self, request: web.Request) -> web.Response:
        await body_as(request, models.Empty)
        tag = request.match_info["tag"]
        self.sup.migration.refuse_handed_over("revert to a snapshot")
        with self.sup.ops.exclusive("revert to a snapshot", f"reverting to snapshot {tag!r}"):
            clock = await savestate.revert_snapshot(self.sup.vm, tag)
        return web.json_response({"tag": tag, "state": self.sup.vm.state.value,
                                  "clock": clock.to_dict() if clock else None})

    async def snapshot_delete(self, request: web.Request) -> web.Response:
        await body_as(request, models.Empty)
        tag = request.match_info["tag"]
        with self.sup.ops.exclusive("delete a snapshot", f"deleting snapshot {tag!r}"):
            await savestate.delete_snapshot(self.sup.vm, tag)
        return web.json_response({"tag": tag, "deleted": True})


async def _finish(writer: asyncio.Task[None], lines: asyncio.Queue[dict[str, Any] | None]) -> None:
    """Let the progress writer flush what is queued, then end it."""
    lines.put_nowait(None)
    with contextlib.suppress(ConnectionError, TimeoutError):
        await asyncio.wait_for(writer, 10)


async def _last_line(resp: web.StreamResponse, payload: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionError):  # the client left: the outcome stands anyway
        await resp.write((json.dumps(payload) + "\n").encode())
        await resp.write_eof()


async def json_body(request: web.Request) -> dict[str, Any]:
    """A request's JSON object body ({} when empty); bad input is a ConfigError.

    A body over the application's ``client_max_size`` raises aiohttp's 413 error (the
    supervisor's error middleware answers it as a ConfigError too).
    """
    if not request.can_read_body:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise ConfigError.single("<body>", "the request body is not JSON: send a JSON object") from None
    if not isinstance(body, dict):
        raise ConfigError.single("<body>", "the request body must be a JSON object")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity by default


def unexpected_error(exc: BaseException) -> VmkitError:
    """An exception vmkit did not expect, as the one error shape of the API (the details go to the log)."""
    log.error("unexpected error", exc_info=exc)
    return VmkitError(f"the supervisor failed unexpectedly: {type(exc).__name__}: {exc}",
                      hint="the machine keeps running; see supervisor.log in the instance directory")
