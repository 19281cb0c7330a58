"""The periodic clock fix-up against a fake guest agent whose clock runs off the host's."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from vmkit.config import ClockSync, parse_config
from vmkit.runtime.guest.agent import GuestAgentError
from vmkit.runtime.guest.clock import ClockKeeper, ClockReading, read_offset


class FakeAgent:
    """A guest whose clock is ``offset`` seconds off the host's; answers after ``delay`` seconds."""

    def __init__(self, offset: float, delay: float = 0.0, fail: bool = False) -> None:
        self.offset = offset
        self.delay = delay
        self.fail = fail
        self.commands: list[str] = []

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        self.commands.append(command)
        if self.fail:
            raise GuestAgentError("the guest agent session ended: connection reset")
        await asyncio.sleep(self.delay)
        if command == "guest-get-time":
            return time.time_ns() + int(self.offset * 1e9)
        if command == "guest-set-time":
            assert arguments is not None
            self.offset = (arguments["time"] - time.time_ns()) / 1e9
            return {}
        raise AssertionError(command)


def test_reading_is_the_guest_minus_the_host() -> None:
    r = asyncio.run(read_offset(FakeAgent(-2.5)))
    assert abs(r.offset + 2.5) < 0.05 and 0 <= r.uncertainty < 0.05


def test_keeper_sets_a_clock_that_is_off_and_reports_it() -> None:
    agent = FakeAgent(-1.2)
    seen: list[ClockReading] = []
    keeper = ClockKeeper(agent, interval=1, threshold=0.25, on_fix=seen.append)
    asyncio.run(keeper.check())
    assert agent.commands == ["guest-get-time", "guest-set-time"] and abs(agent.offset) < 0.05
    assert keeper.fixes == 1 and len(seen) == 1 and abs(seen[0].offset + 1.2) < 0.05
    asyncio.run(keeper.check())  # now within the threshold: read only
    assert agent.commands[2:] == ["guest-get-time"] and keeper.fixes == 1


def test_keeper_leaves_a_close_clock_alone_and_measure_only_never_sets() -> None:
    agent = FakeAgent(0.1)
    asyncio.run(ClockKeeper(agent, interval=1, threshold=0.25).check())
    assert agent.commands == ["guest-get-time"]
    far = FakeAgent(30.0)
    keeper = ClockKeeper(far, interval=1, threshold=0.25, correct=False)
    reading = asyncio.run(keeper.check())
    assert far.commands == ["guest-get-time"] and reading is not None and abs(reading.offset - 30) < 0.05
    assert keeper.last == reading and keeper.fixes == 0


def test_keeper_does_not_trust_a_slow_reading_or_fail_on_a_missing_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmkit.runtime.guest.clock.MAX_UNCERTAINTY", 0.05)
    slow = FakeAgent(-5.0, delay=0.2)
    assert asyncio.run(ClockKeeper(slow, interval=1, threshold=0.25).check()) is None
    assert slow.commands == ["guest-get-time"]  # not set on a reading it cannot trust
    gone = FakeAgent(-5.0, fail=True)
    assert asyncio.run(ClockKeeper(gone, interval=1, threshold=0.25).check()) is None


def test_run_checks_only_while_running() -> None:
    agent = FakeAgent(-3.0)
    state = {"running": False}

    async def main() -> None:
        keeper = ClockKeeper(agent, interval=0.05, threshold=0.25, running=lambda: state["running"])
        task = asyncio.create_task(keeper.run())
        await asyncio.sleep(0.2)
        assert agent.commands == []
        state["running"] = True
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert "guest-set-time" in agent.commands and abs(agent.offset) < 0.05


def test_clock_sync_settings() -> None:
    assert ClockSync().enabled and ClockSync().threshold == 0.25
    cfg = parse_config({"name": "a", "boot": {"kernel": "/k"}, "clock_sync": {"enabled": False, "interval": 10}})
    assert cfg.clock_sync == ClockSync(enabled=False, interval=10)
    with pytest.raises(Exception, match=r"clock_sync\.interval"):
        parse_config({"name": "a", "boot": {"kernel": "/k"}, "clock_sync": {"interval": 0}})
