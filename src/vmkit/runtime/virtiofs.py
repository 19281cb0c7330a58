"""virtiofsd daemons for a machine's virtiofs shares.

One ``virtiofsd`` per virtiofs share (Debian ships the C one in qemu-system-common at
``/usr/lib/qemu/virtiofsd``). vmkit creates each vhost-user socket itself
(``virtiofs-<tag>.sock``, 0600, in the instance directory) and passes the listening fd with
``--fd``, so QEMU can connect the moment it starts: no waiting for a socket file to appear.

``read_only`` is enforced on the host: virtiofsd has no read-only switch, so it runs in
its own mount namespace over a read-only bind mount of the folder (a write in the guest
fails with EROFS; the host folder stays untouched). That, and virtiofsd itself, need root.

Each daemon is watched: if one dies while the machine runs, a ``share-failed`` event says
which, and :attr:`ShareDaemons.degraded` holds the reason. A daemon that ends because QEMU did
(it exits when the vhost-user connection closes) is not a failure.

How guests mount the shares at boot is in :mod:`vmkit.host.provision` (fstab entries) and
:mod:`vmkit.runtime.sshfs` (sshfs shares).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkit.config import MachineConfig, Share
from vmkit.errors import HostError
from vmkit.runtime.proc import owned
from vmkit.runtime.qemu.cmdline import Runtime

log = logging.getLogger(__name__)

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"

_RO_WRAPPER = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'


def virtiofsd_binary() -> str:
    found = os.environ.get("VMKIT_VIRTIOFSD") or (VIRTIOFSD if Path(VIRTIOFSD).exists() else shutil.which("virtiofsd"))
    if not found:
        raise HostError("virtiofsd is not installed (needed for virtiofs shares)",
                        hint="apt-get install qemu-system-common, or use type: 9p")
    return found


def fuse_opt_escape(value: str) -> str:
    r"""Escape a value for a FUSE ``-o key=value,...`` option string, as virtiofsd parses it.

    virtiofsd (libfuse's ``fuse_opt_parse``) splits ``-o`` on commas and takes a backslash as an
    escape for the next character, so ``\\`` and ``\,`` are the only ways to put a backslash or a
    comma into a value. Without this, a folder named ``/srv/p,source=/srv/secret`` would make
    virtiofsd serve ``/srv/secret`` (the last ``source`` wins) outside the read-only bind mount.
    """
    return value.replace("\\", "\\\\").replace(",", "\\,")


def virtiofsd_argv(share: Share, fd: int, *, binary: str) -> list[str]:
    """The daemon's argv; read-only shares run under a read-only bind mount in a new mount namespace.

    The folder reaches virtiofsd only inside ``-o source=``, escaped (:func:`fuse_opt_escape`); the
    read-only wrapper gets it as a positional argument (never inside a shell or option string).
    """
    src = str(share.host_path.resolve())
    argv = [binary, f"--fd={fd}", "-o", f"source={fuse_opt_escape(src)}", "-o", f"cache={share.cache}",
            "-o", "sandbox=namespace", "-o", "no_posix_lock"]
    if share.read_only:
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _RO_WRAPPER, "vmkit-ro", src, *argv]
    return argv


@dataclass
class _Daemon:
    tag: str
    share: Share
    socket_path: Path
    proc: asyncio.subprocess.Process | None = None
    watcher: asyncio.Task[None] | None = None


class ShareDaemons:
    def __init__(self, config: MachineConfig, workdir: Path, emit: Callable[..., None],
                 vm_gone: Callable[[float], Awaitable[bool]] | None = None) -> None:
        self.config = config
        self.workdir = workdir
        self._emit = emit
        self._vm_gone = vm_gone
        self.daemons: list[_Daemon] = []
        self.degraded: str | None = None
        self._stopping = False

    async def start(self, runtime: Runtime) -> None:
        """Create the sockets and launch one virtiofsd per virtiofs share."""
        self._stopping = False
        self.degraded = None
        shares = [(self.config.share_tag(i), s) for i, s in enumerate(self.config.shares) if s.type == "virtiofs"]
        if not shares:
            return
        if os.geteuid() != 0:
            raise HostError("virtiofs shares need root here (virtiofsd's sandbox and the read-only bind mount)",
                            hint="run vmkit as root, or use type: 9p")
        binary = virtiofsd_binary()
        for tag, share in shares:
            path = runtime.virtiofs_socket(tag)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(str(path))
                path.chmod(0o600)
                listener.listen(1)
                log_path = self.workdir / f"virtiofsd-{tag}.log"
                with log_path.open("ab") as logf:
                    proc = await asyncio.create_subprocess_exec(
                        *owned(virtiofsd_argv(share, listener.fileno(), binary=binary)),
                        stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                        pass_fds=(listener.fileno(),), start_new_session=True,
                    )
            finally:
                listener.close()
            daemon = _Daemon(tag, share, path, proc)
            daemon.watcher = asyncio.create_task(self._watch(daemon), name=f"vmkit-virtiofsd-{tag}")
            self.daemons.append(daemon)

    async def _watch(self, daemon: _Daemon) -> None:
        assert daemon.proc is not None
        rc = await daemon.proc.wait()
        if self._stopping:
            return
        # virtiofsd also exits when QEMU does (the vhost-user connection closes): not a failure
        if self._vm_gone is not None and (await self._vm_gone(2.0) or self._stopping):
            return
        reason = f"virtiofsd for share {daemon.tag!r} ({daemon.share.host_path}) exited with status {rc}"
        self.degraded = reason
        log.error("%s", reason)
        self._emit("share-failed", tag=daemon.tag, host_path=str(daemon.share.host_path), returncode=rc,
                   reason=reason)

    def pids(self) -> list[int]:
        return [d.proc.pid for d in self.daemons if d.proc is not None and d.proc.returncode is None]

    async def stop(self) -> None:
        """Stop every daemon (they also exit by themselves when QEMU disconnects)."""
        self._stopping = True
        for d in self.daemons:
            if d.proc is not None and d.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    d.proc.send_signal(signal.SIGTERM)
        for d in self.daemons:
            if d.proc is not None:
                try:
                    await asyncio.wait_for(d.proc.wait(), 5)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        d.proc.kill()
                    await d.proc.wait()
            if d.watcher is not None:
                d.watcher.cancel()
            with contextlib.suppress(FileNotFoundError):
                d.socket_path.unlink()
        self.daemons.clear()

    def status(self) -> list[dict[str, Any]]:
        return [{"tag": d.tag, "host_path": str(d.share.host_path), "pid": d.proc.pid if d.proc else None,
                 "alive": d.proc is not None and d.proc.returncode is None} for d in self.daemons]
