"""Running a command in the guest through qemu-guest-agent (``guest-exec``).

The agent starts the process and keeps its output; the host asks ``guest-exec-status`` until
it has exited (the protocol has no completion event, so this is the one place vmkit asks
repeatedly, with a short back-off).
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import VmTimeoutError
from vmkit.guest.agent import GuestAgent, GuestAgentError

EXEC_MAX_MESSAGE = 48 << 20
"""The longest agent message an exec session accepts: qemu-guest-agent keeps up to 16 MiB of each
of stdout and stderr (GUEST_EXEC_MAX_OUTPUT), and ``guest-exec-status`` returns both in base64."""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None


async def guest_exec(socket_path: Path, argv: list[str], *, timeout: float = 60.0,
                     stdin: bytes | None = None) -> ExecResult:
    """Run ``argv`` in the guest; its output and exit code (``timeout``: VmTimeoutError)."""
    async with GuestAgent(socket_path, timeout=10.0, max_message=EXEC_MAX_MESSAGE) as agent:
        return await exec_in_session(agent, argv, timeout=timeout, stdin=stdin)


async def exec_in_session(agent: GuestAgent, argv: list[str], *, timeout: float = 60.0,
                          stdin: bytes | None = None) -> ExecResult:
    """Run ``argv`` in the guest through an open agent session (see :func:`guest_exec`)."""
    args: dict[str, object] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
    if stdin is not None:
        args["input-data"] = base64.b64encode(stdin).decode()
    started = await agent.execute("guest-exec", args)
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
        delay = min(delay * 2, 0.5)
    try:
        return ExecResult(
            exit_code=int(status.get("exitcode", 128 + int(status.get("signal", 0)))),
            stdout=base64.b64decode(status.get("out-data", "")),
            stderr=base64.b64decode(status.get("err-data", "")),
            signal=status.get("signal"),
        )
    except (TypeError, ValueError):
        raise GuestAgentError(f"the guest agent's guest-exec-status reply is malformed: {status!r:.200}") from None
