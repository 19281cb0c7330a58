"""Storage devices the guest really sees, and disks on vmkit's own NBD server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from conftest import NbdServerProcess
from vmkit.config import MachineConfig, parse_config
from vmkit.host.images import micro
from vmkit.host.images.store import Image
from vmkit.runtime.machine import VirtualMachine, VmEvent, VmState

pytestmark = pytest.mark.integration

MiB = 1 << 20


def config(image: Image, storage: list[dict[str, Any]], run: str, *, memory: str = "256M") -> MachineConfig:
    return parse_config({
        "name": "st",
        "memory": memory,
        "boot": {"kernel": str(image.kernel), "initrd": str(image.initrd),
                 "cmdline": micro.guest_cmdline(image.manifest.cmdline, run=run, poweroff=True)},
        "network": None,
        "storage": storage,
        "readiness": {"serial_marker": micro.READY_MARKER, "timeout": 90},
    })


async def run_guest(cfg: MachineConfig, workdir: Path, timeout: float = 120) -> micro.RunResult:
    async with VirtualMachine(cfg, workdir) as vm:
        await vm.start()
        info = await vm.wait(timeout)
        assert info.clean, info.reason
        result = micro.parse_run_output(vm.serial.text())
    assert result is not None, "the guest printed no run result"
    return result


def disk(path: Path, marker: bytes, size: int = 8 * MiB) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        f.write(marker)
    return path


ROUND_TRIP = ("ls /sys/block | sort | tr '\\n' ' '; echo; "
              "for d in {devs}; do printf '%s=' $d; head -c 12 /dev/$d; echo; "
              "printf 'GUEST-%s' $d | dd of=/dev/$d bs=512 seek=1 conv=fsync 2>/dev/null; done")


async def test_guest_sees_virtio_blk_and_nvme(micro_image: Image, tmp_path: Path) -> None:
    a = disk(tmp_path / "a.raw", b"HOST-VIRTIO!")
    b = disk(tmp_path / "b.raw", b"HOST-NVME!!!")
    cfg = config(micro_image, [
        {"kind": "virtio-blk", "attachment": {"type": "disk-image", "path": str(a)}},
        {"kind": "nvme", "attachment": {"type": "disk-image", "path": str(b)}},
    ], ROUND_TRIP.format(devs="vda nvme0n1"))
    res = await run_guest(cfg, tmp_path)
    assert res.rc == 0, res.output
    assert "vda" in res.output.split("\n")[0] and "nvme0n1" in res.output.split("\n")[0]
    assert "vda=HOST-VIRTIO!" in res.output and "nvme0n1=HOST-NVME!!!" in res.output
    assert a.read_bytes()[512:521] == b"GUEST-vda"
    assert b.read_bytes()[512:525] == b"GUEST-nvme0n1"


async def test_guest_sees_usb_storage(micro_full_image: Image, tmp_path: Path) -> None:
    c = disk(tmp_path / "c.raw", b"HOST-USB!!!!")
    cfg = config(micro_full_image, [{"kind": "usb-storage", "attachment": {"type": "disk-image", "path": str(c)}}],
                 "i=0; while [ ! -e /dev/sda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; "
                 + ROUND_TRIP.format(devs="sda"))
    res = await run_guest(cfg, tmp_path, timeout=180)
    assert res.rc == 0, res.output
    assert "sda=HOST-USB!!!!" in res.output
    assert c.read_bytes()[512:521] == b"GUEST-sda"


async def test_data_disk_on_vmkit_nbd_server(micro_image: Image, tmp_path: Path) -> None:
    img = disk(tmp_path / "nbd.raw", b"HOST-NBD!!!!")
    server = NbdServerProcess(img, tmp_path / "nbd.sock")
    server.start()
    try:
        cfg = config(micro_image, [{"attachment": {"type": "nbd", "url": server.url}}],
                     ROUND_TRIP.format(devs="vda"))
        res = await run_guest(cfg, tmp_path)
    finally:
        server.kill()
    assert res.rc == 0, res.output
    assert "vda=HOST-NBD!!!!" in res.output
    assert img.read_bytes()[512:521] == b"GUEST-vda"


BLOCKS = 48
BLOCK = 64 * 1024


def expected_block(i: int) -> bytes:
    line = f"block-{i}\n".encode()
    return (line * (BLOCK // len(line) + 1))[:BLOCK]


async def test_vm_pauses_and_resumes_when_the_nbd_server_dies(micro_image: Image, tmp_path: Path) -> None:
    img = disk(tmp_path / "nbd.raw", b"", size=BLOCKS * BLOCK)
    server = NbdServerProcess(img, tmp_path / "nbd.sock")
    server.start()
    # the guest writes a known pattern block by block, slowly, with direct I/O, then checks it
    writer = (f"i=0; while [ $i -lt {BLOCKS} ]; do yes block-$i | head -c {BLOCK} | "
              f"dd of=/dev/vda bs={BLOCK} seek=$i oflag=direct 2>/dev/null || echo WRITE-FAILED-$i; "
              "echo wrote-$i; i=$((i+1)); sleep 0.15; done; "
              f"i=0; bad=0; while [ $i -lt {BLOCKS} ]; do "
              f"a=$(dd if=/dev/vda bs={BLOCK} skip=$i count=1 iflag=direct 2>/dev/null | md5sum); "
              f"b=$(yes block-$i | head -c {BLOCK} | md5sum); [ \"$a\" = \"$b\" ] || bad=$((bad+1)); i=$((i+1)); done; "
              "echo bad-blocks=$bad")
    cfg = config(micro_image, [{"attachment": {"type": "nbd", "url": server.url, "on_error": "pause",
                                               "reconnect_delay": 1}}], writer)
    events: list[VmEvent] = []
    try:
        async with VirtualMachine(cfg, tmp_path) as vm:
            vm.add_listener(events.append)
            await vm.start()
            await vm.serial.wait_for_regex(r"^wrote-8\b")
            server.kill()  # a crash, mid-write
            await vm.wait_for_state(VmState.PAUSED, timeout=30)  # QEMU stops the guest on the I/O error
            await asyncio.sleep(2.0)
            assert vm.state == VmState.PAUSED
            server.start()  # the server is back: vmkit resumes the guest by itself
            await vm.wait_for_state(VmState.RUNNING, timeout=30)
            info = await vm.wait(180)
            assert info.clean, info.reason
            result = micro.parse_run_output(vm.serial.text())
    finally:
        server.kill()
    assert result is not None and result.rc == 0
    assert "WRITE-FAILED" not in result.output
    assert "bad-blocks=0" in result.output
    data = img.read_bytes()
    assert all(data[i * BLOCK:(i + 1) * BLOCK] == expected_block(i) for i in range(BLOCKS))
    nbd_states = [e.detail["state"] for e in events if e.kind == "nbd"]
    assert nbd_states[0] == "connected" and "disconnected" in nbd_states and nbd_states[-1] == "reconnected"


async def test_report_policy_passes_the_error_to_the_guest(micro_image: Image, tmp_path: Path) -> None:
    img = disk(tmp_path / "nbd.raw", b"", size=4 * MiB)
    server = NbdServerProcess(img, tmp_path / "nbd.sock")
    server.start()
    reader = ("dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null && echo first-read-ok; "
              "i=0; while [ $i -lt 300 ]; do "
              "dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$((i % 900)) iflag=direct 2>/dev/null "
              "|| { echo read-failed; break; }; i=$((i+1)); sleep 0.2; done")
    cfg = config(micro_image, [{"attachment": {"type": "nbd", "url": server.url, "on_error": "report",
                                               "reconnect_delay": 1}}], reader)
    events: list[VmEvent] = []
    try:
        async with VirtualMachine(cfg, tmp_path) as vm:
            vm.add_listener(events.append)
            await vm.start()
            await vm.serial.wait_for_regex(r"^first-read-ok")
            server.kill()
            info = await vm.wait(120)
            assert info.clean
            assert vm.state == VmState.STOPPED  # never paused: the guest saw the error itself
    finally:
        server.kill()
    result = micro.parse_run_output(vm.serial.text())
    assert result is not None and "read-failed" in result.output
    assert not any(e.kind == "state-changed" and e.state == VmState.PAUSED for e in events)
    states = [e.detail["state"] for e in events if e.kind == "nbd"]
    assert states[:1] == ["connected"] and "disconnected" in states and states[-1] == "failed"
