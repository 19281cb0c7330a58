"""Real cgroups on this host (v1 here; see tests/unit/test_cgroups.py for v2 against a fake tree) with micro
guests: the machine's cgroup exists with its limits while it runs and holds QEMU and its helpers, `vmkit set`
changes the limits live (vm.yaml and the events follow), a cpu_max of 50 % holds a busy guest well below a
whole core (measured with the cgroup's own CPU accounting), bad input is refused naming the option, and the
cgroup is gone after a stop and, after the supervisor was SIGKILLed, at the next start (which says so)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import follow_events, pid_alive, vmkit, wait_until
from vmkit.host import cgroups
from vmkit.host.images.store import Image

pytestmark = pytest.mark.integration

DRIVER = cgroups.detect()
needs_cgroups = pytest.mark.skipif(DRIVER is None or not DRIVER.controllers or os.geteuid() != 0,
                                   reason="needs cgroup controllers and root")


def stats(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(vmkit("stats", name, "--json").stdout)
    return data


def group_of(name: str) -> str:
    """The machine's cgroup, relative (vmkit/<name>, or vmkit/<name>-2 if another home runs that name)."""
    path = stats(name)["cgroup"]
    assert isinstance(path, str)
    return "/".join(Path(path).parts[-2:])


def supervisor_pid(home: Path, name: str) -> int:
    return int(json.loads((home / "instances" / name / "state.json").read_text())["supervisor_pid"])


def cpu_usage_s(rel: str) -> float:
    assert DRIVER is not None
    usage = DRIVER.cpu_usage_ns(rel)
    assert usage is not None
    return usage / 1e9


@needs_cgroups
def test_cgroup_holds_qemu_and_helpers_with_limits_live(vmkit_home: Path, micro_full_image: Image,
                                                        tmp_path: Path) -> None:
    assert DRIVER is not None
    src = tmp_path / "src"
    src.mkdir()
    vmkit("create", "cgbox", "--image", "micro-full", "--memory", "256M", "--mount", f"{src}:/mnt/src",
          "--cpu-weight", "300", "--memory-max", "768M", "--memory-min", "128M")
    vmkit("start", "cgbox")
    events = follow_events("cgbox")  # subscribed: nothing after is missed
    try:
        rel = group_of("cgbox")
        assert rel.startswith("vmkit/cgbox")
        for d in DRIVER.dirs(rel):
            assert d.is_dir(), d
        status = json.loads((vmkit_home / "instances" / "cgbox" / "state.json").read_text())
        members = DRIVER.pids(rel)
        assert status["qemu_pid"] in members
        helpers = [p for p in members if p != status["qemu_pid"]]
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in helpers}
        assert any("virtiofsd" in n for n in names), names  # the share's helper joined too
        assert status["supervisor_pid"] not in members  # the supervisor itself stays out
        files = stats("cgbox")["cgroup_files"]
        assert files["cpu.shares"] == str(300 * 1024 // 100)
        assert files["memory.limit_in_bytes"] == str(768 << 20)
        assert files["memory.soft_limit_in_bytes"] == str(128 << 20)

        # live changes: the kernel, vm.yaml and the events follow
        changed = vmkit("set", "cgbox", "--cpu-pin", "1", "--cpu-max", "150", "--memory-max", "none")
        assert "live in" in changed.stdout and "vCPU0->1" in changed.stdout, changed.stdout
        now = stats("cgbox")
        assert now["limits"]["cpu_pin"] == "1" and now["limits"]["cpu_max"] == 150
        assert now["limits"]["memory_max"] is None and now["limits"]["cpu_weight"] == 300
        assert now["cgroup_files"]["cpu.cfs_quota_us"] == "150000"
        assert now["cgroup_files"]["cpuset.cpus"] == "1"
        assert int(now["cgroup_files"]["memory.limit_in_bytes"]) > 1 << 60  # unlimited again
        yaml_text = (vmkit_home / "instances" / "cgbox" / "vm.yaml").read_text()
        assert "cpu_max: 150" in yaml_text and "cpu_pin: '1'" in yaml_text
        qemu = status["qemu_pid"]
        for task in Path(f"/proc/{qemu}/task").iterdir():
            allowed = [ln for ln in (task / "status").read_text().splitlines() if ln.startswith("Cpus_allowed_list")]
            assert allowed[0].split()[-1] == "1", (task, allowed)

        # refusals name the option and change nothing
        for args, option, words in (
                (["--cpu-pin", "0-63"], "--cpu-pin", "has no CPU"),
                (["--memory-max", "300M"], "--memory-max", "at least 384M"),
                (["--memory-min", "1G", "--memory-max", "512M"], "--memory-min", "at most the memory_max"),
                (["--cpu-max", "0"], "--cpu-max", "greater than or equal to 1"),
                (["--cpu-weight", "20000"], "--cpu-weight", "10000"),
                (["--swap-max", "lots"], "--swap-max", "not a size")):
            bad = vmkit("set", "cgbox", *args, check=False)
            assert bad.returncode == 2 and option in bad.stderr and words in bad.stderr, (args, bad.stderr)
        assert stats("cgbox")["limits"] == now["limits"]

        vmkit("stop", "cgbox", "--force")
        out, _ = events.communicate(timeout=30)
    finally:
        events.kill()
        events.wait()
    changes = [e for e in map(json.loads, out.splitlines()) if e["kind"] == "limits-changed"]
    assert changes and changes[-1]["detail"]["limits"]["cpu_max"] == 150, out[-2000:]
    assert not any(d.exists() for d in DRIVER.dirs(rel)), "the cgroup outlived the machine"


@needs_cgroups
def test_cpu_max_holds_a_busy_guest_and_sigkill_leaves_nothing(vmkit_home: Path, micro_image: Image) -> None:
    assert DRIVER is not None
    vmkit("create", "cgbusy", "--image", "micro", "--memory", "128M", "--run", "while :; do :; done")
    vmkit("start", "cgbusy")
    rel = group_of("cgbusy")
    vmkit("set", "cgbusy", "--cpu-max", "50")
    start_usage, start = cpu_usage_s(rel), time.monotonic()
    time.sleep(6)
    share = (cpu_usage_s(rel) - start_usage) / (time.monotonic() - start)
    print(f"busy guest under cpu_max 50 %: {100 * share:.1f} % of a core")
    assert 0.05 < share < 0.75, share  # capped: well below a whole core, and it does run
    steal = stats("cgbusy")["steal_percent"]
    assert isinstance(steal, float) and steal > 10, steal  # throttled time is waiting time

    # the supervisor dies: QEMU follows (pdeathsig); the empty cgroup is removed at the next start
    sup = supervisor_pid(vmkit_home, "cgbusy")
    qemu = json.loads((vmkit_home / "instances" / "cgbusy" / "state.json").read_text())["qemu_pid"]
    os.kill(sup, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(qemu), 15)
    # QEMU's leader turns zombie before its TCG threads finish exiting; cgroup.procs lists it until then
    assert wait_until(lambda: not DRIVER.pids(rel), 15), DRIVER.pids(rel)
    assert DRIVER.exists(rel)  # left behind, empty
    vmkit("create", "cgnext", "--image", "micro", "--memory", "128M")
    started = vmkit("start", "cgnext")
    assert f"removed the stale empty cgroup {rel}" in started.stdout + started.stderr, started
    assert not DRIVER.exists(rel)
    vmkit("stop", "cgnext", "--force")


@needs_cgroups
def test_limits_of_a_stopped_machine_apply_at_its_next_start(vmkit_home: Path, micro_image: Image) -> None:
    assert DRIVER is not None
    vmkit("create", "cgcold", "--image", "micro", "--memory", "128M")
    later = vmkit("set", "cgcold", "--cpu-max", "25", "--cpu-weight", "50")
    assert "at its next start" in later.stdout
    bad = vmkit("create", "cgbad", "--image", "micro", "--memory", "512M", "--memory-max", "256M", check=False)
    assert bad.returncode == 2 and "memory_max" in bad.stderr and "at least 640M" in bad.stderr, bad.stderr
    assert not (vmkit_home / "instances" / "cgbad").exists()
    vmkit("start", "cgcold")
    files = stats("cgcold")["cgroup_files"]
    assert files["cpu.cfs_quota_us"] == "25000" and files["cpu.shares"] == "512"
    vmkit("stop", "cgcold", "--force")


@needs_cgroups
def test_machines_started_at_once_each_get_their_cgroup(vmkit_home: Path, micro_image: Image) -> None:
    """Starts take the vmkit parent's lock only until their first child is in: concurrent starts all work,
    and none cleans away another's new, still empty cgroup."""
    assert DRIVER is not None
    names = ("cgpar1", "cgpar2", "cgpar3")
    for n in names:
        vmkit("create", n, "--image", "micro", "--memory", "128M")
    starts = [subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "start", n], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for n in names]
    for p in starts:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (out, err)
    for n in names:
        qemu = json.loads((vmkit_home / "instances" / n / "state.json").read_text())["qemu_pid"]
        assert qemu in DRIVER.pids(group_of(n))
    for n in names:
        vmkit("stop", n, "--force")
