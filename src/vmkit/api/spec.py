"""The supervisor's REST API as data: every route, its models and the phases it is allowed in, and
the OpenAPI 3.1 document generated from them (committed as ``docs/openapi.json``; served at
``GET /v1/openapi.json``).

The supervisor binds one handler to each route's ``operation`` (a test checks that every route has
a handler and nothing else is served), and clients and tests check requests and responses against
the generated document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from vmkit.api import models as m
from vmkit.config import PortForward, StorageDevice
from vmkit.version import __version__

LIVE = ("running", "paused")
Body = Literal["json", "ndjson", "binary", "png", "websocket"]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    operation: str
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    many: bool = False
    """The response is a JSON array of ``response``."""
    responds: Body = "json"
    accepts: Literal["json", "binary"] = "json"
    states: tuple[str, ...] = ()
    """The machine states in which the action is allowed (documentation; others answer 409)."""
    query: tuple[tuple[str, str, bool], ...] = ()
    """(name, description, required) of string query parameters."""
    description: str = ""
    errors: tuple[int, ...] = field(default=(400, 404, 409, 500))


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/openapi.json", "get_openapi", "This document", errors=()),
    Route("GET", "/v1/state", "get_state", "The machine's runtime status", response=m.RuntimeStatus, errors=()),
    Route("GET", "/v1/info", "get_info", "Configuration and runtime status", response=m.MachineInfo, errors=()),
    Route("POST", "/v1/start", "start", "Start the machine (once, right after the supervisor is launched)",
          request=m.StartRequest, response=m.StartLine, responds="ndjson", states=("starting",),
          description="`vmkit start` launches a supervisor, which serves this API at once and waits for this "
                      "call; the answer streams the start's progress as newline-delimited JSON and ends with "
                      "one `result` line (the guest is ready) or one `error` line (the supervisor then exits)."),
    Route("POST", "/v1/pause", "pause", "Pause the guest's vCPUs", request=m.Empty, response=m.RuntimeStatus,
          states=("running",)),
    Route("POST", "/v1/resume", "resume", "Resume a paused guest and set its clock",
          request=m.Empty, response=m.ResumeResult, states=("paused",),
          description="The guest clock stood still while paused; the guest agent (if any) sets it to the "
                      "host's time. sshfs shares of a machine restored paused are mounted again."),
    Route("POST", "/v1/request-stop", "request_stop", "Press the ACPI power button and wait for the guest",
          request=m.RequestStop, response=m.RuntimeStatus, states=("running",), errors=(400, 409, 500, 504)),
    Route("POST", "/v1/stop", "stop", "Stop QEMU now (hard stop)", request=m.Empty, response=m.StopResult,
          states=("starting", *LIVE, "pausing", "resuming", "stopping")),
    Route("GET", "/v1/events", "events", "The machine's events as they happen", response=m.Event,
          responds="ndjson", errors=(),
          description="Newline-delimited JSON: a `hello` event with the state now, then one event per line; "
                      "the stream ends when the machine stops."),
    Route("GET", "/v1/console", "console", "The serial console (WebSocket, binary frames both ways)",
          responds="websocket", errors=(400,)),
    Route("POST", "/v1/ports", "add_port", "Forward a host port to the guest (user-mode network)",
          request=PortForward, response=m.PortAdded, states=LIVE),
    Route("GET", "/v1/disks", "list_disks", "Disks: boot and hot-plugged, with NBD connection state",
          response=m.DiskRow, many=True, errors=()),
    Route("POST", "/v1/disks", "attach_disk", "Hot-plug a disk", request=StorageDevice, response=m.DiskAttached,
          states=LIVE),
    Route("DELETE", "/v1/disks/{id}", "detach_disk", "Unplug a hot-plugged disk", request=m.DetachDisk,
          response=m.DiskDetached, states=LIVE, errors=(400, 404, 409, 500, 504)),
    Route("POST", "/v1/exec", "exec", "Run a program in the guest (guest agent)", request=m.ExecRequest,
          response=m.ExecResult, states=("running",), errors=(400, 409, 500, 504),
          description="Requests from several clients share the supervisor's one agent connection."),
    Route("GET", "/v1/files", "read_file", "Read a file from the guest (guest agent)", responds="binary",
          states=("running",), query=(("path", "absolute path in the guest", True),)),
    Route("PUT", "/v1/files", "write_file", "Write a file into the guest (guest agent)", accepts="binary",
          response=m.FileWritten, states=("running",),
          query=(("path", "absolute path in the guest", True),
                 ("mode", "octal mode for a new file, e.g. 0644", False))),
    Route("POST", "/v1/balloon", "set_balloon", "Move the guest's usable memory (memory balloon)",
          request=m.BalloonRequest, response=m.BalloonResult, states=LIVE,
          description="QEMU reports each step of the guest's balloon driver as a `qmp` event "
                      "with `detail.event` = `BALLOON_CHANGE`. The target holds until the machine stops "
                      "(a new boot starts with all its memory)."),
    Route("POST", "/v1/cpus", "set_cpus", "Add or remove vCPUs live (CPU hot-plug)",
          request=m.CpusRequest, response=m.CpusResult, states=LIVE, errors=(400, 409, 500, 504),
          description="Adds the lowest free vCPUs (`device_add`) or removes the highest ones (`device_del`, "
                      "waiting for the guest to release them: 504 if it does not within the timeout). The new "
                      "count is written to vm.yaml (`cpus`, what the next boot starts with) and reported as a "
                      "`cpus-changed` event."),
    Route("POST", "/v1/memory", "set_memory", "Grow or shrink the memory live (virtio-mem)",
          request=m.MemoryRequest, response=m.MemoryResult, states=LIVE,
          description="Sets the virtio-mem device's requested size to `memory` minus the boot memory and waits "
                      "for the guest to plug or unplug it. Needs `max_memory` in vm.yaml. The request is "
                      "written to vm.yaml (`plugged_memory`: a new boot plugs it again) and reported as a "
                      "`memory-changed` event."),
    Route("GET", "/v1/stats", "get_stats", "Memory and CPU use now", response=m.MachineStats, states=LIVE,
          errors=(409, 500)),
    Route("PUT", "/v1/limits", "set_limits", "Change the cgroup limits live (weight, cap, pinning, memory)",
          request=m.LimitsRequest, response=m.LimitsResult, states=LIVE,
          description="Checked first (ranges, CPUs the host has, memory_max above the guest's memory plus "
                      "QEMU's needs, swap accounting, min <= high <= max); then written to the machine's "
                      "cgroup, the vCPU threads pinned, vm.yaml updated and a `limits-changed` event emitted."),
    Route("GET", "/v1/screenshot", "screenshot", "The screen now, as a PNG image (QMP screendump)",
          responds="png", states=LIVE, errors=(400, 409, 500)),
    Route("POST", "/v1/keys", "send_keys", "Press keys on the machine's keyboard", request=m.KeysRequest,
          response=m.KeysSent, states=("running",),
          description="Each item is pressed and released in turn; a combination such as `ctrl-alt-delete` "
                      "is pressed together. The call returns once QEMU has queued them."),
    Route("POST", "/v1/type", "type_text", "Type text on the machine's keyboard (US layout)",
          request=m.TypeRequest, response=m.KeysSent, states=("running",)),
    Route("GET", "/v1/display", "get_display", "The display's device and size", response=m.DisplayInfo,
          states=LIVE, errors=(400, 409, 500)),
    Route("POST", "/v1/display", "resize_display", "Ask the guest for another display size",
          request=m.DisplayResize, response=m.DisplayResized, states=("running",), errors=(400, 409, 500, 504),
          description="As a VNC client's SetDesktopSize: the display device offers the size as its preferred "
                      "mode and the guest takes it, or the largest mode it can show (Linux's fbdev console: "
                      "at most the size it booted with)."),
    Route("POST", "/v1/web-console", "web_console", "Serve the web console on a loopback port; a one-time URL",
          request=m.WebConsoleRequest, response=m.WebConsole, states=LIVE,
          description="The supervisor serves a page with the screen (noVNC) and the serial console "
                      "(xterm.js) on 127.0.0.1. Each call returns a new URL whose token works once; the "
                      "page then holds a session cookie, and its WebSockets refuse other origins."),
    Route("POST", "/v1/save", "save", "Save the machine's running state to a file", request=m.SaveRequest,
          response=m.SaveLine, responds="ndjson", states=LIVE,
          description="Newline-delimited JSON: `progress` lines, then one line with `result` or `error`. "
                      "Pauses a running machine, saves, then resumes it (keep_running) or stops it."),
    Route("GET", "/v1/snapshots", "list_snapshots", "Snapshots (RAM + disks, in the qcow2 images)",
          response=m.SnapshotInfo, many=True, states=LIVE),
    Route("POST", "/v1/snapshots", "create_snapshot", "Take a snapshot", request=m.SnapshotCreate,
          response=m.SnapshotInfo, states=LIVE),
    Route("POST", "/v1/snapshots/{tag}/revert", "revert_snapshot", "Revert to a snapshot",
          request=m.Empty, response=m.SnapshotReverted, states=LIVE),
    Route("DELETE", "/v1/snapshots/{tag}", "delete_snapshot", "Delete a snapshot", request=m.Empty,
          response=m.SnapshotDeleted, states=LIVE),
    Route("POST", "/v1/migrate", "migrate", "Send the machine to a QEMU waiting for it on another host",
          request=m.MigrateRequest, response=m.MigrateLine, responds="ndjson", states=LIVE,
          description="Newline-delimited JSON: `progress` and `note` lines, then one line with `result` "
                      "(the migration completed: the guest stays paused here until `/v1/migrate/finish` or "
                      "`/v1/migrate/cancel`) or `error` (the guest runs on here as it did)."),
    Route("POST", "/v1/migrate/finish", "finish_migration", "The target runs the migrated machine: end it here",
          request=m.MigrateFinish, response=m.StopResult, states=("paused",)),
    Route("POST", "/v1/migrate/cancel", "cancel_migration",
          "Cancel a migration in flight, or take back a completed one: the guest runs on here",
          request=m.Empty, response=m.RuntimeStatus, states=LIVE),
    Route("POST", "/v1/migrate/takeover", "takeover_migration",
          "The target side: once the incoming migration has completed, run the guest here",
          request=m.Takeover, response=m.ResumeResult, states=LIVE, errors=(400, 409, 500, 504),
          description="Ends the NBD exports the source's disk mirrors wrote to, then resumes the guest."),
    Route("GET", "/v1/migration", "get_migration", "QEMU's account of the migration (either side)",
          response=m.MigrationInfo, errors=(500,)),
    Route("POST", "/v1/memory-digest", "memory_digest", "A hash of every page of the paused guest's memory",
          request=m.Empty, response=m.MemoryDigest, states=("paused",),
          description="The migration check: source and target of a completed migration must be equal."),
)

_STATUS_TEXT = {400: "Bad input (names the field)", 404: "Not found", 405: "Method not allowed",
                409: "Wrong state, or a conflicting operation is running", 413: "Request body too large",
                500: "QEMU or the host failed", 504: "Timed out"}


def _schemas() -> tuple[dict[str, Any], dict[Any, Any]]:
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [(m.ErrorResponse, "serialization")]
    for r in ROUTES:
        if r.request is not None:
            models.append((r.request, "validation"))
        if r.response is not None:
            models.append((r.response, "serialization"))
    refs, defs = models_json_schema(list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}")
    return defs.get("$defs", {}), dict(refs)


_BINARY = {"type": "string", "contentMediaType": "application/octet-stream"}


def _path_params(path: str) -> list[dict[str, Any]]:
    names = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the supervisor's API."""
    schemas, refs = _schemas()
    error_ref = refs[(m.ErrorResponse, "serialization")]
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        op: dict[str, Any] = {"operationId": r.operation, "summary": r.summary}
        desc = r.description
        if r.states:
            desc = (desc + "\n\n" if desc else "") + f"Allowed while the machine is: {', '.join(r.states)}."
        if desc:
            op["description"] = desc
        params = _path_params(r.path) + [
            {"name": n, "in": "query", "required": req, "description": d, "schema": {"type": "string"}}
            for n, d, req in r.query]
        if params:
            op["parameters"] = params
        if r.request is not None:
            required = any(f.is_required() for f in r.request.model_fields.values())
            op["requestBody"] = {"required": required, "content": {
                "application/json": {"schema": refs[(r.request, "validation")]}}}
        elif r.accepts == "binary":
            op["requestBody"] = {"required": True, "content": {"application/octet-stream": {"schema": _BINARY}}}
        ok: dict[str, Any]
        if r.responds == "websocket":
            ok = {"101": {"description": "Switching to the WebSocket protocol"}}
        elif r.responds == "png":
            ok = {"200": {"description": "A PNG image", "content": {"image/png": {"schema": {
                "type": "string", "contentMediaType": "image/png"}}}}}
        elif r.responds == "binary":
            ok = {"200": {"description": "The file's bytes", "content": {"application/octet-stream": {
                "schema": _BINARY}}}}
        elif r.operation == "get_openapi":
            ok = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
        else:
            assert r.response is not None, r.operation
            schema = refs[(r.response, "serialization")]
            if r.many:
                schema = {"type": "array", "items": schema}
            media = "application/x-ndjson" if r.responds == "ndjson" else "application/json"
            ok = {"200": {"description": "OK" if media == "application/json" else
                          "One JSON object per line, each matching the schema", "content": {media: {"schema": schema}}}}
        responses = dict(ok)
        for code in sorted({*r.errors, 400, 500} if r.request is not None or r.accepts == "binary" else r.errors):
            responses[str(code)] = {"description": _STATUS_TEXT[code],
                                    "content": {"application/json": {"schema": error_ref}}}
        responses["default"] = {"description": "Any other failure",
                                "content": {"application/json": {"schema": error_ref}}}
        op["responses"] = responses
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "vmkit supervisor API", "version": m.API_VERSION,
                 "description": "One supervisor per running machine serves this API on the unix socket "
                                "`api.sock` in the machine's directory (mode 0600). Every failure is an "
                                "ErrorResponse. Generated from vmkit's models; vmkit " + __version__.split("+")[0]
                                + "."},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def openapi_json() -> str:
    return json.dumps(openapi(), indent=2, sort_keys=False) + "\n"


def route(operation: str) -> Route:
    for r in ROUTES:
        if r.operation == operation:
            return r
    raise KeyError(operation)


if __name__ == "__main__":  # python -m vmkit.api.spec > docs/openapi.json
    import sys

    sys.stdout.write(openapi_json())
