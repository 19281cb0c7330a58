"""Child processes vmkit owns (QEMU, virtiofsd, sftp-server, ssh): they must never outlive their owner.

Each is started in a new session (``start_new_session``: a terminal's Ctrl-C reaches the owner,
which stops the child properly) under ``setpriv --pdeathsig KILL`` (util-linux), which sets the
parent-death signal and then executes the program in the same process: if the owner dies, the
kernel kills the child. No ``preexec_fn``: Python code between fork and exec is unsafe in a
process with threads, and the supervisor has them (state-file writers, worker threads).

A supervisor whose machine has a cgroup (see :mod:`vmkit.host.cgroups`) calls :func:`place_children`
once: from then on every child first writes its own pid into each of the cgroup's ``cgroup.procs``
files (a tiny ``/bin/sh`` wrapper, the paths passed as arguments, never in the script) and only then
executes ``setpriv`` and the program, so QEMU allocates guest RAM already inside its cgroup.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

from vmkit.errors import HostError

SETPRIV = "/usr/bin/setpriv"
SH = "/bin/sh"

JOIN_SCRIPT = ('n=$1; shift; while [ "$n" -gt 0 ]; do '
               'echo $$ > "$1" || { echo "vmkit: cannot join the cgroup $1" >&2; exit 126; }; '
               'shift; n=$((n - 1)); done; exec "$@"')
"""Writes the shell's pid (the child's: ``exec`` keeps it) into each file, then runs the rest."""

_cgroup_procs: tuple[str, ...] = ()


def place_children(procs_files: Sequence[str]) -> None:
    """Every child started through :func:`owned` from now on joins these ``cgroup.procs`` files
    before it executes its program (empty: no cgroup). One machine per process (the supervisor)."""
    global _cgroup_procs
    _cgroup_procs = tuple(str(f) for f in procs_files)


def placed_children() -> tuple[str, ...]:
    return _cgroup_procs


def owned(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so that the child is killed when the process that starts it dies.

    Raises :class:`HostError` if the program or ``setpriv`` is missing (the wrapper would only
    say so in its exit status)."""
    setpriv = SETPRIV if shutil.which(SETPRIV) else shutil.which("setpriv")
    if setpriv is None:
        raise HostError("setpriv is not installed (it ties vmkit's child processes to their owner)",
                        hint="apt-get install util-linux")
    if shutil.which(argv[0]) is None:
        raise FileNotFoundError(2, "No such file or directory", argv[0])
    wrapped = [setpriv, "--pdeathsig", "KILL", "--", *argv]
    if _cgroup_procs:
        return [SH, "-c", JOIN_SCRIPT, "vmkit-cgroup-join", str(len(_cgroup_procs)), *_cgroup_procs, *wrapped]
    return wrapped
