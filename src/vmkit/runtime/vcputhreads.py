"""QEMU's vCPU threads as the host sees them: pinning them to host CPUs, and the steal they suffer.

**Pinning** (``limits.cpu_pin``): vCPU *i* is pinned to the *i*-th CPU of the list, round robin
(``sched_setaffinity`` on the thread ids QMP ``query-cpus-fast`` gives); QEMU's other threads
(main loop, I/O, RCU, virtiofsd's) keep the whole list, which the machine's cpuset already imposes.
A vCPU added live, or brought back online in the guest, is pinned when ``vmkit set --cpus`` returns.
vCPUs offlined in the guest (parked, see vmkit.runtime.vcpus) take no turn in the round robin and may
run anywhere in the list (they are halted), and steal is averaged over the running vCPUs only.

**Steal**: under TCG the guest sees no steal time of its own, so vmkit measures it on the host:
the time each vCPU thread was runnable but waiting for a host CPU (``/proc/PID/task/TID/schedstat``,
second field: run-queue wait in ns; it includes time throttled by a ``cpu_max`` cap). Steal percent
is that wait over wall-clock time, averaged over the vCPUs, since the previous reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Collection, Sequence
from typing import Any, Protocol


class Qmp(Protocol):
    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = ...) -> Any: ...


async def vcpu_threads(vm: Qmp) -> list[int]:
    """Host thread ids of the vCPUs, in vCPU index order."""
    reply: list[dict[str, Any]] = await vm.execute("query-cpus-fast")
    return [int(c["thread-id"]) for c in sorted(reply, key=lambda c: int(c.get("cpu-index", 0)))]


def pin(threads: Sequence[int], cpus: Sequence[int], *, parked: Collection[int] = ()) -> dict[int, int]:
    """Pin the vCPU threads the guest runs on to ``cpus``, round robin in vCPU order; returns thread id ->
    CPU (a thread that is gone is skipped). An empty ``cpus`` undoes nothing: the cpuset's list applies.
    vCPUs whose index is in ``parked`` (offlined in the guest: their threads are halted) do not take a
    turn, so the running ones spread over ``cpus`` as a machine booted with that many would; they may run
    on any CPU of ``cpus`` and are left out of the result (they are placed when they come back online)."""
    placed: dict[int, int] = {}
    if not cpus:
        return placed
    turn = 0
    for i, tid in enumerate(threads):
        with contextlib.suppress(ProcessLookupError):
            if i in parked:
                os.sched_setaffinity(tid, set(cpus))
                continue
            cpu = cpus[turn % len(cpus)]
            turn += 1
            os.sched_setaffinity(tid, {cpu})
            placed[tid] = cpu
    return placed


def unpin(threads: Sequence[int], cpus: Sequence[int]) -> None:
    """Let each thread run on every CPU of ``cpus`` again."""
    for tid in threads:
        with contextlib.suppress(ProcessLookupError, OSError):
            os.sched_setaffinity(tid, set(cpus))


def run_delay_ns(pid: int, tid: int, *, proc: str = "/proc") -> int:
    """Nanoseconds thread ``tid`` of ``pid`` has waited on a run queue (schedstat's second field)."""
    with open(f"{proc}/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[1])


def steal_percent(before: dict[int, int], after: dict[int, int], seconds: float) -> float:
    """Average run-queue wait of the threads present in both readings, in percent of ``seconds``."""
    common = [t for t in after if t in before]
    if not common or seconds <= 0:
        return 0.0
    waited = sum(max(0, after[t] - before[t]) for t in common) / 1e9
    return round(100.0 * waited / (seconds * len(common)), 1)


class StealMeter:
    """Steal of one machine's vCPUs since the previous reading, or over ``interval`` s when there is
    no recent one (as :class:`vmkit.runtime.balloon.CpuMeter`)."""

    def __init__(self, interval: float = 0.25, stale: float = 60.0) -> None:
        self.interval = interval
        self.stale = stale
        self._last: tuple[int, float, dict[int, int]] | None = None

    def _read(self, pid: int, threads: Sequence[int]) -> dict[int, int]:
        out = {}
        for tid in threads:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                out[tid] = run_delay_ns(pid, tid)
        return out

    async def percent(self, pid: int, threads: Sequence[int]) -> float:
        last = self._last
        if last is None or last[0] != pid or time.monotonic() - last[1] > self.stale \
                or not set(threads) & set(last[2]):
            last = (pid, time.monotonic(), self._read(pid, threads))
            await asyncio.sleep(self.interval)
        now = (pid, time.monotonic(), self._read(pid, threads))
        self._last = now
        return steal_percent(last[2], now[2], now[1] - last[1])
