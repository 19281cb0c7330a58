"""Copying files between host and guest through qemu-guest-agent (``guest-file-*``).

No network or SSH needed: the agent opens the guest file, and data moves base64-encoded in
1 MiB pieces. Guest paths must be absolute; the guest file is written in place.

The guest side (:func:`read_guest_file`, :func:`write_guest_file`) runs in the supervisor over the
machine's shared agent channel; the supervisor streams the bytes over its API
(``GET``/``PUT /v1/files``), and the host side (``vmkit cp``, :func:`host_destination`,
:func:`new_file_mode`) writes or reads the host file.

As with ``cp``: a host destination that is a directory receives the file under the guest
file's name, and a guest destination ending in ``/`` receives it under the host file's name.
The host file is written atomically (a temp file renamed over it), with these permissions:

- over an existing file: that file's permission bits (and its owner, where the caller may set
  it); set-id and sticky bits are dropped, as the kernel drops them when a file is rewritten;
- a new file: the guest file's permission bits as ``stat`` in the guest reports them (run
  through ``guest-exec``), less the caller's umask and never set-id bits, as ``cp`` does;
  when the guest cannot say (guest-exec disabled, no ``stat``), 0666 less the umask, as for
  any new file.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import stat
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import Any

from vmkit.errors import ConfigError, VmkitError
from vmkit.fsutil import atomic_open
from vmkit.runtime.guest.agent import GuestAgentError
from vmkit.runtime.guest.channel import AgentCommands
from vmkit.runtime.guest.execute import guest_exec

CHUNK = 1 << 20
STAT_ARGV = ("stat", "-L", "-c", "%a", "--")
"""The guest command that tells a guest file's permission bits (prints e.g. ``640``)."""


# --------------------------------------------------------------------------- guest side (supervisor)


async def read_guest_file(agent: AgentCommands, remote: str) -> AsyncGenerator[bytes, None]:
    """The guest file ``remote``, piece by piece (opened before the first piece is yielded)."""
    check_remote(remote)
    async with _guest_file(agent, remote, "rb") as handle:
        while True:
            data, eof = _read_piece(await agent.execute("guest-file-read", {"handle": handle, "count": CHUNK}))
            if data:
                yield data
            if eof or not data:
                break


async def write_guest_file(agent: AgentCommands, remote: str, pieces: AsyncIterable[bytes], *,
                           timeout: float | None = None) -> int:
    """Write ``pieces`` to the guest file ``remote`` (created or truncated); returns the bytes written.
    ``timeout``: seconds each agent command may take (default: the channel's)."""
    check_remote(remote)
    total = 0
    async with _guest_file(agent, remote, "wb") as handle:
        async for piece in pieces:
            for i in range(0, len(piece), CHUNK):
                chunk = piece[i:i + CHUNK]
                await agent.execute("guest-file-write", {"handle": handle,
                                                         "buf-b64": base64.b64encode(chunk).decode()},
                                    timeout=timeout)
                total += len(chunk)
        await agent.execute("guest-file-flush", {"handle": handle}, timeout=timeout)
    return total


def _read_piece(piece: Any) -> tuple[bytes, bool]:
    """The data and eof flag of a ``guest-file-read`` reply (at most :data:`CHUNK` bytes)."""
    b64 = piece.get("buf-b64", "") if isinstance(piece, dict) else None
    if not isinstance(b64, str):
        raise GuestAgentError(f"the guest agent's guest-file-read reply is malformed: {piece!r:.200}")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise GuestAgentError("the guest agent's guest-file-read reply is not valid base64") from None
    if len(data) > CHUNK:
        raise GuestAgentError(f"the guest agent returned {len(data)} bytes for a read of at most {CHUNK}")
    return data, bool(piece.get("eof"))


@contextlib.asynccontextmanager
async def _guest_file(agent: AgentCommands, remote: str, mode: str) -> AsyncIterator[int]:
    """A guest file handle, closed afterwards (best effort if the copy already failed)."""
    handle = await agent.execute("guest-file-open", {"path": remote, "mode": mode})
    if not isinstance(handle, int):
        raise GuestAgentError(f"the guest agent's guest-file-open reply is not a handle: {handle!r:.200}")
    try:
        yield handle
    except BaseException:
        with contextlib.suppress(GuestAgentError):
            await agent.execute("guest-file-close", {"handle": handle}, timeout=5.0)
        raise
    await agent.execute("guest-file-close", {"handle": handle})


def check_remote(remote: str) -> None:
    if not remote.startswith("/"):
        raise ConfigError.single("PATH", f"{remote!r} is not an absolute guest path: use NAME:/path/in/guest")


# --------------------------------------------------------------------------- host side (vmkit cp)

GuestReader = Callable[[str], AsyncIterator[bytes]]
"""The pieces of a guest file (``GET /v1/files``, or :func:`read_guest_file` in-process)."""
GuestWriter = Callable[[str, AsyncIterator[bytes]], Awaitable[int]]
"""Write pieces to a guest file, return the bytes written (``PUT /v1/files``, or :func:`write_guest_file`)."""
GuestModeProbe = Callable[[str], Awaitable["int | None"]]
"""A guest file's permission bits, or None if the guest cannot say (:data:`STAT_ARGV` through guest-exec)."""


async def copy_out(read: GuestReader, probe: GuestModeProbe, remote: str, local: Path) -> int:
    """Copy guest file ``remote`` to host path ``local`` (a directory: into it, under the guest file's
    name), written atomically with the permissions the module describes; returns the bytes copied."""
    check_remote(remote)
    target = host_destination(local, remote)
    existing = existing_file(target)
    guest_mode = await probe(remote) if existing is None else None
    total = 0
    with atomic_open(target, new_file_mode(existing, guest_mode, current_umask())) as out:
        if existing is not None:
            with contextlib.suppress(PermissionError):
                os.fchown(out.fileno(), existing.st_uid, existing.st_gid)
        async for piece in read(remote):
            out.write(piece)
            total += len(piece)
    return total


async def copy_in(write: GuestWriter, local: Path, remote: str) -> int:
    """Copy host file ``local`` to guest path ``remote`` (``/dir/``: into it); returns the bytes copied."""
    remote = guest_destination(remote, local)
    check_remote(remote)
    with local.open("rb") as fh:
        async def pieces() -> AsyncIterator[bytes]:
            while chunk := fh.read(CHUNK):
                yield chunk

        return await write(remote, pieces())


async def copy_from_guest(agent: AgentCommands, remote: str, local: Path) -> int:
    """:func:`copy_out` over an agent session in this process (embedding, tests)."""
    async def probe(path: str) -> int | None:
        try:
            res = await guest_exec(agent, [*STAT_ARGV, path], timeout=10.0)
        except VmkitError:
            return None
        return parse_guest_mode(res.exit_code, res.stdout)

    return await copy_out(lambda path: read_guest_file(agent, path), probe, remote, local)


async def copy_to_guest(agent: AgentCommands, local: Path, remote: str) -> int:
    """:func:`copy_in` over an agent session in this process (embedding, tests)."""
    return await copy_in(lambda path, pieces: write_guest_file(agent, path, pieces), local, remote)



def host_destination(local: Path, remote: str) -> Path:
    """Where a copy of guest file ``remote`` goes: ``local``, or ``local/NAME`` if it is a directory."""
    if not local.is_dir():
        return local
    name = PurePosixPath(remote).name
    if remote.endswith("/") or name in ("", ".", ".."):
        raise ConfigError.single("SRC", f"{remote!r} names no guest file to copy into the directory {local}: "
                                 "give the guest file's path (e.g. web:/etc/hostname)")
    return local / name


def guest_destination(remote: str, local: Path) -> str:
    """Where a copy of host file ``local`` goes in the guest: ``remote``, or ``remote + NAME`` for ``/dir/``."""
    return remote + local.name if remote.endswith("/") else remote


def existing_file(target: Path) -> os.stat_result | None:
    """The host file a copy would replace (None if there is none); refuses anything but a regular file."""
    try:
        st = target.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError.single("DST", f"{target} exists and is not a regular file: give a file or directory path")
    return st


def parse_guest_mode(exit_code: int, stdout: bytes) -> int | None:
    """The permission bits :data:`STAT_ARGV` printed, or None if the guest could not say."""
    text = stdout.decode("ascii", errors="replace").strip()
    return int(text, 8) if exit_code == 0 and re.fullmatch(r"[0-7]{1,4}", text) else None


def new_file_mode(existing: os.stat_result | None, guest_mode: int | None, umask: int) -> int:
    """The permission bits of the host copy (see the module docstring)."""
    if existing is not None:
        return stat.S_IMODE(existing.st_mode) & 0o777
    return (0o666 if guest_mode is None else guest_mode & 0o777) & ~umask


def current_umask() -> int:
    """This process's umask, read without changing it (Linux's /proc), else by setting it back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o077)
    os.umask(old)
    return old
