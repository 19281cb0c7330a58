"""Unit tests: storage device kinds (virtio-blk, nvme, usb-storage) and NBD attachments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import check_golden
from vmkit.config import MachineConfig, parse_config, parse_nbd_url
from vmkit.errors import ConfigError
from vmkit.runtime.qemu import cmdline


def cfg(tmp_path: Path, storage: list[dict[str, Any]], **extra: Any) -> MachineConfig:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    return parse_config({"name": "s", "boot": {"kernel": str(kernel)}, "network": None, "storage": storage,
                         **extra})


def storage_argv(config: MachineConfig) -> list[str]:
    out = cmdline.controller_args(config)
    for i, dev in enumerate(config.storage):
        out += cmdline.storage_args(i, dev)
    return out


def test_golden_device_kinds_and_nbd(tmp_path: Path) -> None:
    c = cfg(tmp_path, [
        {"kind": "nvme", "attachment": {"type": "nbd", "url": "nbd://127.0.0.1:10809/data", "on_error": "report"}},
        {"kind": "usb-storage", "id": "stick",
         "attachment": {"type": "nbd", "url": "nbd+unix:///root?socket=/run/n.sock", "reconnect_delay": 3}},
        {"kind": "virtio-blk", "serial": "abc",
         "attachment": {"type": "nbd", "url": "nbd://example.test/ro%20disk", "read_only": True}},
    ], hotplug_slots=0)
    check_golden("storage_kinds", storage_argv(c).copy())


def test_pause_policy_sets_werror_and_rerror_stop(tmp_path: Path) -> None:
    c = cfg(tmp_path, [{"attachment": {"type": "nbd", "url": "nbd://127.0.0.1/x"}}])
    dev = cmdline.device_spec("disk0", c.storage[0])
    assert dev["werror"] == "stop" and dev["rerror"] == "stop"
    spec = cmdline.blockdev_spec("disk0", c.storage[0].attachment)
    assert spec["reconnect-delay"] == 5 and spec["server"] == {"type": "inet", "host": "127.0.0.1", "port": "10809"}


def test_usb_controller_only_when_needed(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(b"\0" * 4096)
    plain = cfg(tmp_path, [{"attachment": {"type": "disk-image", "path": str(img)}}])
    assert not any("qemu-xhci" in a for a in cmdline.controller_args(plain))
    usb = cfg(tmp_path, [{"kind": "usb-storage", "attachment": {"type": "disk-image", "path": str(img)}}])
    assert "qemu-xhci,id=xhci" in cmdline.controller_args(usb)
    assert "bus=xhci.0" in cmdline.storage_args(0, usb.storage[0])[3]
    assert cmdline.controller_args(cfg(tmp_path, [], usb=True)).count("qemu-xhci,id=xhci") == 1


@pytest.mark.parametrize(("url", "message"), [
    ("http://x/y", "not an NBD URL"),
    ("nbd:///export", "no host"),
    ("nbd+unix:///e?socket=rel.sock", "absolute socket path"),
    ("nbd://h:99999/e", "bad port"),
])
def test_bad_nbd_urls_name_the_field(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(tmp_path, [{"attachment": {"type": "nbd", "url": url}}])
    (problem,) = exc.value.problems
    assert problem.field == "storage[0].attachment.url" and message in problem.message


def test_nvme_cannot_pause_on_errors(tmp_path: Path) -> None:
    c = cfg(tmp_path, [{"kind": "nvme", "attachment": {"type": "nbd", "url": "nbd://127.0.0.1/x"}}])
    problems = c.validate(host=False)
    assert [p.field for p in problems] == ["storage[0].attachment.on_error"]
    assert "on_error: report" in problems[0].message


def test_duplicate_device_ids_are_a_problem(tmp_path: Path) -> None:
    c = cfg(tmp_path, [{"id": "a", "attachment": {"type": "nbd", "url": "nbd://127.0.0.1/x"}},
                       {"id": "a", "attachment": {"type": "nbd", "url": "nbd://127.0.0.1/y"}}])
    assert [p.field for p in c.validate(host=False)] == ["storage[1].id"]


def test_parse_nbd_url_parts() -> None:
    a = parse_nbd_url("nbd+unix:///exp?socket=/tmp/s.sock")
    assert (a.export, a.unix_path, a.host) == ("exp", "/tmp/s.sock", None)
    b = parse_nbd_url("nbd://h:1234/a%2Fb")
    assert (b.export, b.host, b.port) == ("a/b", "h", 1234)


def test_sata_and_ide_disks_get_their_controllers_ports_and_units(tmp_path: Path) -> None:
    imgs = []
    for n in range(5):
        img = tmp_path / f"d{n}.raw"
        img.write_bytes(b"\0" * 4096)
        imgs.append(str(img))
    c = cfg(tmp_path, [{"kind": k, "attachment": {"type": "disk-image", "path": p}}
                       for k, p in zip(("sata", "ide", "virtio-blk", "ide", "sata"), imgs, strict=True)],
            hotplug_slots=0)
    assert c.validate(host=True) == []
    assert cmdline.controller_args(c) == ["-device", "ich9-ahci,id=sata0", "-device", "piix3-ide,id=pata0"]
    assert cmdline.storage_slots(c) == [0, 0, 0, 1, 1]
    slots = cmdline.storage_slots(c)
    devices = [cmdline.storage_args(i, d, slot=s)[3] for i, (d, s) in enumerate(zip(c.storage, slots, strict=True))]
    assert devices == ["ide-hd,drive=disk0,id=disk0-dev,bus=sata0.0",
                       "ide-hd,drive=disk1,id=disk1-dev,bus=pata0.0,unit=0",
                       "virtio-blk-pci,drive=disk2,id=disk2-dev",
                       "ide-hd,drive=disk3,id=disk3-dev,bus=pata0.0,unit=1",
                       "ide-hd,drive=disk4,id=disk4-dev,bus=sata0.1"]
    plain = cfg(tmp_path, [{"attachment": {"type": "disk-image", "path": imgs[0]}}])
    assert not any("ahci" in a or "piix" in a for a in cmdline.controller_args(plain))


@pytest.mark.parametrize(("kind", "most"), [("sata", 6), ("ide", 4)])
def test_too_many_ata_disks_name_the_first_one_too_many(tmp_path: Path, kind: str, most: int) -> None:
    c = cfg(tmp_path, [{"kind": kind, "attachment": {"type": "disk-image", "path": f"/d{n}.raw"}}
                       for n in range(most + 1)])
    problems = c.validate(host=False)
    assert [p.field for p in problems] == [f"storage[{most}].kind"]
    assert f"at most {most} {kind} disks" in problems[0].message


def test_unknown_disk_kind_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(tmp_path, [{"kind": "scsi", "attachment": {"type": "disk-image", "path": "/d.raw"}}])
    assert [p.field for p in exc.value.problems] == ["storage[0].kind"]
