"""The typed models of the supervisor's REST API: every request body, response and event.

One contract for every client (the CLI, :class:`vmkit.Client`, other languages): the supervisor
parses request bodies with these models and answers with them, and the OpenAPI document
(:mod:`vmkit.api.spec`, committed as ``docs/openapi.json``) is generated from them. Outcomes are
typed fields, never message text to be matched.

Requests forbid unknown fields and take numbers and yes/no values only as such (``"timeout": "5"``
or ``true`` for a number is refused, naming the field: the same types as vm.yaml's,
:data:`vmkit.config.Float` and friends), so a typo never silently does something else.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field

from vmkit.config import Bool, Float

API_VERSION = "v1"

MachineStateName = Literal["stopped", "starting", "running", "pausing", "paused", "resuming", "stopping", "error"]
"""The values of :class:`vmkit.runtime.states.VmState` (a test keeps the two equal)."""


MAX_WAIT = 24 * 3600.0
"""The longest any request may ask the supervisor to wait (seconds)."""


class Request(BaseModel):
    """A request body: unknown fields refused, numbers and yes/no values as such."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class Empty(Request):
    """No body, or ``{}``: the action takes no parameters."""


class Response(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)


# -- errors ------------------------------------------------------------------------------------------
class ErrorDetail(Response):
    """What went wrong: ``type`` is the error class (``ConfigError``, ``NotFoundError``, ``StateError``,
    ...), ``exit_code`` the CLI's exit code for it; ``field`` names the input at fault, ``hint`` says
    what to do."""

    type: str
    message: str
    field: str | None = None
    hint: str | None = None
    exit_code: int


class ErrorResponse(Response):
    """Every failure, with any 4xx or 5xx status."""

    error: ErrorDetail


# -- status --------------------------------------------------------------------------------------------
class RuntimeStatus(Response):
    """The machine's runtime status (also recorded in the instance's ``state.json``)."""

    state: MachineStateName
    reason: str = ""
    supervisor_pid: int | None = None
    qemu_pid: int | None = None
    started_at: float | None = None
    accel: str | None = None
    accel_reason: str | None = None
    qemu_version: str | None = None
    degraded: str | None = Field(default=None, description="why the machine runs degraded (a share died)")
    updated_at: float


class ClockFix(Response):
    """What the clock fix-up did after the guest's clock stood still (pause, restore, revert)."""

    corrected: bool
    behind_seconds: float | None
    message: str


class ResumeResult(RuntimeStatus):
    clock: ClockFix


class StopResult(RuntimeStatus):
    exit: str = Field(description="how QEMU ended")


class MachineInfo(Response):
    name: str
    config: dict[str, Any] = Field(description="the machine's configuration (vm.yaml's schema: `vmkit schema`)")
    runtime: RuntimeStatus


class Progress(Response):
    done: int
    total: int | None


# -- start ---------------------------------------------------------------------------------------------
class IncomingRequest(Request):
    """Start QEMU waiting for a migration stream (``-incoming defer``) and listen at ``uri``."""

    uri: str = Field(pattern=r"^tcp:(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):\d{1,5}$",
                     description="where QEMU listens: tcp:ADDRESS:PORT")
    postcopy: Bool = Field(default=False, description="accept a switch to post-copy (both sides must agree)")
    nbd_port: int | None = Field(default=None, strict=True, ge=1, le=65535,
                                 description="serve the disks in `exports` over NBD on this port (same address), "
                                             "writable, for the source's mirror jobs (the storage copy)")
    exports: list[str] = Field(default_factory=list, max_length=64,
                               description="node names of the disks to receive (their device ids)")


class StartRequest(Request):
    """How to bring the machine up: boot it (no fields), start it from a state file or a snapshot, or
    receive it from another host (``incoming``: it stays paused until ``POST /v1/resume``)."""

    restore: str | None = Field(default=None, max_length=4096, description="absolute path of a state file")
    force: Bool = Field(default=False, description="restore even if the disks changed since the save")
    consume: Bool = Field(default=False, description="delete the state file once the machine runs from it")
    snapshot: str | None = Field(default=None, max_length=63, description="start from this snapshot")
    paused: Bool = Field(default=False, description="stay paused after restoring")
    incoming: IncomingRequest | None = Field(default=None, description="receive the machine by migration")

    @property
    def active(self) -> bool:
        """Whether the machine starts from saved state (or a migration) rather than booting."""
        return self.restore is not None or self.snapshot is not None or self.incoming is not None


class Started(Response):
    """What a start from saved state did."""

    restored: dict[str, Any] | None = Field(default=None, description="path, payload_bytes, seconds, saved_at, "
                                                                     "suspended_seconds of the state it resumed")
    snapshot: str | None = None
    incoming: str | None = Field(default=None, description="where QEMU waits for the migration stream")
    clock: ClockFix | None = None


class StartLine(Response):
    """One line of the start's NDJSON stream: ``progress`` (a state file loading), ``console`` (the
    guest's last console line, while it boots), ``started`` (what was restored), then exactly one
    ``result`` (the machine is ready) or ``error``."""

    progress: Progress | None = None
    console: str | None = None
    started: Started | None = None
    result: RuntimeStatus | None = None
    error: ErrorDetail | None = None


# -- lifecycle requests --------------------------------------------------------------------------------
class RequestStop(Request):
    timeout: Float | None = Field(default=None, gt=0, le=MAX_WAIT,
                                  description="seconds to wait for the guest to power off (then 504)")


# -- ports ---------------------------------------------------------------------------------------------
class PortAdded(Response):
    forward: str


# -- disks ---------------------------------------------------------------------------------------------
class DiskRow(Response):
    id: str
    kind: str
    attachment: str
    target: str
    read_only: bool
    origin: Literal["boot", "hot-plugged"]
    state: str


class DiskAttached(Response):
    id: str
    port: str | None = None


class DetachDisk(Request):
    timeout: Float = Field(default=30.0, gt=0, le=MAX_WAIT, description="seconds to wait for the guest to release it")


class DiskDetached(Response):
    id: str
    detached: bool


# -- guest access ----------------------------------------------------------------------------------------
class ExecRequest(Request):
    """Run a program in the guest through its agent (no shell: ``argv[0]`` is looked up on the guest's PATH)."""

    argv: list[str] = Field(min_length=1, max_length=4096)
    stdin: Base64Bytes | None = Field(default=None, description="the bytes to feed on stdin (base64)")
    timeout: Float = Field(default=60.0, gt=0, le=MAX_WAIT)


class ExecResult(Response):
    """What the command did: ``stdout``/``stderr`` are bytes in Python, base64 in JSON."""

    exit_code: int
    stdout: Base64Bytes
    stderr: Base64Bytes
    signal: int | None = None

    @classmethod
    def of(cls, exit_code: int, stdout: bytes, stderr: bytes, signal: int | None = None) -> ExecResult:
        """From raw bytes (validation would read them as base64)."""
        return cls.model_construct(exit_code=exit_code, stdout=stdout, stderr=stderr, signal=signal)


class FileWritten(Response):
    path: str
    bytes: int


# -- save, snapshots -----------------------------------------------------------------------------------
class SaveRequest(Request):
    path: str | None = Field(default=None, max_length=4096,
                             description="absolute path of the state file; default: the machine's own")
    keep_running: Bool = False
    force: Bool = Field(default=False, description="replace an existing file that is not a vmkit state file")


class SaveResult(Response):
    path: str
    payload_bytes: int
    file_bytes: int
    seconds: float
    keep_running: bool
    clock: ClockFix | None = None


class SaveLine(Response):
    """One line of the save's NDJSON stream: progress lines, then exactly one result or error."""

    progress: Progress | None = None
    result: SaveResult | None = None
    error: ErrorDetail | None = None


class SnapshotInfo(Response):
    tag: str
    created: float
    vm_state_bytes: int
    guest_clock_seconds: float


class SnapshotCreate(Request):
    tag: str = Field(min_length=1, max_length=63)


class SnapshotReverted(Response):
    tag: str
    state: MachineStateName
    clock: ClockFix | None = None


class SnapshotDeleted(Response):
    tag: str
    deleted: bool


# -- migration -----------------------------------------------------------------------------------------
class MirrorDisk(Request):
    """One disk copied to the target: every write the guest makes from the start is mirrored too."""

    node: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$", description="the disk's node name (its id)")
    target: str = Field(pattern=r"^nbd://(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):\d{1,5}/[A-Za-z][A-Za-z0-9_-]{0,31}$",
                        description="the target's export: nbd://ADDRESS:PORT/NODE")
    sync: Literal["full", "top"] = Field(default="full", description="top: only this image's own layer (the "
                                                                       "target has the same backing image)")


class MigrateRequest(Request):
    """Send the running (or paused) machine to a QEMU waiting at ``uri`` (``vmkit migrate``).

    The source stays paused once the migration has completed, until ``POST /v1/migrate/finish``
    (the target runs it: QEMU here ends) or ``POST /v1/migrate/cancel`` (it runs on here)."""

    uri: str = Field(pattern=IncomingRequest.model_fields["uri"].metadata[0].pattern,
                     description="the target QEMU's incoming address: tcp:ADDRESS:PORT")
    method: Literal["auto", "live", "paused"] = Field(
        default="auto", description="live: pre-copy while the guest runs; paused: copy with the guest paused "
                                    "(no dirty pages to lose); auto: live where that is safe (see `vmkit doctor`)")
    verified: Bool = Field(default=False, description="the caller compares every page afterwards "
                                                      "(/v1/memory-digest): live pre-copy is allowed where it may "
                                                      "lose pages (a loss is then found and the migration undone)")
    downtime_limit_ms: int | None = Field(default=None, strict=True, ge=1, le=2000_000,
                                          description="the longest pause QEMU aims for at the switch-over")
    bandwidth_bytes: int | None = Field(default=None, strict=True, ge=1 << 20,
                                        description="most bytes per second the migration may use")
    auto_converge: Bool = Field(default=False, description="throttle the guest's vCPUs while it dirties "
                                                            "memory faster than the link carries it")
    postcopy: Bool = Field(default=False, description="switch to post-copy after the first round (the target "
                                                       "then runs the guest; a failure from there loses it)")
    mirror: list[MirrorDisk] = Field(default_factory=list, max_length=64,
                                     description="local disks to copy to the target while the guest runs, "
                                                 "before its memory (QEMU's drive-mirror to the target's NBD server)")
    max_rounds: int = Field(default=30, strict=True, ge=2, le=100_000,
                            description="after this many rounds without converging, pause the guest so the "
                                        "copy completes (the migration never runs forever)")


class MigrationProgress(Response):
    status: str = Field(description="QEMU's migration status (setup, active, postcopy-active, device, completed...)")
    rounds: int = Field(description="dirty-page synchronisations so far (1: the first full pass)")
    transferred_bytes: int
    remaining_bytes: int
    total_bytes: int
    dirty_pages_rate: int = Field(description="pages the guest dirties per second")
    mbps: float = Field(description="throughput in megabits per second")
    expected_downtime_ms: int | None = None
    throttle_percent: int | None = None
    elapsed_ms: int | None = None


class MigrationReport(Response):
    """A completed migration: how, and every figure QEMU reported (``query`` is ``query-migrate``)."""

    uri: str
    method: Literal["live", "paused", "postcopy"]
    method_reason: str
    total_time_ms: int | None
    downtime_ms: int | None = Field(description="QEMU's downtime: from its final stop to completion")
    paused_ms: int | None = Field(default=None, description="how long the guest stood paused here: QEMU's "
                                                              "downtime, or the whole copy when it was copied paused")
    setup_time_ms: int | None
    rounds: int
    transferred_bytes: int
    throttle_percent: int | None = None
    disks_copied: list[str] = Field(default_factory=list, description="disks mirrored to the target")
    disk_bytes: int = Field(default=0, description="bytes the disk mirrors copied")
    notes: list[str] = Field(default_factory=list)
    query: dict[str, Any] = Field(description="QEMU's query-migrate answer at the end, as it is")


class MigrateLine(Response):
    """One line of the migration's NDJSON stream: ``progress`` and ``note`` lines, then exactly one
    ``result`` or ``error``."""

    progress: MigrationProgress | None = None
    disks: Progress | None = Field(default=None, description="the disk mirrors: bytes copied of the total")
    note: str | None = None
    result: MigrationReport | None = None
    error: ErrorDetail | None = None


class Takeover(Request):
    timeout: Float = Field(default=120.0, gt=0, le=MAX_WAIT,
                           description="seconds to wait for the incoming migration to complete")


class MigrateFinish(Request):
    target: str = Field(min_length=1, max_length=512, description="where the machine runs now (for the record)")


class MigrationInfo(Response):
    """``GET /v1/migration``: the machine state and QEMU's ``query-migrate`` (either side)."""

    state: MachineStateName
    status: str = Field(description="QEMU's migration status, `none` before any")
    query: dict[str, Any]


class MemoryDigest(Response):
    """A hash of every page of the paused guest's RAM (the migration check)."""

    page_size: int
    pages: int
    digest: Base64Bytes = Field(description="8 bytes (BLAKE2b) per page, in address order; base64 in JSON")

    @classmethod
    def of(cls, page_size: int, digest: bytes) -> MemoryDigest:
        return cls.model_construct(page_size=page_size, pages=len(digest) // 8, digest=digest)


# -- memory and statistics -----------------------------------------------------------------------------
class BalloonRequest(Request):
    """Move the guest's usable memory: the balloon takes the rest back (at most the machine's memory,
    at least 64 MiB)."""

    target: int = Field(strict=True, gt=0, description="the guest's usable memory, in bytes")
    timeout: Float = Field(default=10.0, ge=0, le=300,
                           description="seconds to wait for the guest to reach the target (0: do not wait)")


class BalloonResult(Response):
    """Where the balloon stands: ``reached`` says whether the guest got within 1 MiB of the target
    before the request's timeout (it goes on moving towards it either way)."""

    target_bytes: int
    actual_bytes: int
    reached: bool


class MachineStats(Response):
    """A running machine's resources now (``vmkit stats``)."""

    balloon_bytes: int | None = Field(description="the guest's usable memory (the balloon's actual size); "
                                                  "None without a balloon")
    memory_bytes: int = Field(description="the memory the machine was booted with")
    guest_mem_total_bytes: int | None = Field(description="MemTotal as the guest's balloon driver reports it "
                                                          "(None until it has reported)")
    guest_mem_available_bytes: int | None = Field(description="MemAvailable as the guest's balloon driver "
                                                              "reports it (None until it has reported)")
    host_rss_bytes: int = Field(description="resident memory of the QEMU process on the host")
    ksm_shared_bytes: int | None = Field(description="memory KSM saves on the whole host (host-wide, not this "
                                                     "machine's share); None without KSM")
    vcpus: int = Field(description="configured virtual CPUs")
    cpu_percent: float = Field(description="QEMU's CPU use in percent of one core, since the previous stats "
                                           "request (or over a quarter second)")


# -- events ----------------------------------------------------------------------------------------------
class Event(Response):
    """One line of ``GET /v1/events``. ``kind``: ``hello`` (first line: the state now), ``state-changed``,
    ``guest-stopped``, ``stopped-with-error``, ``qmp`` (any other QEMU event, named in
    ``detail.event``), ``share-failed``, ``nbd-*`` (disk connection changes), ``clock-fixed``..."""

    kind: str
    state: MachineStateName
    detail: dict[str, Any] = Field(default_factory=dict)
    timestamp: float | None = None


# -- the client's own views (no route returns them; they are what vmkit.Client gives) --------------------
class InstanceRow(Response):
    """One machine as ``vmkit list`` shows it. ``state`` adds ``saved`` (a saved state waits to be
    resumed) and ``broken`` (its files cannot be read: ``reason`` says why) to the machine states;
    ``health`` is ``degraded`` while a share's helper is gone (``reason`` says which)."""

    name: str
    state: str
    health: Literal["ok", "degraded"] = "ok"
    cpus: int | None
    memory: str | None
    accel: str | None
    uptime: float | None
    reason: str


class StartResult(Response):
    """How a machine came up: booted, restored from a state file, or started from a snapshot."""

    status: RuntimeStatus
    restored: dict[str, Any] | None = Field(default=None, description="path, payload_bytes, seconds, saved_at, "
                                                                     "suspended_seconds of the state it resumed")
    snapshot: str | None = None
    clock: ClockFix | None = None
    fallback: str | None = Field(default=None, description="why the saved state was not used (a cold boot instead)")
    discarded: str | None = Field(default=None, description="where an unusable saved state was moved aside")
    notes: list[str] = Field(default_factory=list, description="what the user should know, e.g. a moved SSH port")


class SaveOutcome(SaveResult):
    """A save as the client reports it: the result, and the machine's status after it (``stopped``, or
    ``running``/``paused`` with ``keep_running``)."""

    status: RuntimeStatus


class ShareRow(Response):
    """One shared folder of a machine (``vmkit mount list``). ``state``: ``stopped`` (the machine is not
    running), ``active``, or ``failed (...)`` with why (its virtiofsd died, its sshfs link ended)."""

    tag: str
    type: str
    host_path: str
    guest_path: str
    read_only: bool
    state: str


class KeyInfo(Response):
    """The state-file key of this user (``vmkit key show``): where it is, its fingerprint (``key_id``,
    None before the first save creates it), and keys kept by an unfinished rotation."""

    path: str
    key_id: str | None
    retired_key_ids: list[str]


class SkippedFile(Response):
    path: str
    reason: str


class KeyRotation(Response):
    """What ``vmkit key rotate`` did: the new key (in ``path``) replaced the old one, these files were
    re-encrypted, and these discarded saved states could not be read and were left as they were."""

    path: str
    old_key_id: str
    new_key_id: str
    reencrypted: list[str]
    skipped: list[SkippedFile] = Field(default_factory=list)
