"""Copying files between host and guest through qemu-guest-agent (``guest-file-*``).

No network or SSH needed: the agent opens the guest file, and data moves base64-encoded in
1 MiB pieces. Guest paths must be absolute; the guest file is written in place.
"""

from __future__ import annotations

import base64
from pathlib import Path

from vmkit.errors import ConfigError
from vmkit.guest.agent import GuestAgent

CHUNK = 1 << 20


async def copy_to_guest(socket_path: Path, local: Path, remote: str) -> int:
    """Copy host file ``local`` to guest path ``remote``; returns the bytes copied."""
    _check_remote(remote)
    data_len = 0
    async with GuestAgent(socket_path, timeout=30.0) as agent:
        handle = await agent.execute("guest-file-open", {"path": remote, "mode": "wb"})
        try:
            with local.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    await agent.execute("guest-file-write", {"handle": handle,
                                                             "buf-b64": base64.b64encode(chunk).decode()})
                    data_len += len(chunk)
            await agent.execute("guest-file-flush", {"handle": handle})
        finally:
            await agent.execute("guest-file-close", {"handle": handle})
    return data_len


async def copy_from_guest(socket_path: Path, remote: str, local: Path) -> int:
    """Copy guest file ``remote`` to host path ``local`` (written atomically); returns the bytes copied."""
    from vmkit.fsutil import atomic_open

    _check_remote(remote)
    total = 0
    async with GuestAgent(socket_path, timeout=30.0) as agent:
        handle = await agent.execute("guest-file-open", {"path": remote, "mode": "rb"})
        try:
            with atomic_open(local, 0o644) as out:
                while True:
                    piece = await agent.execute("guest-file-read", {"handle": handle, "count": CHUNK})
                    data = base64.b64decode(piece.get("buf-b64", ""))
                    out.write(data)
                    total += len(data)
                    if piece.get("eof") or not data:
                        break
        finally:
            await agent.execute("guest-file-close", {"handle": handle})
    return total


def _check_remote(remote: str) -> None:
    if not remote.startswith("/"):
        raise ConfigError.single("PATH", f"{remote!r} is not an absolute guest path: use NAME:/path/in/guest")
