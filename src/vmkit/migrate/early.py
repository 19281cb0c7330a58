"""The target's half of a migration, started early: ``vmkit migrate`` spawns it (ssh, and the target's vmkit
starting there) the moment its arguments are parsed, so that the target's Python starts while this one is still
loading the rest of vmkit, not after it; :class:`vmkit.migrate.send.Remote` adopts the process. This module imports
only what ssh needs (the rest of :mod:`vmkit.migrate` takes about half a second to import)."""

from __future__ import annotations

import contextlib
import subprocess

from vmkit.backends import ssh
from vmkit.errors import VmkitError

_started: dict[str, subprocess.Popen[str]] = {}


def spawn(host: ssh.SshHost) -> subprocess.Popen[str]:
    """The target's ``vmkit migrate-receive`` over ssh: JSON lines on its stdin and stdout. In a session of its
    own, so a Ctrl-C reaches this process only (which then tells the receiver to undo what it made)."""
    return subprocess.Popen(host.vmkit_argv(["migrate-receive"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True, cwd=ssh.RUN_IN)


def prestart(target: str) -> None:
    """Spawn the receiver for ``target`` now (nothing if the URI is bad or ssh is missing: the migration itself
    says so). :func:`drop` ends it unless it was adopted."""
    try:
        host = ssh.parse(target, field="TARGET")
    except VmkitError:
        return
    if host.uri not in _started:
        with contextlib.suppress(OSError):
            _started[host.uri] = spawn(host)


def drop(target: str) -> None:
    """End the receiver :func:`prestart` spawned for ``target`` if it was never adopted (the command failed before
    it reached the target): its input closes, so it ends having made nothing."""
    with contextlib.suppress(VmkitError):
        _drop(ssh.parse(target, field="TARGET").uri)


def adopt(host: ssh.SshHost) -> subprocess.Popen[str] | None:
    """The receiver :func:`prestart` spawned for ``host`` (None: there is none; each is adopted once)."""
    return _started.pop(host.uri, None)


def _drop(uri: str) -> None:
    proc = _started.pop(uri, None)
    if proc is None:
        return
    with contextlib.suppress(OSError):
        assert proc.stdin is not None
        proc.stdin.close()  # it was sent nothing: on the target, the receiver ends having made nothing
    try:
        proc.wait(1)
    except subprocess.TimeoutExpired:  # ssh still connecting (an unreachable host): no need to wait for it
        proc.kill()
        proc.wait(5)
