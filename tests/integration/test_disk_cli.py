"""`vmkit disk ...` and NBD connection events through the supervisor, from the shell."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import NbdServerProcess, follow_events, vmkit
from vmkit.host.images.store import Image

pytestmark = pytest.mark.integration


def test_disk_attach_list_detach_and_nbd_events(vmkit_home: Path, micro_image: Image, tmp_path: Path) -> None:
    served = tmp_path / "served.raw"
    with served.open("wb") as f:
        f.truncate(4 << 20)
        f.write(b"NBD-AT-BOOT!")
    extra = tmp_path / "extra.raw"
    with extra.open("wb") as f:
        f.truncate(4 << 20)
        f.write(b"HOT-MARKER!!")
    server = NbdServerProcess(served, tmp_path / "nbd.sock")
    server.start()
    try:
        vmkit("create", "d", "--image", "micro", "--memory", "256M", "--disk", f"{server.url},kind=virtio-blk")
        vmkit("start", "d")
        follower = follow_events("d")  # subscribed: nothing after is missed
        try:
            rows = json.loads(vmkit("disk", "list", "d", "--json").stdout)
            assert [(r["id"], r["attachment"], r["state"]) for r in rows] == [("disk0", "nbd", "connected")]

            out = vmkit("disk", "attach", "d", f"{extra}:kind=nvme", "--id", "scratch").stdout
            assert "attached scratch" in out
            rows = json.loads(vmkit("disk", "list", "d", "--json").stdout)
            assert {r["id"]: r["origin"] for r in rows} == {"disk0": "boot", "scratch": "hot-plugged"}
            typed = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "console", "d"], text=True,
                                   input="sleep 1; echo both:$(head -c 12 /dev/vda):$(head -c 12 /dev/nvme0n1)\n",
                                   capture_output=True, timeout=60)
            assert typed.returncode == 0
            log = vmkit("console", "d", "--log", "--until", r"^both:.*\n", "--timeout", "30").stdout
            assert "both:NBD-AT-BOOT!:HOT-MARKER!!" in log

            bad = vmkit("disk", "detach", "d", "disk0", check=False)
            assert bad.returncode == 3 and "vm.yaml" in bad.stderr  # boot disks are not hot-plugged
            vmkit("disk", "detach", "d", "scratch", "--timeout", "60")
            assert [r["id"] for r in json.loads(vmkit("disk", "list", "d", "--json").stdout)] == ["disk0"]
            bad_spec = vmkit("disk", "attach", "d", f"{extra}:bogus", check=False)
            assert bad_spec.returncode == 2 and "bogus" in bad_spec.stderr

            server.kill()
            deadline = time.monotonic() + 60
            subprocess.run([sys.executable, "-m", "vmkit.cli.main", "console", "d"], text=True,
                           input="dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=100 iflag=direct\n",
                           capture_output=True, timeout=60)
            while json.loads(vmkit("list", "--json").stdout)[0]["state"] != "paused":
                assert time.monotonic() < deadline, "the VM did not pause when its NBD server died"
                time.sleep(0.5)
            server.start()
            while json.loads(vmkit("list", "--json").stdout)[0]["state"] != "running":
                assert time.monotonic() < deadline, "the VM did not resume when the NBD server came back"
                time.sleep(0.5)
            time.sleep(4)  # the watcher reports "reconnected" once the guest stays running
            vmkit("stop", "d")
            out, _ = follower.communicate(timeout=30)
        finally:
            follower.kill()
    finally:
        server.kill()
    nbd_states = [e["detail"]["state"] for e in map(json.loads, out.splitlines()) if e.get("kind") == "nbd"]
    assert "disconnected" in nbd_states and "reconnected" in nbd_states
    assert nbd_states.index("disconnected") < nbd_states.index("reconnected")

