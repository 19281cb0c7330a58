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

from vmkit.config import Bool, Float, Limits

# defined with the state file they describe (below the API), re-exported as part of the contract
from vmkit.host.status import MachineStateName as MachineStateName
from vmkit.host.status import RuntimeStatus as RuntimeStatus
from vmkit.net.store import NetworkMember as NetworkMember
from vmkit.net.store import NetworkView as NetworkView

API_VERSION = "v1"

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
class ClockFix(Response):
    """What the clock fix-up did after the guest's clock stood still (pause, restore, revert)."""

    corrected: bool
    behind_seconds: float | None
    message: str


class ResumeResult(RuntimeStatus):
    model_config = ConfigDict(frozen=True)

    clock: ClockFix


class StopResult(RuntimeStatus):
    model_config = ConfigDict(frozen=True)

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
    tls: Bool = Field(default=False, description="the migration stream is TLS: the CA, server certificate and key "
                                                 "are in the instance's migration-tls/ directory (the client must "
                                                 "present a certificate of that CA)")
    ram_pad: int | None = Field(default=None, strict=True, ge=0, le=1 << 20,
                                description="bytes of RAM over the configured memory, as the source has them "
                                            "(None: what this host's QEMU needs)")


class StartRequest(Request):
    """How to bring the machine up: boot it (no fields), start it from a state file or a snapshot, or
    receive it from another host (``incoming``: it stays paused until ``POST /v1/resume``)."""

    restore: str | None = Field(default=None, max_length=4096, description="absolute path of a state file")
    force: Bool = Field(default=False, description="restore even if the disks changed since the save")
    consume: Bool = Field(default=False, description="delete the state file once the machine runs from it")
    snapshot: str | None = Field(default=None, max_length=63, description="start from this snapshot")
    paused: Bool = Field(default=False, description="stay paused after restoring")
    incoming: IncomingRequest | None = Field(default=None, description="receive the machine by migration")
    template: str | None = Field(default=None, max_length=4096,
                                 description="absolute path of a warm template to clone the running machine from")

    @property
    def active(self) -> bool:
        """Whether the machine starts from saved state (or a migration) rather than booting."""
        return (self.restore is not None or self.snapshot is not None or self.incoming is not None
                or self.template is not None)


class Started(Response):
    """What a start from saved state did."""

    restored: dict[str, Any] | None = Field(default=None, description="path, payload_bytes, seconds, saved_at, "
                                                                     "suspended_seconds of the state it resumed")
    snapshot: str | None = None
    incoming: str | None = Field(default=None, description="where QEMU waits for the migration stream")
    template: dict[str, Any] | None = Field(default=None, description="path, restore_seconds, personalize_seconds "
                                            "of the warm template the machine was cloned from; phases (seconds "
                                            "of each step in order), parallel (steps beside the last), "
                                            "identity_steps (seconds of each step of the identity script, as "
                                            "the guest timed them), process_started and began_at (the "
                                            "supervisor's, wall clock)")
    clock: ClockFix | None = None


class StartLine(Response):
    """One line of the start's NDJSON stream: ``progress`` (a state file loading), ``console`` (the
    guest's last console line, while it boots), ``started`` (what was restored), then exactly one
    ``result`` (the machine is ready) or ``error``."""

    progress: Progress | None = None
    console: str | None = None
    started: Started | None = None
    note: str | None = Field(default=None, description="what the user should know (e.g. a stale cgroup removed)")
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
    tls: Bool = Field(default=False, description="TLS for the migration stream: the CA, client certificate and key "
                                                 "are in the instance's migration-tls/ directory")
    max_rounds: int = Field(default=30, strict=True, ge=2, le=100_000,
                            description="after this many rounds without converging, pause the guest so the "
                                        "copy completes (the migration never runs forever)")
    host: str | None = Field(default=None, max_length=512, pattern=r"^ssh://[^\s]+$",
                             description="the target host's vmkit (ssh://[user@]HOST[:PORT]): named in messages, and "
                                         "asked by `vmkit migrate --cancel` whether it took the machine over")


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
    """One line of the migration's NDJSON stream: ``progress`` and ``note`` lines, ``completed`` once
    (the moment QEMU says the copy completed), then exactly one ``result`` or ``error``."""

    progress: MigrationProgress | None = None
    disks: Progress | None = Field(default=None, description="the disk mirrors: bytes copied of the total")
    note: str | None = None
    completed: bool | None = Field(default=None, description="QEMU says the copy completed (the guest stands "
                                   "paused here): the target may run it now; the report follows")
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
    method: Literal["live", "paused", "unknown"] = Field(
        default="unknown", description="how `auto` would migrate this machine now (unknown: it does not run)")
    method_reason: str = Field(default="", description="why that method (see `vmkit doctor`)")
    ram_pad: int | None = Field(default=None, description="bytes of RAM over the configured memory (the target's "
                                                          "QEMU needs the same; None: it does not run)")
    handed_to: str | None = Field(default=None, description="the source side after a completed migration that was "
                                  "neither finished nor taken back: the target it went to (the guest stays paused "
                                  "here; resume, save and snapshots are refused)")


class MemoryDigest(Response):
    """A hash of every page of the paused guest's RAM (the migration check)."""

    page_size: int
    pages: int
    digest: Base64Bytes = Field(description="8 bytes per page (a weighted sum of its 64-bit words, "
                                            "vmkit.runtime.migration.page_hashes), in address order; base64 in JSON")

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


class CpusRequest(Request):
    """Give the running machine this many vCPUs (at least 1, at most its max_cpus)."""

    cpus: int = Field(strict=True, ge=1, le=64, description="the number of vCPUs the machine should have")
    timeout: Float = Field(default=30.0, ge=0, le=300,
                           description="seconds to wait for the guest to release vCPUs it gives up")


CpuMethod = Literal["hotplug", "unplug", "guest-offline", "guest-online", "guest-online+hotplug", "unchanged",
                    "next-boot"]
"""How ``vmkit set --cpus`` made a change (vmkit.runtime.vcpus.METHODS says each in words)."""


class CpusResult(Response):
    """The vCPUs after the change (also written to vm.yaml as ``cpus``, what the next boot starts with)."""

    cpus: int = Field(description="the vCPUs asked for")
    vcpus_online: int | None = Field(description="the vCPUs the guest can run on now: QEMU's, less those offlined "
                                                 "in the guest (None: the machine is stopped, and only vm.yaml "
                                                 "changed)")
    max_cpus: int = Field(description="the most the machine can have while it runs")
    added: list[int] = Field(description="indexes of the vCPUs added")
    removed: list[int] = Field(description="indexes of the vCPUs removed")
    offlined: list[int] = Field(default_factory=list, description="indexes of the vCPUs taken offline in the guest "
                                "through its agent (under TCG, instead of removing them): QEMU keeps them, halted, "
                                "until the next boot, which starts with cpus")
    onlined: list[int] = Field(default_factory=list, description="indexes of offlined vCPUs brought back online in "
                               "the guest")
    method: CpuMethod = Field(default="unchanged", description="how the change was made: device_add, "
                    "device_del, offlined in the guest (unplugged at the next boot), brought back online in the "
                    "guest (then device_add for the rest), nothing to do, or vm.yaml only (a stopped machine)")
    note: str = Field(default="", description="the method in words")


class MemoryRequest(Request):
    """Give the running machine this much memory: its boot memory plus what the virtio-mem region
    plugs (at most max_memory; the part above the boot memory a multiple of 2 MiB)."""

    memory: int = Field(strict=True, gt=0, description="the machine's memory in bytes, boot memory included")
    timeout: Float = Field(default=10.0, ge=0, le=300,
                           description="seconds to wait for the guest to plug or unplug it (0: do not wait)")


class MemoryResult(Response):
    """Where the memory stands: ``reached`` says whether the guest plugged exactly what was asked
    before the timeout (it goes on trying either way; a shrinking guest may keep memory it uses)."""

    memory_bytes: int = Field(description="the memory asked for (written to vm.yaml: memory + plugged_memory)")
    plugged_bytes: int | None = Field(description="memory the guest has plugged above its boot memory now "
                                                  "(None: the machine is stopped, and only vm.yaml changed)")
    boot_memory_bytes: int = Field(description="the memory the machine booted with (cannot be unplugged)")
    max_memory_bytes: int = Field(description="the most the machine can have")
    reached: bool


class MachineStats(Response):
    """A running machine's resources now (``vmkit stats``)."""

    balloon_bytes: int | None = Field(description="the guest's usable boot memory (the balloon's actual size: "
                                                  "the balloon works on memory_bytes only; add "
                                                  "memory_plugged_bytes for all it can use); None without a balloon")
    memory_bytes: int = Field(description="the memory the machine was booted with")
    guest_mem_total_bytes: int | None = Field(description="MemTotal as the guest's balloon driver reports it "
                                                          "(None until it has reported)")
    guest_mem_available_bytes: int | None = Field(description="MemAvailable as the guest's balloon driver "
                                                              "reports it (None until it has reported)")
    host_rss_bytes: int = Field(description="resident memory of the QEMU process on the host")
    ksm_shared_bytes: int | None = Field(description="memory KSM saves on the whole host (host-wide, not this "
                                                     "machine's share); None without KSM")
    ksm_merged_bytes: int | None = Field(default=None, description="this machine's memory that KSM merged with "
                                                                  "identical pages (Linux 6.1+; None where unknown)")
    vcpus: int = Field(description="configured virtual CPUs (vm.yaml's cpus, which `vmkit set --cpus` changes)")
    vcpus_online: int = Field(description="the vCPUs the guest can run on now: QEMU's (query-cpus-fast), less "
                                          "those vmkit offlined in the guest")
    vcpus_offlined: int = Field(default=0, description="vCPUs QEMU still has, halted, that `vmkit set --cpus` "
                                                       "offlined in the guest (under TCG); gone at the next boot")
    max_cpus: int = Field(description="the most vCPUs the machine can have while it runs")
    memory_plugged_bytes: int | None = Field(description="memory the guest has plugged into its virtio-mem "
                                                         "region, above memory_bytes; None without one")
    max_memory_bytes: int | None = Field(description="the most memory the machine can have (max_memory); "
                                                     "None without a virtio-mem region")
    cpu_percent: float = Field(description="QEMU's CPU use in percent of one core, since the previous stats "
                                           "request (or over a quarter second)")
    steal_percent: float | None = Field(default=None, description="time the vCPU threads were runnable but "
                                        "waited for a host CPU (or were held back by cpu_max), in percent, averaged "
                                        "over the vCPUs, since the previous stats request (the host's view: a TCG "
                                        "guest sees no steal)")
    limits: Limits = Field(default_factory=Limits, description="the cgroup limits in force (as in vm.yaml)")
    cgroup: str | None = Field(default=None, description="the machine's cgroup directory (v1: the memory "
                                                         "hierarchy's; None without a cgroup)")
    cgroup_version: int | None = Field(default=None, description="1 or 2 (None without a cgroup)")
    cgroup_files: dict[str, str | None] = Field(default_factory=dict,
                                                description="what the kernel holds now, file name -> value")


class LimitsRequest(Request):
    """Change the machine's cgroup limits live (``vmkit set``): a field given replaces the value in force,
    ``null`` removes that limit, a field left out stays as it is. Sizes in bytes, ``cpu_max`` in percent
    of one host core, ``cpu_pin`` a host CPU list such as ``0-1,3``."""

    cpu_weight: int | None = Field(default=None, strict=True, ge=1, le=10000)
    cpu_max: int | None = Field(default=None, strict=True, ge=1, le=6400)
    cpu_pin: str | None = Field(default=None, max_length=200)
    memory_min: int | None = Field(default=None, strict=True, ge=0, le=1 << 50)
    memory_high: int | None = Field(default=None, strict=True, ge=0, le=1 << 50)
    memory_max: int | None = Field(default=None, strict=True, ge=0, le=1 << 50)
    swap_max: int | None = Field(default=None, strict=True, ge=0, le=1 << 50)


class LimitsResult(Response):
    """The limits now in force (also written to vm.yaml), what was written to the cgroup, and the host
    CPU each vCPU thread is pinned to (in vCPU order; empty without ``cpu_pin``)."""

    limits: Limits
    cgroup: str | None
    cgroup_version: int | None
    written: list[str] = Field(description="FILE=VALUE, in the order written")
    pinned: list[int] = Field(default_factory=list)


# -- automatic ballooning (host-wide; no supervisor route: vmkit.backends.local.balloonctl) ---------------
class AutoballoonGuest(Response):
    """One running machine as the automatic balloon controller saw it in its last round."""

    name: str
    memory_bytes: int
    balloon_bytes: int
    guest_mem_available_bytes: int | None
    balloon_min_bytes: int
    balloon_shares: int
    pressure: bool = Field(description="short of memory: grown first, shrunk last")
    target_bytes: int | None = Field(default=None, description="the balloon target set in that round, if any")


class AutoballoonStatus(Response):
    """``vmkit host autoballoon status``: whether the controller runs, its settings, and its last round."""

    running: bool
    pid: int | None = None
    already_running: bool = Field(default=False, description="`on` found it running and changed nothing")
    target_percent: float | None = None
    step_bytes: int | None = None
    interval_seconds: float | None = None
    meminfo: str | None = Field(default=None, description="where it reads the host's memory figures")
    rounds: int = 0
    changes: int = Field(default=0, description="balloon targets set since it started")
    last_round_at: str | None = None
    host_total_bytes: int | None = None
    host_used_bytes: int | None = None
    goal_bytes: int | None = Field(default=None, description="target - used: positive = room for the guests, "
                                                             "negative = memory to take back")
    action: str | None = Field(default=None, description="grow, shrink or none (the last round)")
    guests: list[AutoballoonGuest] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list, description="what went wrong in the last round")
    log: str | None = None


# -- screen and keyboard -------------------------------------------------------------------------------
HoldMs = Field(default=50, strict=True, ge=1, le=10_000, description="how long each press is held (ms)")


class KeysRequest(Request):
    """Key presses, one after the other; each is a QEMU key name (``a``, ``ret``, ``f2``, ``ctrl``...) or
    a combination pressed together, joined with ``-`` (``ctrl-alt-delete``; the minus key is ``minus``)."""

    keys: list[str] = Field(min_length=1, max_length=4096)
    hold_ms: int = HoldMs


class TypeRequest(Request):
    """Text typed on a US keyboard layout (printable ASCII, newlines and tabs; shift where needed)."""

    text: str = Field(min_length=1, max_length=4096)
    hold_ms: int = HoldMs


class KeysSent(Response):
    """The presses were queued in QEMU, which delivers them to the guest one after the other."""

    presses: int


class DisplayInfo(Response):
    """The machine's display: its device, its size now, and the size it booted with (the largest its
    fbdev console can show)."""

    type: str
    width: int
    height: int
    boot_width: int
    boot_height: int


class DisplayResize(Request):
    width: int = Field(strict=True, ge=320, le=8192)
    height: int = Field(strict=True, ge=200, le=8192)
    timeout: Float = Field(default=10.0, ge=0, le=120, description="seconds to wait for the guest to change mode")


class DisplayResized(Response):
    """The display's size after the request: ``reached`` says whether it is the size asked for (a
    guest caps a larger one to the largest mode it can show)."""

    width: int
    height: int
    requested_width: int
    requested_height: int
    reached: bool


class WebConsoleRequest(Request):
    port: int = Field(default=0, strict=True, ge=0, le=65535,
                      description="loopback port to serve the page on the first time (0: any free port)")


class WebConsole(Response):
    """Open ``url`` in a browser on this host: its token works once, within ``expires_in`` seconds."""

    url: str
    port: int
    expires_in: float


# -- events ----------------------------------------------------------------------------------------------
class Event(Response):
    """One line of ``GET /v1/events``. ``kind``: ``hello`` (first line: the state now), ``state-changed``,
    ``guest-stopped``, ``stopped-with-error``, ``qmp`` (any other QEMU event, named in
    ``detail.event``), ``share-failed``, ``nbd-*`` (disk connection changes), ``clock-fixed``,
    ``limits-changed`` (``detail``: ``limits`` now in force, ``cgroup``, ``written``),
    ``cpus-changed`` (``detail``: ``cpus``, ``vcpus_online``, ``previous``, ``method``, ``note``), ``memory-changed``
    (``detail``: ``memory_bytes``, ``plugged_bytes``)..."""

    kind: str
    state: MachineStateName
    detail: dict[str, Any] = Field(default_factory=dict)
    timestamp: float | None = None


# -- the client's own views (no route returns them; they are what vmkit.Client gives) --------------------
class InstanceRow(Response):
    """One machine as ``vmkit list`` shows it. ``state`` adds ``saved`` (a saved state waits to be
    resumed), ``migrated`` (it runs on another host now: ``reason`` says where) and ``broken`` (its
    files cannot be read: ``reason`` says why) to the machine states;
    ``health`` is ``degraded`` while a share's helper is gone (``reason`` says which)."""

    name: str
    state: str
    health: Literal["ok", "degraded"] = "ok"
    cpus: int | None
    memory: str | None
    accel: str | None
    uptime: float | None
    reason: str
    addresses: dict[str, str] = Field(default_factory=dict, description="the machine's address on each vmkit "
                                      "network it is on, by network name")


class NetworkDeleted(Response):
    """What ``vmkit network delete`` removed from the host."""

    name: str
    removed: list[str] = Field(default_factory=list)


class MachineTop(Response):
    """One running machine as ``vmkit top`` shows it: its state and its :class:`MachineStats` now
    (``stats`` None and ``error`` set if they could not be read, e.g. it stopped meanwhile)."""

    name: str
    state: str
    stats: MachineStats | None = None
    error: str | None = None


class StartResult(Response):
    """How a machine came up: booted, restored from a state file, or started from a snapshot."""

    status: RuntimeStatus
    restored: dict[str, Any] | None = Field(default=None, description="path, payload_bytes, seconds, saved_at, "
                                                                     "suspended_seconds of the state it resumed")
    snapshot: str | None = None
    template: dict[str, Any] | None = Field(default=None, description="path, restore_seconds, personalize_seconds "
                                            "of the warm template it was cloned from; phases, parallel, "
                                            "identity_steps, process_started, began_at (see Started)")
    clock: ClockFix | None = None
    fallback: str | None = Field(default=None, description="why the saved state or warm template was not used "
                                                           "(a cold boot instead)")
    discarded: str | None = Field(default=None, description="where an unusable saved state was moved aside")
    notes: list[str] = Field(default_factory=list, description="what the user should know, e.g. a moved SSH port")


class ImageInfo(Response):
    """An image in the image cache (``vmkit image list``; what build, pull and import return)."""

    name: str
    kind: str = Field(description="initramfs (kernel and initrd) or disk (with a root disk)")
    directory: str
    kernel: str | None = None
    initrd: str | None = None
    disk: str | None = None
    kernel_version: str | None = None
    size: int = Field(description="bytes of its files")
    created: float
    source: str = Field(default="", description="how it was made (the packages, or the URL it was pulled from)")
    recipe: str | None = Field(default=None, description="the vmkit recipe that built it (None: pulled)")
    outdated: bool = Field(default=False, description="built by an older recipe (see note)")
    note: str | None = Field(default=None, description="what to do about it, when outdated")


class ImageExported(Response):
    """An image written to an archive (``vmkit image export``)."""

    name: str
    path: str
    size: int = Field(description="bytes of the archive")


class WarmTemplate(Response):
    """A warm template (``vmkit image warm``): a booted image's running state new machines start from."""

    path: str
    image: str
    memory: int
    cpus: int
    qemu_version: str
    machine_type: str
    created: float
    boot_seconds: float = Field(description="how long the template's boot took, until it was ready and settled")
    ram_bytes: int
    devices_bytes: int


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
