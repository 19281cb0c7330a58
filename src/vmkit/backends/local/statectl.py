"""Save, restore and snapshot operations on instances, as the CLI and scripts use them.

Like :mod:`vmkit.backends.local.control`, each function is one user-level action; running machines are reached
through their supervisor (:mod:`vmkit.daemon.state_routes` serves the routes).

The everyday form
=================
``vmkit stop --save NAME`` is :func:`save` to the instance's own state file
(``<instance>/saved.vmstate``, :attr:`Instance.saved_state_path`); ``vmkit list`` shows such an
instance as ``saved``. ``vmkit start NAME`` is :func:`start`: if that file exists it resumes from
it, and deletes it once the machine runs (a state is resumed once: the guest and its disks move on).

Fallback policy: if the saved state cannot be used (any :class:`~vmkit.state.file.StateFileError`:
not a state file, unsupported version, other QEMU or machine type, configuration changed,
authentication failed, disks changed, QEMU refused the stream) :func:`start` says why, *keeps*
the file renamed to ``saved.vmstate.discarded`` (replacing an older one) and cold-boots. Keeping it
costs one file but loses nothing: after putting the configuration or key back, or with disks
restored from a copy, ``vmkit restore NAME <that file> [--force]`` can still use it; and the
rename guarantees the next ``start`` does not trip over it again. A problem that is not the
file's (an unsafe key file, QEMU missing) is raised instead, and the file stays where it is.

Copying disks with a save: a state file does not contain the disks, it records their
identities. To keep a save restorable elsewhere or later, copy the disk images *while the machine
is stopped after the save*, preserving timestamps (``cp -a`` / ``cp --preserve=timestamps`` /
``rsync -t``); a copy in another place restores fine (identity = size, mtime, first 64 KiB).
After ``vmkit save --keep-running`` the guest writes on, so the disks no longer match the
save: restoring it needs disks copied right after the save, or ``--force`` (at your own risk:
the guest's view of its disks then disagrees with what is on them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vmkit.api import SupervisorClient
from vmkit.api.models import StartRequest
from vmkit.backends.local import control, provisioning
from vmkit.errors import STATE_FILE_CODES, ExitCode, NotFoundError, StateError, VmkitError, error_from_fields
from vmkit.host.images.store import ImageStore
from vmkit.host.instance import LIVE, Instance, Status, take_exclusive
from vmkit.runtime import migration
from vmkit.runtime.qemu import accel as accel_mod
from vmkit.state import key as keys
from vmkit.state import savestate, template
from vmkit.state.file import (
    AuthenticationFailed,
    ProgressCallback,
    StateFileError,
    StateFileWriter,
    StateHeader,
    read_info,
    reencrypt,
)
from vmkit.state.savestate import SnapshotInfo


@dataclass(frozen=True)
class Note:
    """What the user should be told while a machine comes up. ``kind``: ``resuming`` (from its saved
    state), ``booting`` (a cold boot instead), ``discarded`` (its saved state was moved aside);
    ``warning``: something was not as the user may expect."""

    kind: Literal["resuming", "booting", "discarded"]
    message: str
    warning: bool = False

    def __str__(self) -> str:
        return self.message


Notice = Callable[[Note], None]

DISCARDED_SUFFIX = ".discarded"


# --------------------------------------------------------------------------- save


@dataclass(frozen=True)
class SaveOutcome:
    path: Path
    payload_bytes: int
    file_bytes: int
    seconds: float
    keep_running: bool
    status: Status
    clock: dict[str, Any] | None = None
    """The clock fix-up after ``keep_running`` resumed the machine (its clock stood still meanwhile)."""


def _supervised(name: str, operation: str) -> Instance:
    inst = control.get(name)
    status = inst.reconcile()
    if not inst.is_supervised():
        raise StateError(operation, _shown_state(inst, status), ["running", "paused"])
    return inst


def _shown_state(inst: Instance, status: Status) -> str:
    return "saved" if status.state not in LIVE and inst.saved_state_path.exists() else status.state


def save(name: str, path: Path | None = None, *, keep_running: bool = False, force: bool = False,
         progress: ProgressCallback | None = None, timeout: float = 600.0) -> SaveOutcome:
    """Pause ``name``, save its state (default: the instance's own state file), then stop it.

    With ``keep_running`` the machine resumes instead (if it was running). ``progress(done,
    None)`` reports the bytes written. State-file errors are raised as their own classes.
    The supervisor refuses a target that would destroy something
    (:func:`vmkit.state.savestate.check_save_target`); ``force`` lets it replace an existing regular
    file that is not a state file.
    """
    inst = _supervised(name, "save the machine state")
    target = Path(path).expanduser().absolute() if path is not None else inst.saved_state_path
    api = SupervisorClient(inst.api_socket, timeout=timeout)

    async def run() -> dict[str, Any]:
        async for msg in api.stream("POST", "/v1/save", {"path": str(target), "keep_running": keep_running,
                                                           "force": force}):
            if "progress" in msg and progress is not None:
                progress(int(msg["progress"]["done"]), msg["progress"].get("total"))
            elif "error" in msg:
                raise error_from_fields(msg["error"])
            elif "result" in msg:
                result: dict[str, Any] = msg["result"]
                return result
        raise VmkitError(f"{name}: the supervisor ended the save without a result",
                         hint=f"see {inst.supervisor_log}")

    result = asyncio.run(run())
    if not keep_running:
        control.wait_unsupervised(inst, 30.0)
    return SaveOutcome(path=Path(result["path"]), payload_bytes=int(result["payload_bytes"]),
                       file_bytes=int(result["file_bytes"]), seconds=float(result["seconds"]),
                       keep_running=keep_running, status=inst.reconcile(), clock=result.get("clock"))


# --------------------------------------------------------------------------- start / restore


@dataclass
class StartOutcome:
    """How :func:`start` / :func:`restore` brought the machine up."""

    status: Status
    restored: dict[str, Any] | None = None
    """What was restored (path, payload_bytes, seconds, saved_at, suspended_seconds), if anything."""
    snapshot: str | None = None
    clock: dict[str, Any] | None = None
    """The clock fix-up (corrected, behind_seconds, message), when the machine was resumed."""
    fallback: str | None = None
    """Why the saved state was not used, when ``start`` cold-booted instead."""
    discarded: Path | None = None
    notes: list[str] = field(default_factory=list)
    template: dict[str, Any] | None = None
    """The warm template the machine was cloned from (path, restore_seconds, personalize_seconds), if it was."""


def saved_header(name: str) -> StateHeader | None:
    """The header of ``name``'s saved state (authenticated), or None if it has none."""
    inst = control.get(name)
    path = inst.saved_state_path
    return savestate.read_verified_header(path) if path.exists() else None


def discard_saved_state(inst: Instance) -> Path:
    """Move the instance's saved state aside (``saved.vmstate.discarded``); return where it went."""
    src = inst.saved_state_path
    dst = src.with_name(src.name + DISCARDED_SUFFIX)
    os.replace(src, dst)
    return dst


def _listener(outcome: StartOutcome, state_progress: ProgressCallback | None) -> Callable[[dict[str, Any]], None]:
    """What a start reports before its outcome, recorded in ``outcome`` (and the byte progress)."""
    def on_message(msg: dict[str, Any]) -> None:
        if "progress" in msg and state_progress is not None:
            state_progress(int(msg["progress"]["done"]), msg["progress"].get("total"))
        elif "started" in msg:
            started = msg["started"]
            outcome.restored = started.get("restored")
            outcome.snapshot = started.get("snapshot")
            outcome.clock = started.get("clock")
            outcome.template = started.get("template")
        elif "note" in msg:
            outcome.notes.append(str(msg["note"]))

    return on_message


def _launch(name: str, plan: StartRequest | None, outcome: StartOutcome, *, progress: control.Progress | None,
            state_progress: ProgressCallback | None, timeout: float | None) -> StartOutcome:
    outcome.status = control.start(name, progress=progress, timeout=timeout, plan=plan,
                                   on_message=_listener(outcome, state_progress))
    if plan is None:  # a boot (not a resumed state)
        _provision(name, outcome, progress)
    return outcome


def _provision(name: str, outcome: StartOutcome, progress: control.Progress | None) -> StartOutcome:
    """The machine's template provisioning and probes, after a boot or a first start cloned from a warm
    image template (to the user both are a machine's first run; a resumed state is not)."""
    message = provisioning.run(name, progress=progress)
    if message:
        outcome.notes.append(message)
    return outcome


def _is_state_file_problem(exc: VmkitError) -> bool:
    # an error from the supervisor comes back as its own class when this process has imported it,
    # else as its exit code; an unsafe key (KeyFileError) is caught by the precheck in this
    # process, before the supervisor is started
    return isinstance(exc, StateFileError) or (exc.exit_code in STATE_FILE_CODES and type(exc) is VmkitError)


def start(name: str, *, progress: control.Progress | None = None, timeout: float | None = None,
          cold: bool = False, state_progress: ProgressCallback | None = None,
          notice: Notice | None = None) -> StartOutcome:
    """``vmkit start``: resume from the instance's saved state if it has one, else boot.

    ``cold`` ignores the saved state (it is moved aside as with an unusable one). ``notice``
    receives what the user should be told (resuming, or why the saved state was not used).
    See the module docstring for the fallback policy.
    """
    inst = control.get(name)
    say = notice or (lambda _n: None)
    outcome = StartOutcome(status=inst.reconcile())
    saved = inst.saved_state_path
    if inst.is_supervised() or not saved.exists():
        if inst.is_supervised():
            warm = None
        elif cold:
            template.consume_reference(inst.dir)  # booted once, its disk no longer matches the template's RAM
            warm = None
        else:
            warm = _warm_plan(inst, outcome, say)
        if warm is None:
            return _launch(name, None, outcome, progress=progress, state_progress=None, timeout=timeout)
        try:
            _launch(name, warm, outcome, progress=progress, state_progress=None, timeout=timeout)
        except (VmkitError, OSError) as exc:
            if isinstance(exc, VmkitError) and exc.exit_code in (ExitCode.TIMEOUT, ExitCode.INTERRUPTED):
                raise
            message = exc.message if isinstance(exc, VmkitError) else str(exc)
            outcome.fallback = f"the warm template failed: {message}"
            say(Note("booting", f"{name} could not be cloned from its warm template: {message}\n"
                                f"cold-booting {name}", warning=True))
            control.wait_unsupervised(inst, 30.0)
            return _launch(name, None, outcome, progress=progress, state_progress=None, timeout=timeout)
        return _provision(name, outcome, progress)  # outside the fallback: a failing script fails the start
    if cold:
        outcome.discarded = discard_saved_state(inst)
        outcome.fallback = "a cold boot was asked for"
        say(Note("booting", f"{name}: not resuming its saved state (cold boot asked for); "
                            f"it was kept as {outcome.discarded}"))
        return _launch(name, None, outcome, progress=progress, state_progress=None, timeout=timeout)
    try:
        config = inst.load_config()
        header = savestate.precheck(saved, config, accel_mod.choose(config.accel.value, arch=config.arch))
        say(Note("resuming", f"resuming {name} from its saved state (saved {_ago(header)}, "
                             f"{_mib(saved.stat().st_size)})"))
        return _launch(name, StartRequest(restore=str(saved), consume=True), outcome, progress=progress,
                       state_progress=state_progress, timeout=timeout)
    except VmkitError as exc:
        if not _is_state_file_problem(exc):
            raise
        if saved.exists():
            outcome.discarded = discard_saved_state(inst)
        outcome.fallback = exc.message
        kept = f"; it was kept as {outcome.discarded}" if outcome.discarded else ""
        say(Note("booting", f"the saved state of {name} cannot be used: {exc.message}{kept}\n"
                            f"cold-booting {name}: the guest starts afresh (what it had not written to disk "
                            "before the save is lost)", warning=True))
    return _launch(name, None, outcome, progress=progress, state_progress=None, timeout=timeout)


def _warm_plan(inst: Instance, outcome: StartOutcome, say: Notice) -> StartRequest | None:
    """A start from the warm template ``inst`` was created from, if it can use it (else say why: it boots cold)."""
    ref = template.reference(inst.dir)
    if ref is None:
        return None
    template.consume_reference(inst.dir)  # warm or cold, this start moves the disk on from the template's
    config = inst.load_config()
    try:
        tpl = template.load(Path(ref.path))
        image = ImageStore().get(config.image) if config.image else None
    except VmkitError as exc:
        reasons = [exc.message]
    else:
        reasons = template.unusable_reasons(tpl, config, accel_mod.choose(config.accel.value), image=image,
                                            qemu_version=migration.host_qemu_version())
    if reasons:
        outcome.fallback = "; ".join(reasons)
        say(Note("booting", f"{inst.name} cannot start from its warm template: {outcome.fallback}\n"
                            f"cold-booting {inst.name} (`vmkit image warm {config.image}` makes a current template)",
                 warning=True))
        return None
    say(Note("resuming", f"cloning {inst.name} from the warm template of {config.image} "
                         f"({tpl.manifest.memory >> 20} MiB, {tpl.manifest.cpus} vCPUs)"))
    return StartRequest(template=str(tpl.directory))


def restore(name: str, path: Path | None = None, *, force: bool = False, paused: bool = False,
            progress: control.Progress | None = None, state_progress: ProgressCallback | None = None,
            timeout: float | None = None) -> StartOutcome:
    """``vmkit restore``: start the STOPPED instance ``name`` from a state file (default: its own).

    Unlike :func:`start` nothing falls back: a file that cannot be used raises its error (and is
    left where it is). ``force`` restores despite changed disks. The instance's own state file
    is consumed (deleted) once the machine runs from it; a file given by path is kept.
    """
    inst = control.get(name)
    status = inst.reconcile()
    if inst.is_supervised():
        raise StateError("restore a saved state", status.state, ["stopped"])
    own = path is None
    target = inst.saved_state_path if path is None else Path(path).expanduser().absolute()
    if own and not target.exists():
        raise NotFoundError("saved state of", name, hint=f"save one with `vmkit stop --save {name}` or "
                            f"`vmkit save {name}`, or give a state file: vmkit restore {name} FILE")
    config = inst.load_config()
    savestate.precheck(target, config, accel_mod.choose(config.accel.value, arch=config.arch), force=force)
    plan = StartRequest(restore=str(target), force=force, consume=own, paused=paused)
    return _launch(name, plan, StartOutcome(status=status), progress=progress, state_progress=state_progress,
                   timeout=timeout)


def _ago(header: StateHeader) -> str:
    seconds = max(0.0, time.time() - header.created_at.timestamp())
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"on {header.created_at.astimezone().strftime('%Y-%m-%d %H:%M')}"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# --------------------------------------------------------------------------- snapshots


def _snapshot_rows(data: Any) -> list[SnapshotInfo]:
    return [SnapshotInfo(tag=str(d["tag"]), created=float(d["created"]), vm_state_bytes=int(d["vm_state_bytes"]),
                         guest_clock_seconds=float(d["guest_clock_seconds"])) for d in data]


def snapshot_list(name: str) -> list[SnapshotInfo]:
    """The machine snapshots of ``name`` (running: from QEMU; stopped: from the disk images)."""
    inst = control.get(name)
    inst.reconcile()
    if inst.is_supervised():
        return _snapshot_rows(SupervisorClient(inst.api_socket).call("GET", "/v1/snapshots"))
    return savestate.list_snapshots_offline(inst.load_config())


def default_tag() -> str:
    return time.strftime("snap-%Y%m%d-%H%M%S")


def snapshot_create(name: str, tag: str | None = None) -> SnapshotInfo:
    """Snapshot the running or paused machine ``name`` (RAM and disks) under ``tag``."""
    inst = _supervised(name, "create a snapshot")
    tag = tag or default_tag()
    data = SupervisorClient(inst.api_socket, timeout=900).call("POST", "/v1/snapshots", {"tag": tag}, timeout=900)
    return _snapshot_rows([data])[0]


def snapshot_revert(name: str, tag: str, *, progress: control.Progress | None = None,
                    timeout: float | None = None, notice: Notice | None = None) -> StartOutcome:
    """Go back to snapshot ``tag``: RAM and disks as they were, the machine running as it was.

    A running or paused machine loads it in place (it keeps running or stays paused). A stopped
    machine is started from it; its saved state, if any, belongs to another timeline and is moved
    aside (as ``saved.vmstate.discarded``).
    """
    inst = control.get(name)
    status = inst.reconcile()
    if inst.is_supervised():
        data = SupervisorClient(inst.api_socket, timeout=900).call("POST", f"/v1/snapshots/{tag}/revert",
                                                                   timeout=900)
        return StartOutcome(status=inst.reconcile(), snapshot=tag, clock=data.get("clock"))
    config = inst.load_config()
    if not any(s.tag == tag for s in savestate.list_snapshots_offline(config)):
        raise NotFoundError("snapshot", tag, hint=f"see `vmkit snapshot list {name}`")
    outcome = StartOutcome(status=status)
    if inst.saved_state_path.exists():
        outcome.discarded = discard_saved_state(inst)
        if notice is not None:
            notice(Note("discarded", f"{name}: its saved state was moved aside to {outcome.discarded} "
                                     "(reverting to a snapshot)", warning=True))
    return _launch(name, StartRequest(snapshot=tag), outcome, progress=progress, state_progress=None, timeout=timeout)


def snapshot_delete(name: str, tag: str) -> None:
    """Delete snapshot ``tag`` of ``name`` (running or stopped)."""
    inst = control.get(name)
    inst.reconcile()
    if inst.is_supervised():
        SupervisorClient(inst.api_socket, timeout=600).call("DELETE", f"/v1/snapshots/{tag}", timeout=600)
        return
    savestate.delete_snapshot_offline(inst.load_config(), tag)


# --------------------------------------------------------------------------- key rotation


@dataclass(frozen=True)
class RotateOutcome:
    """What :func:`rotate_key` did."""

    old_key_id: str
    new_key_id: str
    reencrypted: tuple[Path, ...]
    skipped: tuple[tuple[Path, str], ...] = ()
    """Discarded saved states that could not be read (path, why): left as they were."""


@contextlib.contextmanager
def _instances_locked() -> Iterator[list[Instance]]:
    """Hold every instance's lock, as a supervisor does: none can start (and save or resume a state
    file) meanwhile. Raises :class:`StateError` for an instance that is supervised."""
    fds: list[int] = []
    try:
        instances = Instance.all()
        for inst in instances:
            fd = inst.open_lock()
            fds.append(fd)
            if not take_exclusive(fd):
                exc = StateError(f"rotate the state-file key while {inst.name} runs",
                                 inst.read_status().state, ["stopped", "saved"])
                exc.hint = (f"stop it (vmkit stop {inst.name}) or save it (vmkit stop --save {inst.name}) first: "
                            "a running machine may save or resume a state file while the key changes")
                raise exc from None
        yield instances
    finally:
        for fd in fds:
            os.close(fd)


def _rotation_files(instances: list[Instance], extra: Sequence[Path]) -> list[tuple[Path, bool]]:
    """The state files to re-encrypt, each with whether it must be (else it is skipped if unreadable):
    each instance's saved state (must), its discarded one (if readable), and ``extra`` (must)."""
    out: list[tuple[Path, bool]] = []
    for inst in instances:
        saved = inst.saved_state_path
        out += [(saved, True)] if saved.exists() else []
        discarded = saved.with_name(saved.name + DISCARDED_SUFFIX)
        out += [(discarded, False)] if discarded.exists() else []
    out += [(Path(p).expanduser().resolve(), True) for p in extra]
    seen: set[tuple[int, int] | Path] = set()
    unique = []
    for path, required in out:
        try:
            st = path.stat()
            ident: tuple[int, int] | Path = (st.st_dev, st.st_ino)
        except OSError:
            ident = path  # reported when it is read
        if ident not in seen:
            seen.add(ident)
            unique.append((path, required))
    return unique


def rotate_key(extra: Sequence[Path] = ()) -> RotateOutcome:
    """``vmkit key rotate``: a new state-file key; every instance's saved state (and its discarded
    one, if readable) and the files ``extra`` are re-encrypted with it.

    No machine may be running (:class:`StateError`); the instances are locked meanwhile. Crash
    safety: each file is first re-encrypted into an unnamed temporary file beside it (records
    re-sealed as stored, see :func:`vmkit.state.file.reencrypt`); any failure there (a damaged or
    foreign file that must be re-encrypted, no space) drops them all and raises, with nothing
    changed. Then :func:`vmkit.state.key.replace_key` makes the new key current (the old one kept as
    retired), the new files are renamed over the old ones, and the retired key is deleted. If the
    process dies in between, files still under the old key are read with the retired key (state
    files name their key) and running the rotation again completes it.
    """
    with keys.rotation_lock(), _instances_locked() as instances:
        old = keys.load_key()
        keyring = {keys.key_id(k): k for k in [*keys.load_retired_keys(), old]}
        new = secrets.token_bytes(keys.KEY_SIZE)
        prepared: list[StateFileWriter] = []
        skipped: list[tuple[Path, str]] = []
        try:
            for path, required in _rotation_files(instances, extra):
                try:
                    key = keyring.get(read_info(path).key_id)
                    if key is None:
                        raise AuthenticationFailed(path, "it was written with a key this user does not have")
                    prepared.append(reencrypt(path, key, new))
                except StateFileError as exc:
                    if not required:
                        skipped.append((path, exc.message))
                        continue
                    exc.hint = (f"nothing was changed, the key is the same; {path} cannot be re-encrypted: "
                                "restore it, or discard (delete) it or move it aside if it cannot be used "
                                "anyway, then rotate again")
                    raise
            keys.replace_key(new, old)
        except BaseException:
            for writer in prepared:
                writer.abort()
            raise
        failed: list[StateFileError] = []
        for writer in prepared:
            try:
                writer.commit()
            except StateFileError as exc:
                failed.append(exc)
        if failed:
            first = failed[0]
            first.hint = (f"the new key is in force; {len(failed)} file(s) still use the old one, which is kept "
                        f"in {keys.retired_path()} so they stay readable: fix the cause and run "
                        "`vmkit key rotate` again")
            raise first
        keys.forget_retired()
        return RotateOutcome(old_key_id=keys.key_id(old), new_key_id=keys.key_id(new),
                             reencrypted=tuple(w.path for w in prepared), skipped=tuple(skipped))
