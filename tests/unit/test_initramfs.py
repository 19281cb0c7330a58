"""Unit tests: the cpio/initramfs writer, the micro guest's pure helpers, module selection, apt parsing."""

from __future__ import annotations

import base64
import gzip
import lzma
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from vmkit.errors import ConfigError, ImageError
from vmkit.host.images import debpkg, micro
from vmkit.host.images.initramfs import CpioArchive, normalize_path, read_archive

# --------------------------------------------------------------------------- cpio writer


def sample_archive() -> CpioArchive:
    a = CpioArchive()
    a.add_file("bin/busybox", b"\x7fELF fake", 0o755)
    a.add_symlink("bin/sh", "busybox")
    a.add_dir("tmp", 0o1777)
    a.add_char_device("dev/console", 5, 1)
    a.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    a.add_file("etc/empty", b"", 0o600)
    a.add_file("etc/odd", b"abc", 0o644)  # length not a multiple of 4
    return a


def test_entries_sorted_with_parents_first() -> None:
    names = [e.path for e in sample_archive().entries()]
    assert names == sorted(names)
    assert names == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "etc", "etc/empty",
                     "etc/odd", "init", "tmp"]


def test_roundtrip_through_reader() -> None:
    entries = {e.path: e for e in read_archive(sample_archive().to_bytes())}
    assert entries["bin"].kind == "dir" and entries["bin"].permissions == 0o755
    assert entries["bin/busybox"].kind == "file" and entries["bin/busybox"].data == b"\x7fELF fake"
    assert entries["bin/busybox"].permissions == 0o755
    assert entries["bin/sh"].kind == "symlink" and entries["bin/sh"].data == b"busybox"
    assert entries["tmp"].permissions == 0o1777
    console = entries["dev/console"]
    assert console.kind == "chardev" and (console.rdev_major, console.rdev_minor) == (5, 1)
    assert entries["etc/odd"].data == b"abc" and entries["etc/empty"].data == b""
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 0 for e in entries.values())


def test_deterministic_regardless_of_insertion_order() -> None:
    a = CpioArchive()
    a.add_file("z/file", b"1")
    a.add_symlink("a/link", "../z/file")
    b = CpioArchive()
    b.add_symlink("a/link", "../z/file")
    b.add_file("z/file", b"1")
    assert a.to_bytes() == b.to_bytes()
    assert sample_archive().to_bytes() == sample_archive().to_bytes()
    # gzip header: no file name, zero mtime
    data = a.to_bytes()
    assert data[:4] == b"\x1f\x8b\x08\x00" and data[4:8] == b"\0\0\0\0"


def test_newc_layout_is_4_byte_aligned_with_trailer() -> None:
    raw = sample_archive().to_cpio()
    assert raw.startswith(b"070701")
    assert len(raw) % 4 == 0
    assert b"TRAILER!!!\0" in raw[-128:]
    assert gzip.decompress(sample_archive().to_bytes()) == raw


def test_replacing_an_entry_and_bad_paths() -> None:
    a = CpioArchive()
    a.add_file("/etc//x/", b"old")
    a.add_file("etc/x", b"new")
    assert [e.data for e in a.entries() if e.path == "etc/x"] == [b"new"]
    assert "etc/x" in a
    for bad in ("", "/", "../x", "a/../b", "a\0b"):
        with pytest.raises(ImageError):
            normalize_path(bad)
    with pytest.raises(ImageError):
        a.add_file("etc/x/under-a-file", b"")


def test_write_and_read_host_file(tmp_path: Path) -> None:
    src = tmp_path / "tool"
    src.write_bytes(b"#!/bin/sh\n")
    src.chmod(0o750)
    a = CpioArchive(mtime=1234)
    a.add_host_file("usr/bin/tool", src)
    out = tmp_path / "initrd.img"
    a.write(out)
    (entry,) = [e for e in read_archive(out.read_bytes()) if e.path == "usr/bin/tool"]
    assert entry.permissions == 0o750 and entry.mtime == 1234


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio tool not installed")
def test_gnu_cpio_reads_the_archive() -> None:
    listing = subprocess.run(["cpio", "-t", "-v", "--numeric-uid-gid", "--quiet"],
                             input=sample_archive().to_cpio(), capture_output=True, check=True).stdout
    lines = listing.decode().splitlines()
    by_name = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in lines}
    assert set(by_name) == {e.path for e in sample_archive().entries()}
    assert by_name["bin/busybox"].startswith("-rwxr-xr-x")
    assert by_name["bin/sh"].startswith("lrwxrwxrwx") and by_name["bin/sh"].endswith("-> busybox")
    assert by_name["dev/console"].startswith("crw-------")
    assert by_name["tmp"].startswith("drwxrwxrwt")
    assert all(" 0        0 " in line or line.split()[2:4] == ["0", "0"] for line in lines)


# --------------------------------------------------------------------------- micro helpers


def test_run_parameter_roundtrip() -> None:
    cmd = "echo 'a b' && uname -r | tr a-z A-Z; exit 3"
    param = micro.run_parameter(cmd)
    assert param.startswith("vmkit.run=")
    assert " " not in param
    assert base64.b64decode(param.removeprefix("vmkit.run=")).decode() == cmd


def test_run_parameter_limits() -> None:
    with pytest.raises(ConfigError):
        micro.run_parameter("   ")
    with pytest.raises(ConfigError, match="too long"):
        micro.run_parameter("x" * 2000)


def test_guest_cmdline() -> None:
    line = micro.guest_cmdline("console=ttyS0", run="true", poweroff=True, counter=True)
    assert line == f"console=ttyS0 vmkit.counter=1 {micro.run_parameter('true')} vmkit.then=poweroff"
    assert micro.guest_cmdline() == micro.DEFAULT_CMDLINE


def test_parse_run_output() -> None:
    serial = (
        "[    1.0] some kernel line\r\nVMKIT-READY\r\nVMKIT-RUN-BEGIN\r\n"
        "hello\r\nvmkit-tick 0\r\n\r\nno newline\r\nVMKIT-RUN-END rc=3\r\n~ # "
    )
    result = micro.parse_run_output(serial)
    assert result == micro.RunResult(output="hello\n\nno newline\n", rc=3)
    assert not result.ok
    assert micro.parse_run_output("VMKIT-RUN-BEGIN\nVMKIT-RUN-END rc=0\n") == micro.RunResult("", 0)


def test_parse_run_output_incomplete_or_absent() -> None:
    assert micro.parse_run_output("") is None
    assert micro.parse_run_output("VMKIT-READY\nVMKIT-RUN-BEGIN\nhalf") is None
    assert micro.parse_run_output("VMKIT-RUN-END rc=0\n") is None


def test_parse_run_output_takes_last_block() -> None:
    text = "VMKIT-RUN-BEGIN\na\nVMKIT-RUN-END rc=1\nVMKIT-RUN-BEGIN\nb\nVMKIT-RUN-END rc=0\n"
    assert micro.parse_run_output(text) == micro.RunResult("b\n", 0)


def test_ticks_and_markers() -> None:
    text = ("vmkit-tick 0\r\nvmkit-tick 1\r\nvmkit-micro:/# \x1b[6nvmkit-tick 2\r\nvmkit-tick 3 and more\r\n"
            "VMKIT-READY\r\n")
    assert micro.parse_ticks(text) == [0, 1, 2]
    assert micro.has_line(text, "VMKIT-READY")
    assert not micro.has_line("NOT-VMKIT-READY\n", "VMKIT-READY")


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
def test_init_script_parses_with_busybox_ash(tmp_path: Path) -> None:
    script = tmp_path / "init"
    script.write_text(micro.INIT_SCRIPT)
    subprocess.run(["busybox", "sh", "-n", str(script)], check=True)


# --------------------------------------------------------------------------- kernel modules


def fake_elf_module(depends: str, name: str) -> bytes:
    """A minimal ELF64 file with .shstrtab and .modinfo sections, enough for modinfo()."""
    modinfo = f"license=GPL\0depends={depends}\0name={name}\0".encode()
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    ehdr_size, shent = 64, 64
    shstr_off = ehdr_size
    modinfo_off = shstr_off + len(shstrtab)
    shoff = modinfo_off + len(modinfo)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, ehdr_size, 0, 0, shent, 3, 1)

    def sh(name_off: int, stype: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name_off, stype, 0, 0, off, size, 0, 0, 1, 0)

    sections = sh(0, 0, 0, 0) + sh(1, 3, shstr_off, len(shstrtab)) + sh(11, 1, modinfo_off, len(modinfo))
    return ehdr + shstrtab + modinfo + sections


def test_modinfo_reads_fake_elf() -> None:
    info = micro.modinfo(fake_elf_module("a,b", "x"))
    assert info["depends"] == ["a,b"] and info["name"] == ["x"]
    with pytest.raises(ImageError):
        micro.elf_section(b"not elf", ".modinfo")


def make_moddir(tmp_path: Path) -> Path:
    moddir = tmp_path / "lib" / "modules" / "6.1.0-99-test"
    mods = {
        "kernel/drivers/virtio/virtio.ko": "",
        "kernel/drivers/virtio/virtio_ring.ko": "virtio",
        "kernel/drivers/block/virtio_blk.ko": "virtio,virtio_ring",
        "kernel/drivers/net/net_failover.ko": "failover",
        "kernel/net/core/failover.ko": "",
        "kernel/drivers/net/virtio_net.ko": "net_failover,virtio,virtio_ring,builtin_thing",
    }
    for rel, deps in mods.items():
        p = moddir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(fake_elf_module(deps, micro.module_name(p.name)))
    xz = moddir / "kernel/drivers/usb/storage/usb-storage.ko.xz"
    xz.parent.mkdir(parents=True)

    xz.write_bytes(lzma.compress(fake_elf_module("", "usb_storage")))
    (moddir / "modules.builtin").write_text("kernel/drivers/nvme/host/nvme.ko\nkernel/x/builtin_thing.ko\n")
    return moddir


def test_select_modules_resolves_dependencies(tmp_path: Path) -> None:
    mods = micro.select_modules(make_moddir(tmp_path), ["virtio_net", "virtio_blk", "nvme", "9p", "usb_storage"])
    assert mods.version == "6.1.0-99-test"
    assert mods.included == ["virtio_net", "virtio_blk", "usb_storage"]
    assert mods.builtin == ["nvme"]
    assert mods.missing == ["9p"]
    order = mods.load_order
    for name, deps in mods.depends.items():
        assert all(order.index(d) < order.index(name) for d in deps)
    assert set(order) == {"virtio", "virtio_ring", "virtio_blk", "failover", "net_failover", "virtio_net",
                          "usb_storage"}
    assert mods.files["usb_storage"] == "kernel/drivers/usb/storage/usb-storage.ko"  # decompressed
    assert mods.data["usb_storage"].startswith(b"\x7fELF")
    dep = micro.modules_dep(mods).splitlines()
    # like depmod: dependencies in reverse load order (modprobe inserts from the end of the list)
    assert ("kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio_ring.ko "
            "kernel/drivers/virtio/virtio.ko kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko"
            in dep)
    assert "kernel/drivers/virtio/virtio.ko:" in dep


def test_build_initramfs_layout(tmp_path: Path) -> None:
    mods = micro.select_modules(make_moddir(tmp_path), ["virtio_blk"])
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    archive = micro.build_initramfs(busybox, mods, ["bin/busybox", "bin/sh", "sbin/poweroff", "linuxrc"])
    entries = {e.path: e for e in read_archive(archive.to_bytes())}
    assert entries["init"].permissions == 0o755 and entries["init"].data.startswith(b"#!/bin/sh\n")
    assert entries["bin/sh"].kind == "symlink" and entries["bin/sh"].data == b"/bin/busybox"
    assert entries["sbin/poweroff"].data == b"/bin/busybox"
    assert "linuxrc" not in entries
    assert entries["dev/console"].kind == "chardev"
    load = entries["etc/vmkit/modules"].data.decode().splitlines()
    assert load == [f"/lib/modules/6.1.0-99-test/kernel/drivers/virtio/{m}.ko"
                    for m in ("virtio", "virtio_ring")] + [
        "/lib/modules/6.1.0-99-test/kernel/drivers/block/virtio_blk.ko"]
    assert all(p.lstrip("/") in entries for p in load)
    assert stat.S_ISDIR(entries["lib/modules/6.1.0-99-test"].mode)


# --------------------------------------------------------------------------- apt output parsing


def test_parse_control_and_depends() -> None:
    text = ("Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n"
            "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2), foo | bar,\n baz:any\n"
            "Description: x\n more\n\nPackage: other\n")
    fields = debpkg.parse_control(text)
    assert fields["Version"] == "6.1.192-2"
    assert debpkg.parse_depends(fields["Depends"]) == ("linux-image-6.1.0-56-cloud-amd64", "foo", "baz")
    assert "other" not in fields.values()
