"""Starting a supervisor process (``python -m vmkit.daemon.supervisor``), fast where it can be.

A new interpreter spends most of a warm start importing what the supervisor needs (aiohttp,
pydantic and vmkit's models: about 1 s on a quiet host, 3 to 5 s on a loaded one), and the process
asking for the start has imported nearly all of it already. So when that process runs a single
thread (the CLI, a script), the supervisor is a fork of it: forked twice (it belongs to no caller,
as a daemon; the first child exits at once), in a session of its own, with only the files it is
given (the instance lock, the listening socket, the log as stdout and stderr), the environment it is
given, default signal handlers, no logging handlers of the caller, and the caller's objects frozen
(never collected in the child, so no finalizer of the caller's runs there). It then runs the module
as ``python -m`` would (:func:`runpy.run_module`) and exits with its status, never returning into
the caller's code. With other (non-daemon) threads running (a fork copies only the calling one, and a
lock another thread held would stay held in the child), a new interpreter is started as before.

A forked supervisor keeps the caller's command line (``ps aux`` shows ``vmkit start web``: the
memory of a command line cannot be moved once the caller changed its environment, as the CLI does,
so setproctitle fails there), but its name (``ps -e``, ``pgrep vmkit-supervisor``, /proc/PID/comm) is
``vmkit-supervisor`` and its working directory is the instance's, where tools looking for a
machine's processes find it.

Either way the caller gets a handle with the part of :class:`subprocess.Popen` it uses. A double
fork leaves no child to reap; the forked supervisor is watched through a pidfd, so its exit status
is not known (:attr:`ForkedProcess.returncode` is None, and :func:`exit_text` says "unknown").
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import io
import logging
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Protocol

MODULE = "vmkit.daemon.supervisor"
COMM = "vmkit-supervisor"
"""A forked supervisor's process name (the kernel keeps 15 bytes: ``vmkit-superviso``)."""
PR_SET_NAME = 15


class Process(Protocol):
    """The part of :class:`subprocess.Popen` a start uses."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class ForkedProcess:
    """A supervisor forked from this process (not a child of it: watched through a pidfd)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already
            self._pidfd = None

    def _exited(self, timeout: float | None) -> bool:
        if self._pidfd is None:
            return True
        ready, _, _ = select.select([self._pidfd], [], [], timeout)
        return bool(ready)

    def poll(self) -> int | None:
        """None while it runs; once it has exited its status is unknown here: -1."""
        return None if not self._exited(0) else -1

    def wait(self, timeout: float | None = None) -> int | None:
        if not self._exited(timeout):
            raise subprocess.TimeoutExpired(MODULE, timeout or 0)
        return -1

    def send_signal(self, sig: int) -> None:
        if self._pidfd is None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __del__(self) -> None:
        self.close()


def exit_text(proc: Process) -> str:
    """How ``proc`` exited, for a message."""
    code = proc.poll()
    if code is None:
        return "still running"
    return "status unknown" if isinstance(proc, ForkedProcess) else f"status {code}"


def can_fork() -> bool:
    """Whether a supervisor may be a fork of this process: on Linux, when every other thread is a daemon
    thread (such as the CLI's spinner, which holds nothing the supervisor uses; the interpreter makes its
    import and logging locks anew in a child). A worker thread (a thread pool's) may be anywhere: no fork."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    return sys.platform == "linux" and hasattr(os, "pidfd_open") and all(t.daemon for t in others)


def start_supervisor(args: list[str], *, pass_fds: tuple[int, ...], log: int, cwd: Path,
                     env: dict[str, str]) -> Process:
    """Run ``python -m vmkit.daemon.supervisor ARGS`` in a new session, with ``pass_fds`` kept open,
    stdin from /dev/null and stdout and stderr into the file ``log`` (an open descriptor)."""
    if not can_fork():
        return subprocess.Popen([sys.executable, "-m", MODULE, *args], pass_fds=pass_fds,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                cwd=cwd, env=env)
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    first = os.fork()
    if first == 0:  # the first child: a new session, the supervisor, gone
        code = 1
        try:
            os.close(rfd)
            os.setsid()
            pid = os.fork()
            if pid == 0:
                os.close(wfd)
                _run_supervisor(args, pass_fds=pass_fds, log=log, cwd=cwd, env=env)  # never returns
            os.write(wfd, str(pid).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        with os.fdopen(rfd, "rb") as r:
            data = r.read()
    finally:
        os.waitpid(first, 0)
    if not data:
        raise OSError(f"could not fork a supervisor for {cwd.name}")
    return ForkedProcess(int(data))


def set_name(name: str) -> None:
    """This process's name (prctl PR_SET_NAME; what ``ps -e`` and /proc/PID/comm show)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def reset_signals(*ignored: signal.Signals) -> None:
    """In a forked child: the handlers a new interpreter starts with (SIGINT raises KeyboardInterrupt, every other
    signal this process handled gets its default action), and the default action for ``ignored`` too."""
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError, TypeError):
            handler = signal.getsignal(sig)
            if sig == signal.SIGINT:
                signal.signal(sig, signal.default_int_handler)
            elif callable(handler) or sig in ignored:
                signal.signal(sig, signal.SIG_DFL)


def rebind_stdio() -> None:
    """In a forked child whose descriptors 0, 1 and 2 were just replaced: ``sys.stdin``, ``sys.stdout`` and
    ``sys.stderr`` on them (line-buffered output), not on the parent's buffers."""
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)


def _run_supervisor(args: list[str], *, pass_fds: tuple[int, ...], log: int, cwd: Path,
                    env: dict[str, str]) -> None:
    """In the forked supervisor: shed what belongs to the caller, run the module, exit."""
    code = 1
    try:
        gc.freeze()  # the caller's objects: never collected (and finalized) here
        faulthandler.disable()
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        reset_signals()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        keep = sorted(set(pass_fds))
        low = 3
        for fd in [*keep, 1 << 20]:
            if fd >= low:
                os.closerange(low, fd)
                low = fd + 1
        for fd in keep:
            os.set_inheritable(fd, True)
        rebind_stdio()
        for logger in [logging.root, *(v for v in logging.root.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger))]:
            logger.handlers.clear()
            logger.setLevel(logging.NOTSET)
            logger.disabled = False
            logger.propagate = True
        logging.root.setLevel(logging.WARNING)
        logging.disable(logging.NOTSET)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = [MODULE, *args]
        set_name(COMM)
        try:
            runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
