"""Shared host folders (virtiofs, 9p) in the micro-full guest, which has both drivers."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import pid_alive
from vmkit.config import MachineConfig, parse_config
from vmkit.host.images import micro
from vmkit.host.images.store import Image
from vmkit.runtime.machine import VirtualMachine, VmEvent, VmState

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="virtiofsd and read-only bind mounts need root")]

MOUNT = {
    "virtiofs": "mount -t virtiofs {tag} {dst}",
    "9p": "mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 {tag} {dst}",
}


def config(image: Image, shares: list[dict[str, Any]], run: str | None, *, poweroff: bool = True) -> MachineConfig:
    return parse_config({
        "name": "sh", "memory": "256M", "network": None, "shares": shares,
        "boot": {"kernel": str(image.kernel), "initrd": str(image.initrd),
                 "cmdline": micro.guest_cmdline(image.manifest.cmdline, run=run, poweroff=poweroff)},
        "readiness": {"serial_marker": micro.READY_MARKER},
    })


def folder(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "hello.txt").write_text(f"hello-from-{name}\n")
    return d


async def test_virtiofs_and_9p_read_write_and_read_only(micro_full_image: Image, tmp_path: Path) -> None:
    kinds = [("virtiofs", False), ("virtiofs", True), ("9p", False), ("9p", True)]
    dirs = [folder(tmp_path, f"{t}-{'ro' if ro else 'rw'}") for t, ro in kinds]
    shares = [{"type": t, "host_path": str(d), "read_only": ro} for (t, ro), d in zip(kinds, dirs, strict=True)]
    script = []
    for i, (t, _ro) in enumerate(kinds):
        dst = f"/mnt/s{i}"
        # read-only shares are mounted read-write on purpose: the host must refuse the write
        script.append(f"mkdir -p {dst}; {MOUNT[t].format(tag=f'share{i}', dst=dst)} || echo s{i}-mount-failed; "
                      f"echo s{i}=$(cat {dst}/hello.txt); "
                      f"if echo from-guest-{i} > {dst}/out.txt 2>/tmp/e{i}; then echo s{i}-write-ok; "
                      f"else echo s{i}-write-failed:$(cat /tmp/e{i}); fi")
    cfg = config(micro_full_image, shares, "; ".join(script))
    async with VirtualMachine(cfg, tmp_path / "vm") as vm:
        await vm.start()
        assert len(vm.shares.pids()) == 2  # one virtiofsd per virtiofs share
        pids = vm.shares.pids()
        info = await vm.wait(120)
        assert info.clean, info.reason
        result = micro.parse_run_output(vm.serial.text())
    assert result is not None, vm.serial.tail_text(30)
    out = result.output
    for i, ((_t, ro), d) in enumerate(zip(kinds, dirs, strict=True)):
        assert f"s{i}=hello-from-{d.name}" in out, out
        if ro:
            assert f"s{i}-write-failed" in out and "Read-only file system" in out, out
            assert not (d / "out.txt").exists()
        else:
            assert f"s{i}-write-ok" in out, out
            assert (d / "out.txt").read_text() == f"from-guest-{i}\n"
    assert not any(pid_alive(p) for p in pids), "virtiofsd outlived the machine"
    assert not list((tmp_path / "vm").glob("virtiofs-*.sock"))


async def test_dead_virtiofsd_is_reported(micro_full_image: Image, tmp_path: Path) -> None:
    d = folder(tmp_path, "src")
    cfg = config(micro_full_image, [{"type": "virtiofs", "host_path": str(d), "tag": "src"}], None, poweroff=False)
    events: list[VmEvent] = []
    async with VirtualMachine(cfg, tmp_path / "vm") as vm:
        vm.add_listener(events.append)
        await vm.start()
        await vm.wait_ready()
        (pid,) = vm.shares.pids()
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if vm.shares.degraded:
                break
            await asyncio.sleep(0.05)
        assert vm.shares.degraded and "'src'" in vm.shares.degraded
        assert vm.state == VmState.RUNNING  # the guest runs on, degraded
        failed = [e for e in events if e.kind == "share-failed"]
        assert failed and failed[0].detail["tag"] == "src"


def test_cli_mount_degraded_and_no_leftovers(vmkit_home: Path, micro_full_image: Image, tmp_path: Path) -> None:
    import json

    from conftest import vmkit, wait_until

    src = folder(tmp_path, "src")
    vmkit("create", "dev", "--image", "micro-full", "--memory", "256M", "--mount", f"{src}:/mnt/src",
          "--mount", f"{src}:/mnt/ro:ro,type=9p")
    rows = json.loads(vmkit("mount", "list", "dev", "--json").stdout)
    assert [(r["type"], r["guest_path"], r["read_only"], r["state"]) for r in rows] == [
        ("virtiofs", "/mnt/src", False, "stopped"), ("9p", "/mnt/ro", True, "stopped")]
    vmkit("start", "dev")
    assert [r["state"] for r in json.loads(vmkit("mount", "list", "dev", "--json").stdout)] == ["active", "active"]
    daemons = virtiofsd_serving(src)
    assert daemons
    for pid in daemons:
        os.kill(pid, signal.SIGKILL)

    def degraded() -> bool:
        row = json.loads(vmkit("list", "--json").stdout)[0]
        return bool(row["state"] == "running" and row["health"] == "degraded")

    assert wait_until(degraded, 15)
    assert json.loads(vmkit("mount", "list", "dev", "--json").stdout)[0]["state"] == "failed (virtiofsd died)"
    vmkit("stop", "dev")
    assert not [p for p in virtiofsd_serving(src) if pid_alive(p)]


def virtiofsd_serving(folder: Path) -> list[int]:
    from conftest import processes_mentioning

    out = []
    for pid in processes_mentioning("virtiofsd"):
        try:
            if f"source={folder}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


async def test_option_injection_in_share_path_is_escaped(micro_full_image: Image, tmp_path: Path) -> None:
    """A folder named ``.../proj,source=SECRET`` must be served as itself, read-only: unescaped, virtiofsd
    split its ``-o source=`` on the comma and served SECRET (outside the read-only bind mount), and the
    guest read and wrote files there."""
    secret = folder(tmp_path, "secret")
    decoy = Path(f"{tmp_path}/proj,source={secret}")
    decoy.mkdir(parents=True)
    (decoy / "hello.txt").write_text("hello-from-decoy\n")
    kinds = ["virtiofs", "9p"]
    shares = [{"type": t, "host_path": str(decoy), "read_only": True} for t in kinds]
    script = []
    for i, t in enumerate(kinds):
        dst = f"/mnt/s{i}"
        script.append(f"mkdir -p {dst}; {MOUNT[t].format(tag=f'share{i}', dst=dst)} || echo s{i}-mount-failed; "
                      f"echo s{i}=$(cat {dst}/hello.txt) s{i}-listing=$(ls {dst} | tr '\\n' +); "
                      f"if echo pwned > {dst}/hello.txt 2>/dev/null; then echo s{i}-write-ok; "
                      f"else echo s{i}-write-refused; fi")
    async with VirtualMachine(config(micro_full_image, shares, "; ".join(script)), tmp_path / "vm") as vm:
        await vm.start()
        info = await vm.wait(120)
        assert info.clean, info.reason
        result = micro.parse_run_output(vm.serial.text())
    assert result is not None, vm.serial.tail_text(30)
    for i in range(len(kinds)):
        assert f"s{i}=hello-from-decoy s{i}-listing=hello.txt+" in result.output, result.output
        assert f"s{i}-write-refused" in result.output, result.output
    assert (secret / "hello.txt").read_text() == "hello-from-secret\n"
    assert (decoy / "hello.txt").read_text() == "hello-from-decoy\n"
