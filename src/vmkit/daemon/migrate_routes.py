"""The supervisor's part of live migration: its API routes (the source side) and the incoming start
(the target side, :func:`start_incoming`).

Routes (errors as everywhere else)::

    POST /v1/migrate          MigrateRequest -> NDJSON: progress and note lines, then one result or error.
                              Sends the machine to the QEMU waiting at ``uri``. The moment QEMU says
                              the copy completed, a ``completed`` line (the caller may let the target
                              run the guest), then the report. On success the guest stays paused here
                              (QEMU's ``postmigrate``) until one of:
    POST /v1/migrate/finish   the target runs it: QEMU here ends ("migrated to ...").
    POST /v1/migrate/cancel   cancel a migration in flight, or take back a completed one that the target
                              did not take over: the guest runs on here, as before.
    GET  /v1/migration        QEMU's query-migrate (the target polls it to see its migration complete)
    POST /v1/memory-digest    a hash of every page of the paused guest's RAM (the migration check)
    POST /v1/migrate/takeover the target side: once its migration has completed, stop serving the disks
                              to the source's mirrors and run the guest.

Local disks move with the machine when the request names ``mirror`` disks: QEMU's ``drive-mirror``
copies each to the target's NBD export (started with the incoming QEMU, writable) while the guest
runs, every write mirrored synchronously once a copy has caught up (``write-blocking``); the memory
migration starts when every mirror is ready, and the mirrors end (``block-job-cancel``: the source
keeps using its own disks) once it has completed. This is QEMU's iotest 194.

A migration is an exclusive operation (:class:`~vmkit.daemon.state_routes.OperationGate`). Every
failure on the way (the target refuses or dies, the client goes away, a cancel) ends with the guest
running here as it was (paused if it was paused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from typing import Any

from aiohttp import web

from vmkit.api import models
from vmkit.daemon.state_routes import Supervisor, body_as, unexpected_error
from vmkit.errors import QemuError, StateError, VmkitError, VmTimeoutError, error_fields
from vmkit.runtime import migration, vcpus
from vmkit.runtime.states import VmState
from vmkit.state import savestate

log = logging.getLogger("vmkit.daemon.supervisor")

POLL = 0.25
"""How often query-migrate is asked while a migration runs (seconds)."""
MIRROR_TARGET = "mirror-target-"
"""Node names of the NBD clients a storage copy writes to (the prefix; then the disk's node name)."""


def _nbd_parts(uri: str) -> tuple[str, str, str]:
    """``nbd://HOST:PORT/EXPORT`` (as :class:`vmkit.api.models.MirrorDisk` validates it) as its parts."""
    hostport, export = uri.removeprefix("nbd://").split("/", 1)
    host, port = hostport.rsplit(":", 1)
    return host.strip("[]"), port, export


async def start_incoming(sup: Supervisor, plan: models.IncomingRequest) -> dict[str, Any]:
    """Start QEMU waiting for a migration at ``plan.uri`` (the target side). The guest stays paused:
    once the migration has completed, ``POST /v1/resume`` runs it."""
    vm = sup.vm
    await vm.start(incoming=True, ram_pad=plan.ram_pad)
    try:
        await migration.set_capabilities(vm, events=True, postcopy_ram=plan.postcopy)
        if plan.tls:
            await migration.add_tls(vm, sup.instance.dir / migration.TLS_DIR, server=True)
        await vm.execute("migrate-incoming", {"uri": plan.uri})
        if plan.exports and plan.nbd_port is not None:
            host = plan.uri.split(":", 1)[1].rsplit(":", 1)[0].strip("[]")
            server: dict[str, Any] = {"addr": {"type": "inet", "data": {"host": host, "port": str(plan.nbd_port)}}}
            if plan.tls:  # the disks travel under the same certificates as the memory
                server["tls-creds"] = migration.TLS_ID
            await vm.execute("nbd-server-start", server)
            for node in plan.exports:
                await vm.execute("block-export-add", {"type": "nbd", "id": f"mig-{node}", "node-name": node,
                                                      "name": node, "writable": True})
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
        self.incoming: str | None = None
        """Where this machine was started to receive a migration (None: an ordinary start)."""
        self._clock_fix: asyncio.Task[Any] | None = None
        """Setting the guest's clock after a takeover (it never raises: fix_guest_clock logs its result)."""

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/migrate", self.migrate),
            web.post("/v1/migrate/finish", self.finish),
            web.post("/v1/migrate/cancel", self.cancel),
            web.get("/v1/migration", self.info),
            web.post("/v1/memory-digest", self.digest),
            web.post("/v1/migrate/takeover", self.takeover),
        ]

    async def info(self, request: web.Request) -> web.Response:
        vm = self.sup.vm
        up = vm.qmp is not None and vm.state not in (VmState.STOPPED, VmState.ERROR, VmState.STARTING)
        q = await migration.query(vm) if up else {}
        safety = await migration.machine_safety(vm) if up else None
        blocks = await migration.ram_blocks(vm) if up else {}
        return web.json_response(models.MigrationInfo(
            state=vm.state.value, status=str(q.get("status", "none")), query=q,
            method=safety.method if safety else "unknown", method_reason=safety.reason if safety else "",
            ram_pad=blocks["mem"] - vm.config.memory if "mem" in blocks else None,
            handed_to=self.completed_to).model_dump(mode="json"))

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
        vcpus.refuse_parked(vm, "migrate the machine")
        safety = await migration.machine_safety(vm)
        if body.method == "live" and not safety.live and not body.verified:
            from vmkit.errors import ConfigError

            raise ConfigError.single("method", f"live pre-copy would corrupt this machine: {safety.reason}; "
                                     "leave the method to vmkit (auto) or ask for paused")
        live = body.method == "live" or (body.method == "auto" and safety.live)
        method: str = "live" if live else "paused"
        if body.method == "paused":
            reason = "asked for"
        elif live and not safety.live:
            reason = "asked for, verified page by page afterwards (this QEMU can lose pages under TCG)"
        elif live and body.method == "live":
            reason = f"asked for ({safety.reason})"
        else:
            reason = safety.reason
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
                if body.tls:
                    await migration.drop_tls(vm)
            self.completed_to = body.host or body.uri
            self.sup.status.reason = f"migrated to {self.completed_to}: waiting for the target to take over"
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
        if body.tls:
            await migration.add_tls(vm, self.sup.instance.dir / migration.TLS_DIR, server=False)
            await note("the memory stream" + (" and the disk copy are" if body.mirror else " is")
                       + " TLS (certificates made for this migration)")
        paused_at: float | None = time.monotonic() if vm.state == VmState.PAUSED else None
        if method == "live":
            await note(f"live pre-copy: {reason}")
        if method == "paused":
            await note(f"copying with the guest paused: {reason}")
            if vm.state == VmState.RUNNING:
                await vm.pause()
                paused_at = time.monotonic()
        self.sup.status.reason = f"migrating to {body.uri}"
        self.sup.instance.write_status(self.sup.status)
        disk_bytes = 0
        if body.mirror:
            await note(f"copying {len(body.mirror)} disk(s) to the target while the guest runs")
            disk_bytes = await self._mirror(body.mirror, resp, tls=body.tls)
        async with vm.subscribe() as events:  # from before `migrate`: no MIGRATION event is missed
            sent_at = time.monotonic()
            await vm.execute("migrate", {"uri": body.uri})
            postcopy_started = False
            info: dict[str, Any] = {}
            last_shown = 0.0
            throttled = 0  # the most auto-converge throttled the guest (query-migrate drops it at the end)
            while True:
                if self._cancel.is_set():
                    await vm.execute("migrate_cancel")
                    self._cancel.clear()
                info = await migration.query(vm)
                status = str(info.get("status", "none"))
                if status == "completed":  # first: the target may take over now (the figures and report follow)
                    await _line(resp, {"completed": True})
                    info = await migration.final_figures(vm, info)
                prog = migration.progress_of(info)
                throttled = max(throttled, int(prog["throttle_percent"] or 0))
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
                # QEMU's MIGRATION event wakes this at once: the completion reaches the target's take-over
                # without a poll's delay (the poll is for the progress figures)
                await migration.wait_status_change(events, POLL)
        status = str(info.get("status"))
        throttled = max(throttled, int(info.get("cpu-throttle-percentage") or 0))
        if throttled:
            await note(f"auto-converge slowed the guest's vCPUs (throttled up to {throttled}%) so that the copy "
                       "converged")
        if status == "completed" and body.mirror:
            await self._end_mirrors()  # the target has every block: the source keeps its own disks
        if status != "completed":
            why = info.get("error-desc") or ("cancelled" if status == "cancelled" else "QEMU gave no reason")
            raise QemuError(f"{vm.config.name}: the migration {status}: {why}",
                            hint="the machine runs on here as before")
        ram = info.get("ram") or {}
        total_ms = info.get("total-time")
        downtime_ms = info.get("downtime")
        if not total_ms:  # still none after final_figures (seen over TLS when the status was polled)
            total_ms = round((time.monotonic() - sent_at) * 1000)
            downtime_ms = None
            await note(f"QEMU reported no times for this migration: total time {total_ms} ms as vmkit measured "
                       "it (to within a poll); its downtime is unknown")
        paused_ms = round((time.monotonic() - paused_at) * 1000) if paused_at is not None else downtime_ms
        return models.MigrationReport(
            paused_ms=paused_ms,
            uri=body.uri, method=method, method_reason=reason,
            total_time_ms=total_ms, downtime_ms=downtime_ms,
            setup_time_ms=info.get("setup-time"), rounds=int(ram.get("dirty-sync-count", 0)),
            transferred_bytes=int(ram.get("transferred", 0)), throttle_percent=throttled or None,
            disks_copied=[m.node for m in body.mirror], disk_bytes=disk_bytes, notes=notes, query=info)

    async def _mirror(self, disks: list[models.MirrorDisk], resp: web.StreamResponse, *, tls: bool = False) -> int:
        """Start a mirror per disk and wait until every one has caught up (then writes are mirrored as
        they happen). Returns the bytes copied so far. Each target is an NBD client node of its own
        (``mirror-target-NODE``), over TLS with the migration's certificates when ``tls``."""
        vm = self.sup.vm
        for d in disks:
            host, port, export = _nbd_parts(d.target)
            node: dict[str, Any] = {"driver": "nbd", "node-name": f"{MIRROR_TARGET}{d.node}", "export": export,
                                    "server": {"type": "inet", "host": host, "port": port}}
            if tls:
                node["tls-creds"] = migration.TLS_ID
            await vm.execute("blockdev-add", node)
            await vm.execute("blockdev-mirror", {"job-id": f"mirror-{d.node}", "device": d.node,
                                                 "target": f"{MIRROR_TARGET}{d.node}", "sync": d.sync,
                                                 "copy-mode": "write-blocking", "auto-dismiss": False})
        last = 0.0
        while True:
            if self._cancel.is_set():
                raise QemuError(f"{vm.config.name}: the migration was cancelled while its disks were copied")
            jobs = {j["device"]: j for j in await vm.execute("query-block-jobs")}
            mine = [jobs.get(f"mirror-{d.node}") for d in disks]
            gone = [d.node for d, j in zip(disks, mine, strict=True) if j is None or j.get("status") == "concluded"]
            if gone:
                errors = [str(j.get("error")) for j in mine if j is not None and j.get("error")]
                raise QemuError(f"{vm.config.name}: copying disk(s) {', '.join(gone)} to the target failed"
                                + (f": {'; '.join(errors)}" if errors else ""))
            done = sum(int(j["offset"]) for j in mine if j is not None)
            total = sum(int(j["len"]) for j in mine if j is not None)
            now = time.monotonic()
            ready = all(j is not None and j.get("ready") for j in mine)
            if now - last >= 0.5 or ready:
                last = now
                await _line(resp, {"disks": {"done": done, "total": total}})
            if ready:
                return done
            await asyncio.sleep(POLL)

    async def _end_mirrors(self, *, force: bool = False) -> None:
        """End every mirror job without switching the source to the copy."""
        vm = self.sup.vm
        with contextlib.suppress(VmkitError):
            for j in await vm.execute("query-block-jobs"):
                if str(j.get("device", "")).startswith("mirror-"):
                    with contextlib.suppress(VmkitError):
                        if j.get("status") == "concluded":
                            await vm.execute("job-dismiss", {"id": j["device"]})
                        else:
                            await vm.execute("block-job-cancel", {"device": j["device"], "force": force})
            for _ in range(300):
                jobs = [j for j in await vm.execute("query-block-jobs")
                        if str(j.get("device", "")).startswith("mirror-")]
                for j in jobs:
                    if j.get("status") == "concluded":
                        with contextlib.suppress(VmkitError):
                            await vm.execute("job-dismiss", {"id": j["device"]})
                if not jobs:
                    break
                await asyncio.sleep(0.1)
            for n in await vm.execute("query-named-block-nodes", {"flat": True}):  # the NBD clients
                if str(n.get("node-name", "")).startswith(MIRROR_TARGET):
                    with contextlib.suppress(VmkitError):
                        await vm.execute("blockdev-del", {"node-name": n["node-name"]})

    async def _take_back(self) -> None:
        """After a failed, cancelled or abandoned migration: the guest runs here again as it did.
        Not after a switch to post-copy: the target ran the guest since, so this copy is stale."""
        vm = self.sup.vm
        await self._end_mirrors(force=True)
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

    async def takeover(self, request: web.Request) -> web.Response:
        """The target side: wait for the incoming migration to complete, end the disk exports, run the guest."""
        body = await body_as(request, models.Takeover)
        vm = self.sup.vm
        if self.incoming is None:
            raise StateError("take over a migrated machine", vm.state.value,
                             ["a machine started for an incoming migration"])
        deadline = time.monotonic() + body.timeout
        async with vm.subscribe() as events:  # the incoming QEMU's MIGRATION events: no poll's delay
            while True:
                if vm.state not in (VmState.PAUSED, VmState.RUNNING):
                    raise StateError("take over the migrated machine", vm.state.value, [VmState.PAUSED.value])
                status = str((await migration.query(vm)).get("status", "none"))
                if status == "completed" or (status == "postcopy-active" and vm.state == VmState.RUNNING):
                    break
                if status in ("failed", "cancelled"):
                    raise QemuError(f"{vm.config.name}: the incoming migration {status}")
                if time.monotonic() > deadline:
                    raise VmTimeoutError(f"{vm.config.name}: the incoming migration is still {status} after "
                                         f"{body.timeout:.0f} s")
                await migration.wait_status_change(events, 0.1)
        tls_dir = self.sup.instance.dir / migration.TLS_DIR
        if tls_dir.exists():  # the stream is over: its certificates go
            await migration.drop_tls(vm)
            shutil.rmtree(tls_dir, ignore_errors=True)
        exports = await vm.execute("query-block-exports")
        for exp in exports if isinstance(exports, list) else []:
            with contextlib.suppress(VmkitError):
                await vm.execute("block-export-del", {"id": exp["id"]})
        if exports:
            with contextlib.suppress(VmkitError):
                await vm.execute("nbd-server-stop")
        clock = None
        if vm.state == VmState.PAUSED:
            # the guest runs from here on; its clock (behind by the downtime) is set through the guest
            # agent afterwards, so the source does not wait for the agent's round trip
            await vm.resume()
            self._clock_fix = asyncio.create_task(savestate.fix_guest_clock(vm))
            clock = {"corrected": None, "behind_seconds": None, "message": "being set by the guest agent"}
        announced = bool(vm.config.networks or vm.config.user_nic is not None)
        if announced:  # the guest's MAC is here now: tell the segment
            try:
                await migration.announce(vm)
            except VmkitError as exc:
                announced = False
                log.warning("announce-self failed: %s", exc)
        self.sup.status.reason = "migrated here" + (" (announced on its networks)" if announced else "")
        self.sup.instance.write_status(self.sup.status)
        return web.json_response({**self.sup.status.to_dict(), "clock": clock or {
            "corrected": False, "behind_seconds": None, "message": "the guest ran on (post-copy)"}})

    def refuse_handed_over(self, operation: str) -> None:
        """After a completed migration not yet finished or taken back, the target may run the guest: this paused
        copy must not run, nor be saved or snapshotted (a second copy, restored later). Refused with what to do."""
        if self.completed_to is None:
            return
        name = self.sup.vm.config.name
        err = StateError(operation, f"migrated to {self.completed_to} (paused here until the target takes over)",
                         ["running or paused here"])
        err.hint = (f"if it runs there (vmkit --host {self.completed_to} list), end this copy: vmkit delete --force "
                    f"{name}; if not, take it back: vmkit migrate --cancel {name}")
        raise err

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
