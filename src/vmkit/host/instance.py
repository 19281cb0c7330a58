"""The instance directory: everything vmkit keeps about one VM.

Layout (directory mode 0700, files 0600)::

    <instances_dir>/<name>/
        vm.yaml          the configuration
        state.json       runtime status written by the supervisor (atomic)
        lock             flock'ed by the supervisor for its whole life: held <=> supervised
                         (and for a moment by `vmkit key rotate`, which keeps machines from starting)
        api.sock         the supervisor's JSON HTTP API
        console.sock     the raw serial console (e.g. `socat -,raw,echo=0 UNIX:console.sock`)
        serial.log       everything the guest printed on its console
        qemu.pid         QEMU's pid (written by QEMU, removed when it exits)
        qemu.log         QEMU's stderr and the argv it ran with
        supervisor.log   the supervisor's own log
        saved.vmstate    the saved machine state `vmkit start` resumes from (vmkit.backends.local.statectl)

A lock held by a live supervisor is the one source of truth for "running"; a state file
that says otherwise is stale (the supervisor was killed) and :meth:`Instance.reconcile`
cleans up after it: kills a leftover QEMU, removes sockets, records why.

A vm.yaml or state.json that cannot be read or is not valid (damaged, edited by hand) is a
:class:`~vmkit.errors.ConfigError` naming the file, for this instance only: listing shows the
instance as broken with that reason (:func:`vmkit.backends.local.control.list_instances`), and it can still be
deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from pydantic import ValidationError

from vmkit.config import MachineConfig, load_config, problems_from_validation, validate_name
from vmkit.errors import AlreadyExistsError, ConfigError, NotFoundError, Problem, StateError
from vmkit.fsutil import atomic_write
from vmkit.host import paths
from vmkit.host.lock import held_exclusively
from vmkit.host.status import RuntimeStatus
from vmkit.runtime.states import LIVE_STATES

LIVE = tuple(s.value for s in LIVE_STATES)
"""The recorded states in which a supervisor should hold the machine."""


Status = RuntimeStatus
"""The runtime status recorded in ``state.json``: the API's model (:mod:`vmkit.host.status`)."""


class Instance:
    def __init__(self, name: str, root: Path | None = None) -> None:
        self.name = validate_name(name)
        self.root = root if root is not None else paths.instances_dir()
        self.dir = self.root / name

    # -- paths ------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.dir / "vm.yaml"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def lock_path(self) -> Path:
        return self.dir / "lock"

    @property
    def api_socket(self) -> Path:
        return self.dir / "api.sock"

    @property
    def console_socket(self) -> Path:
        return self.dir / "console.sock"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    @property
    def qemu_pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def supervisor_log(self) -> Path:
        return self.dir / "supervisor.log"

    @property
    def migrated_to(self) -> str | None:
        """Where the machine runs since it was migrated away (``migrated.json``), else None."""
        try:
            data = json.loads((self.dir / "migrated.json").read_text())
        except (OSError, ValueError):
            return None
        return str(data.get("target")) if isinstance(data, dict) else None

    @property
    def saved_state_path(self) -> Path:
        """Where ``vmkit stop --save`` / ``vmkit save`` put the state that ``vmkit start`` resumes."""
        return self.dir / "saved.vmstate"

    # -- existence ----------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.config_path.is_file()

    def require(self) -> Instance:
        if not self.exists():
            raise NotFoundError("instance", self.name, hint="see `vmkit list`, or create it with `vmkit create`")
        return self

    @classmethod
    def create(cls, config: MachineConfig, root: Path | None = None) -> Instance:
        """Make the instance directory with its vm.yaml (all or nothing)."""
        inst = cls(config.name, root)
        if inst.dir.exists():
            raise AlreadyExistsError("instance", config.name, hint=f"delete it first: vmkit delete {config.name}")
        paths.ensure_private_dir(inst.root)
        staging = Path(tempfile.mkdtemp(dir=inst.root, prefix=f".{config.name}.creating."))
        try:
            staging.chmod(0o700)
            config.save(staging / "vm.yaml")
            staging.rename(inst.dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return inst

    @classmethod
    def all(cls, root: Path | None = None) -> list[Instance]:
        base = root if root is not None else paths.instances_dir()
        if not base.is_dir():
            return []
        out = []
        for d in sorted(base.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / "vm.yaml").is_file():
                with contextlib.suppress(Exception):
                    out.append(cls(d.name, base))
        return out

    def load_config(self) -> MachineConfig:
        self.require()
        return load_config(self.config_path)

    def save_config(self, config: MachineConfig) -> None:
        config.save(self.config_path)

    def delete(self) -> None:
        """Remove the instance directory; refused while a supervisor runs it. A broken instance
        (unreadable vm.yaml or state.json) can be deleted too."""
        self.require()
        try:
            state = self.reconcile().state
        except ConfigError:  # a damaged state.json: the lock alone says whether it runs
            if self.is_supervised():
                raise
            self._clean_up(None)
            state = "stopped"
        if state in LIVE:
            raise StateError("delete", state, ["stopped"])
        shutil.rmtree(self.dir)

    # -- runtime status -----------------------------------------------------------------------------
    def read_status(self) -> Status:
        """The status recorded in state.json; ``stopped`` if there is none.

        A state.json that cannot be read or does not hold a status is a :class:`ConfigError`
        naming it (never silently "stopped": it may be a running machine's).
        """
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return Status()
        except OSError as exc:
            raise self._damaged_status(f"cannot be read: {exc.strerror}") from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise self._damaged_status("is not valid JSON") from None
        if not isinstance(data, dict):
            raise self._damaged_status(f"holds a JSON {type(data).__name__}, not a status object")
        try:
            return Status.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(str(p) for p in problems_from_validation(exc))
            raise self._damaged_status(f"is not a valid status ({problems})") from None

    def _damaged_status(self, problem: str) -> ConfigError:
        exc = ConfigError([Problem(str(self.state_path), problem)], context=f"runtime state of {self.name!r}")
        exc.hint = (f"vmkit writes this file itself; if {self.name} is not running, remove it "
                    f"(rm {self.state_path}) and vmkit records the machine as stopped")
        return exc

    def write_status(self, status: Status) -> None:
        status.updated_at = time.time()
        atomic_write(self.state_path, json.dumps(status.to_dict(), indent=2), 0o600)

    def is_supervised(self) -> bool:
        """True while a supervisor holds the instance lock (see :func:`vmkit.host.lock.held_exclusively`)."""
        return held_exclusively(self.lock_path)

    def open_lock(self) -> int:
        """The lock file, opened for :func:`take_exclusive`."""
        return os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def reconcile(self) -> Status:
        """The true status; if the supervisor died, clean up after it first."""
        status = self.read_status()
        if self.is_supervised():
            return status
        leftover = self._leftover_qemu_pid()
        if status.state not in LIVE and leftover is None:
            return status
        self._clean_up(leftover)
        if status.state in LIVE:
            status = Status(state="error", reason="the supervisor died unexpectedly; vmkit cleaned up"
                            + (f" (killed leftover QEMU pid {leftover})" if leftover else ""))
            self.write_status(status)
        return status

    def _clean_up(self, leftover: int | None) -> None:
        """After a supervisor died: kill its QEMU (``leftover``, or found from qemu.pid), remove its sockets."""
        leftover = self._leftover_qemu_pid() if leftover is None else leftover
        if leftover is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)
            _wait_gone(leftover, 5.0)
        for p in (self.api_socket, self.console_socket, self.qemu_pidfile, self.dir / "vnc.sock"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def _leftover_qemu_pid(self) -> int | None:
        try:
            pid = int(self.qemu_pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        # only a process that is really this instance's QEMU (pid files can go stale)
        return pid if str(self.qemu_pidfile).encode() in cmdline else None


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return
        if ") Z" in stat:  # a zombie of someone else's: gone for our purposes
            return
        time.sleep(0.05)


def take_exclusive(fd: int, *, patience: float = 2.0) -> bool:
    """Take an instance lock exclusively, as a supervisor holds it; False if another holder has it
    exclusively. :meth:`Instance.is_supervised` holds it shared for microseconds: those are waited
    out (up to ``patience`` seconds), so a check never makes a starting supervisor fail."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # held exclusively: a supervisor (or a key rotation)
        fcntl.flock(fd, fcntl.LOCK_UN)  # only checkers: try again
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
