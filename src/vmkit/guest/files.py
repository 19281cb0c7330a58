"""Copying files between host and guest through qemu-guest-agent (``guest-file-*``).

No network or SSH needed: the agent opens the guest file, and data moves base64-encoded in
1 MiB pieces. Guest paths must be absolute; the guest file is written in place.

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
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any

from vmkit.errors import ConfigError, VmkitError
from vmkit.fsutil import atomic_open
from vmkit.guest.agent import GuestAgent, GuestAgentError
from vmkit.guest.execute import exec_in_session

CHUNK = 1 << 20
STAT_TIMEOUT = 10.0


async def copy_to_guest(socket_path: Path, local: Path, remote: str) -> int:
    """Copy host file ``local`` to guest path ``remote`` (``/dir/``: into it); returns the bytes copied."""
    _check_remote(remote)
    if remote.endswith("/"):
        remote += local.name
    data_len = 0
    async with GuestAgent(socket_path, timeout=30.0) as agent, _guest_file(agent, remote, "wb") as handle:
        with local.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                await agent.execute("guest-file-write", {"handle": handle,
                                                         "buf-b64": base64.b64encode(chunk).decode()})
                data_len += len(chunk)
        await agent.execute("guest-file-flush", {"handle": handle})
    return data_len


async def copy_from_guest(socket_path: Path, remote: str, local: Path) -> int:
    """Copy guest file ``remote`` to host path ``local`` (a directory: into it, under the guest file's
    name), written atomically with the permissions the module describes; returns the bytes copied."""
    _check_remote(remote)
    target = host_destination(local, remote)
    existing = _existing_file(target)
    total = 0
    async with GuestAgent(socket_path, timeout=30.0) as agent:
        guest_mode = await guest_file_mode(agent, remote) if existing is None else None
        async with _guest_file(agent, remote, "rb") as handle:
            with atomic_open(target, new_file_mode(existing, guest_mode, current_umask())) as out:
                if existing is not None:
                    with contextlib.suppress(PermissionError):
                        os.fchown(out.fileno(), existing.st_uid, existing.st_gid)
                while True:
                    data, eof = _read_piece(await agent.execute("guest-file-read", {"handle": handle, "count": CHUNK}))
                    out.write(data)
                    total += len(data)
                    if eof or not data:
                        break
    return total


def host_destination(local: Path, remote: str) -> Path:
    """Where a copy of guest file ``remote`` goes: ``local``, or ``local/NAME`` if it is a directory."""
    if not local.is_dir():
        return local
    name = PurePosixPath(remote).name
    if remote.endswith("/") or name in ("", ".", ".."):
        raise ConfigError.single("SRC", f"{remote!r} names no guest file to copy into the directory {local}: "
                                 "give the guest file's path (e.g. web:/etc/hostname)")
    return local / name


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


async def guest_file_mode(agent: GuestAgent, remote: str) -> int | None:
    """The permission bits of guest file ``remote`` (``stat -L -c %a`` through guest-exec), or None
    if the guest cannot say (the agent has guest-exec disabled, no stat, no such file)."""
    try:
        result = await exec_in_session(agent, ["stat", "-L", "-c", "%a", "--", remote], timeout=STAT_TIMEOUT)
    except VmkitError:
        return None
    text = result.stdout.decode("ascii", errors="replace").strip()
    return int(text, 8) if result.exit_code == 0 and re.fullmatch(r"[0-7]{1,4}", text) else None


def _existing_file(target: Path) -> os.stat_result | None:
    try:
        st = target.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError.single("DST", f"{target} exists and is not a regular file: give a file or directory path")
    return st


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
async def _guest_file(agent: GuestAgent, remote: str, mode: str) -> AsyncIterator[int]:
    """A guest file handle, closed afterwards (best effort if the copy already failed)."""
    handle = await agent.execute("guest-file-open", {"path": remote, "mode": mode})
    if not isinstance(handle, int):
        raise GuestAgentError(f"the guest agent's guest-file-open reply is not a handle: {handle!r:.200}")
    try:
        yield handle
    except BaseException:
        with contextlib.suppress(GuestAgentError):
            await agent.execute("guest-file-close", {"handle": handle}, timeout=min(agent.timeout, 5.0))
        raise
    await agent.execute("guest-file-close", {"handle": handle})


def _check_remote(remote: str) -> None:
    if not remote.startswith("/"):
        raise ConfigError.single("PATH", f"{remote!r} is not an absolute guest path: use NAME:/path/in/guest")
