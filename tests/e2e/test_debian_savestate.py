"""Save and resume the full Debian guest through the CLI: a process started before the save still runs
afterwards, and qemu-guest-agent puts the guest clock right."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import vmkit
from vmkit.images.store import Image

pytestmark = pytest.mark.e2e




@pytest.mark.timeout(1200)
def test_stop_save_start_keeps_processes_and_the_clock(vmkit_home: Path, debian12: Image) -> None:
    vmkit("create", "deb", "--image", "debian-12")
    vmkit("start", "deb")
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
    vmkit("stop", "deb")
