"""A small client for qemu-guest-agent (qga) on its virtio-serial channel, and the clock fix-up.

On the host the agent channel is a unix socket (QEMU's ``-chardev socket,server=on`` behind a
``virtserialport`` named ``org.qemu.guest_agent.0``). vmkit looks for it as ``qga.sock`` in the
machine's directory (:func:`agent_socket`), which is where the Debian guest's channel is wired.

Protocol (QEMU's ``docs/interop/qemu-ga-ref``): JSON commands, one reply each. The channel has no
framing a client can trust after a reconnect (stale replies may be queued), so every session
starts with ``guest-sync-delimited``: the client sends a 0xFF byte (which resets the agent's
parser) and ``{"execute": "guest-sync-delimited", "arguments": {"id": N}}``; the agent answers
0xFF followed by ``{"return": N}``. Everything before the 0xFF, and replies with another id, are
stale and dropped. Sockets are read with our own buffer (``makefile`` breaks after a timeout).

The agent ends every reply with a newline (and never puts one inside: its JSON is compact), so a
message is one line: the buffer is searched for the newline only in the bytes that arrived since
the last search. A line longer than ``max_message`` bytes (:data:`MAX_MESSAGE`: the largest reply
vmkit asks for is a 1 MiB ``guest-file-read``, 1.4 MiB in base64), or JSON nested too deeply to
decode, is a :class:`GuestAgentError`, and the session is unusable afterwards: a hostile or broken
agent cannot make the host buffer without bound. A line that is not a JSON object is dropped.

A channel whose guest side has no agent accepts the connection and never answers: every call
has a timeout and raises :class:`GuestAgentError` with ``timed_out=True``.

:func:`correct_guest_clock` is the clock fix-up after a restore or a snapshot revert: while a
machine is saved or paused its virtual clock stands still, so the guest's wall clock is behind
by the time spent suspended. With an agent it is set to the host's time (``guest-set-time``,
which also writes the guest's RTC); without one nothing is changed and the result says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from vmkit.errors import ExitCode, VmkitError

AGENT_SOCKET_NAME = "qga.sock"
DEFAULT_TIMEOUT = 5.0
MAX_MESSAGE = 4 << 20
"""The longest agent message accepted by default (bytes, up to its newline)."""
_DELIMITER = b"\xff"


class GuestAgentError(VmkitError):
    """The guest agent is unreachable, did not answer in time, or refused a command."""

    exit_code = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None, timed_out: bool = False,
                 error_class: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.timed_out = timed_out
        self.error_class = error_class


class GuestAgent:
    """One session with qemu-guest-agent over a unix socket (an async context manager).

    ``async with GuestAgent(path) as agent: await agent.set_time()`` connects and syncs.
    """

    def __init__(self, path: Path, *, timeout: float = DEFAULT_TIMEOUT, max_message: int = MAX_MESSAGE) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.max_message = max_message
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buf = bytearray()
        self._scanned = 0  # how much of _buf is known to hold no newline
        self._failed: GuestAgentError | None = None  # the protocol error that ended the session

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path)), self.timeout)
        except (OSError, TimeoutError) as exc:
            raise GuestAgentError(f"cannot connect to the guest agent channel {self.path}: {exc}") from exc
        await self.sync()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
            self._writer = None
            self._reader = None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- protocol -------------------------------------------------------------------------------
    async def sync(self) -> None:
        """``guest-sync-delimited``: drop whatever is stale on the channel."""
        token = secrets.randbelow(1 << 31)
        await self._send(_DELIMITER + _encode("guest-sync-delimited", {"id": token}))

        async def wait() -> None:
            while True:
                await self._skip_to_delimiter()
                reply = await self._read_message()
                if reply.get("return") == token:
                    return

        await self._with_timeout(wait(), "guest-sync-delimited")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """Run one agent command and return its ``return`` value."""
        await self._send(_encode(command, arguments))
        reply = await self._with_timeout(self._read_message(), command, timeout)
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise GuestAgentError(f"the guest agent refused {command}: {err.get('desc', reply['error'])}",
                                  error_class=err.get("class"))
        return reply.get("return")

    async def set_time(self, ns: int | None = None) -> None:
        """Set the guest's clock to ``ns`` (nanoseconds since the epoch; default: the host's now).

        ``None`` explicitly would make the agent read the guest's RTC instead; vmkit always passes
        the host time, which is right for guests whose RTC is in UTC or not.
        """
        await self.execute("guest-set-time", {"time": time.time_ns() if ns is None else ns})

    async def get_time(self) -> int:
        """The guest's clock, nanoseconds since the epoch."""
        return int(await self.execute("guest-get-time"))

    # -- internals ------------------------------------------------------------------------------
    async def _send(self, data: bytes) -> None:
        if self._failed is not None:
            raise GuestAgentError(f"the guest agent session ended: {self._failed.message}")
        if self._writer is None:
            raise GuestAgentError("the guest agent session is not connected")
        try:
            self._writer.write(data)
            await asyncio.wait_for(self._writer.drain(), self.timeout)
        except (OSError, ConnectionError, TimeoutError) as exc:
            raise GuestAgentError(f"cannot write to the guest agent channel {self.path}: {exc}") from exc

    async def _with_timeout(self, aw: Any, what: str, timeout: float | None = None) -> Any:
        limit = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(aw, limit)
        except TimeoutError:
            raise GuestAgentError(
                f"the guest agent did not answer {what} within {limit:g} s",
                hint="is qemu-guest-agent installed and running in the guest?", timed_out=True,
            ) from None

    async def _fill(self) -> None:
        assert self._reader is not None
        data = await self._reader.read(65536)
        if not data:
            raise GuestAgentError(f"the guest agent channel {self.path} closed")
        self._buf += data

    async def _skip_to_delimiter(self) -> None:
        while True:
            i = self._buf.find(_DELIMITER)
            if i >= 0:
                del self._buf[: i + 1]
                self._scanned = 0
                return
            self._buf.clear()
            await self._fill()

    def _fail(self, message: str) -> GuestAgentError:
        self._failed = GuestAgentError(message, hint="the guest agent misbehaves: restart it in the guest "
                                       "(systemctl restart qemu-guest-agent) or reboot the guest")
        self._buf.clear()
        self._scanned = 0
        return self._failed

    async def _read_line(self) -> bytes:
        """The next line (without its newline); at most ``max_message`` bytes."""
        while True:
            i = self._buf.find(b"\n", self._scanned)
            if 0 <= i <= self.max_message:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                self._scanned = 0
                return line
            if i > self.max_message or len(self._buf) > self.max_message:
                raise self._fail(f"the guest agent on {self.path} sent a message longer than "
                                 f"{self.max_message} bytes (the most vmkit accepts)")
            self._scanned = len(self._buf)
            await self._fill()

    async def _read_message(self) -> dict[str, Any]:
        while True:
            line = (await self._read_line()).strip()
            if not line:
                continue
            try:
                obj = json.loads(line.decode("utf-8", errors="surrogateescape"))  # round-trips every byte
            except RecursionError:
                raise self._fail(f"the guest agent on {self.path} sent JSON nested too deeply to read") from None
            except ValueError:
                continue  # a line that is not JSON: dropped
            if isinstance(obj, dict):
                return obj


def _encode(command: str, arguments: dict[str, Any] | None) -> bytes:
    msg: dict[str, Any] = {"execute": command}
    if arguments is not None:
        msg["arguments"] = arguments
    return json.dumps(msg).encode() + b"\n"


# --------------------------------------------------------------------------- clock fix-up


class ClockSetter(Protocol):
    """Anything that can set a guest's wall clock (the guest agent; a fake in tests)."""

    async def set_time(self, ns: int | None = None) -> None: ...


@dataclass(frozen=True)
class ClockResult:
    """What the clock fix-up did.

    ``corrected``: the guest clock was set to the host's time. ``behind_seconds``: how far behind
    it was expected to be (the time the machine spent suspended), if known. ``message`` says it in
    words, for logs and the CLI.
    """

    corrected: bool
    behind_seconds: float | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"corrected": self.corrected, "behind_seconds": self.behind_seconds, "message": self.message}


def agent_socket(workdir: Path) -> Path | None:
    """The guest agent channel of the machine in ``workdir``, if it has one."""
    path = workdir / AGENT_SOCKET_NAME
    return path if path.is_socket() else None


def _behind(seconds: float | None) -> str:
    if seconds is None:
        return "by the time it was suspended"
    return f"by about {seconds:.0f} s" if seconds >= 1 else "by less than a second"


async def correct_guest_clock(socket_path: Path | None, *, behind_seconds: float | None = None,
                              timeout: float = DEFAULT_TIMEOUT, setter: ClockSetter | None = None) -> ClockResult:
    """Set the guest clock to the host's time through the agent; never raises.

    ``setter`` replaces the agent (tests). Without an agent channel, or when the agent does not
    answer, the clock is left alone and the result says how far behind it is.
    """
    if setter is not None:
        try:
            await setter.set_time(time.time_ns())
        except VmkitError as exc:
            return ClockResult(False, behind_seconds, f"clock not corrected: {exc.message}")
        by = " by the guest agent" if socket_path is not None else ""
        return ClockResult(True, behind_seconds, f"guest clock set to the host's time{by}")
    if socket_path is None:
        return ClockResult(False, behind_seconds,
                           f"no guest agent: clock not corrected (the guest clock is behind {_behind(behind_seconds)}"
                           "; it catches up only through NTP or a reboot)")
    try:
        async with GuestAgent(socket_path, timeout=timeout) as agent:
            await agent.set_time(time.time_ns())
    except GuestAgentError as exc:
        return ClockResult(False, behind_seconds,
                           f"guest agent unavailable ({exc.message}): clock not corrected "
                           f"(the guest clock is behind {_behind(behind_seconds)})")
    return ClockResult(True, behind_seconds, "guest clock set to the host's time by the guest agent")
