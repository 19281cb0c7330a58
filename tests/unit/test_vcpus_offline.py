"""vCPUs taken offline in the guest instead of unplugged (TCG): how the change is named, pinning of real
threads around parked vCPUs, and the refusal to save while vCPUs are parked."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, get_args

import pytest

from vmkit.api import models
from vmkit.errors import StateError
from vmkit.runtime import vcpus, vcputhreads


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


def _vm(parked: set[int]) -> Any:
    return SimpleNamespace(vcpus_parked=parked, config=SimpleNamespace(name="box", cpus=1))


def test_a_state_is_not_saved_while_vcpus_are_parked() -> None:
    vcpus.refuse_parked(_vm(set()), "save its state")  # nothing parked: allowed
    with pytest.raises(StateError) as caught:
        vcpus.refuse_parked(_vm({1, 2}), "save its state")
    assert "cannot save its state" in caught.value.message and "vCPU(s) 1, 2 offlined" in caught.value.message
    assert caught.value.hint is not None and "vmkit set box --cpus 3" in caught.value.hint
