"""The Debian image: built once (cached), booted with plain QEMU and a vmkit seed.

Checks that the guest agent answers, cloud-init finishes, SSH works with the generated key and a
``known_hosts`` pinned from the seed (StrictHostKeyChecking=yes), and that a wrong pin is refused.
Prints the boot timings. The image is built into ``$VMKIT_IMAGE_CACHE`` (default: the repository's
``.cache/images``) the first time; building needs root, mmdebstrap and the Debian archive.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import build_current_debian
from vmkit.errors import ConfigError
from vmkit.host import cloudinit
from vmkit.host import sshkeys as keys
from vmkit.host.images import debian, qemuimg
from vmkit.host.images.debian import READY_MARKER, BuildProgress, build_debian
from vmkit.host.images.store import Image, ImageStore
from vmkit.host.provision import free_port

# The VM tests are marked e2e (slow, they need the image); the build-recipe tests at the end are fast.

REPO = Path(__file__).resolve().parents[2]
NAME = "e2e-debian"
MAC = "52:54:00:e2:e2:01"
RUNCMD_MARKER = "/var/tmp/vmkit-runcmd-ran"


def _store() -> ImageStore:
    root = os.environ.get("VMKIT_IMAGE_CACHE")
    return ImageStore(Path(root).expanduser().resolve() if root else REPO / ".cache" / "images")


@pytest.fixture(scope="module")
def debian_image() -> Image:
    store = _store()
    if not store.exists("debian-12") and (os.geteuid() != 0 or shutil.which("mmdebstrap") is None):
        pytest.skip("building debian-12 needs root and mmdebstrap (apt-get install mmdebstrap)")

    def show(ev: BuildProgress) -> None:
        if ev.stage_done:
            print(f"[{ev.elapsed:6.1f} s] {ev.message}", flush=True)

    return build_current_debian(store, progress=show)


@dataclass
class Guest:
    """One QEMU process booting the image from ``work/disk.qcow2`` with ``work/seed.iso``."""

    work: Path
    port: int
    host_keys: keys.HostKeys
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def serial(self) -> Path:
        return self.work / "serial.log"

    def serial_tail(self, lines: int = 40) -> str:
        text = self.serial.read_text(errors="replace") if self.serial.exists() else "(no serial log)"
        return "\n".join(text.splitlines()[-lines:])

    def ssh_argv(self, known_hosts: Path | None = None, timeout: int = 5) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-i", str(self.work / "id_ed25519"), "-p", str(self.port),
                "-o", f"UserKnownHostsFile={known_hosts or self.work / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", f"ConnectTimeout={timeout}", "-o", "LogLevel=ERROR", "vmkit@127.0.0.1"]

    def ssh(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.ssh_argv(timeout=20), command], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start(self, image: Image, mac: str) -> None:
        assert image.kernel and image.initrd
        w = self.work
        argv = [
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max",
            "-smp", "2", "-m", "1G", "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", image.manifest.cmdline,
            "-drive", f"file={w / 'disk.qcow2'},if=none,id=root,format=qcow2",
            "-device", "virtio-blk-pci,drive=root",
            "-drive", f"file={w / 'seed.iso'},if=none,id=seed,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=seed",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
            "-chardev", f"socket,id=qga0,path={w / 'qga.sock'},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-device", "virtio-rng-pci",
            "-serial", f"file:{w / 'serial.log'}",
        ]
        self.serial.unlink(missing_ok=True)
        (w / "qga.sock").unlink(missing_ok=True)
        self.timings = {}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 300) -> None:
        """Agent answers, then SSH (pinned key) works, then cloud-init prints its final line."""
        assert self.proc is not None
        deadline = self.started + timeout
        try:
            _agent_sync(self.work / "qga.sock", deadline, self.proc)
            self.timings["agent"] = time.monotonic() - self.started
            while True:
                r = subprocess.run([*self.ssh_argv(timeout=5), "true"], capture_output=True, text=True,
                                   check=False)
                if r.returncode == 0:
                    self.timings["ssh"] = time.monotonic() - self.started
                    break
                assert "Host key verification failed" not in r.stderr, r.stderr
                assert time.monotonic() < deadline, f"no SSH login in time: {r.stderr}"
                time.sleep(0.3)
            while READY_MARKER not in self.serial.read_text(errors="replace"):
                assert time.monotonic() < deadline, "cloud-init did not finish in time"
                time.sleep(0.2)
            self.timings["cloud_init_final"] = time.monotonic() - self.started
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- serial log tail ---\n{self.serial_tail()}") from exc
        print("boot timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()), flush=True)

    def stop(self) -> None:
        """Always ends QEMU (kill); safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=30)


def _agent_sync(sock_path: Path, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    """Wait until qemu-guest-agent answers guest-sync-delimited (our own buffer, no makefile)."""
    sock: socket.socket | None = None
    buf = b""
    n = 0
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "QEMU exited"
            try:
                if sock is None:
                    sock = socket.socket(socket.AF_UNIX)
                    sock.connect(str(sock_path))
                    sock.settimeout(0.3)
                n += 1
                # Until the agent runs, QEMU stops reading once the port's buffer is full: a send
                # that times out means "not yet" (reconnect and try again).
                sock.sendall(json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": n}}).encode()
                             + b"\n")
                try:
                    buf += sock.recv(4096)
                except TimeoutError:
                    continue
                for line in buf.replace(b"\xff", b"\n").splitlines():
                    if line.strip().startswith(b"{") and "return" in json.loads(line):
                        return
            except OSError:  # not there yet, refused, or the send timed out
                if sock is not None:
                    sock.close()
                sock = None
                time.sleep(0.2)
        raise AssertionError("the guest agent did not answer in time")
    finally:
        if sock is not None:
            sock.close()


def _write_seed(work: Path, host_keys: keys.HostKeys, *, hostname: str, mac: str) -> None:
    user = keys.load_keypair(work / "id_ed25519")
    extra = f"#cloud-config\nruncmd:\n  - [touch, {RUNCMD_MARKER}]\n"
    spec = cloudinit.SeedSpec(cloudinit.new_instance_id(), hostname, (user.public_openssh,), host_keys,
                              mac=mac, extra_user_data=extra)
    cloudinit.make_seed_iso(work / "seed.iso", spec)


@pytest.fixture(scope="module")
def guest(debian_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    work = tmp_path_factory.mktemp("debian-guest")
    assert debian_image.disk is not None
    keys.generate_keypair(comment="vmkit@e2e").write(work / "id_ed25519")
    g = Guest(work, free_port(), keys.generate_host_keys())
    keys.write_known_hosts(work / "known_hosts", g.host_keys, g.port)
    _write_seed(work, g.host_keys, hostname=NAME, mac=MAC)
    qemuimg.create_overlay(work / "disk.qcow2", debian_image.disk, backing_format="qcow2", size="4G")
    try:
        g.start(debian_image, MAC)
        g.wait_ready()
        yield g
    finally:
        g.stop()


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_image_manifest_and_cache(debian_image: Image) -> None:
    m = debian_image.manifest
    assert (m.name, m.kind, m.disk_format) == ("debian-12", "disk", "qcow2")
    assert "root=/dev/vda" in m.cmdline and "console=ttyS0" in m.cmdline
    assert debian_image.kernel and debian_image.kernel.is_file()
    assert debian_image.initrd and debian_image.initrd.is_file()
    assert qemuimg.info(debian_image.disk or Path()).format == "qcow2"
    assert m.recipe == debian.RECIPE and not debian.is_outdated(debian_image)
    # a second build is a no-op
    started = time.monotonic()
    again = build_debian(_store())
    assert time.monotonic() - started < 5
    assert again.manifest.created == m.created


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_cloud_init_done_and_user_data_applied(guest: Guest) -> None:
    r = guest.ssh("cloud-init status --wait --long")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "status: done" in r.stdout
    assert guest.ssh("hostname").stdout.strip() == NAME
    assert guest.ssh(f"test -e {RUNCMD_MARKER}").returncode == 0


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_guest_agent_and_sudo(guest: Guest) -> None:
    r = guest.ssh("systemctl is-active qemu-guest-agent ssh systemd-networkd && sudo -n true && id -nG")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sudo" in r.stdout


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_root_fs_grew_and_9p_is_available(guest: Guest) -> None:
    size = int(guest.ssh("df --output=size -B1 / | tail -1").stdout)
    assert size > 3 << 30  # the 4 GiB overlay, grown on first boot
    r = guest.ssh("/sbin/modinfo -n 9p 9pnet_virtio virtio_blk")
    assert r.returncode == 0, r.stderr


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_pinned_host_key_is_enforced(guest: Guest, tmp_path: Path) -> None:
    wrong = tmp_path / "known_hosts"
    keys.write_known_hosts(wrong, keys.generate_host_keys(), guest.port)
    r = subprocess.run([*guest.ssh_argv(known_hosts=wrong), "true"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode != 0
    assert "Host key verification failed" in r.stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in r.stderr
    # only the seed's host key is offered (no other key types generated)
    out = subprocess.run(["ssh-keyscan", "-T", "30", "-t", "rsa,ecdsa,ed25519", "-p", str(guest.port),
                          "127.0.0.1"], capture_output=True, text=True, timeout=120, check=False).stdout
    offered = {line.split()[1] for line in out.splitlines() if line and not line.startswith("#")}
    assert offered == {"ssh-ed25519"}
    assert guest.host_keys.keys[0].public_key.split()[1] in out


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_new_instance_id_reconfigures_the_same_disk(guest: Guest, debian_image: Image) -> None:
    """What a clone relies on: a new seed (instance-id, hostname, host key, MAC) on the old disk."""
    # Runs last in this module: it replaces the module's guest.
    r = guest.ssh("sudo systemctl poweroff", timeout=60)
    assert guest.proc is not None
    guest.proc.wait(timeout=120)  # QEMU exits when the guest powers off
    guest.host_keys = keys.generate_host_keys()
    keys.write_known_hosts(guest.work / "known_hosts", guest.host_keys, guest.port)
    _write_seed(guest.work, guest.host_keys, hostname=f"{NAME}-clone", mac="52:54:00:e2:e2:02")
    guest.start(debian_image, "52:54:00:e2:e2:02")
    guest.wait_ready()  # SSH with the *new* pinned host key
    assert guest.ssh("hostname").stdout.strip() == f"{NAME}-clone", r.stderr
    assert "status: done" in guest.ssh("cloud-init status --wait").stdout


# --- the build recipe, without building -------------------------------------------------------


def test_cloud_cfg_is_complete_yaml() -> None:
    cfg = yaml.safe_load(debian.CLOUD_CFG)
    assert cfg["datasource_list"] == ["NoCloud"]
    assert cfg["network"] == {"config": "disabled"}
    assert {"users-groups", "ssh", "growpart", "resizefs", "set_hostname"} <= set(cfg["cloud_init_modules"])
    assert {"runcmd", "locale", "set-passwords"} <= set(cfg["cloud_config_modules"])
    assert {"scripts-user", "final-message", "package-update-upgrade-install"} <= set(cfg["cloud_final_modules"])
    assert "keys-to-console" not in cfg["cloud_final_modules"]
    assert cfg["system_info"]["distro"] == "debian"
    logging_cfg = yaml.safe_load(debian.CLOUD_LOGGING_CFG)
    ini = "\n".join(logging_cfg["log_cfgs"][0])
    assert "class=FileHandler" in ini and "/var/log/cloud-init.log" in ini
    assert logging_cfg["output"] == {"all": "| tee -a /var/log/cloud-init-output.log"}


def test_configure_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "lib/systemd/system/cloud-init.service").write_text(
        "[Unit]\nAfter=cloud-init-local.service\nAfter=systemd-networkd-wait-online.service\n"
        "Before=sysinit.target\n[Service]\nExecStart=/usr/bin/cloud-init init\n")
    (root / "lib/systemd/system/cloud-config.service").write_text(
        "[Service]\nExecStart=/usr/bin/cloud-init modules --mode=config\n")
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_rsa_key").write_text("secret")
    (root / "etc/ssh/sshd_config").write_text("")
    (root / "var/lib/dbus").mkdir(parents=True)
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    (root / "etc/machine-id").write_text("0123")
    debian.configure_tree(root)
    assert sorted(p.name for p in (root / "etc/ssh").iterdir()) == ["sshd_config"]
    assert (root / "etc/machine-id").read_text() == ""
    assert not (root / "var/lib/dbus/machine-id").is_symlink()
    unit = (root / "etc/systemd/system/cloud-init.service").read_text()
    assert "systemd-networkd-wait-online" not in unit.split("\n", 1)[1]
    assert "Before=sysinit.target" in unit
    assert "ExecStart=/usr/bin/python3 -m cloudinit.cmd.main init\n" in unit
    dropin = (root / "etc/systemd/system/cloud-config.service.d/vmkit.conf").read_text()
    assert "After=ssh.service" in dropin
    assert "ExecStart=\nExecStart=/usr/bin/python3 -m cloudinit.cmd.main modules --mode=config\n" in dropin
    assert not (root / "etc/systemd/system/cloud-final.service.d").exists()  # no packaged unit here
    assert (root / "etc/systemd/system-generators/systemd-gpt-auto-generator").readlink() == Path("/dev/null")
    assert (root / "etc/cloud/cloud.cfg").read_text() == debian.CLOUD_CFG
    assert "DHCP=ipv4" in (root / "etc/systemd/network/10-vmkit.network").read_text()
    assert "After=cloud-init.service" in (
        root / "etc/systemd/system/qemu-guest-agent.service.d/vmkit.conf").read_text()
    assert (root / "etc/resolv.conf").read_text() == "nameserver 10.0.2.3\n"
    assert "LABEL=vmkit-root" in (root / "etc/fstab").read_text()


def test_mmdebstrap_argv(tmp_path: Path) -> None:
    argv = debian.mmdebstrap_argv("bookworm", tmp_path / "rootfs", hooks_dir=tmp_path, kernels=["amd64"],
                                  mirror="http://m/debian", security_mirror="http://m/security")
    assert argv[:4] == ["mmdebstrap", "--mode=root", "--format=directory", "--variant=minbase"]
    include = next(a for a in argv if a.startswith("--include="))
    for pkg in ("linux-image-amd64", "cloud-init", "openssh-server", "qemu-guest-agent", "cloud-guest-utils",
                "systemd-sysv", "initramfs-tools"):
        assert pkg in include.split("=", 1)[1].split(",")
    assert f"--essential-hook={tmp_path / 'essential.sh'}" in argv
    assert argv[-3:] == ["deb http://m/debian bookworm main", "deb http://m/debian bookworm-updates main",
                         "deb http://m/security bookworm-security main"]
    assert "--dpkgopt=path-exclude=/usr/share/man/*" in argv


def test_build_rejects_bad_arguments(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(ConfigError, match="not a supported release"):
        build_debian(store, release="sid")
    with pytest.raises(ConfigError, match="kernels"):
        build_debian(store, kernels=["rt-amd64"])




def test_remove_tree(tmp_path: Path) -> None:
    tree = tmp_path / "rootfs"
    (tree / "a/b").mkdir(parents=True)
    (tree / "a/b/f").write_text("x")
    debian.remove_tree(tree)
    assert not tree.exists()
    debian.remove_tree(tree)  # absent: nothing to do
