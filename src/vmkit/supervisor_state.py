"""The supervisor's part of save/restore and snapshots: its API routes and restored starts.

Routes (added to the supervisor's API; errors as everywhere else)::

    POST   /v1/save                  {"path": ABSOLUTE, "keep_running": bool, "force": bool}
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

A supervisor can also *start* a machine from saved state instead of booting it
(:class:`StartPlan`, command-line options ``--restore PATH [--force] [--consume]`` or
``--snapshot TAG``, plus ``--paused``). It then writes interim JSON lines on its ready pipe
before the final report: ``{"progress": {"done", "total"}}`` while the state loads, and one
``{"started": {...}}`` line saying what was restored and what happened to the guest clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from vmkit import savestate
from vmkit.errors import ConfigError, StateError, VmkitError, error_fields
from vmkit.machine import VmState

if TYPE_CHECKING:
    from vmkit.supervisor import Supervisor

log = logging.getLogger("vmkit.supervisor")

_PROGRESS_INTERVAL = 0.2


@dataclass(frozen=True)
class StartPlan:
    """How a supervisor brings its machine up when it should not simply boot it."""

    restore: Path | None = None
    force: bool = False
    consume: bool = False
    """Delete the state file once the machine runs from it (the instance's own saved state)."""
    snapshot: str | None = None
    paused: bool = False

    @property
    def active(self) -> bool:
        return self.restore is not None or self.snapshot is not None

    def args(self) -> list[str]:
        out: list[str] = []
        if self.restore is not None:
            out += ["--restore", str(self.restore)]
        if self.force:
            out.append("--force")
        if self.consume:
            out.append("--consume")
        if self.snapshot is not None:
            out += ["--snapshot", self.snapshot]
        if self.paused:
            out.append("--paused")
        return out

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--restore", type=Path, default=None, help="start from this state file")
        parser.add_argument("--force", action="store_true", help="restore even if the disks changed")
        parser.add_argument("--consume", action="store_true", help="delete the state file once restored")
        parser.add_argument("--snapshot", default=None, help="start from this snapshot")
        parser.add_argument("--paused", action="store_true", help="stay paused after restoring")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> StartPlan:
        return cls(restore=ns.restore, force=ns.force, consume=ns.consume, snapshot=ns.snapshot, paused=ns.paused)


def _write_line(fd: int | None, payload: dict[str, Any]) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(payload) + "\n").encode())


def _throttled(emit: Callable[[int, int | None], None]) -> Callable[[int, int | None], None]:
    last = [0.0]

    def report(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] >= _PROGRESS_INTERVAL or (total is not None and done >= total):
            last[0] = now
            emit(done, total)

    return report


async def start_from_plan(sup: Supervisor, plan: StartPlan, ready_fd: int | None) -> None:
    """Bring the machine up from a state file or a snapshot (instead of booting it)."""
    vm = sup.vm
    started: dict[str, Any] = {}
    progress = _throttled(lambda d, t: _write_line(ready_fd, {"progress": {"done": d, "total": t}}))
    if plan.restore is not None:
        result = await savestate.restore_state(vm, plan.restore, progress, force=plan.force)
        started["restored"] = result.to_dict()
        sup.status.reason = f"restored from {plan.restore}"
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
            plan.restore.unlink()  # the machine has moved on: this state must not be resumed twice
    _write_line(ready_fd, {"started": started})


class StateRoutes:
    """The save and snapshot handlers of one supervisor (one operation at a time)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self._lock = asyncio.Lock()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/save", self.save),
            web.get("/v1/snapshots", self.snapshots),
            web.post("/v1/snapshots", self.snapshot_create),
            web.post("/v1/snapshots/{tag}/revert", self.snapshot_revert),
            web.delete("/v1/snapshots/{tag}", self.snapshot_delete),
        ]

    async def save(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        raw_path = body.get("path")
        if raw_path is None:
            path = self.sup.instance.saved_state_path
        elif isinstance(raw_path, str) and raw_path.startswith("/"):
            path = Path(raw_path)
        else:
            raise ConfigError.single("path", "give the state file's absolute path")
        keep_running = bool(body.get("keep_running", False))
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise ConfigError.single("force", "give true to replace an existing file that is not a state file")
        vm = self.sup.vm
        if vm.state not in (VmState.RUNNING, VmState.PAUSED):
            raise StateError("save the machine state", vm.state.value, [VmState.RUNNING.value, VmState.PAUSED.value])
        if self._lock.locked():
            raise StateError("save the machine state", "busy with another save or snapshot", ["idle"])
        target_check = functools.partial(savestate.check_save_target, own=self.sup.instance, force=force)
        target_check(path)  # before the machine is paused: a refused target leaves it as it was
        async with self._lock:
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
            except VmkitError as exc:
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
        body = await json_body(request)
        tag = body.get("tag")
        if not isinstance(tag, str):
            raise ConfigError.single("tag", "give the snapshot's tag")
        async with self._lock:
            info = await savestate.create_snapshot(self.sup.vm, tag)
        return web.json_response(info.to_dict())

    async def snapshot_revert(self, request: web.Request) -> web.Response:
        tag = request.match_info["tag"]
        async with self._lock:
            clock = await savestate.revert_snapshot(self.sup.vm, tag)
        return web.json_response({"tag": tag, "state": self.sup.vm.state.value,
                                  "clock": clock.to_dict() if clock else None})

    async def snapshot_delete(self, request: web.Request) -> web.Response:
        tag = request.match_info["tag"]
        async with self._lock:
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
    """A request's JSON object body ({} when empty); bad input is a ConfigError."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise ConfigError.single("<body>", "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ConfigError.single("<body>", "the request body must be a JSON object")
    return body
