"""Unit tests: lifecycle guards of VirtualMachine (no QEMU is started)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from vmkit.config import parse_config
from vmkit.errors import ExitCode, StateError, VmkitError
from vmkit.runtime.machine import LIVE_STATES, VirtualMachine, VmEvent, VmState
from vmkit.runtime.qemu.accel import AccelChoice


@pytest.fixture
def vm(tmp_path: Path) -> VirtualMachine:
    config = parse_config({"name": "guarded", "boot": {"kernel": str(tmp_path / "vmlinuz")}})
    return VirtualMachine(config, tmp_path / "work", accel=AccelChoice("tcg", "test"),
                          qemu_binary="/nonexistent/qemu-must-not-run")


OPERATIONS: dict[str, tuple[Callable[[VirtualMachine], Awaitable[object]], str, set[str]]] = {
    "pause": (lambda vm: vm.pause(), "pause", {"running"}),
    "resume": (lambda vm: vm.resume(), "resume", {"paused"}),
    "request_stop": (lambda vm: vm.request_stop(), "request a stop", {"running"}),
    "stop": (lambda vm: vm.stop(), "stop", {s.value for s in LIVE_STATES}),
    "execute": (lambda vm: vm.execute("query-status"), "run QMP query-status",
                {s.value for s in LIVE_STATES} - {"starting"}),
}


@pytest.mark.parametrize("op", sorted(OPERATIONS))
async def test_operation_on_a_stopped_machine_is_a_state_error(vm: VirtualMachine, op: str) -> None:
    call, operation, required = OPERATIONS[op]
    events: list[VmEvent] = []
    vm.add_listener(events.append)
    assert vm.state is VmState.STOPPED
    with pytest.raises(StateError) as info:
        await call(vm)
    err = info.value
    assert isinstance(err, VmkitError)
    assert err.exit_code == ExitCode.WRONG_STATE and int(err.exit_code) == 4
    assert err.current == "stopped"
    assert set(err.required) == required
    assert err.operation == operation
    message = str(err)
    assert f"cannot {operation}" in message
    assert "the machine is stopped" in message
    for state in required:
        assert state in message.split("it must be", 1)[1]
    # the refused call changed nothing
    assert vm.state is VmState.STOPPED
    assert events == []
    assert vm.pid is None


async def test_pause_message_names_current_and_required_state(vm: VirtualMachine) -> None:
    with pytest.raises(StateError, match=r"^cannot pause: the machine is stopped, it must be running$"):
        await vm.pause()
    with pytest.raises(StateError, match=r"^cannot resume: the machine is stopped, it must be paused$"):
        await vm.resume()


async def test_wait_on_a_never_started_machine(vm: VirtualMachine) -> None:
    with pytest.raises(StateError) as info:
        await vm.wait(0.1)
    assert info.value.current == "stopped"


async def test_leaving_the_context_of_a_never_started_machine_is_clean(vm: VirtualMachine) -> None:
    async with vm as entered:
        assert entered is vm
    assert vm.state is VmState.STOPPED and vm.pid is None


def test_state_names_are_the_documented_ones() -> None:
    assert [s.value for s in VmState] == ["stopped", "starting", "running", "pausing", "paused", "resuming",
                                          "stopping", "error"]
    assert VmState.STOPPED not in LIVE_STATES and VmState.ERROR not in LIVE_STATES
