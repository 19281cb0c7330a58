"""Save and resume the full Debian guest through the CLI: a process started before the save still runs
afterwards, qemu-guest-agent puts the guest clock right (after a restore and after a plain pause), and
an sshfs share works again after a restore, also one left paused and resumed later."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import vmkit
from vmkit.host.images.store import Image

pytestmark = pytest.mark.e2e


def guest_reads(name: str, path: str) -> str:
    return vmkit("exec", name, "--", "cat", path).stdout.strip()


@pytest.mark.timeout(1200)
def test_stop_save_start_keeps_processes_the_clock_and_sshfs(vmkit_home: Path, debian12: Image,
                                                             tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "before").write_text("written before the save\n")
    vmkit("create", "deb", "--image", "debian-12", "--mount", f"{shared}:/mnt/host,type=sshfs")
    vmkit("start", "deb")
    assert guest_reads("deb", "/mnt/host/before") == "written before the save"
    pid = vmkit("exec", "deb", "--", "sh", "-c",
                "setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!").stdout.strip()
    assert pid.isdigit()

    assert "saved deb to" in vmkit("stop", "--save", "deb").stdout
    assert json.loads(vmkit("list", "--json").stdout)[0]["state"] == "saved"
    time.sleep(20)  # the guest's clock stands still meanwhile

    res = vmkit("start", "deb")
    assert "resumed from" in res.stdout, res.stdout + res.stderr
    assert "guest clock set to the host's time by the guest agent" in " ".join(res.stdout.split())
    assert vmkit("exec", "deb", "--", "kill", "-0", pid, check=False).returncode == 0, "the process is gone"
    guest_now = int(vmkit("exec", "deb", "--", "date", "+%s").stdout)
    assert abs(guest_now - time.time()) < 3, f"guest clock off by {time.time() - guest_now:.0f} s"
    # the restored guest's sshfs mount belonged to an ssh session of the old QEMU: it was made anew
    (shared / "after").write_text("written after the restore\n")
    assert guest_reads("deb", "/mnt/host/after") == "written after the restore"

    # a plain pause stops the guest's clock too; resume puts it right
    vmkit("pause", "deb")
    time.sleep(15)
    res = vmkit("resume", "deb")
    assert "guest clock set to the host's time by the guest agent" in " ".join(res.stdout.split()), res.stdout
    guest_now = int(vmkit("exec", "deb", "--", "date", "+%s").stdout)
    assert abs(guest_now - time.time()) < 3, f"guest clock off by {time.time() - guest_now:.0f} s after resume"

    # restored but left paused: the share is mounted when it is resumed
    vmkit("stop", "--save", "deb")
    assert "is paused" in vmkit("restore", "deb", "--paused").stdout
    vmkit("resume", "deb")
    (shared / "later").write_text("written while it was paused\n")
    assert guest_reads("deb", "/mnt/host/later") == "written while it was paused"
    vmkit("stop", "deb")
