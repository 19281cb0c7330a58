"""vCPUs added to and removed from a running machine.

QEMU starts the machine with ``-smp CPUS,maxcpus=MAX`` (see :meth:`vmkit.config.MachineConfig.cpu_ceiling`):
MAX possible vCPU slots, CPUS of them filled. ``query-hotpluggable-cpus`` lists every slot with the
properties (socket, core, thread ids) that place a CPU in it, and the QOM path of the CPU that fills
it, if any. :func:`set_cpus` fills the lowest free slots (``device_add`` of the CPU model QEMU names)
or empties the highest filled ones (``device_del``), so the filled slots are always the first CPUS:
exactly what ``-smp CPUS`` gives at the next boot, and what a saved state restores into.

Adding is immediate for QEMU; the guest sees an ACPI notification and a new, offline CPU, which
its userspace brings online (the debian-12 image has a udev rule for it). Removing needs the
guest's cooperation: QEMU asks it to eject the CPU (ACPI) and removes the CPU only when the guest
has taken it offline and acknowledged, with a ``DEVICE_DELETED`` event. A guest that does not
answer within the timeout gets a :class:`~vmkit.errors.VmTimeoutError` naming the vCPUs it kept;
QEMU's request stays pending, and a late release still removes them.

Under TCG, QEMU 7.2 corrupts its own heap when a vCPU is removed: at the next change of the guest's
memory map (the next ``device_add`` of a vCPU, a save's ``migrate``, ``quit``) it crashes, with SIGSEGV
or glibc's "double free or corruption" in ``free()`` under ``memory_region_transaction_commit``; the
guest itself runs on until then. No setting of 7.2 avoids it (single-threaded TCG fails at the removal
itself); see docs/notes/tcg-vcpu-unplug.md and scripts/tcg_vcpu_unplug_repro.py. So under TCG
:func:`set_cpus` never removes a vCPU with ``device_del``: as libvirt's ``virsh setvcpus --guest`` does, it takes
the surplus vCPUs (the highest-numbered online ones) offline *inside the guest* through the guest agent
(``guest-set-vcpus`` with ``online: false``). QEMU keeps their threads, halted (they cost next to
nothing); the machine keeps them *parked* (:attr:`VirtualMachine.vcpus_parked`), vm.yaml's ``cpus`` says
the lower count, and the next boot, which starts with ``-smp CPUS``, no longer has them. Raising the
count again first brings parked vCPUs back online in the guest (``online: true``), lowest first, and
adds (``device_add``) only the rest. A machine without a guest agent is refused (naming ``cpus``), and
so is one whose agent does not answer. A guest that reboots in the same QEMU brings every vCPU QEMU has
online again: the machine forgets its parked vCPUs then (vm.yaml still says what the next boot has).
A saved state records the parked vCPUs (vmkit.state.savestate: ``vcpus_offline``), and its restore
boots them too and parks them again (the guest has them offline in the memory it resumes). A snapshot
(reverted, perhaps, in a QEMU booted with ``-smp CPUS``) and a migration (whose target boots from
vm.yaml) are refused while vCPUs are parked (:func:`refuse_parked`).

Where removing is safe (KVM), ``device_del`` is used as before. :data:`UNSAFE_TCG_UNPLUG` in the
supervisor's environment makes TCG machines use ``device_del`` too (tests and benchmarks of that path);
after such a removal adding vCPUs is refused.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from vmkit.config import MAX_VCPUS, MachineConfig
from vmkit.errors import ConfigError, StateError, VmTimeoutError
from vmkit.runtime.guest.agent import GuestAgentError
from vmkit.runtime.machine import VirtualMachine
from vmkit.runtime.migration import parse_version

_TOPOLOGY = ("socket-id", "die-id", "cluster-id", "core-id", "thread-id")
UNSAFE_TCG_UNPLUG = "VMKIT_UNSAFE_TCG_VCPU_UNPLUG"
"""Environment variable: ``1`` lets a TCG machine remove vCPUs although its QEMU may crash later."""
ID_PREFIX = "vcpu"
"""Hot-added vCPUs are named ``vcpu<N>`` (N: the slot's index, as QEMU numbers its CPUs)."""


def check_cpus(config: MachineConfig, count: int, *, field: str = "cpus") -> int:
    """``count`` if a machine made from ``config`` can have that many vCPUs, else a :class:`ConfigError`
    naming ``field``."""
    if count < 1:
        raise ConfigError.single(field, f"{count} vCPUs: a machine needs at least 1")
    ceiling = config.cpu_ceiling
    if count > ceiling:
        hint = (f"raise max_cpus in its vm.yaml (at most {MAX_VCPUS}) and start it again" if ceiling < MAX_VCPUS
                else f"{MAX_VCPUS} is vmkit's limit")
        raise ConfigError.single(field, f"{count} vCPUs is more than {config.name} can have while it runs "
                                 f"(max_cpus: {ceiling}): give at most {ceiling}, or {hint}")
    return count


def unplug_refusal(accel: str, qemu_version: tuple[int, int, int] | None) -> str | None:
    """Why a machine on ``accel`` under this QEMU cannot have vCPUs removed with ``device_del`` (None: it
    can). Plain QEMU 10.0.2 survives removals under TCG, but vmkit has not been validated on it (a save
    after a removal hung there once): every TCG machine parks vCPUs in the guest instead, for now."""
    if accel != "tcg":
        return None
    shown = ".".join(map(str, qemu_version)) if qemu_version else "of unknown version"
    return (f"running on TCG with QEMU {shown}, which corrupts its memory removing a vCPU (it crashes at the "
            "next vCPU added, save or quit)")


def _refusal(vm: VirtualMachine) -> str | None:
    return unplug_refusal(vm.accel.name, parse_version(vm.qmp.qemu_version if vm.qmp else None))


@dataclass(frozen=True)
class Slot:
    """One possible vCPU: its place (``props``), the CPU model to put there, the CPU that fills it."""

    index: int
    driver: str
    props: dict[str, Any]
    qom_path: str | None


def _key(props: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(props.get(k, 0)) for k in _TOPOLOGY)


async def slots(vm: VirtualMachine) -> list[Slot]:
    """Every possible vCPU slot, in QEMU's CPU order (``query-hotpluggable-cpus`` lists them backwards)."""
    reply: list[dict[str, Any]] = await vm.execute("query-hotpluggable-cpus")
    ordered = sorted(reply, key=lambda s: _key(s["props"]))
    return [Slot(i, str(s["type"]), dict(s["props"]), s.get("qom-path")) for i, s in enumerate(ordered)]


async def present(vm: VirtualMachine) -> int:
    """How many vCPUs QEMU has now (``query-cpus-fast``), parked ones included."""
    return len(await vm.execute("query-cpus-fast"))


async def online(vm: VirtualMachine) -> int:
    """How many vCPUs the guest can run on: QEMU's, less those parked (offlined in the guest by
    :func:`set_cpus`)."""
    return await present(vm) - len(vm.vcpus_parked)


METHODS = {
    "hotplug": "hot-plugged (device_add)",
    "unplug": "unplugged (device_del)",
    "guest-offline": "offlined in the guest; unplugged at the next boot",
    "guest-online": "brought back online in the guest",
    "guest-online+hotplug": "parked vCPUs brought back online in the guest, the rest hot-plugged (device_add)",
    "unchanged": "unchanged",
}
"""How :func:`set_cpus` made the change (``CpusResult.method``), and the sentence that says so."""


@dataclass(frozen=True)
class CpuChange:
    requested: int
    online: int
    """vCPUs the guest can run on after the change (QEMU's less the parked ones)."""
    ceiling: int
    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    offlined: tuple[int, ...] = ()
    """vCPUs taken offline in the guest (parked: QEMU keeps them until the next boot)."""
    onlined: tuple[int, ...] = ()
    """Parked vCPUs brought back online in the guest."""

    @property
    def method(self) -> str:
        """A key of :data:`METHODS`."""
        if self.offlined:
            return "guest-offline"
        if self.removed:
            return "unplug"
        if self.onlined:
            return "guest-online+hotplug" if self.added else "guest-online"
        return "hotplug" if self.added else "unchanged"


def refuse_parked(vm: VirtualMachine, what: str) -> None:
    """A :class:`StateError` if the machine has parked vCPUs, for what cannot carry them: a snapshot (it may
    be reverted in a QEMU booted with vm.yaml's ``cpus``) and a migration (whose target boots with it)."""
    if vm.vcpus_parked:
        ids = ", ".join(map(str, sorted(vm.vcpus_parked)))
        exc = StateError(what, f"running with vCPU(s) {ids} offlined in the guest (`vmkit set --cpus` lowered "
                         "it under TCG), which QEMU keeps until the next boot", ["without offlined vCPUs"])
        exc.hint = (f"stop it and start it again (it boots with cpus: {vm.config.cpus}), or bring them back with "
                    f"`vmkit set {vm.config.name} --cpus {vm.config.cpus + len(vm.vcpus_parked)}` first")
        raise exc


AGENT_TIMEOUT = 15.0
"""Seconds the guest agent gets to take vCPUs offline or online (a few hundred ms measured under TCG)."""


async def guest_set_online(vm: VirtualMachine, ids: list[int], up: bool, count: int, *,
                           timeout: float = AGENT_TIMEOUT) -> None:
    """Take the guest's vCPUs ``ids`` offline (``up`` False) or online through its agent
    (``guest-set-vcpus``); :attr:`VirtualMachine.vcpus_parked` follows what the agent did."""
    name = vm.config.name
    if vm.agent is None:
        raise ConfigError.single("cpus", f"{count} vCPUs: taking vCPUs offline or online in the guest needs its "
                                 f"guest agent, and {name} has no agent channel (agent: false)")
    request = [{"logical-id": i, "online": up} for i in ids]
    try:
        done = int(await vm.agent.execute("guest-set-vcpus", {"vcpus": request}, timeout=timeout))
    except GuestAgentError as exc:
        raise GuestAgentError(f"{name}: the guest agent could not take vCPU(s) {', '.join(map(str, ids))} "
                              f"{'online' if up else 'offline'} (for --cpus {count}): {exc.message}",
                              hint="is qemu-guest-agent running in the guest? (`vmkit exec` needs it too); "
                                   "or stop the machine, lower cpus and start it again",
                              timed_out=exc.timed_out, error_class=exc.error_class) from None
    for i in ids[:done]:
        if up:
            vm.vcpus_parked.discard(i)
        else:
            vm.vcpus_parked.add(i)
    if done < len(ids):
        raise GuestAgentError(f"{name}: the guest took only {done} of vCPU(s) {', '.join(map(str, ids))} "
                              f"{'online' if up else 'offline'} (for --cpus {count})",
                              hint="the guest refused the rest (see its kernel log)")


async def set_cpus(vm: VirtualMachine, count: int, *, timeout: float = 30.0) -> CpuChange:
    """Give the running machine ``count`` vCPUs the guest can run on; waits up to ``timeout`` s for the
    guest to release the ones it gives up (:class:`VmTimeoutError` if it keeps some). Under TCG the
    surplus is parked (offlined in the guest), see the module's docs."""
    check_cpus(vm.config, count)
    all_slots = await slots(vm)
    filled = [s for s in all_slots if s.qom_path is not None]
    vm.vcpus_parked &= {s.index for s in filled}
    parked = sorted(vm.vcpus_parked)
    active = len(filled) - len(parked)
    if count > active:
        if vm.vcpus_removed and count > len(filled) and _refusal(vm):
            exc = StateError("add vCPUs", f"running on TCG and has removed {vm.vcpus_removed} vCPU(s) since it "
                             "started (its QEMU crashes adding one after that)", ["freshly started"])
            exc.hint = (f"stop it and start it again (vm.yaml already says cpus: {len(filled)}), then add "
                        "them; or save it (vmkit stop --save) and start it")
            raise exc
        back = parked[:count - active]
        if back:
            await guest_set_online(vm, back, True, count)
        added = []
        for slot in [s for s in all_slots if s.qom_path is None][:count - len(filled)]:
            await vm.execute("device_add", {"driver": slot.driver, "id": f"{ID_PREFIX}{slot.index}", **slot.props})
            added.append(slot.index)
        return CpuChange(count, await online(vm), len(all_slots), added=tuple(added), onlined=tuple(back))
    if count == active:
        return CpuChange(count, active, len(all_slots))
    why = _refusal(vm)
    if why and os.environ.get(UNSAFE_TCG_UNPLUG) != "1":  # no device_del: park them in the guest
        if vm.agent is None:
            name = vm.config.name
            raise ConfigError.single("cpus", f"{count} vCPUs: {name} is {why}, so vmkit takes vCPUs away by "
                                     "offlining them in the guest through its guest agent, and it has no agent "
                                     "channel (agent: false): stop it, lower cpus for the next start (vmkit set "
                                     f"{name} --cpus {count}) and start it again")
        going_ids = sorted((s.index for s in filled if s.index not in vm.vcpus_parked), reverse=True)
        await guest_set_online(vm, going_ids[:active - count], False, count)
        return CpuChange(count, await online(vm), len(all_slots), offlined=tuple(going_ids[:active - count]))
    going = sorted(filled, key=lambda s: s.index, reverse=True)[:len(filled) - count]
    paths = {str(s.qom_path): s.index for s in going}
    vm.vcpus_removed += len(going)  # asked for: a refused eject can still complete later
    async with vm.subscribe() as events:
        for path in paths:
            await vm.execute("device_del", {"id": path})
        await _wait_released(vm, events, set(paths), timeout)
    now = await slots(vm)
    kept = [s.index for s in now if s.qom_path in paths]
    if kept:
        raise VmTimeoutError(f"{vm.config.name}: the guest did not release vCPU{'s' if len(kept) > 1 else ''} "
                             f"{', '.join(map(str, kept))} within {timeout:.0f} s, so it still has "
                             f"{sum(s.qom_path is not None for s in now)}: it may not support CPU hot-unplug "
                             "(ACPI eject) or may be busy; QEMU's request stays pending (try again, or give "
                             "a longer --timeout)")
    return CpuChange(count, sum(s.qom_path is not None for s in now), len(now),
                     removed=tuple(sorted(paths.values())))


async def _wait_released(vm: VirtualMachine, events: asyncio.Queue[Any], paths: set[str], timeout: float) -> None:
    """Until QEMU no longer has any of the vCPUs at ``paths``, or ``timeout``. Woken by each
    ``DEVICE_DELETED``; QEMU's slots are also looked at once a second, so an event that does not name
    the vCPU as expected (measured with the Debian guest: the wait ran into its timeout although the vCPU
    was gone) costs at most that. Released means gone from both of QEMU's lists: ``query-hotpluggable-cpus``
    can show a slot empty while ``query-cpus-fast`` (what :func:`online` counts) still has its CPU, whose
    thread is still ending (seen in CI: a ``cpus-changed`` event said 2 vCPUs where the command said 1)."""
    deadline = time.monotonic() + timeout
    while True:
        filled = {str(s.qom_path) for s in await slots(vm) if s.qom_path is not None}
        if not paths & filled and await present(vm) == len(filled):
            return
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = await asyncio.wait_for(events.get(), min(left, 1.0))
            except TimeoutError:
                break
            if ev.kind == "qmp" and ev.detail.get("event") == "DEVICE_DELETED":
                break
            if ev.kind in ("guest-stopped", "stopped-with-error", "events-dropped"):
                return
        if deadline - time.monotonic() <= 0:
            return
