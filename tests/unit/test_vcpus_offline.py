"""vCPUs taken offline in the guest instead of unplugged (TCG): how the change is named, pinning of real
threads around parked vCPUs, the refusal to snapshot or migrate while vCPUs are parked, and a saved
state's record of them."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

import pytest

from conftest import serving_unix
from vmkit.api import models
from vmkit.errors import ConfigError, StateError
from vmkit.runtime import vcpus, vcputhreads
from vmkit.runtime.guest.agent import GuestAgentError
from vmkit.runtime.guest.channel import AgentChannel


def test_every_method_has_words_and_is_in_the_api() -> None:
    assert set(vcpus.METHODS) | {"next-boot"} == set(get_args(models.CpuMethod))
    change = vcpus.CpuChange
    assert change(1, 1, 3, offlined=(2, 1)).method == "guest-offline"
    assert change(2, 2, 3, onlined=(1,)).method == "guest-online"
    assert change(3, 3, 3, onlined=(1,), added=(2,)).method == "guest-online+hotplug"
    assert change(3, 3, 3, added=(1, 2)).method == "hotplug"
    assert change(1, 1, 3, removed=(1, 2)).method == "unplug"
    assert change(1, 1, 3).method == "unchanged"
    assert vcpus.METHODS["guest-offline"] == "offlined in the guest; unplugged at the next boot"


@pytest.fixture
def threads() -> Iterator[list[int]]:
    """Three real, idle threads of this process (stand-ins for QEMU's vCPU threads)."""
    stop = threading.Event()
    ready = threading.Barrier(4)

    def run() -> None:
        ready.wait()
        stop.wait()

    workers = [threading.Thread(target=run) for _ in range(3)]
    for w in workers:
        w.start()
    ready.wait()
    order = [w.native_id for w in workers if w.native_id is not None]
    try:
        yield order
    finally:
        stop.set()
        for w in workers:
            w.join()


def test_parked_vcpus_take_no_turn_in_the_pinning(threads: list[int]) -> None:
    host = sorted(os.sched_getaffinity(0))
    if len(host) < 2:
        pytest.skip("needs two host CPUs")
    a, b = host[:2]
    placed = vcputhreads.pin(threads, [a, b], parked={1})
    assert placed == {threads[0]: a, threads[2]: b}  # the running vCPUs 0 and 2 spread over both
    assert os.sched_getaffinity(threads[0]) == {a}
    assert os.sched_getaffinity(threads[1]) == {a, b}  # halted: anywhere in the list
    assert os.sched_getaffinity(threads[2]) == {b}
    # vCPU 1 back online: pinned in its turn, as a machine booted with three would have it
    assert vcputhreads.pin(threads, [a, b]) == {threads[0]: a, threads[1]: b, threads[2]: a}
    vcputhreads.unpin(threads, host)


def _vm(parked: set[int], agent: AgentChannel | None = None) -> Any:
    return SimpleNamespace(vcpus_parked=parked, config=SimpleNamespace(name="box", cpus=1), agent=agent)


class GuestCpus:
    """qemu-guest-agent's side of ``guest-set-vcpus`` on a unix socket (protocol level): CPUs 0-2, of which
    ``stubborn`` cannot be taken offline (the agent stops at the first it cannot change and returns how many
    it did, as qga does); ``silent`` answers nothing after the sync (a hung agent)."""

    def __init__(self, stubborn: frozenset[int] = frozenset(), silent: bool = False) -> None:
        self.online = {0: True, 1: True, 2: True}
        self.stubborn, self.silent = stubborn, silent

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            msg = json.loads(line.replace(b"\xff", b""))
            args = msg.get("arguments", {})
            if msg["execute"] == "guest-sync-delimited":
                writer.write(b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n")
            elif self.silent:
                continue
            elif msg["execute"] == "guest-set-vcpus":
                done = 0
                for v in args["vcpus"]:
                    if v["logical-id"] in self.stubborn:
                        break
                    self.online[v["logical-id"]] = v["online"]
                    done += 1
                writer.write(json.dumps({"return": done}).encode() + b"\n")
            await writer.drain()
        writer.close()


def test_offline_and_back_online_through_the_agent(tmp_path: Path) -> None:
    guest, path = GuestCpus(), tmp_path / "qga.sock"

    async def run() -> None:
        async with serving_unix(guest.handle, path):
            vm = _vm(set(), AgentChannel(path))
            await vcpus.guest_set_online(vm, [2, 1], False, 1)
            assert vm.vcpus_parked == {1, 2} and guest.online == {0: True, 1: False, 2: False}
            await vcpus.guest_set_online(vm, [1], True, 2)
            assert vm.vcpus_parked == {2} and guest.online[1]
            await vm.agent.close()

    asyncio.run(run())


def test_a_guest_that_keeps_a_vcpu_leaves_it_unparked_and_says_so(tmp_path: Path) -> None:
    guest, path = GuestCpus(stubborn=frozenset({1})), tmp_path / "qga.sock"

    async def run() -> None:
        async with serving_unix(guest.handle, path):
            vm = _vm(set(), AgentChannel(path))
            with pytest.raises(GuestAgentError) as caught:
                await vcpus.guest_set_online(vm, [2, 1], False, 1)
            assert "took only 1 of vCPU(s) 2, 1 offline (for --cpus 1)" in caught.value.message
            assert vm.vcpus_parked == {2}  # what the guest did, no more
            await vm.agent.close()

    asyncio.run(run())


def test_no_agent_or_a_silent_one_is_refused_naming_cpus(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        asyncio.run(vcpus.guest_set_online(_vm(set()), [1], False, 1))
    problem = refused.value.problems[0]
    assert problem.field == "cpus" and "no agent channel" in problem.message
    guest, path = GuestCpus(silent=True), tmp_path / "qga.sock"

    async def run() -> None:
        async with serving_unix(guest.handle, path):
            vm = _vm(set(), AgentChannel(path))
            with pytest.raises(GuestAgentError) as caught:
                await vcpus.guest_set_online(vm, [1], False, 1, timeout=0.5)
            assert caught.value.timed_out and "--cpus 1" in caught.value.message and not vm.vcpus_parked
            assert caught.value.hint is not None and "qemu-guest-agent" in caught.value.hint
            await vm.agent.close()

    asyncio.run(run())


def test_no_snapshot_or_migration_while_vcpus_are_parked() -> None:
    vcpus.refuse_parked(_vm(set()), "snapshot the machine")  # nothing parked: allowed
    with pytest.raises(StateError) as caught:
        vcpus.refuse_parked(_vm({1, 2}), "snapshot the machine")
    assert "cannot snapshot the machine" in caught.value.message and "vCPU(s) 1, 2 offlined" in caught.value.message
    assert caught.value.hint is not None and "vmkit set box --cpus 3" in caught.value.hint


def test_a_saved_state_counts_parked_vcpus_and_names_them() -> None:
    """The fields a state's digest covers: unchanged without parked vCPUs (states saved before stay
    valid); with them, ``cpus`` is what QEMU has (what the restore must boot) and they are named."""
    from vmkit.config import parse_config
    from vmkit.runtime.qemu.accel import AccelChoice
    from vmkit.state.savestate import config_digest, machine_fields, moved_header

    tcg = AccelChoice("tcg", "test")
    cfg = parse_config({"name": "vm", "boot": {"kernel": "/k"}, "cpus": 1, "max_cpus": 3})
    plain = machine_fields(cfg, tcg)
    assert "vcpus_offline" not in plain and plain == machine_fields(cfg, tcg, offline=())
    parked = machine_fields(cfg, tcg, offline={2, 1})
    assert parked["cpus"] == 3 and parked["vcpus_offline"] == [1, 2]
    assert {k: v for k, v in parked.items() if k not in ("cpus", "vcpus_offline")} == {
        k: v for k, v in plain.items() if k != "cpus"}
    # a state moved to another host keeps them
    moved = moved_header({"machine": parked, "config_digest": config_digest(parked)}, cfg, tcg)
    assert moved["machine"] == parked and moved["config_digest"] == config_digest(parked)


def test_a_removal_waits_until_both_of_qemus_lists_have_let_the_vcpu_go() -> None:
    """QEMU can show a vCPU's slot empty (``query-hotpluggable-cpus``) while ``query-cpus-fast`` still lists
    its CPU (its thread is still ending; the last ``DEVICE_DELETED`` comes after): the removal is done only
    when both agree, so the count vmkit reports and writes to vm.yaml is the one the command gave (a
    ``cpus-changed`` event once said 2 vCPUs where ``vmkit set --cpus 1`` said 1)."""
    props = [{"socket-id": i, "core-id": 0, "thread-id": 0} for i in range(2)]
    lagging = {"left": 3}  # query-cpus-fast answers with the old CPU this many times

    async def execute(cmd: str, args: object = None) -> Any:
        if cmd == "query-hotpluggable-cpus":  # slot 1 already empty
            return [{"type": "qemu64-x86_64-cpu", "props": props[1]},
                    {"type": "qemu64-x86_64-cpu", "props": props[0], "qom-path": "/machine/unattached/device[0]"}]
        assert cmd == "query-cpus-fast"
        lagging["left"] -= 1
        return [{"cpu-index": 0}, {"cpu-index": 1}] if lagging["left"] >= 0 else [{"cpu-index": 0}]

    async def run() -> int:
        vm = SimpleNamespace(execute=execute, vcpus_parked=set())
        events: asyncio.Queue[Any] = asyncio.Queue()
        for _ in range(3):  # the lapic's DEVICE_DELETED and such: each wakes the wait, which looks again
            events.put_nowait(SimpleNamespace(kind="qmp", detail={"event": "DEVICE_DELETED"}))
        await vcpus._wait_released(vm, events, {"/machine/peripheral/vcpu1"}, timeout=10)  # type: ignore[arg-type]
        return await vcpus.online(vm)  # type: ignore[arg-type]

    assert asyncio.run(run()) == 1
    assert lagging["left"] < 0
