"""Running a command in the guest through qemu-guest-agent (``guest-exec``).

The agent starts the process and keeps its output; the host asks ``guest-exec-status`` until
it has exited (the protocol has no completion event, so this is the one place vmkit asks
repeatedly, with a short back-off). Between those short commands the agent channel is free, so
several commands run in the guest at once over one shared connection
(:class:`vmkit.runtime.guest.channel.AgentChannel`).
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass

from vmkit.errors import CommandCannotRun, CommandNotFound, VmTimeoutError
from vmkit.runtime.guest.agent import GuestAgentError
from vmkit.runtime.guest.channel import AgentCommands


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None


async def guest_exec(agent: AgentCommands, argv: list[str], *, timeout: float = 60.0,
                     stdin: bytes | None = None, max_poll: float = 0.5) -> ExecResult:
    """Run ``argv`` in the guest; its output and exit code (``timeout``: VmTimeoutError). Whether it
    has exited is asked after 20 ms, then twice as long each time, at most every ``max_poll`` seconds."""
    args: dict[str, object] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
    if stdin is not None:
        args["input-data"] = base64.b64encode(stdin).decode()
    try:
        started = await agent.execute("guest-exec", args)
    except GuestAgentError as exc:
        if exc.error_class is None:  # the channel failed, not the guest
            raise
        # the agent only says why in words: g_spawn's strerror for the program
        cls = CommandNotFound if "No such file or directory" in exc.message else CommandCannotRun
        raise cls(f"the guest cannot run {argv[0]!r}: {exc.message}",
                  hint="give the program's full path, or run it through sh -c") from None
    try:
        pid = int(started["pid"])
    except (TypeError, KeyError, ValueError):
        raise GuestAgentError(f"the guest agent's guest-exec reply has no pid: {started!r:.200}") from None
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        status = await agent.execute("guest-exec-status", {"pid": pid})
        if not isinstance(status, dict):
            raise GuestAgentError(f"the guest agent's guest-exec-status reply is not an object: {status!r:.200}")
        if status.get("exited"):
            break
        if time.monotonic() > deadline:
            raise VmTimeoutError(f"{argv[0]} still running in the guest after {timeout:.0f} s",
                                 hint="raise --timeout")
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_poll)
    try:
        return ExecResult(
            exit_code=int(status.get("exitcode", 128 + int(status.get("signal", 0)))),
            stdout=base64.b64decode(status.get("out-data", "")),
            stderr=base64.b64decode(status.get("err-data", "")),
            signal=status.get("signal"),
        )
    except (TypeError, ValueError):
        raise GuestAgentError(f"the guest agent's guest-exec-status reply is malformed: {status!r:.200}") from None
