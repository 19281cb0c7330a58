"""Automatic ballooning on this host: ``vmkit host autoballoon on|off|status``.

``on`` starts one small background process for this vmkit home (``python -m
vmkit.backends.local.balloonctl``). Every ``interval`` seconds it reads the host's memory
(``/proc/meminfo``, or a file in that format given with ``meminfo``: a simulated host), asks every
running machine's supervisor for its statistics (``GET /v1/stats``), lets the policy
(:func:`vmkit.host.autoballoon.decide`) pick new balloon targets, and sets them
(``POST /v1/balloon``, without waiting for the guests). Machines without a balloon, or with
``balloon_shares: 0``, are left alone; ``balloon_min`` and ``balloon_shares`` are read from each
vm.yaml every round, so a change takes effect at once.

Its files are in ``DATA/autoballoon/`` (0700): ``lock`` (held by the controller for its whole life:
a second ``on`` finds it taken and does nothing), ``pid`` and ``status.json`` (its last round; both
0600) and ``controller.log``. ``off`` sends it SIGTERM and waits until the lock is free; the balloons
stay where they are (``vmkit set NAME --balloon SIZE`` moves one back).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmkit.api import models
from vmkit.config import format_size, parse_size
from vmkit.errors import ConfigError, HostError, VmkitError
from vmkit.fsutil import atomic_write
from vmkit.host import paths
from vmkit.host.autoballoon import Decision, Guest, HostMemory, Policy, decide, read_meminfo

log = logging.getLogger("vmkit.backends.local.balloonctl")

INTERVAL = 5.0
"""Seconds between two rounds when ``on`` is not told otherwise."""
STOP_WAIT = 10.0
"""Seconds ``off`` waits for the controller to exit before it kills it."""
MODULE = "vmkit.backends.local.balloonctl"
LOG_MAX = 4 << 20
"""controller.log grows to this size, then starts again (the previous one kept as controller.log.1)."""


@dataclass(frozen=True)
class Settings:
    target: float = 0.80
    step: int = Policy.step
    interval: float = INTERVAL
    meminfo: Path | None = None

    @property
    def policy(self) -> Policy:
        return Policy(target=self.target, step=self.step)

    def host(self) -> HostMemory:
        return read_meminfo(self.meminfo) if self.meminfo is not None else read_meminfo()


def settings_from_options(target_percent: float = 80.0, step: int | str = Policy.step, interval: float = INTERVAL,
                          meminfo: str | Path | None = None) -> Settings:
    """Check ``on``'s options (each error names its option)."""
    if not 5 <= target_percent <= 99:
        raise ConfigError.single("--target", f"{target_percent} is out of range: give a percentage of the host's "
                                 "memory from 5 to 99 (default 80)")
    try:
        step_bytes = parse_size(step)
    except ValueError as exc:
        raise ConfigError.single("--step", str(exc)) from None
    if not 1 << 20 <= step_bytes <= 16 << 30:
        raise ConfigError.single("--step", f"{format_size(step_bytes)} is out of range: give 1M to 16G (default 100M)")
    if not 1 <= interval <= 3600:
        raise ConfigError.single("--interval", f"{interval} is out of range: give 1 to 3600 seconds (default 5)")
    path = Path(meminfo).expanduser().resolve() if meminfo is not None else None
    settings = Settings(target_percent / 100, step_bytes, float(interval), path)
    if path is not None:
        try:
            settings.host()
        except HostError as exc:
            raise ConfigError.single("--meminfo", exc.message) from None
    return settings


# -- files ----------------------------------------------------------------------------------------------
def state_dir() -> Path:
    d = paths.data_dir() / "autoballoon"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.check_owned_tree(d, f"the autoballoon directory {d}")
    return d


def _lock_path(d: Path) -> Path:
    return d / "lock"


def _pid_path(d: Path) -> Path:
    return d / "pid"


def _status_path(d: Path) -> Path:
    return d / "status.json"


def log_path(d: Path) -> Path:
    return d / "controller.log"


def _open_lock(d: Path) -> int:
    return os.open(_lock_path(d), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _held(d: Path) -> bool:
    """Whether a controller holds the lock now."""
    fd = _open_lock(d)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken just for the check
    return False


def _read_pid(d: Path) -> int | None:
    try:
        return int(_pid_path(d).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_controller(pid: int) -> bool:
    try:
        return MODULE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _read_status(d: Path) -> dict[str, Any]:
    try:
        data = json.loads(_status_path(d).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- the operations -------------------------------------------------------------------------------------
def status() -> models.AutoballoonStatus:
    """Whether the controller runs, its settings, and what it did in its last round."""
    d = state_dir()
    running = _held(d)
    data = _read_status(d)
    data.update(running=running, pid=_read_pid(d) if running else None, log=str(log_path(d)))
    return models.AutoballoonStatus.model_validate(data)


def start(settings: Settings, *, wait: float = 10.0) -> models.AutoballoonStatus:
    """Start the controller for this vmkit home, unless one runs (then nothing changes); returns its
    status once it has started (and, within ``wait`` seconds, done its first round)."""
    d = state_dir()
    lock_fd = _open_lock(d)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return status().model_copy(update={"already_running": True})
        _status_path(d).unlink(missing_ok=True)  # the previous run's last round
        argv = [sys.executable, "-m", MODULE, str(d), "--lock-fd", str(lock_fd), "--target", repr(settings.target),
                "--step", str(settings.step), "--interval", repr(settings.interval)]
        if settings.meminfo is not None:
            argv += ["--meminfo", str(settings.meminfo)]
        with _open_log(d) as logf:
            proc = subprocess.Popen(argv, pass_fds=(lock_fd,), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True, cwd="/", env=paths.child_env())
        atomic_write(_pid_path(d), f"{proc.pid}\n", 0o600)
    finally:
        os.close(lock_fd)  # the controller holds the lock now (it shares this open file)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HostError(f"the autoballoon controller exited at once (status {proc.returncode})",
                            hint=f"see {log_path(d)}:\n{_tail(log_path(d), 8)}")
        if _read_status(d).get("rounds", 0) >= 1:
            break
        time.sleep(0.1)
    return status()


def stop(*, timeout: float = STOP_WAIT) -> models.AutoballoonStatus:
    """Stop the controller (SIGTERM, then SIGKILL after ``timeout`` s); the balloons stay where they are."""
    d = state_dir()
    if not _held(d):
        _pid_path(d).unlink(missing_ok=True)
        return status()
    pid = _read_pid(d)
    if pid is None or not _is_controller(pid):
        raise HostError(f"an autoballoon controller holds {_lock_path(d)} but {_pid_path(d)} does not name it",
                        hint="find it with `fuser " + str(_lock_path(d)) + "` and stop it")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_free(d, timeout):
        log.warning("the autoballoon controller (pid %d) did not stop within %.0f s: killing it", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_free(d, 5):
            raise HostError(f"the autoballoon controller (pid {pid}) did not exit")
    _reap(pid)
    _pid_path(d).unlink(missing_ok=True)
    return status()


def _reap(pid: int, seconds: float = 5.0) -> None:
    """Collect the controller's exit status when this process started it (a long-running program
    that uses the client, or the tests): else it would linger as a zombie until this process ends.
    The ``vmkit`` command that started it has long exited: then it is not our child, nothing to do."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def _wait_free(d: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _held(d):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _open_log(d: Path) -> Any:
    path = log_path(d)
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > LOG_MAX:
            path.replace(path.with_name(path.name + ".1"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "ab")


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- the controller -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """A running machine's view for one round, and how to set its balloon."""

    guest: Guest
    set_target: Callable[[int], object]


def running_machines(errors: list[str]) -> list[Machine]:
    """Every running machine with a balloon and shares, through its supervisor's API."""
    from vmkit.backends.local import control, listing

    found: list[Machine] = []
    for row in listing.list_instances():
        if row.state != "running":
            continue
        try:
            config = control.get(row.name).load_config()
            if not config.balloon or config.balloon_shares == 0:
                continue
            st = control.stats(row.name)
        except VmkitError as exc:  # it stopped meanwhile, or its supervisor is busy
            errors.append(f"{row.name}: {exc.message}")
            continue
        if st.balloon_bytes is None:
            continue
        guest = Guest(row.name, config.memory, st.balloon_bytes, st.guest_mem_available_bytes, config.balloon_floor,
                      config.balloon_shares)
        found.append(Machine(guest, _setter(row.name)))
    return found


def _setter(name: str) -> Callable[[int], object]:
    from vmkit.backends.local import control

    return lambda target: control.set_balloon(name, target, timeout=0)


class Controller:
    """Runs the policy against the machines; ``host`` and ``machines`` are injectable (a simulated host
    in the tests)."""

    def __init__(self, settings: Settings, *, host: Callable[[], HostMemory] | None = None,
                 machines: Callable[[list[str]], list[Machine]] = running_machines,
                 status_file: Path | None = None, alive: Callable[[], bool] = lambda: True) -> None:
        self.settings = settings
        self.alive = alive
        self.host = host or settings.host
        self.machines = machines
        self.status_file = status_file
        self.rounds = 0
        self.changes = 0

    def round(self) -> Decision:
        errors: list[str] = []
        host = self.host()
        machines = self.machines(errors)
        decision = decide(host, [m.guest for m in machines], self.settings.policy)
        setters = {m.guest.name: m.set_target for m in machines}
        done: dict[str, int] = {}
        for change in decision.changes:
            try:
                setters[change.name](change.target)
            except VmkitError as exc:
                errors.append(f"{change.name}: {exc.message}")
                continue
            done[change.name] = change.target
            log.info("%s %s: %d -> %d MiB%s", decision.action, change.name, change.actual >> 20, change.target >> 20,
                     " (under pressure)" if change.pressure else "")
        for e in errors:
            log.warning("%s", e)
        self.rounds += 1
        self.changes += len(done)
        if self.status_file is not None:
            self._write_status(decision, machines, done, errors)
        return decision

    def _write_status(self, decision: Decision, machines: list[Machine], done: dict[str, int],
                      errors: list[str]) -> None:
        assert self.status_file is not None
        policy = self.settings.policy
        guests = [models.AutoballoonGuest(
            name=g.name, memory_bytes=g.memory, balloon_bytes=g.actual, guest_mem_available_bytes=g.available,
            balloon_min_bytes=g.floor, balloon_shares=g.shares, pressure=g.under_pressure(policy),
            target_bytes=done.get(g.name)) for g in (m.guest for m in machines)]
        st = models.AutoballoonStatus(
            running=True, pid=os.getpid(), target_percent=round(self.settings.target * 100, 2),
            step_bytes=self.settings.step, interval_seconds=self.settings.interval,
            meminfo=str(self.settings.meminfo or "/proc/meminfo"), rounds=self.rounds, changes=self.changes,
            last_round_at=datetime.now(UTC).isoformat(timespec="seconds"), host_total_bytes=decision.host.total,
            host_used_bytes=decision.host.used, goal_bytes=decision.goal, action=decision.action, guests=guests,
            errors=errors)
        atomic_write(self.status_file, st.model_dump_json(indent=1), 0o600)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self.alive():
                log.info("the vmkit home is gone: stopping")
                return
            started = time.monotonic()
            try:
                self.round()
            except VmkitError as exc:
                log.error("round failed: %s", exc.message)
            except Exception:
                log.exception("round failed")
            stop.wait(max(0.0, self.settings.interval - (time.monotonic() - started)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmkit-autoballoon")
    parser.add_argument("dir", type=Path, help="the autoballoon directory of the vmkit home")
    parser.add_argument("--lock-fd", type=int, required=True, help="the controller lock, taken by the caller")
    parser.add_argument("--target", type=float, default=0.80)
    parser.add_argument("--step", type=int, default=Policy.step)
    parser.add_argument("--interval", type=float, default=INTERVAL)
    parser.add_argument("--meminfo", type=Path, default=None)
    args = parser.parse_args(argv)
    os.umask(0o077)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings(args.target, args.step, args.interval, args.meminfo)
    d: Path = args.dir
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    log.info("started: target %.0f %% of the host's memory, steps of %d MiB every %.1f s (%s)",
             settings.target * 100, settings.step >> 20, settings.interval, settings.meminfo or "/proc/meminfo")
    try:
        Controller(settings, status_file=_status_path(d), alive=_lock_path(d).exists).run(stop)
    finally:
        log.info("stopped")  # the lock (args.lock_fd) is released when this process is gone
    return 0


if __name__ == "__main__":
    sys.exit(main())
