"""Instances made from cloud (disk) images: the files in the instance directory, and how to reach the guest.

``vmkit create NAME --image debian-12`` gives an instance directory holding::

    disk.qcow2       copy-on-write overlay on the cached base image, grown to --disk
    seed.iso         NoCloud seed (label cidata): meta-data, user-data, network-config
    ssh/id_ed25519   the instance's user key (0600) and .pub
    ssh/host/        the guest's SSH host keys, generated here and handed over in user-data
    known_hosts      the host key pinned to 127.0.0.1:<ssh port> (no trust on first use)
    ssh_config       for ``ssh -F``: user, key, port, StrictHostKeyChecking yes

The SSH port is a free loopback port picked at create time and forwarded to the guest's 22.

Shared folders: the seed makes the guest mount every virtiofs and 9p share at each boot
(:func:`boot_mounts`, see :mod:`vmkit.host.cloudinit`); sshfs shares are mounted by the supervisor
over SSH once the guest is ready (:mod:`vmkit.runtime.sshfs`). The guest user gets the host user's uid
(:func:`guest_uid`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmkit.config import MachineConfig, Share, port_is_free
from vmkit.errors import ConfigError
from vmkit.fsutil import atomic_write
from vmkit.host import sshkeys as keys
from vmkit.host.images import qemuimg
from vmkit.host.images.store import Image
from vmkit.runtime.qemu.cmdline import NINEP_MSIZE

if TYPE_CHECKING:
    from vmkit.host.cloudinit import FstabEntry

USER = "vmkit"
DISK = "disk.qcow2"
SEED = "seed.iso"
EXTRA_USER_DATA = "user-data.extra"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class CloudOptions:
    disk_size: str | None = None
    user_data: str | None = None  # extra user-data (merged into vmkit's)
    resolv_conf: str | None = None  # the guest's /etc/resolv.conf (machines on vmkit networks: their DNS)


def config_additions(instance_dir: Path, image: Image, *, ssh_port: int) -> dict[str, Any]:
    """The configuration an instance of disk image ``image`` needs (paths in ``instance_dir``)."""
    assert image.kernel is not None
    return {
        "boot": {"kind": "linux", "kernel": str(image.kernel),
                 "initrd": str(image.initrd) if image.initrd else None, "cmdline": image.manifest.cmdline},
        "storage": [
            {"kind": "virtio-blk", "id": "root",
             "attachment": {"type": "disk-image", "path": str(instance_dir / DISK), "format": "qcow2"}},
            {"kind": "virtio-blk", "id": "seed",
             "attachment": {"type": "disk-image", "path": str(instance_dir / SEED), "format": "raw",
                            "read_only": True}},
        ],
        "forwards": [{"host_addr": "127.0.0.1", "host_port": ssh_port, "guest_port": 22}],
        "agent": True,
        "readiness": {"agent": True, "timeout": 300},
    }


def ssh_port(config: MachineConfig) -> int:
    if config.network is not None:
        for fwd in config.network.forwards:
            if fwd.guest_port == 22 and fwd.protocol == "tcp":
                return fwd.host_port
    raise ConfigError.single("network.forwards", "no port forward to the guest's SSH port 22: "
                             "add one (e.g. --port 2222:22) to use vmkit shell")


def claim_ssh_port(instance_dir: Path, config: MachineConfig) -> tuple[MachineConfig, str | None]:
    """Before a start: if another program took the host port forwarded to the guest's SSH since the
    machine was created (it is chosen then, so that ``vmkit ssh-config`` works on a stopped machine),
    move the forward to a free port, and rewrite ``ssh_config``. Returns the configuration to save
    and what changed (None if nothing did)."""
    if not is_cloud_instance(instance_dir) or config.network is None:
        return config, None
    forwards = list(config.network.forwards)
    for i, fwd in enumerate(forwards):
        if fwd.guest_port == 22 and fwd.protocol == "tcp" and not port_is_free(fwd.host_addr, fwd.host_port, "tcp"):
            new = fwd.model_copy(update={"host_port": free_port(fwd.host_addr)})
            forwards[i] = new
            network = config.network.model_copy(update={"forwards": tuple(forwards)})
            updated = config.model_copy(update={"network": network})
            write_ssh_config(instance_dir, config.name, new.host_port)
            return updated, (f"host port {fwd.host_port} (SSH) was taken by another program: "
                             f"forwarding {new.host_port} instead")
    return config, None


def provision(instance_dir: Path, config: MachineConfig, image: Image, options: CloudOptions,
              *, base: Path | None = None) -> None:
    """Write the overlay disk, keys, seed, known_hosts and ssh_config for a new instance. ``base``: the
    disk to make the overlay on instead of the image's (a warm template's, see vmkit.state.template)."""
    from vmkit.host import cloudinit

    assert image.disk is not None
    size = options.disk_size
    if base is not None:
        qemuimg.create_overlay(instance_dir / DISK, base, backing_format="qcow2", size=size)
    else:
        qemuimg.create_overlay(instance_dir / DISK, image.disk,
                               backing_format=image.manifest.disk_format or "qcow2", size=size)
    if options.user_data is not None:  # kept so that clones get the same extra user-data
        atomic_write(instance_dir / EXTRA_USER_DATA, options.user_data, 0o600)
    write_identity(instance_dir, config, options, cloudinit.new_instance_id())


def fstab_entry(share: Share, tag: str) -> FstabEntry | None:
    """How the guest mounts ``share`` at boot (None for sshfs: the supervisor mounts those, see vmkit.runtime.sshfs).

    ``nofail``: a share that cannot be mounted does not stop the boot. ``ro`` for read-only
    shares (the host enforces it anyway). 9p uses ``cache=mmap`` (as Lima does): with the default
    ``cache=none`` the guest kernel refuses writable shared mmap on the share (EINVAL).
    """
    from vmkit.host.cloudinit import FstabEntry

    ro = ",ro" if share.read_only else ""
    if share.type == "virtiofs":
        return FstabEntry(tag, share.mount_point(), "virtiofs", f"defaults,nofail{ro}")
    if share.type == "9p":
        return FstabEntry(tag, share.mount_point(), "9p",
                          f"trans=virtio,version=9p2000.L,msize={NINEP_MSIZE},cache=mmap,nofail{ro}")
    return None


def boot_mounts(config: MachineConfig) -> tuple[FstabEntry, ...]:
    entries = (fstab_entry(s, config.share_tag(i)) for i, s in enumerate(config.shares))
    return tuple(e for e in entries if e is not None)


def guest_uid(env: Mapping[str, str] | None = None, uid: int | None = None) -> int:
    """The guest user's uid: the host user's, so that ownership on shared folders means the same
    on both sides (virtiofs and 9p pass uids through unchanged).

    The host user is the one who ran sudo (``SUDO_UID``) when vmkit runs as root, else the caller;
    root and system users (below 1000) get 1000, the first normal uid.
    """
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    if uid == 0 and env.get("SUDO_UID", "").isdigit():
        uid = int(env["SUDO_UID"])
    return uid if 1000 <= uid < 60000 else 1000


def write_identity(instance_dir: Path, config: MachineConfig, options: CloudOptions, instance_id: str) -> None:
    """Keys, seed, known_hosts and ssh_config: everything that makes this instance itself (clones redo it)."""
    from vmkit.host import cloudinit

    ssh_dir = instance_dir / "ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    user_key = keys.generate_keypair(comment=f"vmkit@{config.name}")
    user_key.write(ssh_dir / "id_ed25519")
    host_keys = keys.generate_host_keys(comment=f"root@{config.name}")
    host_keys.write(ssh_dir / "host")
    port = ssh_port(config)
    keys.write_known_hosts(instance_dir / "known_hosts", host_keys, port)
    cloudinit.make_seed_iso(instance_dir / SEED, cloudinit.SeedSpec(
        instance_id=instance_id, hostname=config.name, authorized_keys=(user_key.public_openssh,),
        host_keys=host_keys, user=USER, mac=config.network.mac if config.network else None,
        extra_user_data=options.user_data, mounts=boot_mounts(config), uid=guest_uid(),
        resolv_conf=options.resolv_conf,
        login_screen=config.display is not None,
    ))
    pad_seed(instance_dir / SEED)
    write_ssh_config(instance_dir, config.name, port)


SEED_PADDING = 1 << 20


def pad_seed(path: Path) -> None:
    """Round the seed up to a whole MiB: a machine cloned from a warm template keeps the size its guest
    read from the template's seed, so the two must agree (they do unless user-data passes 1 MiB)."""
    size = path.stat().st_size
    os.truncate(path, -(-size // SEED_PADDING) * SEED_PADDING)


def write_ssh_config(instance_dir: Path, name: str, port: int) -> Path:
    path = instance_dir / "ssh_config"
    atomic_write(path, ssh_config_text(instance_dir, name, port), 0o600)
    return path


def ssh_config_path(path: Path) -> str:
    """``path`` as an ssh_config argument of IdentityFile or UserKnownHostsFile: in double quotes
    (spaces, ``#`` and ``'`` are then plain characters) with ``%`` doubled (those options expand
    ``%`` tokens). A ``"``, a backslash, ``${`` (environment expansion, which has no escape) or a
    control character cannot be written so that every OpenSSH reads it back: ConfigError."""
    text = str(path)
    bad = next((c for c in text if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is None and "${" in text:
        bad = "${"
    if bad is not None:
        raise ConfigError.single(
            "VMKIT_HOME", f"{text!r} contains {bad!r}, which an OpenSSH config file cannot hold: "
            "keep VMKIT_HOME (and the instance directory) free of '\"', '\\', '${' and control characters")
    return '"' + text.replace("%", "%%") + '"'


def ssh_config_text(instance_dir: Path, name: str, port: int) -> str:
    """The instance's ssh_config (``ssh -F``); paths quoted by :func:`ssh_config_path`."""
    return (
        f"Host {name}\n"
        f"  HostName 127.0.0.1\n"
        f"  Port {port}\n"
        f"  User {USER}\n"
        f"  IdentityFile {ssh_config_path(instance_dir / 'ssh' / 'id_ed25519')}\n"
        f"  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {ssh_config_path(instance_dir / 'known_hosts')}\n"
        f"  StrictHostKeyChecking yes\n"
        f"  LogLevel ERROR\n"
        f"  ConnectTimeout 10\n"
    )


def ssh_argv(instance_dir: Path, name: str, command: list[str], *, tty: bool) -> list[str]:
    argv = ["ssh", "-F", str(instance_dir / "ssh_config")]
    if command and tty:
        argv.append("-t")
    return [*argv, name, "--", *command] if command else [*argv, name]


def is_cloud_instance(instance_dir: Path) -> bool:
    return (instance_dir / "ssh_config").exists() and (instance_dir / SEED).exists()


def reidentify(instance_dir: Path, config: MachineConfig, *, resolv_conf: str | None = None) -> None:
    """A clone's own identity: new instance-id, user and host keys, seed (same extra user-data)."""
    from vmkit.host import cloudinit

    extra = instance_dir / EXTRA_USER_DATA
    options = CloudOptions(user_data=extra.read_text() if extra.exists() else None, resolv_conf=resolv_conf)
    write_identity(instance_dir, config, options, cloudinit.new_instance_id())
