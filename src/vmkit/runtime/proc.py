"""Child processes vmkit owns (QEMU, virtiofsd, sftp-server, ssh): they must never outlive their owner.

Each is started in a new session (``start_new_session``: a terminal's Ctrl-C reaches the owner,
which stops the child properly) under ``setpriv --pdeathsig KILL`` (util-linux), which sets the
parent-death signal and then executes the program in the same process: if the owner dies, the
kernel kills the child. No ``preexec_fn``: Python code between fork and exec is unsafe in a
process with threads, and the supervisor has them (state-file writers, worker threads).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

from vmkit.errors import HostError

SETPRIV = "/usr/bin/setpriv"


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
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]
