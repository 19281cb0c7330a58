"""Child processes vmkit owns (QEMU, virtiofsd): they must never outlive their owner."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def child_setup() -> None:
    """Runs in the child between fork and exec (``preexec_fn``).

    A new session, so a terminal's Ctrl-C reaches the owner, which stops the child properly;
    and a parent-death signal, so the child is killed if its owner dies.
    """
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
