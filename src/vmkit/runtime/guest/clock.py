"""Keeping a running guest's clock right (``clock_sync`` in vm.yaml).

A guest's wall clock drifts from the host's when its vCPUs wait for host CPUs (more busy vCPUs than
cores: timer interrupts come late, a tick-based clock loses time) and stands still while the machine
is paused. The fix-up after a resume or restore is :func:`vmkit.state.savestate.fix_guest_clock`;
:class:`ClockKeeper` is the periodic one: every ``interval`` seconds it reads the guest's clock
through the guest agent (``guest-get-time``), and when it is off by more than ``threshold``
seconds (beyond what the reading's round trip leaves uncertain) sets it to the host's time
(``guest-set-time``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmkit.errors import VmkitError
from vmkit.runtime.guest.channel import AgentCommands

log = logging.getLogger("vmkit.runtime.guest.clock")

MAX_UNCERTAINTY = 1.0
"""A reading whose round trip took longer than twice this many seconds is not trusted (the agent was
busy): the keeper tries again at the next check."""


@dataclass(frozen=True)
class ClockReading:
    """``offset``: the guest's clock minus the host's, in seconds (negative: the guest is behind);
    ``uncertainty``: half the reading's round trip."""

    offset: float
    uncertainty: float


async def read_offset(agent: AgentCommands, *, timeout: float = 5.0) -> ClockReading:
    """How far the guest's clock is from the host's now (one ``guest-get-time``)."""
    before = time.time_ns()
    guest = int(await agent.execute("guest-get-time", timeout=timeout))
    after = time.time_ns()
    return ClockReading(offset=(guest - (before + after) / 2) / 1e9, uncertainty=(after - before) / 2e9)


async def set_to_host(agent: AgentCommands, *, timeout: float = 20.0) -> None:
    """Set the guest's clock to the host's (the agent also writes the RTC: ``hwclock``, slow under TCG)."""
    await agent.execute("guest-set-time", {"time": time.time_ns()}, timeout=timeout)


class ClockKeeper:
    """Checks a running guest's clock every ``interval`` s and sets it when it is off by more than
    ``threshold`` s; ``correct=False`` only measures. ``running`` says whether to check now (not
    while paused or saving); ``on_fix`` hears of every correction."""

    def __init__(self, agent: AgentCommands, *, interval: float, threshold: float, correct: bool = True,
                 running: Callable[[], bool] = lambda: True,
                 on_fix: Callable[[ClockReading], None] = lambda _r: None) -> None:
        self.agent = agent
        self.interval = interval
        self.threshold = threshold
        self.correct = correct
        self.running = running
        self.on_fix = on_fix
        self.last: ClockReading | None = None
        self.fixes = 0

    async def check(self) -> ClockReading | None:
        """One check: the reading (None if the agent did not answer or was too slow to trust)."""
        try:
            reading = await read_offset(self.agent)
        except (VmkitError, TimeoutError) as exc:
            log.debug("clock check skipped: %s", exc)
            return None
        if reading.uncertainty > MAX_UNCERTAINTY:
            return None
        self.last = reading
        if self.correct and abs(reading.offset) - reading.uncertainty > self.threshold:
            try:
                await set_to_host(self.agent)
            except (VmkitError, TimeoutError) as exc:
                log.warning("the guest clock is %+.3f s off and could not be set: %s", reading.offset, exc)
                return reading
            self.fixes += 1
            log.info("guest clock was %+.3f s off the host's: set to the host's time", reading.offset)
            self.on_fix(reading)
        return reading

    async def run(self) -> None:
        """Check every ``interval`` seconds, for ever (cancel the task to stop)."""
        while True:
            await asyncio.sleep(self.interval)
            if self.running():
                await self.check()
