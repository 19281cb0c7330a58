"""Save, restore and snapshots of real QEMU machines (the micro guest with its counter), library level."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conftest import pid_alive
from vmkit.config import MachineConfig, parse_config
from vmkit.errors import STATE_FILE_CODES, AlreadyExistsError, ExitCode, NotFoundError, StateError, VmkitError
from vmkit.host.images import micro
from vmkit.host.images.store import Image
from vmkit.runtime.guest.agent import GuestAgent
from vmkit.runtime.machine import VirtualMachine, VmState
from vmkit.state import key as keys
from vmkit.state import savestate
from vmkit.state.file import (
    AuthenticationFailed,
    ConfigMismatch,
    DisksChanged,
    IncompatibleQemu,
    NoSpace,
    NotAStateFile,
    StateFileWriter,
    iter_payload,
    read_info,
)

pytestmark = pytest.mark.integration

PROMPT = "vmkit-micro:/# "


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKIT_HOME", str(tmp_path / "home"))  # a private state key per test


def make_disk(path: Path, fmt: str = "raw", size: str = "4M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    return path


def config(image: Image, disk: Path | None, *, memory: str = "128M", fmt: str = "raw") -> MachineConfig:
    storage = [] if disk is None else [{"attachment": {"type": "disk-image", "path": str(disk), "format": fmt}}]
    return parse_config({
        "name": "st",
        "memory": memory,
        "boot": {"kernel": str(image.kernel), "initrd": str(image.initrd),
                 "cmdline": micro.guest_cmdline(image.manifest.cmdline, counter=True)},
        "network": None,
        "storage": storage,
        "readiness": {"serial_marker": micro.READY_MARKER, "timeout": 90},
    })


def ticks(vm: VirtualMachine, since: int = 0) -> list[int]:
    return micro.parse_ticks(vm.serial.text(since))


async def next_tick(vm: VirtualMachine, since: int, timeout: float = 20) -> int:
    async def wait() -> int:
        while not ticks(vm, since):
            await vm.serial.changed()
        return ticks(vm, since)[0]

    return await asyncio.wait_for(wait(), timeout)


async def shell(vm: VirtualMachine, command: str, marker: str, timeout: float = 30) -> str:
    """Type ``command`` into the guest's console shell; return what it printed up to ``marker``."""
    since = vm.serial.offset
    await vm.serial.write(f"{command}; echo {marker}\n".encode())
    m = await asyncio.wait_for(vm.serial.wait_for_regex(rf"(?s)^(.*)^{marker}\s*$", since), timeout)
    return m.group(1)


@contextlib.asynccontextmanager
async def booted(cfg: MachineConfig, workdir: Path) -> AsyncIterator[VirtualMachine]:
    async with VirtualMachine(cfg, workdir) as vm:
        await vm.start()
        await vm.wait_ready()
        await asyncio.wait_for(vm.serial.wait_for_regex(re.escape(PROMPT)), 30)
        await next_tick(vm, 0)
        yield vm


async def save_paused(vm: VirtualMachine, path: Path) -> int:
    """Pause, save; return the last counter value printed before the save."""
    await vm.pause()
    last = ticks(vm)[-1]
    await savestate.save_state(vm, path)
    return last


def reencrypt(src: Path, dst: Path, *, payload: bytes | None = None, **header_changes: object) -> None:
    """Write ``src``'s (authentic) payload to ``dst`` under a changed header, as a genuine state file."""
    info = read_info(src)
    data = payload if payload is not None else b"".join(iter_payload(src, keys.load_key()))
    header = info.header.model_copy(update=header_changes)
    with StateFileWriter(dst, header, keys.load_key()) as w:
        w.write(data)


async def test_save_needs_pause_and_a_new_qemu_continues_the_counter(micro_image: Image, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "data.raw")
    cfg = config(micro_image, disk)
    state = tmp_path / "saves" / "st.vmstate"
    progress: list[tuple[int, int | None]] = []
    async with booted(cfg, tmp_path / "a") as vm:
        await shell(vm, "echo before-save | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null", "WROTE")
        with pytest.raises(StateError, match="running, it must be paused"):
            await savestate.save_state(vm, state)
        await vm.pause()
        last = ticks(vm)[-1]
        info = await savestate.save_state(vm, state, lambda d, t: progress.append((d, t)))
        assert vm.state == VmState.PAUSED
    assert state.stat().st_mode & 0o777 == 0o600
    assert progress and progress[-1] == (info.payload_bytes, info.payload_bytes)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    header = read_info(state).header
    assert header.machine_type.startswith("pc-q35-") and re.match(r"^\d+\.\d+\.\d+$", header.qemu_version)
    assert header.ram_bytes == 128 << 20 and header.config_digest.startswith("sha256:")
    assert [d.path for d in header.disks] == [str(disk)]

    async with VirtualMachine(cfg, tmp_path / "b") as vm2:
        result = await savestate.restore_state(vm2, state)
        assert vm2.state == VmState.PAUSED
        assert result.info.payload_bytes == info.payload_bytes
        with pytest.raises(StateError, match="paused, it must be stopped"):
            await savestate.restore_state(vm2, state)
        await asyncio.sleep(1.5)
        assert ticks(vm2) == [], "a restored machine must stay paused until resume()"
        await vm2.resume()
        first = await next_tick(vm2, 0)
        assert last < first <= last + 2, f"the counter restarted: {last} before the save, {first} after"
        assert micro.READY_MARKER not in vm2.serial.text(), "the restored guest booted again"
        out = await shell(vm2, "dd if=/dev/vda bs=11 count=1 2>/dev/null; echo", "READ")
        assert "before-save" in out
        clock = await savestate.fix_guest_clock(vm2, behind_seconds=result.suspended_seconds)
        assert not clock.corrected and clock.message.startswith("no guest agent: clock not corrected")


async def test_each_unusable_state_file_gives_its_own_error(micro_image: Image, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "data.raw")
    cfg = config(micro_image, disk)
    good = tmp_path / "good.vmstate"
    async with booted(cfg, tmp_path / "a") as vm:
        last = await save_paused(vm, good)
    size = good.stat().st_size

    async def refused(path: Path, exc_type: type[VmkitError], match: str, *, cfg_: MachineConfig = cfg,
                      key: bytes | None = None, launches: bool = False) -> None:
        vm = VirtualMachine(cfg_, tmp_path / "r")
        async with vm:
            with pytest.raises(exc_type, match=match) as exc:
                await savestate.restore_state(vm, path, key=key)
            assert exc.value.exit_code == exc_type.exit_code and exc.value.exit_code in STATE_FILE_CODES
            assert vm.state in (VmState.STOPPED, VmState.ERROR)
            if launches:
                assert vm.pid is not None and not pid_alive(vm.pid), "QEMU outlived a failed restore"
            else:
                assert vm.pid is None, "QEMU was launched for a file refused up front"

    bogus = tmp_path / "bogus.vmstate"
    bogus.write_bytes(os.urandom(1 << 16))
    await refused(bogus, NotAStateFile, "not a vmkit state file")

    truncated = tmp_path / "truncated.vmstate"
    shutil.copyfile(good, truncated)
    os.truncate(truncated, size // 2)
    await refused(truncated, AuthenticationFailed, "truncated|does not authenticate", launches=True)

    tampered = tmp_path / "tampered.vmstate"
    shutil.copyfile(good, tampered)
    with tampered.open("r+b") as fh:
        fh.seek(size * 3 // 4)
        byte = fh.read(1)
        fh.seek(size * 3 // 4)
        fh.write(bytes([byte[0] ^ 0x01]))
    await refused(tampered, AuthenticationFailed, "does not authenticate", launches=True)

    await refused(good, AuthenticationFailed, "different key", key=secrets.token_bytes(32))
    await refused(good, ConfigMismatch, "memory was 128M, it is now 256M",
                  cfg_=config(micro_image, disk, memory="256M"))

    other_machine = tmp_path / "machine.vmstate"
    reencrypt(good, other_machine, machine_type="pc-q35-99.0")
    await refused(other_machine, IncompatibleQemu, "machine type", launches=True)

    broken_stream = tmp_path / "stream.vmstate"  # authentic file, but QEMU cannot load what it holds
    payload = b"".join(iter_payload(good, keys.load_key()))
    reencrypt(good, broken_stream, payload=payload[: len(payload) // 3])
    await refused(broken_stream, savestate.RestoreFailed, "QEMU could not load", launches=True)

    with disk.open("r+b") as fh:  # the guest's disk changed behind the save's back
        fh.write(b"changed on the host")
    await refused(good, DisksChanged, "disks changed")

    async with VirtualMachine(cfg, tmp_path / "forced") as vm:  # --force: restore anyway
        await savestate.restore_state(vm, good, force=True)
        await vm.resume()
        assert await next_tick(vm, 0) > last


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def mount_tmpfs(mnt: Path, size: int) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)], check=True)


async def test_disk_full_during_save_leaves_the_earlier_save_intact(micro_image: Image, tmp_path: Path,
                                                                   small_tmpfs: Path) -> None:
    cfg = config(micro_image, None)
    async with booted(cfg, tmp_path / "a") as vm:
        first = tmp_path / "first.vmstate"
        await save_paused(vm, first)
        # room for the earlier save and a little more, not for a second one beside it
        mount_tmpfs(small_tmpfs, first.stat().st_size + (8 << 20))
        target = small_tmpfs / "st.vmstate"
        shutil.copyfile(first, target)
        before = target.read_bytes()
        await vm.resume()
        await next_tick(vm, vm.serial.offset)
        await vm.pause()
        with pytest.raises(NoSpace, match="no space left") as exc:
            await savestate.save_state(vm, target)
        assert exc.value.exit_code == ExitCode.STATE_FILE and "unchanged" in str(exc.value.hint)
        assert target.read_bytes() == before, "the earlier save was touched"
        assert sorted(p.name for p in small_tmpfs.iterdir()) == ["st.vmstate"], "a partial file was left"
        b"".join(iter_payload(target, keys.load_key()))  # still authentic from end to end
        # the machine is unharmed: it resumes, and saves fine where there is room
        assert vm.state == VmState.PAUSED
        await vm.resume()
        await next_tick(vm, vm.serial.offset)
        await vm.pause()
        await savestate.save_state(vm, tmp_path / "again.vmstate")
        with pytest.raises(StateError, match="unchanged since its last save"):
            await savestate.save_state(vm, tmp_path / "twice.vmstate")  # QEMU cannot, before the guest runs
        await vm.resume()
        await vm.pause()

        # a tiny file system: nothing at all under the final name
        tiny = tmp_path / "tiny"
        tiny.mkdir()
        mount_tmpfs(tiny, 2 << 20)
        try:
            with pytest.raises(NoSpace):
                await savestate.save_state(vm, tiny / "st.vmstate")
            assert list(tiny.iterdir()) == []
        finally:
            subprocess.run(["umount", "-l", str(tiny)], check=False)


async def test_snapshot_revert_returns_disk_and_counter(micro_image: Image, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "data.qcow2", "qcow2", "16M")
    cfg = config(micro_image, disk, fmt="qcow2")
    async with booted(cfg, tmp_path / "a") as vm:
        await shell(vm, "echo MARK-ONE | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null", "WROTE")
        before = ticks(vm)[-1]
        info = await savestate.create_snapshot(vm, "one")
        at_snapshot = ticks(vm)[-1]  # at least the snapshot's value (the guest may have ticked since)
        assert vm.state == VmState.RUNNING, "a running machine keeps running after a snapshot"
        assert info.tag == "one" and info.vm_state_bytes > 0
        with pytest.raises(AlreadyExistsError):
            await savestate.create_snapshot(vm, "one")

        await shell(vm, "echo MARK-TWO | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null", "WROTE")
        later = await next_tick(vm, vm.serial.offset)
        later = max(later, await next_tick(vm, vm.serial.offset))
        assert later > at_snapshot + 1

        since = vm.serial.offset
        clock = await savestate.revert_snapshot(vm, "one")
        assert vm.state == VmState.RUNNING
        assert clock is not None and not clock.corrected and "no guest agent" in clock.message
        first = await next_tick(vm, since)
        assert before < first <= at_snapshot + 1, f"counter {first} after revert, {before}..{at_snapshot} before"
        assert "MARK-ONE" in await shell(vm, "dd if=/dev/vda bs=8 count=1 2>/dev/null; echo", "READ")

        # forward again: a second snapshot, then back and forth between them
        await shell(vm, "echo MARK-TRI | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null", "WROTE")
        await vm.pause()
        await savestate.create_snapshot(vm, "two")
        assert vm.state == VmState.PAUSED, "a paused machine stays paused after a snapshot"
        await savestate.revert_snapshot(vm, "one")
        assert vm.state == VmState.PAUSED
        await vm.resume()
        assert "MARK-ONE" in await shell(vm, "dd if=/dev/vda bs=8 count=1 2>/dev/null; echo", "READ")
        await savestate.revert_snapshot(vm, "two")
        assert "MARK-TRI" in await shell(vm, "dd if=/dev/vda bs=8 count=1 2>/dev/null; echo", "READ")

        assert [s.tag for s in await savestate.list_snapshots(vm)] == ["one", "two"]
        with pytest.raises(NotFoundError):
            await savestate.revert_snapshot(vm, "nope")
        await savestate.delete_snapshot(vm, "one")
        assert [s.tag for s in await savestate.list_snapshots(vm)] == ["two"]
    # stopped: listed and deleted with qemu-img
    assert [s.tag for s in savestate.list_snapshots_offline(cfg)] == ["two"]
    savestate.delete_snapshot_offline(cfg, "two")
    assert savestate.list_snapshots_offline(cfg) == []


# A stand-in for qemu-guest-agent in the micro guest: busybox sh answering the two commands the clock
# fix-up sends, on the real virtio-serial port. The host side (chardev socket, guest-sync-delimited,
# guest-set-time) is exactly what runs against the real agent. A port whose host side is not
# connected reads EOF, hence the outer loop (qemu-ga polls the same way).
SHELL_AGENT = r"""
for d in /sys/class/virtio-ports/*; do [ "$(cat $d/name)" = org.qemu.guest_agent.0 ] && p=/dev/${d##*/}; done
[ -n "$p" ] || { echo no agent port; exit 1; }
( exec 3<>$p
  while :; do while read -r line <&3; do
    case "$line" in
      *guest-sync-delimited*) id=${line##*\"id\": }; id=${id%%\}*}; printf '\377{"return": %s}\n' "$id" >&3 ;;
      *guest-set-time*) t=${line##*\"time\": }; t=${t%%\}*}; date -s "@$((t / 1000000000))" >/dev/null
                        echo '{"return": {}}' >&3 ;;
      *guest-get-time*) echo "{\"return\": $(date +%s)000000000}" >&3 ;;
    esac
  done; sleep 0.2; done ) </dev/null >/dev/null 2>&1 &
"""


def agent_channel(workdir: Path) -> list[str]:
    return ["-chardev", f"socket,id=qga0,path={workdir / 'qga.sock'},server=on,wait=off",
            "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]


async def guest_behind(workdir: Path) -> float:
    async with GuestAgent(workdir / "qga.sock") as agent:
        return time.time() - await agent.get_time() / 1e9


async def test_clock_is_behind_after_a_restore_and_the_agent_corrects_it(micro_image: Image, tmp_path: Path) -> None:
    cfg = parse_config({**config(micro_image, None).to_dict(), "boot": {
        "kernel": str(micro_image.kernel), "initrd": str(micro_image.initrd),
        "cmdline": micro.guest_cmdline(micro_image.manifest.cmdline, run=SHELL_AGENT)}})
    state = tmp_path / "st.vmstate"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    async with VirtualMachine(cfg, a, extra_args=agent_channel(a)) as vm:
        await vm.start()
        await vm.wait_ready()
        await asyncio.wait_for(vm.serial.wait_for_regex(r"^VMKIT-RUN-END rc=0"), 60)
        assert abs(await guest_behind(a)) < 3
        await vm.pause()
        await savestate.save_state(vm, state)
    await asyncio.sleep(6)  # suspended
    async with VirtualMachine(cfg, b, extra_args=agent_channel(b)) as vm:
        result = await savestate.restore_state(vm, state)
        await vm.resume()
        assert result.suspended_seconds >= 6
        assert await guest_behind(b) > 4, "the guest clock should lag by the time it was suspended"
        clock = await savestate.fix_guest_clock(vm, behind_seconds=result.suspended_seconds)
        assert clock.corrected and "guest agent" in clock.message
        assert abs(await guest_behind(b)) < 2


async def test_restore_runs_the_machine_type_the_state_was_saved_with(micro_image: Image, tmp_path: Path) -> None:
    # a QEMU upgrade moves the q35 alias to a newer pc-q35-X.Y; here the older QEMU is played by
    # running pc-q35-7.1 on purpose: the restore must run that type again, not the alias's newest
    cfg = config(micro_image, None)
    state = tmp_path / "old-q35.vmstate"
    async with VirtualMachine(cfg, tmp_path / "a") as vm:
        await vm.start(machine_type="pc-q35-7.1")
        await vm.wait_ready()
        await next_tick(vm, 0)
        assert await savestate.machine_type(vm) == "pc-q35-7.1"
        last = await save_paused(vm, state)
    assert read_info(state).header.machine_type == "pc-q35-7.1"
    async with VirtualMachine(cfg, tmp_path / "b") as vm2:
        await savestate.restore_state(vm2, state)
        assert await savestate.machine_type(vm2) == "pc-q35-7.1"
        await vm2.resume()
        first = await next_tick(vm2, 0)
        assert last < first <= last + 2, f"the counter restarted: {last} before the save, {first} after"
    # a cold boot afterwards runs the alias again (the newest type)
    async with booted(cfg, tmp_path / "c") as vm3:
        assert await savestate.machine_type(vm3) != "pc-q35-7.1"
    # a type of another family is never pinned: the header check refuses it
    assert savestate.pinned_machine_type(cfg, "pc-i440fx-7.2") is None


async def test_a_paused_guest_clock_stands_still_and_resume_says_by_how_much(
    micro_image: Image, tmp_path: Path
) -> None:
    async with booted(config(micro_image, None), tmp_path / "a") as vm:
        guest0, host0 = int((await shell(vm, "date +%s", "T0")).split()[-1]), time.time()
        await vm.pause()
        assert vm.guest_clock_stopped_at is not None and abs(vm.guest_clock_stopped_at - time.time()) < 1
        await asyncio.sleep(3)
        clock = await savestate.resume_and_fix_clock(vm)
        guest1, host1 = int((await shell(vm, "date +%s", "T1")).split()[-1]), time.time()
        lost = (host1 - host0) - (guest1 - guest0)
        assert lost >= 2, f"the guest clock ran on while paused (lost only {lost:.1f} s)"
        assert vm.guest_clock_stopped_at is None and vm.clock_behind_seconds is not None
        assert 3 <= vm.clock_behind_seconds < 5
        # the micro guest has no agent: the result says so, and by how much the clock is behind
        assert not clock.corrected and clock.behind_seconds == vm.clock_behind_seconds
        assert "no guest agent" in clock.message and re.search(r"behind by about [34] s", clock.message)
