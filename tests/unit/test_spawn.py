"""How a supervisor process is started: forked from a caller with only daemon threads beside it, a new
interpreter otherwise; a forked one is watched through a pidfd (it is no child of the caller)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import processes_mentioning
from vmkit.backends.local import spawn


def test_fork_only_beside_daemon_threads() -> None:
    assert spawn.can_fork()
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)  # a pool's worker: not a daemon
    worker.start()
    try:
        assert not spawn.can_fork()
    finally:
        stop.set()
        worker.join()
    spinner = threading.Thread(target=stop.wait, daemon=True)  # the CLI's spinner
    stop.clear()
    spinner.start()
    try:
        assert spawn.can_fork()
    finally:
        stop.set()
        spinner.join()


def test_a_forked_process_is_watched_through_its_pidfd() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        proc = spawn.ForkedProcess(sleeper.pid)
        assert proc.poll() is None and spawn.exit_text(proc) == "still running"
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.1)
        proc.send_signal(signal.SIGTERM)
        sleeper.wait(10)  # reaped here, as the init process reaps a real supervisor
        assert proc.wait(5) == -1 and spawn.exit_text(proc) == "status unknown"
        proc.close()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_missing_supervisor_module_fails_in_the_child_not_here(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spawn, "MODULE", "vmkit.no_such_module")
    log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        proc = spawn.start_supervisor([], pass_fds=(), log=log, cwd=tmp_path, env=dict(os.environ))
    finally:
        os.close(log)
    assert isinstance(proc, spawn.ForkedProcess) and proc.pid != os.getpid()
    proc.wait(60)
    deadline = time.monotonic() + 10
    text = ""
    while "No module named" not in text and time.monotonic() < deadline:
        text = (tmp_path / "log").read_text()
        time.sleep(0.05)
    assert "No module named vmkit.no_such_module" in text, text


def test_a_forked_process_is_named_and_runs_in_its_directory(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``ps -e`` shows it as vmkit-supervisor, and it runs in the directory it was given (where the tests'
    search for a machine's leftover processes looks, beside the command line)."""
    monkeypatch.setattr(spawn, "MODULE", "timeit")  # a module that runs for a while: timeit of a sleep
    log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        proc = spawn.start_supervisor(["-n", "1", "import time; time.sleep(20)"], pass_fds=(), log=log,
                                      cwd=tmp_path, env=dict(os.environ))
    finally:
        os.close(log)
    try:
        assert isinstance(proc, spawn.ForkedProcess)
        comm = ""
        deadline = time.monotonic() + 10
        while comm != "vmkit-superviso" and time.monotonic() < deadline:
            comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
            time.sleep(0.05)
        assert comm == "vmkit-superviso"
        assert os.readlink(f"/proc/{proc.pid}/cwd") == str(tmp_path)
        assert proc.pid in processes_mentioning(str(tmp_path))
    finally:
        proc.kill()
        proc.wait(10)
