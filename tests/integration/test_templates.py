"""Warm templates with the micro guest: ``vmkit image warm`` saves a booted guest once, machines created
from the image start from it (their guest runs on, answering on its console), two clones share the
template's RAM pages in the host's page cache, and a template that cannot be used means a cold boot
with the reason. The identity part (agent, SSH keys, RNG) is the Debian guest's: tests/e2e/test_debian_warm.py.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import vmkit, wait_until, warm_template
from vmkit.api.models import WarmTemplate
from vmkit.host.images.store import Image
from vmkit.runtime.qemu import dirtysync

MiB = 1 << 20


@pytest.fixture(scope="module")
def micro_template(micro_image: Image) -> Iterator[WarmTemplate]:
    """The micro image's warm template (512 MiB, 1 vCPU): made once, then found current by later runs."""
    with warm_template("micro") as tpl:
        yield tpl


def instance_dir(name: str) -> Path:
    return Path(os.environ["VMKIT_HOME"]) / "instances" / name


def console_says(name: str, command: str, expect: str, timeout: float = 120) -> None:
    """Type ``command`` on the machine's serial console and wait for ``expect`` in its log."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(instance_dir(name) / "console.sock"))
        s.sendall(command.encode() + b"\n")
        assert wait_until(lambda: expect in (instance_dir(name) / "serial.log").read_text(errors="replace"),
                          timeout, interval=0.2), f"{name} never printed {expect!r}"


def ram_mapping(pid: int, ram: Path) -> dict[str, int]:
    """The smaps fields (bytes) of QEMU's mapping of the template's RAM file."""
    fields: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = line.endswith(str(ram))
        elif inside and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
            fields[head[0][:-1]] = int(head[1]) << 10
    return fields


def test_warm_is_made_once_and_holds_ram_and_device_state(micro_template: WarmTemplate, vmkit_home: Path) -> None:
    again = json.loads(vmkit("image", "warm", "micro", "--json").stdout)
    assert again["made"] is False and again["path"] == micro_template.path  # a current one is reused
    d = Path(micro_template.path)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    ram = d / "ram"
    # the guest's RAM: its memory, and on TCG with QEMU < 9.0 the 8 KiB pad (vmkit.runtime.qemu.dirtysync)
    assert micro_template.memory == 512 * MiB and ram.stat().st_size in (512 * MiB, 512 * MiB + dirtysync.RAM_PAD)
    assert stat.S_IMODE(ram.stat().st_mode) == 0o600
    assert 0 < (d / "devices.state").stat().st_size < 8 * MiB  # device state only: the RAM is not in it
    assert micro_template.machine_type.startswith("pc-q35-")


def test_clones_run_from_the_template_and_share_its_pages(micro_template: WarmTemplate, vmkit_home: Path) -> None:
    names = ("tc1", "tc2")
    for n in names:
        vmkit("create", n, "--image", "micro")
        assert json.loads((instance_dir(n) / "template.json").read_text())["path"] == micro_template.path
    for n in names:
        started = vmkit("start", n)
        assert "cloned from the warm template" in started.stdout, started.stdout + started.stderr
        assert not (instance_dir(n) / "template.json").exists()  # used: its next start boots cold
    for i, n in enumerate(names):  # the restored guests run on: their shells answer
        console_says(n, f"echo clone-$(({i} + 40))-ok", f"clone-{i + 40}-ok")
    pids = [int((instance_dir(n) / "qemu.pid").read_text()) for n in names]
    for pid in pids:
        assert "vmgenid" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    maps = [ram_mapping(pid, Path(micro_template.path) / "ram") for pid in pids]
    for m in maps:
        assert m, "QEMU does not map the template's RAM file"
        # pages read from the template are the page cache's, mapped by both clones; only what a
        # clone wrote is its own (private, anonymous)
        shared = m["Shared_Clean"] + m["Shared_Dirty"]  # dirty: the page cache not yet written back
        assert shared >= 4 * MiB, maps
        assert m["Anonymous"] < shared, maps
    # a clone's balloon would give pages back by punching them out of the template's file (QEMU 7.2)
    ram = Path(micro_template.path) / "ram"
    before = (ram.stat().st_mtime_ns, ram.stat().st_blocks)
    refused = vmkit("set", names[0], "--balloon", "256M", check=False)
    assert refused.returncode == 4 and "warm template's memory" in refused.stderr, refused.stderr
    for n in names:
        vmkit("stop", "--force", n)
    assert (ram.stat().st_mtime_ns, ram.stat().st_blocks) == before, "a clone wrote into the template's RAM file"


def test_a_template_that_cannot_be_used_means_a_cold_boot(micro_template: WarmTemplate, vmkit_home: Path) -> None:
    vmkit("create", "tc3", "--image", "micro")
    ref = instance_dir("tc3") / "template.json"
    ref.write_text(json.dumps({"path": str(Path(micro_template.path).parent / "gone")}))
    started = vmkit("start", "tc3")
    assert "cannot start from its warm template" in started.stderr and "cold-booting tc3" in started.stderr
    assert "cloned" not in started.stdout and "running" in started.stdout
    console_says("tc3", "echo cold-$((2 * 21))", "cold-42")
    vmkit("stop", "--force", "tc3")


def test_start_cold_boots_and_never_clones_afterwards(micro_template: WarmTemplate, vmkit_home: Path) -> None:
    vmkit("create", "tc4", "--image", "micro")
    started = vmkit("start", "--cold", "tc4")
    assert "cloned" not in started.stdout and "running" in started.stdout
    assert not (instance_dir("tc4") / "template.json").exists()  # its disk (if any) moved on: never warm again
    vmkit("stop", "--force", "tc4")
