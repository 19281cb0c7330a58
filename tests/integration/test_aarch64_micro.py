"""An aarch64 guest (QEMU's virt machine under TCG) through the `vmkit` command, on the micro guest built
for aarch64: it boots and runs a command; a disk is hot-plugged into a PCIe root port and detached; a
snapshot is taken and reverted to; it is saved and resumed with its counter going on. A second guest
reads and writes a virtiofs share, is refused a save by name (the share), and stops through the virt
machine's GPIO power key in seconds. What QEMU has no aarch64 build of (an IDE controller) is refused
by name before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import vmkit
from vmkit.host.images import micro
from vmkit.host.images.store import Image

pytestmark = pytest.mark.integration


def console_ticks(name: str, pattern: str = r"vmkit-tick \d+") -> list[int]:
    until = rf"(?:{pattern})\n"
    return micro.parse_ticks(vmkit("console", name, "--log", "--until", until, "--timeout", "120").stdout)


def serial_ticks(inst: Path) -> int:
    return max(micro.parse_ticks((inst / "serial.log").read_text(errors="replace")))


def typed(name: str, line: str, until: str) -> str:
    """Type ``line`` at the guest's console shell; the console log up to a line matching ``until``."""
    res = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "console", name], text=True, input=line + "\n",
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return vmkit("console", name, "--log", "--until", until, "--timeout", "120").stdout


def state_of(name: str) -> str:
    return str(json.loads(vmkit("list", "--json").stdout)[0]["state"])


@pytest.mark.timeout(900)
def test_aarch64_micro_command_disks_snapshot_save_and_resume(vmkit_home: Path, micro_aarch64_image: Image,
                                                               tmp_path: Path) -> None:
    data = tmp_path / "data.qcow2"  # holds the snapshots (the micro guest has no disk of its own)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "16M"], check=True)
    extra = tmp_path / "extra.raw"
    with extra.open("wb") as f:
        f.truncate(4 << 20)
        f.write(b"HOT-MARKER!!")
    vmkit("create", "arm", "--image", "micro", "--arch", "aarch64", "--memory", "256M", "--disk", str(data),
          "--cmdline", "vmkit.counter=1", "--run", "uname -m; cat /proc/device-tree/compatible; echo")
    config = (vmkit_home / "instances" / "arm" / "vm.yaml").read_text()
    assert "arch: aarch64" in config and "machine: virt" in config
    dry = vmkit("start", "arm", "--dry-run").stdout
    assert "qemu-system-aarch64" in dry and "pcie-root-port" in dry  # hot-plug slots on virt's pcie.0
    vmkit("start", "arm")
    row = json.loads(vmkit("list", "--json").stdout)[0]
    assert row["state"] == "running" and row["accel"] == "tcg"
    inst = vmkit_home / "instances" / "arm"
    log = vmkit("console", "arm", "--log", "--until", r"VMKIT-RUN-END rc=\d+", "--timeout", "120").stdout
    result = micro.parse_run_output(log)
    assert result is not None and result.rc == 0, log[-2000:]
    assert result.output.splitlines()[0] == "aarch64"
    assert "linux,dummy-virt" in result.output  # QEMU's virt board's device tree

    # a disk into a PCIe root port of the running machine, read by the guest, then detached
    assert "attached scratch" in vmkit("disk", "attach", "arm", f"{extra}:kind=virtio-blk", "--id", "scratch").stdout
    log = typed("arm", "sleep 1; echo hot:$(head -c 12 /dev/vdb)", r"^hot:.*\n")
    assert "hot:HOT-MARKER!!" in log
    vmkit("disk", "detach", "arm", "scratch", "--timeout", "90")
    assert [r["id"] for r in json.loads(vmkit("disk", "list", "arm", "--json").stdout)] == ["disk0"]

    # a snapshot of the running machine; a later start from it goes on from its counter
    console_ticks("arm", r"vmkit-tick [2-9]")
    before = serial_ticks(inst)
    assert "created snapshot t1" in vmkit("snapshot", "create", "arm", "t1").stdout
    at_snapshot = serial_ticks(inst)
    console_ticks("arm", rf"vmkit-tick {at_snapshot + 4}")
    vmkit("stop", "--force", "arm")
    assert "reverted to snapshot t1" in vmkit("snapshot", "revert", "arm", "t1").stdout
    first = console_ticks("arm")[0]
    assert before < first <= at_snapshot + 1, f"counter {first} after revert, {before}..{at_snapshot} at the snapshot"
    vmkit("snapshot", "delete", "arm", "t1")

    # saved and resumed
    console_ticks("arm", rf"vmkit-tick {first + 2}")
    assert "saved arm to" in vmkit("stop", "--save", "arm").stdout
    last = serial_ticks(inst)
    res = vmkit("start", "arm")
    assert "resumed from" in res.stdout, res.stdout + res.stderr
    after = console_ticks("arm")
    assert last < after[0] <= last + 2, f"counter {after[0]} after resuming, {last} when saved"
    vmkit("stop", "--force", "arm")


@pytest.mark.timeout(600)
def test_aarch64_micro_share_and_a_stop_by_the_gpio_power_key(vmkit_home: Path, micro_aarch64_image: Image,
                                                              tmp_path: Path) -> None:
    assert micro_aarch64_image.manifest.extra["power_button"] is True
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello-arm\n")
    bad = vmkit("create", "ide", "--image", "micro", "--arch", "aarch64", "--disk", f"{tmp_path / 'x.raw'}:kind=ide",
                check=False)
    assert bad.returncode == 2 and "storage[0].kind" in bad.stderr and "aarch64" in bad.stderr, bad.stderr
    assert not (vmkit_home / "instances" / "ide").exists()

    vmkit("create", "fs", "--image", "micro", "--arch", "aarch64", "--memory", "256M", "--mount", f"{src}:/mnt/src",
          "--run", "mkdir -p /mnt/src; mount -t virtiofs share0 /mnt/src && cat /mnt/src/hello.txt "
                   "&& echo from-arm > /mnt/src/out.txt")
    vmkit("start", "fs")
    log = vmkit("console", "fs", "--log", "--until", r"VMKIT-RUN-END rc=\d+", "--timeout", "120").stdout
    result = micro.parse_run_output(log)
    assert result is not None and result.rc == 0, log[-2000:]
    assert result.output.strip() == "hello-arm"
    assert (src / "out.txt").read_text() == "from-arm\n"

    refused = vmkit("stop", "--save", "fs", check=False)
    assert refused.returncode == 2 and "virtiofs" in refused.stderr, refused.stderr
    assert state_of("fs") == "running"

    # no ACPI on the virt machine: system_powerdown pulses the PL061 GPIO power key, which the micro
    # init watches; without it the stop waited for its timeout (about 45 s) and then killed QEMU
    t0 = time.monotonic()
    out = vmkit("stop", "fs").stdout
    took = time.monotonic() - t0
    assert "guest shutdown" in out, out
    assert took < 30, f"vmkit stop took {took:.0f} s"
    assert "VMKIT-POWEROFF" in (vmkit_home / "instances" / "fs" / "serial.log").read_text(errors="replace")
    assert state_of("fs") == "stopped"
