"""Copying files between host and guest through qemu-guest-agent (``guest-file-*``).

No network or SSH needed: the agent opens the guest file, and data moves base64-encoded in
1 MiB pieces. Guest paths must be absolute; the guest file is written in place.

The guest side (:func:`read_guest_file`, :func:`write_guest_file`) runs in the supervisor over the
machine's shared agent channel; the supervisor streams the bytes over its API
(``GET``/``PUT /v1/files``), and the host side writes or reads the host file.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncGenerator, AsyncIterable

from vmkit.errors import ConfigError
from vmkit.guest.channel import AgentCommands

CHUNK = 1 << 20


async def read_guest_file(agent: AgentCommands, remote: str) -> AsyncGenerator[bytes, None]:
    """The guest file ``remote``, piece by piece (opened before the first piece is yielded)."""
    check_remote(remote)
    handle = await agent.execute("guest-file-open", {"path": remote, "mode": "rb"})
    try:
        while True:
            piece = await agent.execute("guest-file-read", {"handle": handle, "count": CHUNK})
            data = base64.b64decode(piece.get("buf-b64", ""))
            if data:
                yield data
            if piece.get("eof") or not data:
                break
    finally:
        await agent.execute("guest-file-close", {"handle": handle})


async def write_guest_file(agent: AgentCommands, remote: str, pieces: AsyncIterable[bytes]) -> int:
    """Write ``pieces`` to the guest file ``remote`` (created or truncated); returns the bytes written."""
    check_remote(remote)
    total = 0
    handle = await agent.execute("guest-file-open", {"path": remote, "mode": "wb"})
    try:
        async for piece in pieces:
            for i in range(0, len(piece), CHUNK):
                chunk = piece[i:i + CHUNK]
                await agent.execute("guest-file-write", {"handle": handle,
                                                         "buf-b64": base64.b64encode(chunk).decode()})
                total += len(chunk)
        await agent.execute("guest-file-flush", {"handle": handle})
    finally:
        await agent.execute("guest-file-close", {"handle": handle})
    return total


def check_remote(remote: str) -> None:
    if not remote.startswith("/"):
        raise ConfigError.single("PATH", f"{remote!r} is not an absolute guest path: use NAME:/path/in/guest")
