"""The machine's lifecycle states: one list for the machine, the instance records and the API."""

from __future__ import annotations

from enum import StrEnum


class VmState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    STOPPING = "stopping"
    ERROR = "error"


LIVE_STATES = (VmState.STARTING, VmState.RUNNING, VmState.PAUSING, VmState.PAUSED,
               VmState.RESUMING, VmState.STOPPING)
"""The states in which QEMU runs (a supervisor holds the machine)."""
