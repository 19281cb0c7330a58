"""The full Debian guest moves to another host of scripts/lab.sh while it runs: its overlay disk is
mirrored, a process it ran keeps running there, what it wrote is there, and the guest agent and SSH
answer on the target (its keys and ssh_config moved with it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import LAB, vmkit
from vmkit.host.images.store import Image

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(os.geteuid() != 0, reason="the lab's network namespaces need root")]


@pytest.mark.timeout(1800)
def test_debian_moves_live_with_its_disk(vmkit_home: Path, debian12: Image, lab: str, on_target: list[str]) -> None:
    vmkit("create", "dm", "--image", "debian-12", "--memory", "512M")
    on_target.append("dm")
    vmkit("start", "dm")
    pid = vmkit("exec", "dm", "--", "sh", "-c",
                "setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!").stdout.strip()
    assert pid.isdigit()
    vmkit("exec", "dm", "--", "sh", "-c", "head -c 4M /dev/urandom > /var/tmp/blob && sync && "
          "sha256sum /var/tmp/blob > /var/tmp/blob.sum")
    want = vmkit("exec", "dm", "--", "cat", "/var/tmp/blob.sum").stdout

    out = json.loads(vmkit("migrate", "dm", lab, "--copy-storage", "--json", timeout=1200).stdout)
    assert out["report"]["disks_copied"] == ["root"] and out["report"]["query"]["status"] == "completed"
    assert json.loads(vmkit("list", "--json").stdout)[0]["state"] == "migrated"

    assert vmkit("--host", lab, "exec", "dm", "--", "kill", "-0", pid, check=False).returncode == 0
    assert vmkit("--host", lab, "exec", "dm", "--", "cat", "/var/tmp/blob.sum").stdout == want
    check = vmkit("--host", lab, "exec", "dm", "--", "sh", "-c", "echo 3 > /proc/sys/vm/drop_caches; "
                  "sha256sum -c /var/tmp/blob.sum", check=False)  # read back from the copied disk
    assert check.returncode == 0, check.stdout + check.stderr
    assert vmkit("--host", lab, "shell", "dm", "--", "echo", "over-ssh").stdout.strip() == "over-ssh"
    there = LAB / "vmklab1" / "home" / "instances" / "dm"
    assert str(there) in (there / "ssh_config").read_text()
    vmkit("delete", "dm")
