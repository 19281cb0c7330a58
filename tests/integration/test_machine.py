"""VirtualMachine against real QEMU (TCG here) and the micro guest."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import pytest

from conftest import pid_alive
from vmkit.config import MachineConfig, parse_config
from vmkit.errors import QemuError, StateError
from vmkit.host.images import micro
from vmkit.host.images.store import Image
from vmkit.runtime.machine import VirtualMachine, VmEvent, VmState

pytestmark = pytest.mark.integration

TICK = re.compile(r"^vmkit-tick (\d+)", re.MULTILINE)


def micro_config(image: Image, name: str = "t", *, counter: bool = True, run: str | None = None,
                 memory: str = "256M") -> MachineConfig:
    return parse_config({
        "name": name,
        "memory": memory,
        "boot": {"kernel": str(image.kernel), "initrd": str(image.initrd),
                 "cmdline": micro.guest_cmdline(image.manifest.cmdline, counter=counter, run=run)},
        "network": None,
        "readiness": {"serial_marker": micro.READY_MARKER, "timeout": 90},
    })


def ticks(vm: VirtualMachine, since: int = 0) -> list[int]:
    return [int(n) for n in TICK.findall(vm.serial.text(since).replace("\r", ""))]


async def wait_tick_after(vm: VirtualMachine, n: int, timeout: float = 30) -> int:
    async def _wait() -> int:
        while True:
            got = ticks(vm)
            if got and got[-1] > n:
                return got[-1]
            await vm.serial.changed()

    return await asyncio.wait_for(_wait(), timeout)


async def test_lifecycle_pause_resume_request_stop(micro_image: Image, tmp_path: Path) -> None:
    events: list[VmEvent] = []
    async with VirtualMachine(micro_config(micro_image), tmp_path) as vm:
        vm.add_listener(events.append)
        await vm.start()
        assert vm.state == VmState.RUNNING
        await vm.wait_ready()
        first = await wait_tick_after(vm, -1)

        await vm.pause()
        assert vm.state == VmState.PAUSED
        frozen = ticks(vm)[-1]
        await asyncio.sleep(2.0)  # four tick periods: a running guest would print ~4 more
        assert ticks(vm)[-1] == frozen, "the counter advanced while the guest was paused"

        await vm.resume()
        assert vm.state == VmState.RUNNING
        after = await wait_tick_after(vm, frozen, timeout=20)
        assert after > frozen >= first

        await vm.request_stop(timeout=30)
        assert vm.state == VmState.STOPPED
        assert vm.exit_info is not None and vm.exit_info.clean
        assert "guest" in vm.exit_info.reason
        assert re.search(r"^VMKIT-POWEROFF", vm.serial.text().replace("\r", ""), re.MULTILINE)
    kinds = [e.kind for e in events]
    assert "guest-stopped" in kinds
    states = [e.detail.get("previous") + "->" + e.state.value for e in events if e.kind == "state-changed"]
    assert "running->pausing" in states and "pausing->paused" in states
    assert "paused->resuming" in states and "resuming->running" in states
    assert (tmp_path / "serial.log").read_bytes().count(b"VMKIT-READY") == 1


async def test_events_come_from_qmp_when_paused_outside_vmkit(micro_image: Image, tmp_path: Path) -> None:
    async with VirtualMachine(micro_config(micro_image, counter=False), tmp_path) as vm:
        await vm.start()
        async with vm.subscribe() as q:
            await vm.execute("stop")  # raw QMP, not vm.pause(): the STOP event must drive the state
            ev = await asyncio.wait_for(q.get(), 10)
            while not (ev.kind == "state-changed" and ev.state == VmState.PAUSED):
                ev = await asyncio.wait_for(q.get(), 10)
            assert vm.state == VmState.PAUSED
            await vm.execute("cont")
            ev = await asyncio.wait_for(q.get(), 10)
            while not (ev.kind == "state-changed" and ev.state == VmState.RUNNING):
                ev = await asyncio.wait_for(q.get(), 10)


async def test_hard_stop_and_guards(micro_image: Image, tmp_path: Path) -> None:
    vm = VirtualMachine(micro_config(micro_image, counter=False), tmp_path)
    with pytest.raises(StateError, match="stopped"):
        await vm.pause()
    async with vm:
        await vm.start()
        pid = vm.pid
        assert pid is not None and pid_alive(pid)
        with pytest.raises(StateError, match="running"):
            await vm.start()
        with pytest.raises(StateError, match="paused"):
            await vm.resume()
        info = await vm.stop()
        assert info.clean
        assert vm.state == VmState.STOPPED
        assert not pid_alive(pid)
        assert not (tmp_path / "qemu.pid").exists()


async def test_context_manager_kills_qemu_when_the_block_fails(micro_image: Image, tmp_path: Path) -> None:
    pid = None
    with pytest.raises(RuntimeError, match="boom"):
        async with VirtualMachine(micro_config(micro_image, counter=False), tmp_path) as vm:
            await vm.start()
            pid = vm.pid
            raise RuntimeError("boom")
    assert pid is not None and not pid_alive(pid)


async def test_qemu_killed_is_reported_as_error(micro_image: Image, tmp_path: Path) -> None:
    async with VirtualMachine(micro_config(micro_image, counter=False), tmp_path) as vm:
        await vm.start()
        async with vm.subscribe() as q:
            assert vm.pid is not None
            os.kill(vm.pid, signal.SIGKILL)
            info = await vm.wait(10)
            assert not info.clean and "SIGKILL" in info.reason
            assert vm.state == VmState.ERROR
            kinds = []
            while not q.empty():
                kinds.append(q.get_nowait().kind)
            assert "stopped-with-error" in kinds


async def test_bad_kernel_fails_start_with_qemu_error(tmp_path: Path) -> None:
    bogus = tmp_path / "vmlinuz"
    bogus.write_bytes(b"not a kernel" * 100)
    config = parse_config({"name": "bad", "memory": "128M", "boot": {"kernel": str(bogus)}, "network": None})
    async with VirtualMachine(config, tmp_path) as vm:
        with pytest.raises(QemuError, match="invalid kernel header") as exc:
            await vm.start()
        assert exc.value.exit_code == 5
        assert vm.state == VmState.ERROR
        assert vm.pid is not None and not pid_alive(vm.pid)
