"""The untrimmed ``debian-12-stock`` variant of the Debian image recipe (the boot benchmark's baseline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vmkit.host.images import debian
from vmkit.host.images.debian import BuildProgress, build_debian
from vmkit.host.images.store import ImageManifest, ImageStore


def _argv(tmp_path: Path, *, stock: bool) -> list[str]:
    return debian.mmdebstrap_argv("bookworm", tmp_path / "rootfs", hooks_dir=tmp_path, kernels=["amd64"],
                                  mirror="http://m/debian", security_mirror="http://m/security", stock=stock)


def _packaged_tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "lib/systemd/system/cloud-init.service").write_text(
        "[Unit]\nAfter=systemd-networkd-wait-online.service\n[Service]\nExecStart=/usr/bin/cloud-init init\n")
    (root / "etc/cloud").mkdir(parents=True)
    (root / "etc/cloud/cloud.cfg").write_text("# packaged\n")
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("build host secret")
    (root / "etc/machine-id").write_text("0123")
    (root / "etc/apt/apt.conf.d").mkdir(parents=True)
    (root / "etc/apt/apt.conf.d/99mmdebstrap").write_text("x")
    (root / "usr/lib/python3/dist-packages/jsonschema").mkdir(parents=True)
    (root / "usr/lib/python3/dist-packages/jsonschema/__init__.py").write_text("")
    return root


def test_stock_argv_has_the_same_packages_and_no_boot_trims(tmp_path: Path) -> None:
    trimmed, stock = _argv(tmp_path, stock=False), _argv(tmp_path, stock=True)
    include = [a for a in trimmed if a.startswith("--include=")]
    assert include == [a for a in stock if a.startswith("--include=")]
    # initramfs-tools keeps its defaults (MODULES=most): no essential hook writes vmkit.conf
    assert not any(a.startswith("--essential-hook=") for a in stock)
    assert any(a.startswith("--essential-hook=") for a in trimmed)
    assert f"--customize-hook={tmp_path / 'customize.sh'}" in stock
    # every kernel module is unpacked; docs are still left out (size only)
    assert not any("/kernel/" in a for a in stock if a.startswith("--dpkgopt=path-exclude="))
    assert any("/kernel/drivers/media" in a for a in trimmed)
    assert not any("/kernel/drivers/gpu" in a for a in trimmed)  # a display needs virtio_gpu (debian/4)
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in stock
    for trim in debian.BOOT_EXCLUDES:  # the initrd without udev
        assert f"--dpkgopt=path-exclude={trim}" in trimmed
        assert f"--dpkgopt=path-exclude={trim}" not in stock
    assert stock[-4:] == trimmed[-4:]  # release, target, sources


def test_stock_hooks_only_enable_networking() -> None:
    hooks = debian.build_hooks(stock=True)
    assert list(hooks) == ["customize.sh"]
    text = hooks["customize.sh"]
    assert "systemctl enable systemd-networkd.service" in text
    assert "mask" not in text
    trimmed = debian.build_hooks()
    assert set(trimmed) == {"customize.sh", "essential.sh"}
    assert "MODULES=list" in trimmed["essential.sh"]
    assert "systemctl mask" in trimmed["customize.sh"]


def test_stock_configure_tree_keeps_the_packaged_configuration(tmp_path: Path) -> None:
    root = _packaged_tree(tmp_path)
    debian.configure_tree(root, stock=True)
    # what every image needs
    assert not list((root / "etc/ssh").glob("ssh_host_*"))
    assert (root / "etc/machine-id").read_text() == ""
    assert (root / "etc/fstab").read_text().split()[:3] == [f"LABEL={debian.ROOT_LABEL}", "/", "ext4"]
    assert (root / "etc/fstab").read_text().split()[-1] == "1"  # checked at boot, as on a cloud image
    assert (root / "etc/resolv.conf").read_text() == f"nameserver {debian.SLIRP_DNS}\n"
    assert not (root / "etc/apt/apt.conf.d/99mmdebstrap").exists()
    # none of the trims
    assert (root / "etc/cloud/cloud.cfg").read_text() == "# packaged\n"
    assert not (root / "etc/cloud/cloud.cfg.d").exists()
    assert not (root / "etc/systemd").exists()  # no unit overrides, drop-ins, generator masks, networkd file
    assert not (root / "etc/modprobe.d").exists()
    assert (root / "usr/lib/python3/dist-packages/jsonschema/__init__.py").exists()


def test_trimmed_configure_tree_differs(tmp_path: Path) -> None:
    root = _packaged_tree(tmp_path)
    debian.configure_tree(root)
    assert (root / "etc/cloud/cloud.cfg").read_text() == debian.CLOUD_CFG
    assert (root / "etc/systemd/system/cloud-init.service").is_file()
    assert "noatime" in (root / "etc/fstab").read_text()
    assert not (root / "usr/lib/python3/dist-packages/jsonschema").exists()  # cloud-init skips validation


def test_stock_cmdline_has_no_vmkit_kernel_options() -> None:
    assert "root=/dev/vda" in debian.STOCK_CMDLINE and "console=ttyS0" in debian.STOCK_CMDLINE
    for trim in ("cryptomgr.notests", "i8042.noaux", "rootfstype=ext4"):
        assert trim in debian.CMDLINE
        assert trim not in debian.STOCK_CMDLINE


@pytest.mark.parametrize(("stock", "name"), [(False, "debian-12"), (True, "debian-12-stock")])
def test_existing_image_is_not_rebuilt(tmp_path: Path, stock: bool, name: str) -> None:
    """Each variant has its own name; an existing one is returned as is (no root, no mmdebstrap)."""
    store = ImageStore(tmp_path)
    with store.staging(name) as st:
        (st / "disk.qcow2").write_bytes(b"x")
        store.commit(st, ImageManifest(name=name, kind="disk", disk="disk.qcow2"))
    events: list[BuildProgress] = []
    image = build_debian(store, stock=stock, progress=events.append)
    assert image.name == name
    assert [e.stage for e in events] == ["done"] and "already built" in events[0].message
    assert not store.exists("debian-12" if stock else "debian-12-stock")  # the other variant is untouched


def _stored(store: ImageStore, name: str, **manifest: Any) -> None:
    with store.staging(name) as st:
        (st / "disk.qcow2").write_bytes(b"x")
        store.commit(st, ImageManifest(name=name, kind="disk", disk="disk.qcow2", **manifest))


def test_an_image_of_an_older_recipe_is_reported_not_replaced(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    _stored(store, "debian-12", source="mmdebstrap bookworm from http://deb.debian.org/debian: ...")
    events: list[BuildProgress] = []
    image = build_debian(store, progress=events.append)  # no root, no mmdebstrap needed: nothing is built
    assert debian.is_outdated(image) and image.manifest.recipe is None
    assert "older vmkit recipe" in events[0].message and "--force" in events[0].message
    # current ones and pulled cloud images are not outdated
    _stored(store, "current", source="mmdebstrap bookworm from x", recipe=debian.RECIPE)
    _stored(store, "pulled", source="https://cloud.debian.org/images/cloud/bookworm/latest/x.qcow2")
    assert not debian.is_outdated(store.get("current")) and debian.outdated_note(store.get("pulled")) is None


def test_image_list_marks_outdated_images(tmp_path: Path) -> None:
    cache = tmp_path / "images"
    store = ImageStore(cache)
    _stored(store, "debian-12", source="mmdebstrap bookworm from x")
    _stored(store, "debian-12-new", source="mmdebstrap bookworm from x", recipe=debian.RECIPE)
    env = {**os.environ, "VMKIT_HOME": str(tmp_path / "home"), "VMKIT_IMAGE_CACHE": str(cache),
           "COLUMNS": "250", "NO_COLOR": "1"}
    res = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "image", "list"], env=env, capture_output=True,
                         text=True, check=True)
    rows = {line.split()[1]: line for line in res.stdout.splitlines() if line.startswith("│ debian")}
    assert "outdated" in rows["debian-12"] and debian.RECIPE in rows["debian-12-new"]
    assert "image debian-12 was built by an older vmkit recipe" in " ".join(res.stdout.split())
    listed = json.loads(subprocess.run([sys.executable, "-m", "vmkit.cli.main", "image", "list", "--json"], env=env,
                                       capture_output=True, text=True, check=True).stdout)
    assert {i["name"]: i["outdated"] for i in listed} == {"debian-12": True, "debian-12-new": False}
