"""sshfs shares, reverse as Lima does it: the guest mounts a host folder over the SSH path vmkit
already has into the guest; nothing new listens on the network.

For each ``type: sshfs`` share the supervisor runs two processes on the host, wired to each
other with two pipes::

    sftp-server [-R] -d HOST_PATH   <== pipes ==>   ssh -F ssh_config NAME sudo ... sshfs -o slave ...

``ssh`` runs ``sshfs`` in the guest in *slave* mode: sshfs speaks SFTP over its own stdin and
stdout, which ssh carries back to the host, where ``/usr/lib/openssh/sftp-server`` (package
openssh-sftp-server) answers. sftp-server starts in the shared folder (``-d``) and the guest
mounts that start directory (``:``), so the guest command line never holds the host path.

*Confinement*: the guest controls its end of the SFTP stream, and plain sftp-server serves any
path its user can reach (Lima's reverse sshfs has this property: the whole home directory and
more). vmkit runs as root, so sftp-server is confined: it runs chrooted into a small tree built
in a private mount namespace in which the shared folder (at ``/share``) is the only host folder
(see :func:`sftp_server_argv`). The empty ``sftp-root-TAG`` directory in the instance directory
is that tree's mount point.

*Mounted at boot*: for sshfs this means that :meth:`SshfsMounts.mount_all` runs once the guest
is ready (its agent answers) and that ``vmkit start`` returns only once every sshfs share is
mounted. The guest side reports the mount on ssh's stderr (a marker line printed once
``mountpoint`` sees the mount), so the host never polls. A stale mount at the mount point (a
machine restored from saved state: its old link is gone) is lazily unmounted first.

*read_only* is enforced on the host: sftp-server runs with ``-R``, which refuses every request
that would change something with ``SSH2_FX_PERMISSION_DENIED``; sshfs turns that into EACCES
("Permission denied"). The guest also mounts the share ``ro``, so an ordinary write fails
earlier with EROFS; the host refuses even when root in the guest remounts it read-write.

*Ownership*: sftp-server runs as the user running vmkit (root here), so every request is made
with that user's rights; sshfs reports the host's uids and modes unchanged (no ``idmap``) and,
mounted with ``allow_other`` and without ``default_permissions``, leaves permission checks to the
host: the guest user can write wherever the host user could.

*Watching*: the ssh and sftp-server processes are children of the supervisor. If either ends
while the machine runs and vmkit did not stop it, a ``share-failed`` event names the share and
:attr:`SshfsMounts.degraded` says why (unmounting the share inside the guest also ends its link,
and is reported the same way). :meth:`SshfsMounts.stop` ends both processes; no ssh or
sftp-server outlives the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmkit.config import MachineConfig, Share
from vmkit.errors import ConfigError, HostError, VmkitError, VmTimeoutError
from vmkit.runtime.proc import owned

log = logging.getLogger(__name__)

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
MOUNTED_MARKER = "vmkit-sshfs: mounted"
SSH_CONFIG = "ssh_config"

# Runs as root in the guest (through sudo): $1 is the mount point, the rest are sshfs's options.
# sshfs runs in the background with the ssh channel as stdin/stdout (fd 3/4: a non-interactive
# shell gives background jobs /dev/null as stdin), the shell waits until the mount is there,
# says so on stderr, and then waits for sshfs: the ssh session lives exactly as long as the mount.
_GUEST_SCRIPT = f"""\
mp=$1; shift
# a mount left by an earlier session (a resumed guest's) whose ssh is gone cannot even be stat'ed
# ("Transport endpoint is not connected"): mountpoint says no to it, so that counts as a mount too
if mountpoint -q "$mp" || ! stat "$mp" >/dev/null 2>&1; then umount -l "$mp" 2>/dev/null; fi
mkdir -p "$mp" || exit 1
command -v sshfs >/dev/null || {{ echo "sshfs is not installed in the guest" >&2; exit 127; }}
exec 3<&0 4>&1
sshfs "$@" : "$mp" <&3 >&4 3<&- 4>&- &
pid=$!
exec 3<&- 4>&- </dev/null >/dev/null
while kill -0 "$pid" 2>/dev/null && ! mountpoint -q "$mp"; do sleep 0.1; done
if mountpoint -q "$mp"; then echo "{MOUNTED_MARKER}" >&2; fi
wait "$pid"
"""


# ssh's words for "nobody answers on the SSH port yet" (sshd still starting in the guest).
_NOT_UP = ("kex_exchange_identification", "Connection refused", "Connection reset", "Connection closed",
           "Connection timed out")


class _SshNotUp(Exception):
    pass


def sftp_server_binary() -> str:
    found = os.environ.get("VMKIT_SFTP_SERVER") or (SFTP_SERVER if Path(SFTP_SERVER).exists()
                                                     else shutil.which("sftp-server"))
    if not found:
        raise HostError("sftp-server is not installed (needed for sshfs shares)",
                        hint="apt-get install openssh-sftp-server, or use type: virtiofs or 9p")
    return found


# Runs on the host in a new mount namespace: $1 an empty directory to build the root in, $2 the
# shared folder, $3 "ro" or "rw", then sftp-server's argv. The root is a small tmpfs holding a
# read-only /usr (sftp-server and its libraries), the merged-/usr links, an /etc with only the
# running user's passwd and group lines (sftp-server looks itself up), /dev/null, and the share at
# /share (a read-only bind mount for read-only shares).
_CONFINE = """\
set -eu
root=$1 share=$2 mode=$3; shift 3
mount -t tmpfs -o mode=0755,size=1m vmkit-sftp "$root"
mkdir "$root/usr" "$root/etc" "$root/dev" "$root/share"
mount --bind /usr "$root/usr"
mount -o remount,bind,ro "$root/usr"
for d in bin sbin lib lib32 lib64 libx32; do
  if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$root/$d"
  elif [ -d "/$d" ]; then mkdir "$root/$d"; mount --bind "/$d" "$root/$d"; mount -o remount,bind,ro "$root/$d"; fi
done
getent passwd "$(id -u)" > "$root/etc/passwd" || echo "vmkit:x:$(id -u):$(id -g)::/:/bin/false" > "$root/etc/passwd"
getent group "$(id -g)" > "$root/etc/group" || true
touch "$root/dev/null"
mount --bind /dev/null "$root/dev/null"
mount --bind "$share" "$root/share"
if [ "$mode" = ro ]; then mount -o remount,bind,ro "$root/share"; fi
exec chroot "$root" "$@"
"""
CONFINED_SHARE = "/share"


def sftp_server_argv(share: Share, *, binary: str, root_dir: Path | None = None) -> list[str]:
    """The host side: an SFTP server on stdin/stdout that starts in the shared folder (``-d``), with
    ``-R`` for read-only shares.

    With ``root_dir`` (an empty directory) it is confined: it runs chrooted into a minimal tree
    built in a private mount namespace (:data:`_CONFINE`), where the share is the only host folder
    it can reach, so the guest (which controls its end of the SFTP stream) cannot read or write
    anything else on the host. Needs root, or unprivileged user namespaces (then ``--user
    --map-root-user``: requests still run with the caller's rights).
    """
    ro = ["-R"] if share.read_only else []
    if root_dir is None:  # -d expands %d, %h, %u: a literal % is %%
        return [binary, "-e", "-d", str(share.host_path.resolve()).replace("%", "%%"), *ro]
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *userns, "--mount", "--propagation", "private", "sh", "-c", _CONFINE, "vmkit-sftp",
            str(root_dir), str(share.host_path.resolve()), "ro" if share.read_only else "rw",
            binary, "-e", "-d", CONFINED_SHARE, *ro]


def sshfs_options(share: Share) -> list[str]:
    """sshfs's options in the guest (``slave``: SFTP over stdin/stdout)."""
    opts = ["slave", "allow_other", "noatime"]
    if share.read_only:
        opts.append("ro")
    return ["-o", ",".join(opts)]


def guest_command(share: Share) -> str:
    """The remote command ssh runs: a root shell that mounts the share and lives as long as the mount."""
    return shlex.join(["sudo", "-n", "sh", "-c", _GUEST_SCRIPT, "vmkit-sshfs", share.mount_point(),
                       *sshfs_options(share)])


def ssh_argv(ssh_config: Path, host: str, share: Share) -> list[str]:
    """ssh to the guest with the instance's config: no tty, no escape character, no multiplexing."""
    return ["ssh", "-F", str(ssh_config), "-T", "-e", "none", "-o", "BatchMode=yes",
            "-o", "ControlMaster=no", "-o", "ControlPath=none", host, "--", guest_command(share)]


@dataclass
class _Link:
    tag: str
    share: Share
    sftp: asyncio.subprocess.Process | None = None
    ssh: asyncio.subprocess.Process | None = None
    mounted: asyncio.Event = field(default_factory=asyncio.Event)
    stderr: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def procs(self) -> list[asyncio.subprocess.Process]:
        return [p for p in (self.ssh, self.sftp) if p is not None]


class SshfsMounts:
    """The sshfs shares of one machine: mounts them in the running guest, watches and ends them.

    ``emit`` receives ``share-failed`` events; ``vm_gone(timeout)`` waits up to ``timeout``
    seconds and says whether the machine has stopped (or is being stopped by vmkit), so a link
    that ends because the machine does is not reported as a failure.
    """

    def __init__(self, config: MachineConfig, workdir: Path, emit: Callable[..., None],
                 vm_gone: Callable[[float], Awaitable[bool]]) -> None:
        self.config = config
        self.workdir = workdir
        self._emit = emit
        self._vm_gone = vm_gone
        self.links: list[_Link] = []
        self.degraded: str | None = None
        self._stopping = False

    @property
    def shares(self) -> list[tuple[str, Share]]:
        return [(self.config.share_tag(i), s) for i, s in enumerate(self.config.shares) if s.type == "sshfs"]

    async def mount_all(self, timeout: float = 120.0) -> None:
        """Mount every sshfs share in the running guest; return once all are mounted.

        Raises :class:`~vmkit.errors.VmkitError` naming the share if one cannot be mounted (the
        links already made are ended).
        """
        shares = self.shares
        if not shares:
            return
        await self.stop()
        self._stopping = False
        self.degraded = None
        ssh_config = self.workdir / SSH_CONFIG
        if not ssh_config.exists():
            i = next(i for i, s in enumerate(self.config.shares) if s.type == "sshfs")
            raise ConfigError.single(f"shares[{i}].type", f"sshfs shares need SSH into the guest, and "
                                     f"{self.workdir} has no {SSH_CONFIG}: create the machine from a cloud "
                                     "image (--image debian-12), or use type: virtiofs or 9p")
        binary = sftp_server_binary()
        try:
            await asyncio.gather(*(self._mount(tag, share, ssh_config, binary, timeout) for tag, share in shares))
        except BaseException:
            await self.stop()
            raise
        for link in self.links:
            link.tasks.append(asyncio.create_task(self._watch(link), name=f"vmkit-sshfs-{link.tag}"))
        log.info("sshfs shares mounted: %s", ", ".join(f"{t} at {s.mount_point()}" for t, s in shares))

    async def _mount(self, tag: str, share: Share, ssh_config: Path, binary: str, timeout: float) -> None:
        """Launch the link and wait for the mount; retry while sshd in the guest is not up yet
        (the agent answers a little before sshd accepts connections)."""
        deadline = time.monotonic() + timeout
        while True:
            link = await self._launch(tag, share, ssh_config, binary)
            self.links.append(link)
            try:
                await self._wait_mounted(link, max(1.0, deadline - time.monotonic()))
                return
            except _SshNotUp:
                if time.monotonic() + 0.5 >= deadline:
                    raise VmTimeoutError(f"sshfs share {tag!r}: SSH into the guest did not come up within "
                                         f"{timeout:.0f} s ({'; '.join(link.stderr)})",
                                         hint=f"see {self.workdir / f'sshfs-{tag}.log'}") from None
                await self._end(link)
                self.links.remove(link)
                await asyncio.sleep(0.5)

    async def _launch(self, tag: str, share: Share, ssh_config: Path, binary: str) -> _Link:
        link = _Link(tag, share)
        to_sftp_r, to_sftp_w = os.pipe()  # ssh's stdout (sshfs's requests) -> sftp-server's stdin
        to_ssh_r, to_ssh_w = os.pipe()  # sftp-server's stdout (replies) -> ssh's stdin
        log_path = self.workdir / f"sshfs-{tag}.log"
        try:
            with log_path.open("ab") as logf:
                root_dir = self.workdir / f"sftp-root-{tag}"
                root_dir.mkdir(mode=0o700, exist_ok=True)
                link.sftp = await asyncio.create_subprocess_exec(
                    *owned(sftp_server_argv(share, binary=binary, root_dir=root_dir)), stdin=to_sftp_r, stdout=to_ssh_w,
                    stderr=logf, start_new_session=True)
                link.ssh = await asyncio.create_subprocess_exec(
                    *owned(ssh_argv(ssh_config, self.config.name, share)), stdin=to_ssh_r, stdout=to_sftp_w,
                    stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except BaseException:
            for p in link.procs():
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
            raise
        finally:
            for fd in (to_sftp_r, to_sftp_w, to_ssh_r, to_ssh_w):
                os.close(fd)
        link.tasks.append(asyncio.create_task(self._read_stderr(link, log_path), name=f"vmkit-sshfs-err-{tag}"))
        return link

    async def _read_stderr(self, link: _Link, log_path: Path) -> None:
        assert link.ssh is not None and link.ssh.stderr is not None
        with log_path.open("a") as logf:
            while line := await link.ssh.stderr.readline():
                text = line.decode(errors="replace").rstrip()
                if text == MOUNTED_MARKER:
                    link.mounted.set()
                    continue
                link.stderr.append(text)
                del link.stderr[:-20]
                logf.write(text + "\n")
                logf.flush()

    async def _wait_mounted(self, link: _Link, timeout: float) -> None:
        assert link.ssh is not None
        mounted = asyncio.ensure_future(link.mounted.wait())
        ended = asyncio.ensure_future(link.ssh.wait())
        try:
            done, _ = await asyncio.wait({mounted, ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            mounted.cancel()
            ended.cancel()
        if link.mounted.is_set():
            return
        what = f"sshfs share {link.tag!r} ({link.share.host_path} at {link.share.mount_point()})"
        if not done:
            raise VmTimeoutError(f"{what} was not mounted within {timeout:.0f} s",
                                 hint=f"see {self.workdir / f'sshfs-{link.tag}.log'}")
        for t in link.tasks:  # the last stderr lines
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(t), 2)
        detail = "; ".join(line for line in link.stderr if line) or "no output"
        if link.sftp is not None and link.sftp.returncode:
            detail += f" (the host's sftp-server exited with status {link.sftp.returncode}, see the log)"
        if link.ssh.returncode == 255 and any(m in detail for m in _NOT_UP):
            raise _SshNotUp(detail)
        raise VmkitError(f"{what} could not be mounted (ssh exited with status {link.ssh.returncode}): {detail}",
                         hint="the guest needs sshfs (apt-get install sshfs) and passwordless sudo; "
                              f"see {self.workdir / f'sshfs-{link.tag}.log'}")

    async def _watch(self, link: _Link) -> None:
        waits = [asyncio.ensure_future(p.wait()) for p in link.procs()]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            w.cancel()
        if self._stopping or await self._vm_gone(2.0) or self._stopping:
            return
        ssh_rc = link.ssh.returncode if link.ssh else None
        sftp_rc = link.sftp.returncode if link.sftp else None
        which = "sftp-server" if sftp_rc is not None and (ssh_rc is None or sftp_rc != 0) else "ssh"
        rc = sftp_rc if which == "sftp-server" else ssh_rc
        reason = (f"sshfs link for share {link.tag!r} ({link.share.host_path}) ended: {which} exited "
                  f"with status {rc}")
        self.degraded = reason
        log.error("%s", reason)
        self._emit("share-failed", tag=link.tag, host_path=str(link.share.host_path), returncode=rc,
                   reason=reason)
        await self._end(link)  # the other half has nothing left to talk to

    async def _end(self, link: _Link) -> None:
        for p in link.procs():
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for p in link.procs():
            try:
                await asyncio.wait_for(p.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()

    def pids(self) -> list[int]:
        return [p.pid for link in self.links for p in link.procs() if p.returncode is None]

    async def stop(self) -> None:
        """End every link (ssh and sftp-server); the guest's sshfs then unmounts and exits."""
        self._stopping = True
        for link in self.links:
            await self._end(link)
        current = asyncio.current_task()
        for link in self.links:
            for t in link.tasks:
                if t is not current and not t.done():
                    t.cancel()
            for t in link.tasks:
                if t is not current:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
            with contextlib.suppress(OSError):  # the mount point of its private root (empty out here)
                (self.workdir / f"sftp-root-{link.tag}").rmdir()
        self.links.clear()

    def status(self) -> list[dict[str, Any]]:
        return [{"tag": link.tag, "host_path": str(link.share.host_path), "mounted": link.mounted.is_set(),
                 "alive": all(p.returncode is None for p in link.procs())} for link in self.links]
