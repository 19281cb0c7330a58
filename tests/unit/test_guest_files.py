"""`vmkit cp` out of and into the guest, against a fake qemu-guest-agent on a unix socket that
serves guest files (guest-file-*) and runs `stat` (guest-exec): the host file's mode, a directory
destination, and agents that misbehave."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import serving_unix
from vmkit.errors import ConfigError
from vmkit.runtime.guest.agent import GuestAgentError
from vmkit.runtime.guest.channel import AgentChannel
from vmkit.runtime.guest.files import copy_from_guest, copy_to_guest, current_umask, host_destination


@dataclass
class FileAgent:
    """Guest files are ``files`` (path -> (data, mode)); ``exec_disabled``: guest-exec refused;
    ``read_reply``: replaces every guest-file-read reply (a broken agent)."""

    path: Path
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    exec_disabled: bool = False
    read_reply: Any = None
    handles: dict[int, list[Any]] = field(default_factory=dict)  # handle -> [path, offset, written]
    closed: list[int] = field(default_factory=list)
    execs: list[list[str]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        try:
            while data := await reader.read(1 << 16):
                buf += data.replace(b"\xff", b"")
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        writer.write(self.reply(json.loads(line)))
                        await writer.drain()
        finally:
            writer.close()

    def reply(self, msg: dict[str, Any]) -> bytes:
        cmd, args = msg["execute"], msg.get("arguments", {})
        if cmd == "guest-sync-delimited":
            return b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n"
        try:
            result = getattr(self, "do_" + cmd.replace("-", "_"))(args)
        except OSError as exc:
            return _json({"error": {"class": "GenericError", "desc": f"failed to open file: {exc.strerror}"}})
        except LookupError as exc:
            return _json({"error": {"class": "CommandNotFound", "desc": str(exc)}})
        return _json({"return": result})

    def do_guest_file_open(self, args: dict[str, Any]) -> int:
        path = args["path"]
        if args["mode"] == "rb" and path not in self.files:
            raise FileNotFoundError(2, "No such file or directory")
        if args["mode"] == "wb":
            if path.endswith("/") or path in ("/tmp", "/"):
                raise IsADirectoryError(21, "Is a directory")
            self.files[path] = (b"", 0o644)
        h = 1000 + len(self.handles)
        self.handles[h] = [path, 0]
        return h

    def do_guest_file_read(self, args: dict[str, Any]) -> Any:
        if self.read_reply is not None:
            return self.read_reply
        path, off = self.handles[args["handle"]]
        data = self.files[path][0][off:off + args["count"]]
        self.handles[args["handle"]][1] = off + len(data)
        return {"count": len(data), "buf-b64": base64.b64encode(data).decode(),
                "eof": off + len(data) >= len(self.files[path][0])}

    def do_guest_file_write(self, args: dict[str, Any]) -> dict[str, Any]:
        path = self.handles[args["handle"]][0]
        data, mode = self.files[path]
        piece = base64.b64decode(args["buf-b64"])
        self.files[path] = (data + piece, mode)
        return {"count": len(piece), "eof": False}

    def do_guest_file_flush(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}

    def do_guest_file_close(self, args: dict[str, Any]) -> dict[str, Any]:
        self.closed.append(args["handle"])
        return {}

    def do_guest_exec(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.exec_disabled:
            raise LookupError("guest-exec has been disabled")
        argv = [args["path"], *args.get("arg", [])]
        self.execs.append(argv)
        self._last = argv
        return {"pid": 4242}

    def do_guest_exec_status(self, args: dict[str, Any]) -> dict[str, Any]:
        argv = self._last
        if argv[:2] == ["stat", "-L"] and argv[-1] in self.files:
            out = f"{self.files[argv[-1]][1]:o}\n".encode()
            return {"exited": True, "exitcode": 0, "out-data": base64.b64encode(out).decode()}
        return {"exited": True, "exitcode": 1, "err-data": base64.b64encode(b"stat: cannot stat").decode()}


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


@contextlib.asynccontextmanager
async def serving(agent: FileAgent) -> AsyncIterator[FileAgent]:
    async with serving_unix(agent.handle, agent.path):
        yield agent


@pytest.fixture
def agent(tmp_path: Path) -> FileAgent:
    return FileAgent(tmp_path / "qga.sock", files={
        "/etc/secret": (b"s3cret\n", 0o600),
        "/usr/bin/tool": (b"#!/bin/sh\n", 0o4755),
        "/srv/big": (os.urandom(3 * (1 << 20) + 17), 0o640),
    })


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_overwriting_an_existing_file_keeps_its_mode(agent: FileAgent, tmp_path: Path, umask022: None) -> None:
    dst = tmp_path / "secret.copy"
    dst.write_bytes(b"old")
    dst.chmod(0o600)
    async with serving(agent):
        await copy_from_guest(AgentChannel(agent.path), "/srv/big", dst)
    assert dst.read_bytes() == agent.files["/srv/big"][0]
    assert mode(dst) == 0o600
    assert agent.execs == []  # the guest's mode is not even asked


async def test_a_new_file_gets_the_guest_mode_less_the_umask(agent: FileAgent, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        async with serving(agent):
            await copy_from_guest(AgentChannel(agent.path), "/etc/secret", tmp_path / "a")
            await copy_from_guest(AgentChannel(agent.path), "/srv/big", tmp_path / "b")
            await copy_from_guest(AgentChannel(agent.path), "/usr/bin/tool", tmp_path / "c")
    finally:
        os.umask(old)
    assert (mode(tmp_path / "a"), mode(tmp_path / "b"), mode(tmp_path / "c")) == (0o600, 0o640, 0o750)  # no setuid
    assert agent.execs[0] == ["stat", "-L", "-c", "%a", "--", "/etc/secret"]
    assert len(agent.closed) == 3


async def test_without_guest_exec_a_new_file_is_0666_less_the_umask(agent: FileAgent, tmp_path: Path,
                                                                   umask022: None) -> None:
    agent.exec_disabled = True
    async with serving(agent):
        n = await copy_from_guest(AgentChannel(agent.path), "/etc/secret", tmp_path / "a")
    assert n == 7 and (tmp_path / "a").read_bytes() == b"s3cret\n"
    assert mode(tmp_path / "a") == 0o644


async def test_a_directory_destination_receives_the_file_under_its_name(agent: FileAgent, tmp_path: Path) -> None:
    dest = tmp_path / "dir"
    dest.mkdir()
    async with serving(agent):
        await copy_from_guest(AgentChannel(agent.path), "/etc/secret", dest)
    assert (dest / "secret").read_bytes() == b"s3cret\n"
    assert mode(dest / "secret") == 0o600 & ~current_umask()
    with pytest.raises(ConfigError, match="names no guest file"):
        host_destination(dest, "/etc/")


async def test_a_missing_guest_file_leaves_nothing(agent: FileAgent, tmp_path: Path) -> None:
    async with serving(agent):
        with pytest.raises(GuestAgentError, match="No such file"):
            await copy_from_guest(AgentChannel(agent.path), "/nope", tmp_path / "x")
    assert list(tmp_path.iterdir()) == [agent.path]


@pytest.mark.parametrize("reply", [[], {"buf-b64": 5}, {"buf-b64": "!!not base64!!"},
                                   {"buf-b64": base64.b64encode(b"x" * ((1 << 20) + 1)).decode()}])
async def test_a_malformed_read_reply_is_an_agent_error_and_keeps_the_old_file(
        agent: FileAgent, tmp_path: Path, reply: Any) -> None:
    agent.read_reply = reply
    dst = tmp_path / "keep"
    dst.write_bytes(b"old")
    async with serving(agent):
        with pytest.raises(GuestAgentError, match=r"guest-file-read|the guest agent returned"):
            await copy_from_guest(AgentChannel(agent.path), "/etc/secret", dst)
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "qga.sock"]  # no temp file left
    assert agent.closed  # the guest file was closed anyway


async def test_copy_into_a_guest_directory_with_a_final_slash(agent: FileAgent, tmp_path: Path) -> None:
    src = tmp_path / "notes.txt"
    src.write_bytes(b"hello")
    async with serving(agent):
        assert await copy_to_guest(AgentChannel(agent.path), src, "/home/vmkit/") == 5
        with pytest.raises(GuestAgentError, match="Is a directory"):
            await copy_to_guest(AgentChannel(agent.path), src, "/tmp")
    assert agent.files["/home/vmkit/notes.txt"][0] == b"hello"
