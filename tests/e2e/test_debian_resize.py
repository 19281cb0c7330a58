"""vCPUs and memory changed live on the Debian guest, as its user sees them: `nproc` follows
`vmkit set --cpus` up and down (down under TCG: offlined in the guest through its agent), and MemTotal
follows `vmkit set --memory` up and down (the image's udev rule brings hot-added CPUs and memory online;
memory is onlined movable, so it can be unplugged).
One Debian machine serves every test here."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import follow_events, image_cache_dir, processes_mentioning, vmkit
from vmkit.host.images.store import Image

pytestmark = pytest.mark.e2e
MiB = 1 << 20
SEEN_WITHIN = 10.0
"""Seconds the guest may take to show a change (the target is 5; TCG on a loaded host is slower)."""


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory, debian12: Image) -> Iterator[Path]:
    """A running debian-12 machine ``deb`` (1 vCPU of at most 3, 1 GiB booted of at most 2 GiB);
    yields its VMKIT_HOME."""
    home = tmp_path_factory.mktemp("resize") / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMKIT_HOME", str(home))
        mp.setenv("VMKIT_IMAGE_CACHE", str(image_cache_dir()))
        vmkit("create", "deb", "--image", "debian-12", "--cpus", "1", "--max-cpus", "3", "--memory", "1G",
              "--max-memory", "2G")
        try:
            vmkit("start", "deb")
            yield home
        finally:
            vmkit("stop", "deb", "--force", check=False)
            for pid in processes_mentioning(str(home)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def guest(*argv: str) -> str:
    return vmkit("exec", "deb", "--", *argv).stdout.strip()


def mem_total() -> int:
    line = next(ln for ln in guest("cat", "/proc/meminfo").splitlines() if ln.startswith("MemTotal:"))
    return int(line.split()[1]) << 10


def seen(check: Callable[[], bool], what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < SEEN_WITHIN, f"the guest did not show {what} within {SEEN_WITHIN} s"
        time.sleep(0.2)
    return time.monotonic() - start


def qemu_pid() -> int:
    pid: int = json.loads(vmkit("inspect", "deb").stdout)["runtime"]["qemu_pid"]
    return pid


def vcpu_affinity(pid: int) -> dict[int, set[int]]:
    """Host CPUs each vCPU thread of QEMU ``pid`` may run on (QEMU names them ``CPU N/TCG``)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        m = re.fullmatch(r"CPU (\d+)/\w+", (task / "comm").read_text().strip())
        if m:
            found[int(m.group(1))] = os.sched_getaffinity(int(task.name))
    return found


def cpu_events(name: str, act: Callable[[], None]) -> list[dict[str, Any]]:
    """The events of ``name`` while ``act`` runs."""
    events = follow_events(name)  # subscribed: nothing after is missed
    try:
        act()
    finally:
        events.kill()
        out, _ = events.communicate(timeout=30)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def changes(lines: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    assert not [e for e in lines if e["kind"] == "qmp" and e["detail"].get("event") == "DEVICE_DELETED"]
    return [(e["detail"]["previous"], e["detail"]["cpus"], e["detail"]["method"]) for e in lines
            if e["kind"] == "cpus-changed"]


def test_nproc_follows_set_cpus_up_down_save_restore_up_and_a_new_boot(deb: Path) -> None:
    """Up live (device_add); down under TCG by offlining the surplus in the guest through its agent
    (QEMU 7.2 corrupts its heap when a vCPU is device_del'ed: none is); a save and restore keep them
    offline; up again first brings the offlined ones back; the next boot has what vm.yaml says. No QEMU
    process crashes or is asked to remove a vCPU."""
    assert guest("nproc") == "1"
    pid = qemu_pid()

    def up_and_down() -> None:
        up = vmkit("set", "deb", "--cpus", "3")
        assert "added vCPU 1, 2" in up.stdout, up.stdout
        took = seen(lambda: guest("nproc") == "3", "3 CPUs")
        print(f"1 -> 3 vCPUs: nproc after {took:.1f} s")
        started = time.monotonic()
        down = vmkit("set", "deb", "--cpus", "1")  # refused with exit 4 before vmkit offlined in the guest
        assert "1 vCPUs" in down.stdout, down.stdout
        assert "vCPU 2, 1 offlined in the guest; unplugged at the next boot" in down.stdout, down.stdout
        took = seen(lambda: guest("nproc") == "1", "1 CPU")
        print(f"3 -> 1 vCPUs: nproc after {time.monotonic() - started:.1f} s from the command ({took:.1f} s after)")

    lines = cpu_events("deb", up_and_down)
    assert changes(lines) == [(1, 3, "hotplug"), (3, 1, "guest-offline")], lines[-10:]
    offline = next(e for e in lines if e["kind"] == "cpus-changed" and e["detail"]["method"] == "guest-offline")
    assert offline["detail"]["note"] == "offlined in the guest; unplugged at the next boot"
    assert guest("cat", "/sys/devices/system/cpu/online") == "0"
    stats = json.loads(vmkit("stats", "deb", "--json").stdout)
    assert stats["vcpus_online"] == 1 and stats["vcpus"] == 1 and stats["vcpus_offlined"] == 2, stats
    assert yaml.safe_load((deb / "instances" / "deb" / "vm.yaml").read_text())["cpus"] == 1
    # pinning: the running vCPUs take the list's CPUs in turn; the offlined (halted) ones take no turn
    vmkit("set", "deb", "--cpu-pin", "0,1")
    assert vcpu_affinity(pid) == {0: {0}, 1: {0, 1}, 2: {0, 1}}
    # a snapshot could be reverted in a QEMU booted with 1 vCPU: refused, naming the way out
    snap = vmkit("snapshot", "create", "deb", "s1", check=False)
    assert snap.returncode == 4 and "offlined in the guest" in snap.stderr, snap.stderr
    assert "vmkit set deb --cpus 3" in snap.stderr, snap.stderr
    assert qemu_pid() == pid  # QEMU did not crash

    # saved and restored: QEMU starts with the 3 vCPUs the state has, the guest still runs on 1
    vmkit("stop", "deb", "--save")
    assert "resumed from" in vmkit("start", "deb").stdout
    assert guest("nproc") == "1" and guest("cat", "/sys/devices/system/cpu/online") == "0"
    stats = json.loads(vmkit("stats", "deb", "--json").stdout)
    assert stats["vcpus_online"] == 1 and stats["vcpus_offlined"] == 2, stats
    pid = qemu_pid()

    def up_again() -> None:
        again = vmkit("set", "deb", "--cpus", "2")  # vCPU 1 back online, no device_add
        assert "vCPU 1 back online in the guest" in again.stdout and "added" not in again.stdout, again.stdout
        seen(lambda: guest("nproc") == "2", "2 CPUs")

    assert changes(cpu_events("deb", up_again)) == [(1, 2, "guest-online")]
    assert guest("cat", "/sys/devices/system/cpu/online") == "0-1"
    stats = json.loads(vmkit("stats", "deb", "--json").stdout)
    assert stats["vcpus_online"] == 2 and stats["vcpus_offlined"] == 1, stats
    assert vcpu_affinity(pid) == {0: {0}, 1: {1}, 2: {0, 1}}  # vCPU 1 is back, and pinned
    vmkit("set", "deb", "--cpu-pin", "none")  # unpinned again, for the tests after this one

    # a reboot inside the same QEMU brings every vCPU it has online again, and vmkit says so
    vmkit("exec", "deb", "--", "systemctl", "reboot", check=False)
    deadline = time.monotonic() + 300
    while json.loads(vmkit("stats", "deb", "--json").stdout)["vcpus_offlined"] != 0:  # QEMU's RESET came
        assert time.monotonic() < deadline, "no guest reset seen"
        time.sleep(1)
    while vmkit("exec", "deb", "--", "nproc", check=False).stdout.strip() != "3":
        assert time.monotonic() < deadline, "the rebooted guest did not answer with 3 CPUs"
        time.sleep(2)
    stats = json.loads(vmkit("stats", "deb", "--json").stdout)
    assert stats["vcpus_online"] == 3 and stats["vcpus"] == 2 and qemu_pid() == pid, stats

    # the next boot starts with vm.yaml's cpus: the vCPU that was offlined is gone for real
    vmkit("stop", "deb")
    assert "-smp 2,maxcpus=3" in vmkit("start", "deb", "--dry-run").stdout
    vmkit("start", "deb")
    assert guest("nproc") == "2"
    stats = json.loads(vmkit("stats", "deb", "--json").stdout)
    assert stats["vcpus_online"] == 2 and stats["vcpus"] == 2 and stats["vcpus_offlined"] == 0
    assert stats["max_cpus"] == 3
    assert yaml.safe_load((deb / "instances" / "deb" / "vm.yaml").read_text())["cpus"] == 2


def test_memtotal_follows_set_memory_up_and_down(deb: Path) -> None:
    booted = mem_total()
    assert booted <= 1024 * MiB
    out = vmkit("set", "deb", "--memory", "2G").stdout
    assert "2048 MiB of memory" in out, out
    took = seen(lambda: mem_total() - booted >= 1000 * MiB, "1 GiB more")
    print(f"1G -> 2G: MemTotal after {took:.1f} s")
    stats = json.loads(vmkit("stats", "deb", "--json").stdout)
    assert stats["memory_plugged_bytes"] == 1024 * MiB and stats["max_memory_bytes"] == 2048 * MiB

    out = vmkit("set", "deb", "--memory", "1280M", "--timeout", "30").stdout
    plugged = json.loads(vmkit("stats", "deb", "--json").stdout)["memory_plugged_bytes"]
    assert plugged == 256 * MiB, out  # the guest onlined it movable: it can give it all back
    took = seen(lambda: mem_total() - booted <= 300 * MiB, "the memory gone")
    print(f"2G -> 1.25G: MemTotal after {took:.1f} s")
    assert yaml.safe_load((deb / "instances" / "deb" / "vm.yaml").read_text())["plugged_memory"] == "256M"
    # the guest keeps working with what it has
    assert guest("sh", "-c", "head -c 200000000 /dev/zero | tail -c 1 | wc -c") == "1"


def test_save_and_restore_keep_the_vcpus_and_plugged_memory(deb: Path) -> None:
    """A state saved after live changes restores into a QEMU with the same vCPUs and virtio-mem device
    (vm.yaml has them), and the guest still sees what it had; the new process can add vCPUs again."""
    vmkit("set", "deb", "--memory", "1536M", "--timeout", "30")
    cpus, total = guest("nproc"), mem_total()
    assert cpus == "2"
    vmkit("stop", "deb", "--save")
    assert "resumed from" in vmkit("start", "deb").stdout
    assert guest("nproc") == cpus and mem_total() == total
    stats = json.loads(vmkit("stats", "deb", "--json").stdout)
    assert stats["memory_plugged_bytes"] == 512 * MiB and stats["vcpus_online"] == int(cpus)
    vmkit("set", "deb", "--cpus", "3")
    seen(lambda: guest("nproc") == "3", "3 CPUs after the restore")
