"""A private libvirt host for the tests: virtlogd + libvirtd (system mode, as root) in a mount namespace of
their own, so they never touch the machine's own libvirt (its sockets, /run/libvirt, /var/lib/libvirt,
/var/log/libvirt, /etc/libvirt) nor another test's daemons. No systemd needed.

    with libvirt_daemon(tmp_path / "lv") as lv:
        lv.virsh("define", "dom.xml")
        libvirt.open(lv.uri)                 # qemu:///system?socket=<root>/sock/libvirt-sock

Inside the namespace a tmpfs covers /run/libvirt (pid files, virtlogd's socket, QEMU's runtime state) and
directories under ``root`` are bound over /var/lib/libvirt, /var/log/libvirt (QEMU's logs:
``root/log/qemu/NAME.log``), /var/cache/libvirt and /etc/libvirt (configuration written here:
QEMU runs as root, no security driver, files' owners left alone: the shared image cache stays as it is).
The client socket is ``root/sock/libvirt-sock``, outside the namespace's mounts, so a client in
the tests' own namespace reaches it. ``host_uuid`` gives the daemon an identity of its own (libvirt
refuses to migrate to a host with its own UUID); ``listen`` also serves ``qemu+tcp://ADDR/system``
without authentication (for a daemon in a network namespace of its own: ``netns``).

Stopping destroys and undefines every domain the daemon has (libvirtd leaves running QEMUs behind
when it ends), then ends libvirtd and virtlogd by their pid files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import textwrap
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LibvirtDaemon:
    root: Path

    @property
    def socket(self) -> Path:
        return self.root / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    def virsh(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def domain_log(self, name: str) -> str:
        """QEMU's own log of a domain (its command line and its complaints)."""
        path = self.root / "log" / "qemu" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pid(self, daemon: str) -> int | None:
        try:
            return int((self.root / f"{daemon}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.socket.exists():
            res = self.virsh("list", "--all", "--name", check=False, timeout=30)
            for name in res.stdout.split():
                self.virsh("destroy", name, check=False, timeout=60)
                self.virsh("undefine", name, "--managed-save", "--snapshots-metadata", "--nvram", check=False,
                           timeout=60)
        for daemon in ("libvirtd", "virtlogd"):
            pid = self.pid(daemon)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


_LIBVIRTD_CONF = """\
unix_sock_dir = "{sock}"
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
host_uuid = "{host_uuid}"
log_outputs = "3:file:{root}/libvirtd.log"
{listen}"""

_QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "logd"
"""

_SETUP = """\
set -e
mkdir -p /run/libvirt
mount -t tmpfs -o mode=0755 tmpfs /run/libvirt
for d in lib log cache etc; do mkdir -p "$ROOT/$d"; done
mount --bind "$ROOT/lib" /var/lib/libvirt
mount --bind "$ROOT/log" /var/log/libvirt
mount --bind "$ROOT/cache" /var/cache/libvirt
mount --bind "$ROOT/etc" /etc/libvirt
virtlogd -d -p "$ROOT/virtlogd.pid"
libvirtd -d -p "$ROOT/libvirtd.pid" $LISTEN
"""


@contextlib.contextmanager
def libvirt_daemon(root: Path, *, host_uuid: str | None = None, listen: str | None = None,
                   netns: str | None = None, timeout: float = 240) -> Iterator[LibvirtDaemon]:
    """A running private libvirtd under ``root`` (created), stopped and cleaned up on exit."""
    if shutil.which("libvirtd") is None or shutil.which("virtlogd") is None:
        raise RuntimeError("libvirtd/virtlogd are missing: run scripts/install.sh (libvirt-daemon, "
                           "libvirt-daemon-driver-qemu)")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    for d in ("sock", "lib", "log/qemu", "cache", "etc/qemu", "etc/nwfilter"):
        (root / d).mkdir(parents=True, exist_ok=True)
    listen_conf = (f'listen_tcp = 1\nlisten_tls = 0\nauth_tcp = "none"\nlisten_addr = "{listen}"\n'
                   if listen else "")
    (root / "etc" / "libvirtd.conf").write_text(_LIBVIRTD_CONF.format(
        sock=root / "sock", host_uuid=host_uuid or str(uuidlib.uuid4()), root=root, listen=listen_conf))
    (root / "etc" / "qemu.conf").write_text(_QEMU_CONF)
    (root / "etc" / "virtlogd.conf").write_text(f'log_outputs = "3:file:{root}/virtlogd.log"\n')
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", textwrap.dedent(_SETUP)]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    env = {**os.environ, "ROOT": str(root), "LISTEN": "--listen" if listen else ""}
    daemon = LibvirtDaemon(root)
    try:
        subprocess.run(argv, check=True, env=env, capture_output=True, text=True, timeout=60)
        deadline = time.monotonic() + timeout
        while True:
            try:  # the first answer waits for libvirtd's probe of QEMU's capabilities: slow on a loaded host
                if daemon.socket.exists() and daemon.virsh("version", check=False, timeout=60).returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                log = (root / "libvirtd.log").read_text(errors="replace")[-3000:] if (root / "libvirtd.log").exists() \
                    else ""
                raise RuntimeError(f"libvirtd under {root} did not answer within {timeout:.0f} s:\n{log}")
            time.sleep(0.2)
        yield daemon
    finally:
        daemon.stop()


# -- libvirt hosts in network namespaces, reached over ssh ----------------------------------------------------------
@contextlib.contextmanager
def client_home(path: Path, image_cache: Path) -> Iterator[Path]:
    """``VMKIT_HOME`` at ``path`` and the test image cache for a module's libvirt tests, and no
    ``VMKIT_CONNECT`` from outside; the environment as it was afterwards, whatever happened."""
    import pytest

    mp = pytest.MonkeyPatch()
    mp.setenv("VMKIT_HOME", str(path))
    mp.setenv("VMKIT_IMAGE_CACHE", str(image_cache))
    mp.delenv("VMKIT_CONNECT", raising=False)
    try:
        yield path
    finally:
        mp.undo()


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=30)


@dataclass
class RemoteLibvirt:
    """A libvirt host in a network namespace of its own: its daemon, its address and the ssh key that
    logs in as root there (an sshd in the namespace)."""

    daemon: LibvirtDaemon
    addr: str
    key: Path

    @property
    def ssh_uri(self) -> str:
        """``qemu+ssh://`` to this daemon. Its socket is private, so the URI names it and libvirt reaches it
        with ``nc -U`` (``proxy=netcat``): virt-ssh-helper knows only the default socket. A real host needs
        neither."""
        return (f"qemu+ssh://root@{self.addr}/system?socket={self.daemon.socket}&keyfile={self.key}"
                "&no_verify=1&proxy=netcat")

    @property
    def tcp_uri(self) -> str:
        return f"qemu+tcp://{self.addr}/system"


@contextlib.contextmanager
def sshd_in(netns: str, addr: str, d: Path) -> Iterator[Path]:
    """An sshd for root at ``addr`` in network namespace ``netns`` (key login only, files under ``d``);
    yields the client key. Stopped on exit."""
    d.mkdir(parents=True, exist_ok=True)
    for key in ("key", "hostkey"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True, timeout=30)
    (d / "authorized_keys").write_text((d / "key.pub").read_text())
    (d / "sshd_config").write_text(f"ListenAddress {addr}\nHostKey {d}/hostkey\n"
                                   f"AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n"
                                   f"PermitRootLogin prohibit-password\nPidFile {d}/sshd.pid\nStrictModes no\n"
                                   "UsePAM no\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    subprocess.run(["ip", "netns", "exec", netns, "/usr/sbin/sshd", "-f", str(d / "sshd_config"),
                    "-E", str(d / "sshd.log")], check=True, timeout=30)
    try:
        yield d / "key"
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((d / "sshd.pid").read_text()), signal.SIGTERM)


@contextlib.contextmanager
def remote_libvirt_hosts(root: Path, *, prefix: str, subnet: str, count: int = 2) -> Iterator[list[RemoteLibvirt]]:
    """``count`` libvirt hosts, each in a network namespace ``PREFIXi`` (and a mount namespace) of its own
    with an sshd, all on one bridge ``PREFIX-br`` with this namespace: this one is ``SUBNET.1``, host i is
    ``SUBNET.(i+2)``, so the hosts reach each other (a migration's memory and disk streams go straight
    from one to the other). Everything is taken down on exit. ``prefix`` and ``subnet`` must differ
    between test modules (they may run at once in two workers)."""
    bridge = f"{prefix}-br"
    names = [f"{prefix}{i}" for i in range(count)]

    def teardown() -> None:
        for ns in names:
            ip("link", "delete", f"{ns}-h", check=False)
            ip("netns", "delete", ns, check=False)
        ip("link", "delete", bridge, check=False)

    teardown()
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        with contextlib.ExitStack() as stack:
            hosts = []
            for i, ns in enumerate(names):
                addr = f"{subnet}.{i + 2}"
                ip("netns", "add", ns)
                ip("link", "add", f"{ns}-h", "type", "veth", "peer", "name", f"{ns}-g")
                ip("link", "set", f"{ns}-g", "netns", ns)
                ip("link", "set", f"{ns}-h", "master", bridge)
                ip("link", "set", f"{ns}-h", "up")
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", f"{ns}-g")
                ip("-n", ns, "link", "set", f"{ns}-g", "up")
                ip("-n", ns, "link", "set", "lo", "up")
                key = stack.enter_context(sshd_in(ns, addr, root / f"sshd-{i}"))
                daemon = stack.enter_context(libvirt_daemon(root / f"host-{i}", listen=addr, netns=ns))
                hosts.append(RemoteLibvirt(daemon, addr, key))
            yield hosts
    finally:
        teardown()
