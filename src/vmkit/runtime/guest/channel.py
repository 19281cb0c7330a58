"""The machine's one connection to qemu-guest-agent, shared by every user of the agent.

qemu-guest-agent serves one client at a time on its virtio-serial port, and QEMU's chardev
accepts one connection: two programs that each open ``qga.sock`` block each other (``vmkit exec``
waited for ``bench fs``) or interleave replies. So the supervisor holds the only connection and
everything that talks to the agent (``POST /v1/exec``, file transfer, the clock fix-up, the
readiness check) sends its commands through :class:`AgentChannel`: one command and its reply at
a time, in the order asked. A long-running ``guest-exec`` holds the channel only for its short
``guest-exec`` and ``guest-exec-status`` commands, so two execs run side by side in the guest.

The connection is opened (and synced with ``guest-sync-delimited``) on first use, and dropped
after a transport failure or timeout, so the next command starts clean: after a guest reboot the
agent restarts and the old session's replies must not be read as new ones.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Protocol

from vmkit.runtime.guest.agent import GuestAgent, GuestAgentError

MAX_MESSAGE = 48 << 20
"""The longest agent message the shared channel accepts: qemu-guest-agent keeps up to 16 MiB of each
of stdout and stderr of a command (GUEST_EXEC_MAX_OUTPUT), and ``guest-exec-status`` returns both
in base64. A longer line, or JSON nested too deeply, ends the session (see GuestAgent)."""


class AgentCommands(Protocol):
    """What callers of the agent need: run one command, get its ``return`` value."""

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any: ...


class AgentChannel:
    """One shared, lazily opened, self-healing agent session (see the module's docs)."""

    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._agent: GuestAgent | None = None
        self._lock = asyncio.Lock()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """Send one command (connecting first if needed) and return its ``return`` value."""
        async with self._lock:
            if self._agent is None:
                agent = GuestAgent(self.path, timeout=self.timeout if timeout is None else min(timeout, self.timeout),
                                   max_message=MAX_MESSAGE)
                await agent.connect()
                # the first caller's timeout bounds the connection, not every later command of the session
                agent.timeout = self.timeout
                self._agent = agent
            try:
                return await self._agent.execute(command, arguments, timeout=timeout)
            except GuestAgentError as exc:
                if exc.error_class is None:  # transport trouble, not the agent refusing: start afresh
                    await self._drop()
                raise
            except BaseException:  # cancelled mid-reply: the next reply on the wire is not ours
                await self._drop()
                raise

    async def set_time(self, ns: int | None = None) -> None:
        """The clock fix-up's setter (see :class:`vmkit.runtime.guest.agent.ClockSetter`)."""
        await self.execute("guest-set-time", {"time": time.time_ns() if ns is None else ns})

    async def ping(self, timeout: float) -> bool:
        """Whether the agent answers ``guest-ping`` within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self.execute("guest-ping", timeout=timeout), timeout + 1)
        except (GuestAgentError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _drop(self) -> None:
        if self._agent is not None:
            agent, self._agent = self._agent, None
            await agent.close()
