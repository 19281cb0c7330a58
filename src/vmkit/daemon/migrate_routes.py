"""The supervisor's part of live migration: its API routes (the source side) and the incoming start
(the target side, :func:`start_incoming`).

Routes (errors as everywhere else)::

    POST /v1/migrate          MigrateRequest -> NDJSON: progress and note lines, then one result or error.
                              Sends the machine to the QEMU waiting at ``uri``. On success the guest
                              stays paused here (QEMU's ``postmigrate``) until one of:
    POST /v1/migrate/finish   the target runs it: QEMU here ends ("migrated to ...").
    POST /v1/migrate/cancel   cancel a migration in flight, or take back a completed one that the target
                              did not take over: the guest runs on here, as before.
    GET  /v1/migration        QEMU's query-migrate (the target polls it to see its migration complete)
    POST /v1/memory-digest    a hash of every page of the paused guest's RAM (the migration check)

A migration is an exclusive operation (:class:`~vmkit.daemon.state_routes.OperationGate`). Every
failure on the way (the target refuses or dies, the client goes away, a cancel) ends with the guest
running here as it was (paused if it was paused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import web

from vmkit.api import models
from vmkit.daemon.state_routes import Supervisor, body_as, unexpected_error
from vmkit.errors import QemuError, StateError, VmkitError, error_fields
from vmkit.runtime import migration
from vmkit.runtime.states import VmState
from vmkit.state import savestate

log = logging.getLogger("vmkit.daemon.supervisor")

POLL = 0.25
"""How often query-migrate is asked while a migration runs (seconds)."""


async def start_incoming(sup: Supervisor, plan: models.IncomingRequest) -> dict[str, Any]:
    """Start QEMU waiting for a migration at ``plan.uri`` (the target side). The guest stays paused:
    once the migration has completed, ``POST /v1/resume`` runs it."""
    vm = sup.vm
    await vm.start(incoming=True)
    try:
        await migration.set_capabilities(vm, events=True, postcopy_ram=plan.postcopy)
        await vm.execute("migrate-incoming", {"uri": plan.uri})
    except BaseException:
        await vm.shutdown(timeout=2)
        raise
    sup.status.reason = f"waiting for a migration at {plan.uri}"
    return {"incoming": plan.uri}


class MigrateRoutes:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self._cancel = asyncio.Event()
        self._running = False
        self.completed_to: str | None = None
        """The target of a completed migration not yet finished or taken back (the guest is paused here)."""
        self._was_running = False
        self._postcopy = False

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/migrate", self.migrate),
            web.post("/v1/migrate/finish", self.finish),
            web.post("/v1/migrate/cancel", self.cancel),
            web.get("/v1/migration", self.info),
            web.post("/v1/memory-digest", self.digest),
        ]

    async def info(self, request: web.Request) -> web.Response:
        vm = self.sup.vm
        q = await migration.query(vm) if vm.qmp is not None and vm.state not in (VmState.STOPPED, VmState.ERROR,
                                                                                   VmState.STARTING) else {}
        return web.json_response(models.MigrationInfo(state=vm.state.value, status=str(q.get("status", "none")),
                                                      query=q).model_dump(mode="json"))

    async def digest(self, request: web.Request) -> web.Response:
        await body_as(request, models.Empty)
        vm = self.sup.vm
        if vm.state != VmState.PAUSED:
            raise StateError("hash the guest's memory", vm.state.value, [VmState.PAUSED.value])
        digest = await migration.memory_digest(vm, self.sup.instance.dir / "memory.scratch")
        return web.json_response(models.MemoryDigest.of(migration.PAGE, digest).model_dump(mode="json"))

    async def migrate(self, request: web.Request) -> web.StreamResponse:
        body = await body_as(request, models.MigrateRequest)
        vm = self.sup.vm
        if vm.state not in (VmState.RUNNING, VmState.PAUSED) or self.completed_to is not None:
            raise StateError("migrate the machine", "migrated, waiting to finish" if self.completed_to else
                             vm.state.value, [VmState.RUNNING.value, VmState.PAUSED.value])
        safety = migration.live_safety(vm.accel.name, vm.config.cpus,
                                       migration.parse_version(vm.qmp.qemu_version if vm.qmp else None))
        if body.method == "live" and not safety.live:
            from vmkit.errors import ConfigError

            raise ConfigError.single("method", f"live pre-copy would corrupt this machine: {safety.reason}; "
                                     "leave the method to vmkit (auto) or ask for paused")
        method: str = "paused" if body.method == "paused" or not safety.live else "live"
        reason = "asked for" if body.method == "paused" else safety.reason
        with self.sup.ops.exclusive("migrate the machine", f"migrating to {body.uri}"):
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            self._cancel = asyncio.Event()
            self._running = True
            self._was_running = vm.state == VmState.RUNNING
            self._postcopy = False
            try:
                report = await self._run(body, method, reason, resp)
            except Exception as raised:  # the answer has begun: every failure goes on its last line
                exc = raised if isinstance(raised, VmkitError) else unexpected_error(raised)
                log.error("migration failed: %s", exc)
                await self._take_back()
                await _line(resp, {"error": error_fields(exc)}, last=True)
                return resp
            except asyncio.CancelledError:  # the client went away mid-way: keep the guest here
                await self._take_back()
                raise
            finally:
                self._running = False
            self.completed_to = body.uri
            self.sup.status.reason = f"migrated to {body.uri}: waiting for the target to take over"
            self.sup.instance.write_status(self.sup.status)
            await _line(resp, {"result": report.model_dump(mode="json")}, last=True)
            return resp

    async def _run(self, body: models.MigrateRequest, method: str, reason: str,
                   resp: web.StreamResponse) -> models.MigrationReport:
        vm = self.sup.vm
        notes: list[str] = []

        async def note(text: str) -> None:
            notes.append(text)
            log.info("migration: %s", text)
            await _line(resp, {"note": text})

        await migration.set_capabilities(vm, events=True, auto_converge=body.auto_converge,
                                         postcopy_ram=body.postcopy)
        await migration.set_parameters(vm, downtime_limit=body.downtime_limit_ms,
                                       max_bandwidth=body.bandwidth_bytes)
        paused_at: float | None = time.monotonic() if vm.state == VmState.PAUSED else None
        if method == "paused":
            await note(f"copying with the guest paused: {reason}")
            if vm.state == VmState.RUNNING:
                await vm.pause()
                paused_at = time.monotonic()
        self.sup.status.reason = f"migrating to {body.uri}"
        self.sup.instance.write_status(self.sup.status)
        await vm.execute("migrate", {"uri": body.uri})
        postcopy_started = False
        info: dict[str, Any] = {}
        last_shown = 0.0
        while True:
            if self._cancel.is_set():
                await vm.execute("migrate_cancel")
                self._cancel.clear()
            info = await migration.query(vm)
            status = str(info.get("status", "none"))
            prog = migration.progress_of(info)
            now = time.monotonic()
            if now - last_shown >= 0.5 or status in migration.TERMINAL:
                last_shown = now
                await _line(resp, {"progress": prog})
            if status in migration.TERMINAL:
                break
            if status == "active" and body.postcopy and not postcopy_started and prog["rounds"] >= 2:
                await vm.execute("migrate-start-postcopy")
                postcopy_started = self._postcopy = True
                method = "postcopy"
                await note("switched to post-copy after the first round: the target runs the guest now")
            elif (status == "active" and prog["rounds"] > body.max_rounds and vm.state == VmState.RUNNING
                  and not postcopy_started):
                await vm.pause()
                paused_at = time.monotonic()
                method = "paused"
                await note(f"not converging after {prog['rounds']} rounds (the guest dirties "
                           f"{prog['dirty_pages_rate']} pages/s): paused it so the copy completes")
            await asyncio.sleep(POLL)
        status = str(info.get("status"))
        if status != "completed":
            why = info.get("error-desc") or ("cancelled" if status == "cancelled" else "QEMU gave no reason")
            raise QemuError(f"{vm.config.name}: the migration {status}: {why}",
                            hint="the machine runs on here as before")
        ram = info.get("ram") or {}
        paused_ms = round((time.monotonic() - paused_at) * 1000) if paused_at is not None else info.get("downtime")
        return models.MigrationReport(
            paused_ms=paused_ms,
            uri=body.uri, method=method, method_reason=reason,
            total_time_ms=info.get("total-time"), downtime_ms=info.get("downtime"),
            setup_time_ms=info.get("setup-time"), rounds=int(ram.get("dirty-sync-count", 0)),
            transferred_bytes=int(ram.get("transferred", 0)), throttle_percent=info.get("cpu-throttle-percentage"),
            notes=notes, query=info)

    async def _take_back(self) -> None:
        """After a failed, cancelled or abandoned migration: the guest runs here again as it did.
        Not after a switch to post-copy: the target ran the guest since, so this copy is stale."""
        vm = self.sup.vm
        if self._postcopy:
            log.error("the migration failed in post-copy: the guest's state here is stale, it stays paused")
            self.sup.status.reason = "migration failed in post-copy: this copy is stale and stays paused"
            self.sup.instance.write_status(self.sup.status)
            return
        with contextlib.suppress(VmkitError):
            if str((await migration.query(vm)).get("status")) not in (*migration.TERMINAL, "none"):
                await vm.execute("migrate_cancel")
                for _ in range(100):
                    if str((await migration.query(vm)).get("status")) in migration.TERMINAL:
                        break
                    await asyncio.sleep(0.1)
        if self._was_running and vm.state == VmState.PAUSED:
            with contextlib.suppress(VmkitError):
                await savestate.resume_and_fix_clock(vm)
        self.completed_to = None
        self.sup.status.reason = "migration abandoned: running here as before"
        self.sup.instance.write_status(self.sup.status)

    async def cancel(self, request: web.Request) -> web.Response:
        await body_as(request, models.Empty)
        if self._running:
            self._cancel.set()
        elif self.completed_to is not None:
            await self._take_back()
        else:
            raise StateError("cancel a migration", self.sup.vm.state.value, ["migrating", "migrated"])
        return web.json_response(self.sup.status.to_dict())

    async def finish(self, request: web.Request) -> web.Response:
        body = await body_as(request, models.MigrateFinish)
        if self.completed_to is None:
            raise StateError("finish a migration", self.sup.vm.state.value, ["migrated (a completed migration)"])
        self.sup.exit_reason = f"migrated to {body.target}"
        self.completed_to = None
        info = await self.sup.vm.stop()
        return web.json_response({**self.sup.status.to_dict(), "exit": info.reason})


async def _line(resp: web.StreamResponse, payload: dict[str, Any], *, last: bool = False) -> None:
    with contextlib.suppress(ConnectionError):
        await resp.write((json.dumps(payload) + "\n").encode())
        if last:
            await resp.write_eof()
