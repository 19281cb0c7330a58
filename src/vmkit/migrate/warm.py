"""A warm receiver on the target: the target's half of ``vmkit migrate`` without Python's start.

A cold ``vmkit migrate-receive`` (run over ssh by the source) spends most of its start importing what it needs
before it can answer. So the first one, once it has imported all of it, forks a *warm receiver*: a daemon of
this user (named ``vmkit-receiver`` in ``ps -e``) listening on ``DATA_DIR/run/migrate-receive.sock`` (0600 in a
0700 directory; a caller of another uid is refused). The next ``vmkit migrate-receive`` is then only the
command's entry (:mod:`vmkit.cli.main`, the standard library): it connects, hands over its standard input,
output and error (SCM_RIGHTS) with its environment and working directory, and waits for the exit status.
The warm receiver forks a child that runs :func:`vmkit.migrate.receive.serve` on those descriptors, in a
session of its own, exactly as the cold command would.

It is what ssh's ``ControlPersist`` is to ssh's handshake: it ends after ``VMKIT_RECEIVER_PERSIST`` seconds
without a connection (default 600; ``0`` starts none), when vmkit's code on the host changes (another vmkit
connects, or a file of a vmkit module it has loaded changed: the command is refused, runs cold and forks a new
one), or on SIGTERM (``pkill -x vmkit-receiver``). A child already serving a migration is not affected by its
end.

This module imports only the standard library and :mod:`vmkit.host.paths` on the connecting side.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any, BinaryIO

PERSIST_ENV = "VMKIT_RECEIVER_PERSIST"
DEFAULT_PERSIST = 600.0
NAME = "vmkit-receiver"
SOCKET = "migrate-receive.sock"
_HEADER_MAX = 1 << 20


def persist_seconds() -> float:
    """How long a warm receiver waits for the next connection (0: no warm receiver)."""
    raw = os.environ.get(PERSIST_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_PERSIST
    except ValueError:  # said on stderr (the source shows it if the migration fails), not fatal to it
        sys.stderr.write(f"vmkit migrate-receive: {PERSIST_ENV}={raw!r} is not a number of seconds; "
                         f"using {DEFAULT_PERSIST:.0f}\n")
        return DEFAULT_PERSIST
    return max(0.0, value)


def run_dir() -> Path:
    from vmkit.host import paths

    return paths.data_dir() / "run"


def build_id() -> str:
    """Which vmkit this is: its version, where it is installed and the Python running it. (Whether the code of
    the same install changed since the warm receiver loaded it, the warm receiver checks: :func:`_changed`.)"""
    from vmkit.version import __version__

    return f"{__version__}:{Path(__file__).resolve().parent}:{sys.executable}"


def _code_stamps() -> dict[str, int]:
    """The file of every vmkit module this process has loaded, with its modification time."""
    stamps = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if (name == "vmkit" or name.startswith("vmkit.")) and file:
            with contextlib.suppress(OSError):
                stamps[file] = os.stat(file).st_mtime_ns
    return stamps


def _changed(stamps: dict[str, int]) -> bool:
    """Whether any of those files changed (or went) since: the code this process runs is not what is installed."""
    for file, mtime in stamps.items():
        try:
            if os.stat(file).st_mtime_ns != mtime:
                return True
        except OSError:
            return True
    return False


# -- the connecting side: `vmkit migrate-receive` with a warm receiver up -------------------------------------
def _send_line(sock: socket.socket, payload: dict[str, Any], fds: list[int] | None = None) -> None:
    data = (json.dumps(payload) + "\n").encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def _read_line(reader: BinaryIO) -> dict[str, Any] | None:
    """The next JSON line the warm receiver's side sent, waiting as long as it takes (None: it closed first).
    ``reader`` is the socket's buffered reader: the child's "serving" and "status" lines can come in one
    segment when its migration ends at once (a refused manifest), and the second must not be lost. No timeout:
    a child serving while this command ran cold would share its stdin."""
    try:
        raw = reader.readline(_HEADER_MAX + 1)
    except OSError:  # a timeout too
        return None
    if not raw.endswith(b"\n"):
        return None  # closed first, or too long
    try:
        msg = json.loads(raw)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def run_warm(seconds: float) -> int | None:
    """Have a warm receiver serve this command; its exit status, or None when there is none to take it (no
    socket, another build, ``seconds`` (:func:`persist_seconds`) 0): the caller then runs the receiver itself,
    cold."""
    if seconds <= 0:
        return None
    try:
        path = run_dir() / SOCKET
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except Exception:  # any trouble finding it: run cold, which says what is wrong
        return None
    with sock:
        try:
            sock.connect(str(path))
        except OSError:
            return None
        try:
            mask = os.umask(0o077)
            os.umask(mask)
            _send_line(sock, {"build": build_id(), "env": dict(os.environ), "cwd": os.getcwd(), "umask": mask,
                              "pid": os.getpid()}, [0, 1, 2])
        except OSError:
            return None
        sock.settimeout(None)
        with sock.makefile("rb") as reader:
            taken = _read_line(reader)
            if taken is None or "serving" not in taken:
                return None  # another build (it ends), or it could not fork: nothing was read from stdin yet
            done = _read_line(reader)
    if done is None or not isinstance(done.get("status"), int):
        sys.stderr.write("vmkit migrate-receive: the warm receiver's child ended without a status\n")
        return 1
    return int(done["status"])


# -- the warm receiver ---------------------------------------------------------------------------------------
def detach(seconds: float) -> None:
    """Fork the warm receiver from this cold ``vmkit migrate-receive`` (which has imported everything by now),
    waiting ``seconds`` for each next command, unless one is up, ``seconds`` is 0, or a fork is unsafe here.
    Never fails the caller."""
    if seconds <= 0 or not hasattr(socket, "recv_fds"):
        return
    from vmkit.backends.local import spawn

    if not spawn.can_fork():
        return
    try:
        directory = run_dir()
        from vmkit.host import paths

        paths.ensure_private_dir(directory)
        lock = os.open(directory / "migrate-receive.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except Exception:  # a warm receiver is only a speed-up
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # one is up (it holds the lock for its whole life)
        os.close(lock)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    first = os.fork()
    if first != 0:
        os.close(lock)  # the daemon keeps its own copy (and the lock with it)
        os.waitpid(first, 0)
        return
    code = 0
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        _daemon(lock, directory, seconds)
    except BaseException:  # the daemon never returns into the caller's code
        code = 1
    os._exit(code)


def _quiet_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _daemon(lock: int, directory: Path, seconds: float) -> None:
    from vmkit.backends.local import spawn

    _quiet_stdio()
    os.chdir("/")
    os.umask(0o077)
    spawn.set_name(NAME)

    def end(*_: object) -> None:
        raise _Ended

    # before the socket exists: a SIGTERM from then on removes it (the pre-imports below take a while)
    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGINT, end)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # its children are reaped by the kernel
    path = directory / SOCKET
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead one's (the lock says none is up)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(8)
        me = build_id()
        with contextlib.suppress(Exception):  # what a forked supervisor imports (the target's QEMU starts sooner)
            import importlib

            importlib.import_module("vmkit.daemon.supervisor")
        stamps = _code_stamps()
        while True:
            ready, _, _ = select.select([listener], [], [], seconds)
            if not ready:
                break  # idle for the whole persist time
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                if not _serve_one(conn, me, stamps, own=(listener.fileno(), lock)):
                    break
    except _Ended:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with contextlib.suppress(OSError):
            path.unlink()  # ours: the lock kept every other warm receiver from binding it
        listener.close()
        os.close(lock)


class _Ended(BaseException):
    """SIGTERM or SIGINT reached the warm receiver (a BaseException: no ``except Exception`` on the way
    swallows it)."""


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _serve_one(conn: socket.socket, me: str, stamps: dict[str, int], *, own: tuple[int, ...]) -> bool:
    """Take one connection: fork its receiver (which closes ``own``, the warm receiver's listening socket and
    lock). False: this warm receiver should end (another vmkit connected, or its own code changed on disk)."""
    fds: list[int] = []
    try:
        if _peer_uid(conn) != os.getuid():
            return True
        conn.settimeout(10)
        data, fds, _, _ = socket.recv_fds(conn, _HEADER_MAX, 3)
        while not data.endswith(b"\n") and len(data) < _HEADER_MAX:
            more = conn.recv(65536)
            if not more:
                return True
            data += more
        header = json.loads(data)
        if not isinstance(header, dict) or len(fds) != 3:
            return True
        if header.get("build") != me or _changed(stamps):
            _send_line(conn, {"stale": me})
            return False
        pid = os.fork()
        if pid == 0:
            for fd in own:  # else a migration served after the warm receiver ended would keep its lock
                os.close(fd)
            _child(conn, fds, header)  # never returns
        return True
    except (OSError, ValueError):
        return True
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _child(conn: socket.socket, fds: list[int], header: dict[str, Any]) -> None:
    """In the forked child: become what the cold command would be, serve, report the status, exit."""
    from vmkit.backends.local import spawn

    code = 1
    try:
        os.setsid()
        spawn.reset_signals(signal.SIGHUP, signal.SIGCHLD)  # the warm receiver ignores those
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        env = header.get("env")
        if isinstance(env, dict):
            os.environ.clear()
            os.environ.update({str(k): str(v) for k, v in env.items()})
        with contextlib.suppress(OSError, TypeError):
            os.chdir(str(header.get("cwd") or "/"))
        mask = header.get("umask")
        os.umask(mask if isinstance(mask, int) and 0 <= mask <= 0o777 else 0o022)
        spawn.rebind_stdio()
        from vmkit.migrate import receive

        receive.WARM = True
        if isinstance(header.get("pid"), int):
            receive.STARTED_BY = str(header["pid"])  # its timings count from the command's start
        _send_line(conn, {"serving": os.getpid()})

        try:
            code = receive.serve()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # said on stderr, as the cold command would
            import traceback

            traceback.print_exc()
            code = 1
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            _send_line(conn, {"status": code})
    finally:
        os._exit(code)
