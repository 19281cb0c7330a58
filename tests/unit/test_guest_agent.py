"""The guest agent client and the clock fix-up, against a fake agent speaking qga's JSON protocol."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import serving_unix
from vmkit.errors import VmkitError
from vmkit.runtime.guest.agent import GuestAgent, GuestAgentError, agent_socket, correct_guest_clock


@dataclass
class FakeAgent:
    """A qemu-guest-agent stand-in on a unix socket.

    ``stale`` is written to each new connection first (replies a previous client left behind);
    ``silent`` never answers (a channel without an agent in the guest).
    """

    path: Path
    stale: bytes = b""
    silent: bool = False
    refuse: dict[str, str] = field(default_factory=dict)
    clock_ns: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    saw_delimiter: bool = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.stale)
        buf = b""
        try:
            while data := await reader.read(4096):
                if b"\xff" in data:
                    self.saw_delimiter = True
                buf += data.replace(b"\xff", b"")
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    self.received.append(msg)
                    if self.silent:
                        continue
                    writer.write(self.reply(msg))
                    await writer.drain()
        finally:
            writer.close()

    def reply(self, msg: dict[str, Any]) -> bytes:
        cmd = msg["execute"]
        args = msg.get("arguments", {})
        if cmd in self.refuse:
            return json.dumps({"error": {"class": "GenericError", "desc": self.refuse[cmd]}}).encode() + b"\n"
        if cmd == "guest-sync-delimited":
            return b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n"
        if cmd == "guest-set-time":
            self.clock_ns = int(args["time"])
            return b'{"return": {}}\n'
        if cmd == "guest-get-time":
            return json.dumps({"return": self.clock_ns}).encode() + b"\n"
        return json.dumps({"error": {"class": "CommandNotFound", "desc": f"{cmd} not found"}}).encode() + b"\n"


@contextlib.asynccontextmanager
async def serving(agent: FakeAgent) -> AsyncIterator[FakeAgent]:
    async with serving_unix(agent.handle, agent.path):
        yield agent


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "qga.sock"


async def test_sync_then_set_and_get_time(sock: Path) -> None:
    async with serving(FakeAgent(sock)) as fake, GuestAgent(sock) as agent:
        await agent.set_time(1_700_000_000_123_456_789)
        assert await agent.get_time() == 1_700_000_000_123_456_789
    assert fake.saw_delimiter, "the client must reset the agent's parser with 0xFF before syncing"
    assert [m["execute"] for m in fake.received] == ["guest-sync-delimited", "guest-set-time", "guest-get-time"]


async def test_stale_replies_before_the_delimiter_are_dropped(sock: Path) -> None:
    stale = b'{"return": {}}\n{"return": 42}\n\xff{"return": 7}\n'  # an old sync with another id too
    async with serving(FakeAgent(sock, stale=stale)), GuestAgent(sock) as agent:
        assert await agent.execute("guest-get-time") == 0


async def test_refused_command_raises_with_the_agents_reason(sock: Path) -> None:
    async with serving(FakeAgent(sock, refuse={"guest-set-time": "Operation not permitted"})), \
            GuestAgent(sock) as agent:
        with pytest.raises(GuestAgentError, match="Operation not permitted") as exc:
            await agent.set_time()
        assert exc.value.error_class == "GenericError"
        assert isinstance(exc.value, VmkitError)


async def test_channel_without_an_agent_times_out(sock: Path) -> None:
    async with serving(FakeAgent(sock, silent=True)):
        started = time.monotonic()
        with pytest.raises(GuestAgentError, match="did not answer guest-sync-delimited") as exc:
            async with GuestAgent(sock, timeout=0.5):
                pass
        assert exc.value.timed_out
        assert time.monotonic() - started < 3


async def test_no_socket_is_a_clear_error(sock: Path) -> None:
    with pytest.raises(GuestAgentError, match="cannot connect"):
        async with GuestAgent(sock, timeout=0.5):
            pass


async def test_correct_clock_through_the_agent(sock: Path) -> None:
    async with serving(FakeAgent(sock)) as fake:
        before = time.time_ns()
        result = await correct_guest_clock(sock, behind_seconds=42.0)
    assert result.corrected and result.behind_seconds == 42.0
    assert "guest agent" in result.message
    assert before <= fake.clock_ns <= time.time_ns()


async def test_correct_clock_without_agent_says_so(sock: Path) -> None:
    result = await correct_guest_clock(None, behind_seconds=120.0)
    assert not result.corrected
    assert result.message.startswith("no guest agent: clock not corrected")
    assert "120 s" in result.message


async def test_correct_clock_with_a_silent_agent_does_not_raise(sock: Path) -> None:
    async with serving(FakeAgent(sock, silent=True)):
        result = await correct_guest_clock(sock, behind_seconds=3.0, timeout=0.3)
    assert not result.corrected and "did not answer" in result.message


async def test_correct_clock_with_a_custom_setter() -> None:
    calls: list[int | None] = []

    class Setter:
        async def set_time(self, ns: int | None = None) -> None:
            calls.append(ns)

    result = await correct_guest_clock(None, setter=Setter())
    assert result.corrected and len(calls) == 1 and calls[0] is not None


def test_agent_socket_lookup(tmp_path: Path) -> None:
    assert agent_socket(tmp_path) is None
    (tmp_path / "qga.sock").write_text("not a socket")
    assert agent_socket(tmp_path) is None


# --------------------------------------------------------------------------- a hostile agent


@dataclass
class HostileAgent:
    """Answers the sync like an agent, then answers the next command with ``payload`` (bytes, or
    ``chunks`` pieces of ``chunk`` bytes, streamed until the client hangs up)."""

    path: Path
    payload: bytes = b""
    chunk: bytes = b""
    chunks: int = 0
    sent: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        try:
            while data := await reader.read(4096):
                buf += data.replace(b"\xff", b"")
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    msg = json.loads(line)
                    if msg["execute"] == "guest-sync-delimited":
                        writer.write(b"\xff" + json.dumps({"return": msg["arguments"]["id"]}).encode() + b"\n")
                        await writer.drain()
                        continue
                    writer.write(self.payload)
                    for _ in range(self.chunks):
                        writer.write(self.chunk)
                        await writer.drain()
                        self.sent += len(self.chunk)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def hostile(agent: HostileAgent) -> AsyncIterator[HostileAgent]:
    async with serving_unix(agent.handle, agent.path):
        yield agent


async def test_an_endless_message_is_cut_off_at_the_limit(sock: Path) -> None:
    """280 MiB of one unterminated JSON string: refused once it passes the limit, in linear time."""
    import tracemalloc

    fake = HostileAgent(sock, payload=b'{"return": "', chunk=b"a" * (1 << 20), chunks=280)
    async with hostile(fake), GuestAgent(sock, timeout=20) as agent:
        tracemalloc.start()
        started = time.monotonic()
        try:
            with pytest.raises(GuestAgentError, match="longer than") as info:
                await agent.execute("guest-get-time")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert not info.value.timed_out
        assert time.monotonic() - started < 5
        assert peak < 3 * agent.max_message, f"buffered {peak} bytes"
        assert fake.sent < 100 << 20  # it stopped reading long before the end
        with pytest.raises(GuestAgentError, match="session ended"):  # the session is unusable now
            await agent.execute("guest-get-time")


async def test_deeply_nested_json_is_a_clean_error(sock: Path) -> None:
    fake = HostileAgent(sock, payload=b"[" * 200_000 + b"]" * 200_000 + b"\n")
    async with hostile(fake), GuestAgent(sock) as agent:
        with pytest.raises(GuestAgentError, match="nested too deeply"):
            await agent.execute("guest-get-time")


async def test_the_largest_legitimate_reply_passes(sock: Path) -> None:
    """A guest-file-read of 1 MiB (1.4 MiB of base64), arriving in small pieces."""
    import base64

    reply = json.dumps({"return": {"count": 1 << 20, "buf-b64": base64.b64encode(b"x" * (1 << 20)).decode(),
                                   "eof": False}}).encode() + b"\n"
    fake = HostileAgent(sock, chunk=reply, chunks=1)
    async with hostile(fake), GuestAgent(sock) as agent:
        got = await agent.execute("guest-file-read", {"handle": 1, "count": 1 << 20})
        assert base64.b64decode(got["buf-b64"]) == b"x" * (1 << 20)


async def test_a_message_in_many_pieces_and_noise_lines(sock: Path) -> None:
    fake = HostileAgent(sock, payload=b"not json\n[1, 2]\n\n" + b'{"return":' + b" " * 100_000, chunk=b"42}\n",
                        chunks=1)
    async with hostile(fake), GuestAgent(sock) as agent:
        assert await agent.execute("guest-get-time") == 42
