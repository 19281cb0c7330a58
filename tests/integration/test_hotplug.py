"""Disks attached to and detached from a running micro guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmkit.config import StorageDevice, parse_config
from vmkit.errors import NotFoundError
from vmkit.host.images import micro
from vmkit.host.images.store import Image
from vmkit.runtime import hotplug
from vmkit.runtime.machine import VirtualMachine

pytestmark = pytest.mark.integration


async def test_attach_and_detach_virtio_blk_and_nvme(micro_image: Image, tmp_path: Path) -> None:
    cfg = parse_config({
        "name": "hp", "memory": "256M", "network": None,
        "boot": {"kernel": str(micro_image.kernel), "initrd": str(micro_image.initrd),
                 "cmdline": micro_image.manifest.cmdline},
        "readiness": {"serial_marker": micro.READY_MARKER},
    })
    disks = []
    for name, marker in (("a", b"HOT-A-MARKER"), ("b", b"HOT-B-MARKER")):
        p = tmp_path / f"{name}.raw"
        with p.open("wb") as f:
            f.truncate(4 << 20)
            f.write(marker)
        disks.append(p)
    async with VirtualMachine(cfg, tmp_path) as vm:
        await vm.start()
        await vm.wait_ready()
        a = await hotplug.attach_disk(vm, StorageDevice.model_validate(
            {"kind": "virtio-blk", "attachment": {"type": "disk-image", "path": str(disks[0])}}))
        b = await hotplug.attach_disk(vm, StorageDevice.model_validate(
            {"kind": "nvme", "id": "fast", "attachment": {"type": "disk-image", "path": str(disks[1])}}))
        assert (a.id, b.id) == ("disk0", "fast")
        mark = vm.serial.offset
        await vm.serial.write(b"sleep 1; echo seen:$(head -c 12 /dev/vda):$(head -c 12 /dev/nvme0n1)\n")
        await vm.serial.wait_for_regex(r"^seen:HOT-A-MARKER:HOT-B-MARKER", since=mark)

        await hotplug.detach_disk(vm, "disk0", timeout=60)
        mark = vm.serial.offset
        await vm.serial.write(b"echo gone:$(ls /sys/block | tr '\\n' ,):end\n")
        m = await vm.serial.wait_for_regex(r"^gone:(.*):end", since=mark)
        assert "vda" not in m.group(1) and "nvme0n1" in m.group(1)
        with pytest.raises(NotFoundError):
            await hotplug.detach_disk(vm, "disk0")
        assert set(vm.hot_disks) == {"fast"}
