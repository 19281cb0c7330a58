"""The Debian guest's whole path on a libvirt host through ``vmkit --connect`` (a private libvirtd):
create from the image (uploaded to the host's pool), start (ready when the agent answers), exec and
cp through libvirt's agent commands, SSH through the forward vmkit adds to the running QEMU, managed
save/restore, a snapshot, stop, delete. ONE booted guest for the whole file (a Debian boot is minutes here)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import image_cache_dir, vmkit
from libvirt_daemon import LibvirtDaemon
from vmkit.host.images.store import Image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

NAME = "lvweb"


@pytest.fixture(scope="module")
def web(lv: LibvirtDaemon, debian12: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    mp = pytest.MonkeyPatch()
    try:  # undone whatever happens: VMKIT_CONNECT must not outlive the module
        mp.setenv("VMKIT_HOME", str(tmp_path_factory.mktemp("home")))
        mp.setenv("VMKIT_IMAGE_CACHE", str(image_cache_dir()))
        mp.setenv("VMKIT_CONNECT", lv.uri)
        vmkit("create", NAME, "--image", "debian-12", "--disk", "3G")
        try:
            vmkit("start", NAME, "--timeout", "900")
            yield NAME
        finally:
            vmkit("delete", "--force", NAME, check=False)
    finally:
        mp.undo()


def test_agent_exec_and_cp(lv: LibvirtDaemon, web: str, tmp_path: Path) -> None:
    assert lv.virsh("domstate", web).stdout.strip() == "running"
    res = vmkit("exec", web, "--", "cat", "/etc/hostname")
    assert res.stdout.strip() == web
    src = tmp_path / "hello.txt"
    src.write_text("through libvirt's guest-file-write\n")
    vmkit("cp", str(src), f"{web}:/tmp/hello.txt")
    vmkit("cp", f"{web}:/tmp/hello.txt", str(tmp_path / "back.txt"))
    assert (tmp_path / "back.txt").read_text() == src.read_text()
    assert vmkit("exec", web, "--", "sh", "-c", "exit 3", check=False).returncode == 3


def test_ssh_through_the_forwarded_port(lv: LibvirtDaemon, web: str) -> None:
    """libvirt 9.0 has no element for user-mode port forwards: vmkit adds the SSH forward to the running
    QEMU (HMP hostfwd_add through libvirt), and the client keeps the key and the pinned host key."""
    import vmkit as vk

    argv = vk.Client(connect=lv.uri).get(web).ssh_argv(["id", "-un"])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "vmkit"
    assert "StrictHostKeyChecking yes" in vmkit("ssh-config", web).stdout


def test_managed_save_and_restore_keep_the_guest(lv: LibvirtDaemon, web: str) -> None:
    vmkit("exec", web, "--", "sh", "-c", "echo before-save > /dev/shm/mark")  # tmpfs: only RAM keeps it
    vmkit("save", web)
    assert lv.virsh("domstate", web).stdout.strip() == "shut off"
    assert json.loads(vmkit("list", "--json").stdout)[0]["state"] == "saved"
    vmkit("restore", web)
    assert vmkit("exec", web, "--", "cat", "/dev/shm/mark").stdout.strip() == "before-save"


def test_snapshot_and_revert(lv: LibvirtDaemon, web: str) -> None:
    vmkit("exec", web, "--", "sh", "-c", "echo one > /dev/shm/snap")
    vmkit("snapshot", "create", web, "s1")
    assert "s1" in lv.virsh("snapshot-list", web, "--name").stdout.split()
    vmkit("exec", web, "--", "sh", "-c", "echo two > /dev/shm/snap")
    vmkit("snapshot", "revert", web, "s1")
    assert vmkit("exec", web, "--", "cat", "/dev/shm/snap").stdout.strip() == "one"
    listed = vmkit("snapshot", "list", web, "--json").stdout
    assert "s1" in listed
    vmkit("snapshot", "delete", web, "s1")
    assert "s1" not in lv.virsh("snapshot-list", web, "--name").stdout.split()


def test_agent_lifecycle_events(lv: LibvirtDaemon, web: str) -> None:
    """libvirt's agent lifecycle events are vmkit's VSERPORT_CHANGE of the agent's port: the agent stopped
    and started again in the guest (over SSH: exec needs the agent) shows as closed, then open."""
    import os
    import select
    import sys
    import time

    import vmkit as vk

    argv = vk.Client(connect=lv.uri).get(web).ssh_argv

    def agents_seen(proc: subprocess.Popen[bytes], want: list[bool], timeout: float) -> list[bool]:
        assert proc.stdout is not None
        seen: list[bool] = []
        buf = b""
        deadline = time.monotonic() + timeout
        while seen[-len(want):] != want:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"agent events so far: {seen}"
            buf += os.read(proc.stdout.fileno(), 65536)
            *lines, buf = buf.split(b"\n")
            for line in lines:
                ev = json.loads(line)
                if ev["kind"] == "qmp" and ev["detail"].get("event") == "VSERPORT_CHANGE":
                    seen.append(ev["detail"]["data"]["open"])
        return seen

    proc = subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "events", web], stdout=subprocess.PIPE,
                            env={**os.environ, "VMKIT_CONNECT": lv.uri}, bufsize=0)
    try:
        time.sleep(3)  # the callbacks are registered
        for action in ("stop", "start"):
            res = subprocess.run(argv(["sudo", "systemctl", action, "qemu-guest-agent"]), capture_output=True,
                                 text=True, timeout=120)
            assert res.returncode == 0, res.stderr
        agents_seen(proc, [False, True], 120)
    finally:
        proc.kill()
        proc.wait()
    assert vmkit("exec", web, "--", "true").returncode == 0  # the agent answers again


def test_stop_then_delete(lv: LibvirtDaemon, web: str) -> None:
    vmkit("stop", web, "--timeout", "120")
    assert lv.virsh("domstate", web).stdout.strip() == "shut off"
    vmkit("delete", web)
    assert web not in lv.virsh("list", "--all", "--name").stdout.split()
    assert f"{web}-" not in lv.virsh("vol-list", "vmkit").stdout
