"""Shared host folders on the full Debian guest, through the CLI, with one boot: a virtiofs, a 9p
and an sshfs share, each also read-only. Every share is mounted at boot; files go both ways;
read-only is enforced by the host; a dead virtiofsd or sshfs link is reported; `vmkit stop` leaves
no virtiofsd, sftp-server or ssh behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import follow_events, pid_alive, processes_mentioning, vmkit, wait_until
from vmkit.host.images.store import Image

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.geteuid() != 0, reason="virtiofsd and read-only bind mounts need root")]

# name -> (type, read_only, file system type in the guest's /proc/mounts)
SHARES = {
    "vfs": ("virtiofs", False, "virtiofs"),
    "p9": ("9p", False, "9p"),
    "ssh": ("sshfs", False, "fuse.sshfs"),
    "vfs-ro": ("virtiofs", True, "virtiofs"),
    "p9-ro": ("9p", True, "9p"),
    "ssh-ro": ("sshfs", True, "fuse.sshfs"),
}


def guest(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return vmkit("exec", "sh", "--", *cmd, check=check)


def guest_mounts() -> dict[str, tuple[str, set[str]]]:
    """The guest's /proc/mounts: mount point -> (file system type, options)."""
    out = {}
    for line in guest("cat", "/proc/mounts").stdout.splitlines():
        _src, mnt, fstype, opts, *_ = line.split()
        out[mnt] = (fstype, set(opts.split(",")))
    return out


def processes_running(binary: str, arg: str) -> list[int]:
    """Live processes whose argv[0] ends with ``binary`` and that have ``arg`` as one argument."""
    out = []
    for pid in processes_mentioning(arg):
        try:
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if argv[0].endswith(binary) and arg in argv[1:] and pid_alive(pid):
            out.append(pid)
    return out


def sftp_servers(under: Path) -> list[int]:
    """Live sftp-server processes whose root directory (vmkit confines them) lies under ``under``."""
    out = []
    for pid in processes_mentioning("sftp-server"):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            root = os.readlink(f"/proc/{pid}/root")
        except OSError:
            continue
        if argv0.endswith(b"/sftp-server") and root.startswith(str(under)) and pid_alive(pid):
            out.append(pid)
    return out


@pytest.mark.timeout(900)
def test_shares_on_debian(vmkit_home: Path, debian12: Image, tmp_path: Path) -> None:
    dirs = {}
    for name in SHARES:
        d = tmp_path / name
        d.mkdir()
        (d / "from-host.txt").write_text(f"host-{name}\n")
        dirs[name] = d
    mount_args = []
    for name, (kind, ro, _fstype) in SHARES.items():
        mount_args += ["--mount", f"{dirs[name]}:/mnt/{name}{':ro' if ro else ''},type={kind}"]
    vmkit("create", "sh", "--image", "debian-12", *mount_args)
    vmkit("start", "sh")

    # every share is mounted when `vmkit start` returns: virtiofs and 9p from /etc/fstab, sshfs by vmkit
    mounts = guest_mounts()
    for name, (_kind, ro, fstype) in SHARES.items():
        assert f"/mnt/{name}" in mounts, f"/mnt/{name} is not mounted: {sorted(mounts)}"
        got_type, opts = mounts[f"/mnt/{name}"]
        assert got_type == fstype
        assert ("ro" in opts) == ro, (name, opts)
    fstab = guest("cat", "/etc/fstab").stdout
    assert "/mnt/vfs virtiofs defaults,nofail" in fstab and "/mnt/p9 9p trans=virtio" in fstab
    rows = json.loads(vmkit("mount", "list", "sh", "--json").stdout)
    assert {r["guest_path"]: r["state"] for r in rows} == {f"/mnt/{n}": "active" for n in SHARES}
    tags = {r["guest_path"]: r["tag"] for r in rows}
    inst = vmkit_home / "instances" / "sh"
    assert len(sftp_servers(inst)) == 2  # one per sshfs share, each in its own root

    # host -> guest and guest -> host, for each type (including a file written after the mount)
    for name in ("vfs", "p9", "ssh"):
        assert guest("cat", f"/mnt/{name}/from-host.txt").stdout == f"host-{name}\n"
        (dirs[name] / "later.txt").write_text(f"later-{name}\n")
        assert guest("cat", f"/mnt/{name}/later.txt").stdout == f"later-{name}\n"
        guest("sh", "-c", f"echo guest-{name} > /mnt/{name}/from-guest.txt")
        assert (dirs[name] / "from-guest.txt").read_text() == f"guest-{name}\n"
    # the guest user (not root) can write over sshfs: the host's sftp-server decides
    guest("runuser", "-u", "vmkit", "--", "sh", "-c", "echo user > /mnt/ssh/from-user.txt")
    assert (dirs["ssh"] / "from-user.txt").read_text() == "user\n"

    # read-only: a write in the guest fails and the host file stays as it was
    for name in ("vfs-ro", "p9-ro", "ssh-ro"):
        assert guest("cat", f"/mnt/{name}/from-host.txt").stdout == f"host-{name}\n"
        res = guest("sh", "-c", f"echo changed > /mnt/{name}/from-host.txt", check=False)
        assert res.returncode != 0 and "Read-only file system" in res.stderr, res.stderr
        res = guest("sh", "-c", f"echo new > /mnt/{name}/new.txt", check=False)
        assert res.returncode != 0
    # ... even when root in the guest remounts virtiofs and 9p shares read-write: the host refuses
    for name in ("vfs-ro", "p9-ro"):
        guest("mount", "-o", "remount,rw", f"/mnt/{name}")
        res = guest("sh", "-c", f"echo changed > /mnt/{name}/from-host.txt", check=False)
        assert res.returncode != 0 and "Read-only file system" in res.stderr, res.stderr
    for name in ("vfs-ro", "p9-ro", "ssh-ro"):
        assert (dirs[name] / "from-host.txt").read_text() == f"host-{name}\n"
        assert sorted(p.name for p in dirs[name].iterdir()) == ["from-host.txt"]

    # a virtiofsd or an sshfs link that dies is reported: share-failed events, `vmkit list` degraded
    events = follow_events("sh")  # subscribed: nothing after is missed
    try:
        daemons = processes_running("virtiofsd", f"source={dirs['vfs']}")
        servers = sftp_servers(inst / f"sftp-root-{tags['/mnt/ssh-ro']}")
        assert daemons and len(servers) == 1
        for pid in daemons:
            os.kill(pid, signal.SIGKILL)

        def state() -> str:
            row = json.loads(vmkit("list", "--json").stdout)[0]
            return f"{row['state']}/{row['health']}"

        assert wait_until(lambda: state() == "running/degraded", 30)
        os.kill(servers[0], signal.SIGKILL)
        by_path: dict[str, str] = {}

        def ssh_failed() -> bool:
            by_path.update({r["guest_path"]: r["state"] for r in
                            json.loads(vmkit("mount", "list", "sh", "--json").stdout)})
            return by_path["/mnt/ssh-ro"] == "failed (sshfs link ended)"

        assert wait_until(ssh_failed, 30), by_path
        assert by_path["/mnt/vfs"] == "failed (virtiofsd died)"
        assert by_path["/mnt/ssh"] == by_path["/mnt/p9"] == by_path["/mnt/vfs-ro"] == "active"
        assert guest("cat", "/mnt/ssh/from-host.txt").stdout == "host-ssh\n"  # the other links live on

        # the guest's shutdown hangs on the virtiofs mount whose daemon is gone: a short timeout
        vmkit("stop", "sh", "--timeout", "10")
        out, _ = events.communicate(timeout=60)
    finally:
        if events.poll() is None:
            events.kill()
            events.wait()
    failed = [json.loads(line)["detail"] for line in out.splitlines()
              if line.strip() and json.loads(line)["kind"] == "share-failed"]
    assert {d["host_path"] for d in failed} == {str(dirs["vfs"]), str(dirs["ssh-ro"])}, failed

    # stopped: no virtiofsd, sftp-server, ssh (nor any other process mentioning the instance) is left
    assert json.loads(vmkit("list", "--json").stdout)[0]["state"] == "stopped"
    for name in SHARES:
        assert processes_running("virtiofsd", f"source={dirs[name]}") == []
    assert sftp_servers(vmkit_home) == []
    assert not list(inst.glob("sftp-root-*")) and not list(inst.glob("virtiofs-*.sock"))
    assert processes_mentioning(str(vmkit_home)) == []
