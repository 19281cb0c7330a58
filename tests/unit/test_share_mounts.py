"""Unit tests: how guests mount shares (fstab entries and the boot-time cloud-init), the guest
user's uid, sshfs's command lines and configuration checks, and sftp-server's read-only mode."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmkit.config import MachineConfig, parse_config
from vmkit.host import cloudinit
from vmkit.host import sshkeys as keys
from vmkit.host.provision import boot_mounts, fstab_entry, guest_uid
from vmkit.runtime.qemu.cmdline import NINEP_MSIZE
from vmkit.runtime.sshfs import guest_command, sftp_server_argv, ssh_argv, sshfs_options


def cfg(tmp_path: Path, shares: list[dict[str, Any]], *, ssh: bool = True) -> MachineConfig:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    network = {"forwards": [{"host_port": 2222, "guest_port": 22}]} if ssh else None
    return parse_config({"name": "s", "boot": {"kernel": str(kernel)}, "network": network, "shares": shares})


def folder(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


# -- boot-time mounts (virtiofs, 9p) ---------------------------------------------------------------
def test_fstab_lines_for_each_type(tmp_path: Path) -> None:
    c = cfg(tmp_path, [{"type": "virtiofs", "host_path": "/srv/a", "guest_path": "/mnt/a"},
                       {"type": "9p", "host_path": "/srv/b", "guest_path": "/mnt/b", "read_only": True},
                       {"type": "sshfs", "host_path": "/srv/c"},
                       {"type": "virtiofs", "host_path": "/srv/d", "tag": "code", "read_only": True}])
    assert [e.line() for e in boot_mounts(c)] == [
        "share0 /mnt/a virtiofs defaults,nofail 0 0",
        f"share1 /mnt/b 9p trans=virtio,version=9p2000.L,msize={NINEP_MSIZE},cache=mmap,nofail,ro 0 0",
        "code /srv/d virtiofs defaults,nofail,ro 0 0",  # guest path defaults to the host path
    ]
    assert fstab_entry(c.shares[2], "share2") is None  # sshfs: mounted by the supervisor


def test_fstab_escapes_spaces(tmp_path: Path) -> None:
    c = cfg(tmp_path, [{"type": "9p", "host_path": "/srv/a", "guest_path": "/mnt/my data"}])
    (entry,) = boot_mounts(c)
    assert entry.line().split()[1] == "/mnt/my\\040data"
    assert entry.file == "/mnt/my data"


def _seed(**kw: Any) -> dict[str, Any]:
    spec = cloudinit.SeedSpec(instance_id="i-1", hostname="h", authorized_keys=(
        keys.generate_keypair().public_openssh,), **kw)
    text = cloudinit.render_seed(spec).user_data
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def test_seed_mounts_shares_at_boot_before_extra_bootcmd() -> None:
    entries = (cloudinit.FstabEntry("share0", "/mnt/a", "virtiofs", "defaults,nofail"),)
    data = _seed(mounts=entries, extra_user_data="#cloud-config\nbootcmd:\n  - echo mine\n")
    first, mine = data["bootcmd"]
    assert first[:2] == ["sh", "-c"] and first[3:] == ["vmkit-mounts", "share0 /mnt/a virtiofs defaults,nofail 0 0",
                                                       "/mnt/a"]
    assert mine == "echo mine"
    assert "mounts" not in data  # cloud-init 22.4 drops tags from `mounts:` (not block devices)
    assert "bootcmd" not in _seed()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a mount namespace")
def test_boot_mount_script_is_idempotent(tmp_path: Path) -> None:
    """Run the bootcmd twice against a scratch /etc/fstab (bind-mounted in a private mount
    namespace) with stand-ins for mount/mountpoint: each line is added once, each mount point made."""
    fstab = tmp_path / "fstab"
    fstab.write_text("LABEL=root / ext4 defaults 0 0\n")
    bin_dir = folder(tmp_path, "bin")
    log = tmp_path / "calls"
    (bin_dir / "mount").write_text(f"#!/bin/sh\necho \"mount $*\" >> {log}\ntouch \"$2/.mounted\"\n")
    (bin_dir / "mountpoint").write_text("#!/bin/sh\n[ -e \"$3/.mounted\" ]\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    mnt = tmp_path / "mnt"
    entries = [cloudinit.FstabEntry("share0", f"{mnt}/a b", "virtiofs", "defaults,nofail"),
               cloudinit.FstabEntry("share1", f"{mnt}/c", "9p", "trans=virtio,nofail,ro")]
    script = shlex.join(cloudinit.boot_mounts_cmd(entries))
    for _ in range(2):
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"mount --bind {fstab} /etc/fstab && PATH={bin_dir}:$PATH {script}"], check=True)
    lines = fstab.read_text().splitlines()
    assert lines == ["LABEL=root / ext4 defaults 0 0", f"share0 {mnt}/a\\040b virtiofs defaults,nofail 0 0",
                     f"share1 {mnt}/c 9p trans=virtio,nofail,ro 0 0"]
    assert (mnt / "a b").is_dir() and (mnt / "c").is_dir()
    assert log.read_text().splitlines() == [f"mount -- {mnt}/a b", f"mount -- {mnt}/c"]  # mounted once each


def test_guest_uid_is_the_host_users() -> None:
    assert guest_uid({}, 1001) == 1001
    assert guest_uid({"SUDO_UID": "1005"}, 0) == 1005  # vmkit run through sudo: the real user's uid
    assert guest_uid({}, 0) == 1000  # root: the first normal uid
    assert guest_uid({"SUDO_UID": "0"}, 0) == 1000
    assert guest_uid({}, 120) == 1000  # a system user
    assert _seed(uid=1001)["users"][0]["uid"] == 1001
    assert "uid" not in _seed()["users"][0]


# -- sshfs -------------------------------------------------------------------------------------------
def test_sshfs_needs_ssh_into_the_guest(tmp_path: Path) -> None:
    d = folder(tmp_path, "d")
    c = cfg(tmp_path, [{"type": "sshfs", "host_path": str(d)}], ssh=False)
    (problem,) = c.validate()
    assert problem.field == "shares[0].type"
    assert "sshfs shares need SSH into the guest" in problem.message and "virtiofs or 9p" in problem.message
    assert cfg(tmp_path, [{"type": "sshfs", "host_path": str(d)}]).validate() == []


def test_sshfs_command_lines(tmp_path: Path) -> None:
    d = folder(tmp_path, "d")
    c = cfg(tmp_path, [{"type": "sshfs", "host_path": str(d), "guest_path": "/mnt/my src"},
                       {"type": "sshfs", "host_path": str(d), "guest_path": "/ro", "read_only": True}])
    rw, ro = c.shares
    assert sftp_server_argv(rw, binary="/s") == ["/s", "-e", "-d", str(d)]
    assert sftp_server_argv(ro, binary="/s") == ["/s", "-e", "-d", str(d), "-R"]
    assert sshfs_options(ro) == ["-o", "slave,allow_other,noatime,ro"]
    argv = ssh_argv(tmp_path / "ssh_config", "s", rw)
    assert argv[:3] == ["ssh", "-F", str(tmp_path / "ssh_config")] and "-T" in argv and argv[-3:-1] == ["s", "--"]
    remote = shlex.split(argv[-1])  # what the guest's shell runs
    assert remote[:4] == ["sudo", "-n", "sh", "-c"]
    assert remote[5:] == ["vmkit-sshfs", "/mnt/my src", "-o", "slave,allow_other,noatime"]
    assert str(d) not in guest_command(rw)  # the guest mounts sftp-server's start directory


needs_sftp = pytest.mark.skipif(not shutil.which("sftp") or not Path("/usr/lib/openssh/sftp-server").exists(),
                                reason="needs sftp and openssh-sftp-server")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the confined server is tested as root (as vmkit runs)")


def sftp_client(tmp_path: Path, server_argv: list[str]) -> Any:
    def sftp(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sftp", "-D", shlex.join(server_argv), "-b", "-"], input=command + "\n",
                              capture_output=True, text=True, cwd=tmp_path, timeout=30)

    return sftp


@needs_sftp
@needs_root
@pytest.mark.parametrize("read_only", [True, False])
def test_sftp_server_read_only_refuses_writes(tmp_path: Path, read_only: bool) -> None:
    """The exact server vmkit runs for a share, driven by OpenSSH's sftp client: with -R a write is
    refused with "Permission denied" (SSH2_FX_PERMISSION_DENIED; sshfs makes that EACCES)."""
    shared = folder(tmp_path, "shared")
    (shared / "f.txt").write_text("original\n")
    (tmp_path / "new.txt").write_text("new\n")
    c = cfg(tmp_path, [{"type": "sshfs", "host_path": str(shared), "read_only": read_only}])
    sftp = sftp_client(tmp_path, sftp_server_argv(c.shares[0], binary="/usr/lib/openssh/sftp-server",
                                                  root_dir=folder(tmp_path, "root")))

    got = sftp("get f.txt got.txt")
    assert got.returncode == 0 and (tmp_path / "got.txt").read_text() == "original\n"  # relative to the share
    put = sftp("put new.txt f.txt")
    if read_only:
        assert put.returncode != 0 and "Permission denied" in put.stderr
        assert (shared / "f.txt").read_text() == "original\n"
        for command in ("rm f.txt", "mkdir d", "rename f.txt g.txt", "put new.txt other.txt"):
            assert sftp(command).returncode != 0, command
        assert sorted(p.name for p in shared.iterdir()) == ["f.txt"]
    else:
        assert put.returncode == 0 and (shared / "f.txt").read_text() == "new\n"


@needs_sftp
@pytest.mark.parametrize("confined", [False, True])
def test_sftp_server_folder_with_percent_tokens(tmp_path: Path, confined: bool) -> None:
    """sftp-server expands %u, %h, %d in -d: a folder named like a token must be served as itself."""
    if confined and os.geteuid() != 0:
        pytest.skip("the confined server is tested as root")
    shared = folder(tmp_path, "p%u,%d %h")
    (shared / "f.txt").write_text("mine\n")
    c = cfg(tmp_path, [{"type": "sshfs", "host_path": str(shared)}])
    root = folder(tmp_path, "root") if confined else None
    sftp = sftp_client(tmp_path, sftp_server_argv(c.shares[0], binary="/usr/lib/openssh/sftp-server", root_dir=root))
    got = sftp("get f.txt got.txt")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "got.txt").read_text() == "mine\n"


@needs_sftp
@needs_root
def test_sftp_server_sees_only_the_share(tmp_path: Path) -> None:
    """The guest drives its end of the SFTP stream: the confined server must not reach other host files."""
    shared = folder(tmp_path, "shared")
    (shared / "f.txt").write_text("in the share\n")
    (tmp_path / "secret.txt").write_text("secret\n")
    root = folder(tmp_path, "root")
    c = cfg(tmp_path, [{"type": "sshfs", "host_path": str(shared)}])
    sftp = sftp_client(tmp_path, sftp_server_argv(c.shares[0], binary="/usr/lib/openssh/sftp-server", root_dir=root))
    assert sftp("get f.txt got.txt").returncode == 0 and (tmp_path / "got.txt").read_text() == "in the share\n"
    for path in (str(tmp_path / "secret.txt"), "../secret.txt", "/etc/hostname", "/etc/shadow", "/root"):
        res = sftp(f"get {path} leak")
        assert res.returncode != 0 and "not found" in res.stderr, (path, res.stderr)
    assert not (tmp_path / "leak").exists()
    listing = sftp("ls /etc").stdout.split()
    assert sorted(x for x in listing if x.startswith("/etc/")) == ["/etc/group", "/etc/passwd"]
    assert sftp(f"put {tmp_path / 'secret.txt'} /usr/leak").returncode != 0  # /usr is read-only
    assert list(root.iterdir()) == []  # the tree lived in the server's own mount namespace
