"""Unit tests: the cgroup drivers against fake cgroupfs trees (v1 per-controller, v2 unified), with golden
files of what gets written (``tests/unit/golden/cgroups-*.txt``; ``VMKIT_UPDATE_GOLDEN=1`` regenerates them),
detection, stale cleaning, name escaping, the limits' checks, steal arithmetic, and children joining a
cgroup before they execute (a real ``/bin/sh`` writing into a file that stands for ``cgroup.procs``).

The fake kernel (:class:`FakeKernel`) does what cgroupfs does and a plain directory does not: ``mkdir``
fills the new group with its control files (defaults as the kernel shows them), ``rmdir`` removes a group
with its files unless a process is in it (EBUSY), ``cgroup.subtree_control`` takes ``+controller``, and
every write is recorded, in order, for the golden files.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmkit.config import Limits, parse_config, parse_cpu_list
from vmkit.errors import ConfigError, HostError
from vmkit.host import cgroups
from vmkit.host.doctor import cgroup_check
from vmkit.runtime import proc
from vmkit.runtime.vcputhreads import StealMeter, steal_percent

GOLDEN = Path(__file__).parent / "golden"
UNLIMITED = "9223372036854771712"

V1_FILES = {
    "cpu": {"cpu.shares": "1024", "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1"},
    "cpuacct": {"cpuacct.usage": "0"},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": "", "cpuset.effective_cpus": ""},
    "memory": {"memory.soft_limit_in_bytes": UNLIMITED, "memory.limit_in_bytes": UNLIMITED,
               "memory.memsw.limit_in_bytes": UNLIMITED},
}
V2_FILES = {"memory.min": "0", "memory.high": "max", "memory.max": "max", "memory.swap.max": "max",
            "cpu.weight": "100", "cpu.max": "max 100000", "cpuset.cpus": "", "cpu.stat": "usage_usec 0",
            "cgroup.subtree_control": "", "cgroup.controllers": "cpuset cpu memory"}


class FakeKernel:
    """cgroupfs semantics for directories under ``root`` (see the module's docstring)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.writes: list[str] = []
        self.memsw = True
        real_mkdir, real_rmdir, real_write = Path.mkdir, Path.rmdir, Path.write_text
        kernel = self

        def mkdir(path: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
            real_mkdir(path, mode, parents, exist_ok)
            if kernel.inside(path):
                kernel.populate(path)

        def rmdir(path: Path) -> None:
            if not kernel.inside(path):
                return real_rmdir(path)
            if not path.is_dir():
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
            if (path / "cgroup.procs").read_text().split() or any(p.is_dir() for p in path.iterdir()):
                raise OSError(errno.EBUSY, "Device or resource busy", str(path))
            shutil.rmtree(path)
            return None

        def write_text(path: Path, data: str, *args: Any, **kwargs: Any) -> int:
            if not kernel.inside(path):
                return real_write(path, data, *args, **kwargs)
            kernel.writes.append(f"{path.relative_to(kernel.root)} = {data}")
            if path.name == "cgroup.subtree_control":
                have = set(path.read_text().split()) | {data.removeprefix("+")}
                data = " ".join(sorted(have))
            return real_write(path, data, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        monkeypatch.setattr(Path, "rmdir", rmdir)
        monkeypatch.setattr(Path, "write_text", write_text)

    def inside(self, path: Path) -> bool:
        return path != self.root and self.root in path.parents

    def populate(self, path: Path) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class FakeV1(FakeKernel):
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, *, memsw: bool = True) -> None:
        super().__init__(root, monkeypatch)
        self.memsw = memsw
        for ctrl, files in V1_FILES.items():
            d = root / ctrl
            d.mkdir(parents=True)
            self._files(d, ctrl, files)
        (root / "cpuset" / "cpuset.cpus").write_text("0-3")
        (root / "cpuset" / "cpuset.effective_cpus").write_text("0-3")
        (root / "cpuset" / "cpuset.mems").write_text("0")
        self.writes.clear()

    def _files(self, d: Path, ctrl: str, files: dict[str, str]) -> None:
        for name, value in files.items():
            if name.startswith("memory.memsw") and not self.memsw:
                continue
            (d / name).open("w").write(value)  # the kernel's defaults: not recorded as writes
        (d / "cgroup.procs").open("w").write("")

    def populate(self, path: Path) -> None:
        ctrl = path.relative_to(self.root).parts[0]
        if ctrl in V1_FILES:
            self._files(path, ctrl, V1_FILES[ctrl])

    def mounts(self) -> str:
        lines = [f"cgroup {self.root / c} cgroup rw,relatime,{c} 0 0" for c in V1_FILES]
        return "\n".join(["tmpfs /sys/fs/cgroup tmpfs rw 0 0", *lines,
                          f"cgroup2 {self.root / 'unified'} cgroup2 rw,relatime 0 0"]) + "\n"


class FakeV2(FakeKernel):
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(root, monkeypatch)
        root.mkdir(parents=True)
        for name, value in V2_FILES.items():
            (root / name).open("w").write(value)
        (root / "cpuset.cpus.effective").open("w").write("0-7")
        (root / "cgroup.procs").open("w").write("1\n")
        for name in ("memory.min", "memory.high", "memory.max", "memory.swap.max", "cpu.weight", "cpu.max"):
            (root / name).unlink()  # the root cgroup has none of these

    def populate(self, path: Path) -> None:
        for name, value in V2_FILES.items():
            (path / name).open("w").write(value)
        (path / "cgroup.procs").open("w").write("")

    def mounts(self) -> str:
        return f"cgroup2 {self.root} cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"


def check_golden(name: str, lines: list[str]) -> None:
    path = GOLDEN / f"cgroups-{name}.txt"
    text = "".join(f"{ln}\n" for ln in lines)
    if os.environ.get("VMKIT_UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    assert path.is_file(), f"{path} is missing: run with VMKIT_UPDATE_GOLDEN=1 to create it"
    assert lines == path.read_text().splitlines(), f"writes differ from {path} (VMKIT_UPDATE_GOLDEN=1 regenerates it)"


FULL = Limits(cpu_weight=200, cpu_max=50, cpu_pin="1-2", memory_min=256 << 20, memory_high=768 << 20,
              memory_max=1 << 30, swap_max=512 << 20)


# -- detection --------------------------------------------------------------------------------------------
def test_hybrid_host_is_v1_and_unified_with_controllers_is_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = FakeV1(tmp_path / "v1", monkeypatch)
    (tmp_path / "v1" / "unified").mkdir()
    (tmp_path / "v1" / "unified" / "cgroup.controllers").open("w").write("")  # hybrid: v2 without controllers
    driver = cgroups.detect(v1.mounts())
    assert isinstance(driver, cgroups.V1Driver) and driver.version == 1
    assert driver.controllers == ("cpu", "cpuacct", "cpuset", "memory")

    v2 = FakeV2(tmp_path / "v2", monkeypatch)
    driver2 = cgroups.detect(v2.mounts() + v1.mounts())
    assert isinstance(driver2, cgroups.V2Driver) and driver2.controllers == ("cpu", "cpuset", "memory")
    assert cgroups.detect("proc /proc proc rw 0 0\n") is None


def test_doctor_names_the_version_and_controllers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v2 = FakeV2(tmp_path / "v2", monkeypatch)
    check = cgroup_check(cgroups.detect(v2.mounts()))
    assert "v2 (unified)" in check.detail and "cpu, cpuset, memory" in check.detail
    v1 = FakeV1(tmp_path / "v1", monkeypatch, memsw=False)
    check1 = cgroup_check(cgroups.detect(v1.mounts()))
    assert "v1 (per-controller mounts)" in check1.detail and "no swap accounting" in check1.detail
    assert not cgroup_check(None).ok


# -- what gets written ------------------------------------------------------------------------------------
def test_v2_create_writes_every_limit_and_enables_controllers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeV2(tmp_path / "cg", monkeypatch)
    driver = cgroups.detect(kernel.mounts())
    assert driver is not None
    with cgroups.parent_lock(driver):
        group = cgroups.create(driver, "web", FULL)
    assert group.rel == "vmkit/web" and group.path == str(tmp_path / "cg" / "vmkit" / "web")
    check_golden("v2-create", kernel.writes)
    web = tmp_path / "cg" / "vmkit" / "web"
    assert (web / "memory.max").read_text() == str(1 << 30)
    assert (web / "cpu.max").read_text() == "50000 100000"
    assert (web / "cpu.weight").read_text() == "200"
    assert set((tmp_path / "cg" / "cgroup.subtree_control").read_text().split()) == {"cpu", "cpuset", "memory"}
    assert set((tmp_path / "cg" / "vmkit" / "cgroup.subtree_control").read_text().split()) == {
        "cpu", "cpuset", "memory"}

    kernel.writes.clear()
    group.apply(Limits())  # every limit removed: the defaults again
    check_golden("v2-clear", kernel.writes)
    assert (web / "memory.max").read_text() == "max" and (web / "cpu.max").read_text() == "max 100000"


def test_v1_create_copies_cpuset_and_orders_memsw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeV1(tmp_path / "cg", monkeypatch)
    driver = cgroups.detect(kernel.mounts())
    assert driver is not None
    with cgroups.parent_lock(driver):
        group = cgroups.create(driver, "web", FULL)
    check_golden("v1-create", kernel.writes)
    root = tmp_path / "cg"
    assert (root / "cpuset" / "vmkit" / "cpuset.cpus").read_text() == "0-3"  # the parent got the root's
    assert (root / "cpuset" / "vmkit" / "web" / "cpuset.cpus").read_text() == "1-2"
    assert (root / "cpuset" / "vmkit" / "web" / "cpuset.mems").read_text() == "0"
    assert (root / "cpu" / "vmkit" / "web" / "cpu.shares").read_text() == "2048"
    assert (root / "cpu" / "vmkit" / "web" / "cpu.cfs_quota_us").read_text() == "50000"
    mem = root / "memory" / "vmkit" / "web"
    assert (mem / "memory.limit_in_bytes").read_text() == str(1 << 30)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str((1 << 30) + (512 << 20))
    assert (mem / "memory.soft_limit_in_bytes").read_text() == str(768 << 20)  # high wins over min on v1
    assert group.path == str(mem)

    # raising the memory limit above the memory+swap limit in force: memsw must go first
    kernel.writes.clear()
    group.apply(FULL.model_copy(update={"memory_max": 4 << 30}))
    assert [w.split(" = ")[0].rsplit("/", 1)[1] for w in kernel.writes[:3]] == [
        "memory.soft_limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
    # lowering it: the memory limit first
    kernel.writes.clear()
    group.apply(FULL)
    assert [w.split(" = ")[0].rsplit("/", 1)[1] for w in kernel.writes[:3]] == [
        "memory.soft_limit_in_bytes", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]


def test_plans_are_pure() -> None:
    assert [str(w) for w in cgroups.plan_v2(Limits(cpu_max=150))][5] == "cpu.max=150000 100000"
    v1 = cgroups.plan_v1(Limits(memory_min=100 << 20), parent_cpus="0-1", memsw=False)
    assert [str(w) for w in v1] == ["memory.soft_limit_in_bytes=104857600", "memory.limit_in_bytes=-1",
                                    "cpu.shares=1024", "cpu.cfs_period_us=100000", "cpu.cfs_quota_us=-1",
                                    "cpuset.cpus=0-1"]
    assert cgroups.shares_from_weight(1) == 10 and cgroups.shares_from_weight(10000) == 102400


# -- refusals ---------------------------------------------------------------------------------------------
def test_host_checks_name_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeV1(tmp_path / "cg", monkeypatch, memsw=False)
    driver = cgroups.detect(kernel.mounts())
    assert driver is not None
    with pytest.raises(ConfigError) as exc:
        driver.check(Limits(cpu_pin="2-5", cpu_max=900, swap_max=1 << 30), prefix="--")
    fields = {p.field: p.message for p in exc.value.problems}
    assert "no CPU 4-5" in fields["--cpu-pin"] and "0-3" in fields["--cpu-pin"]
    assert "at most 400" in fields["--cpu-max"]
    assert "swapaccount=1" in fields["--swap-max"]
    kernel2 = FakeV1(tmp_path / "cg2", monkeypatch)
    driver2 = cgroups.detect(kernel2.mounts())
    assert driver2 is not None
    with pytest.raises(ConfigError, match="memory_max too"):
        driver2.check(Limits(swap_max=1 << 30))
    with cgroups.parent_lock(driver2), pytest.raises(ConfigError):
        cgroups.create(driver2, "bad", Limits(cpu_pin="9"))
    assert not (tmp_path / "cg2" / "cpu" / "vmkit" / "bad").exists()  # nothing left behind


def test_limits_problems_and_parsing() -> None:
    probs = Limits(memory_min=2 << 30, memory_max=1 << 30).problems(512 << 20)
    assert [p.field for p in probs] == ["limits.memory_min"]
    low = Limits(memory_max=600 << 20).problems(512 << 20)
    assert low and "at least 640M" in low[0].message
    assert Limits(memory_max=640 << 20).problems(512 << 20) == []
    assert Limits(cpu_pin="3,0-1,1").cpu_pin == "0-1,3"
    for bad in ("", "a", "1-", "0,,1", "3-1"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)
    cfg = parse_config({"name": "x", "boot": {"kernel": "/k"}, "memory": "512M",
                        "limits": {"memory_max": "256M", "cpu_weight": 300}})
    assert [p.field for p in cfg.validate(host=False)] == ["limits.memory_max"]
    with pytest.raises(ConfigError):
        parse_config({"name": "x", "boot": {"kernel": "/k"}, "limits": {"cpu_weight": 0}})
    with pytest.raises(ConfigError):
        parse_config({"name": "x", "boot": {"kernel": "/k"}, "limits": {"cpu_max": True}})

    assert cgroups.parse_limit_changes({"cpu_max": "50", "memory_max": "1G", "cpu_pin": "none"}) == {
        "cpu_max": 50, "memory_max": 1 << 30, "cpu_pin": None}
    with pytest.raises(ConfigError) as exc:
        cgroups.parse_limit_changes({"cpu_weight": "heavy", "memory_high": "lots", "cpus": "2"})
    assert [p.field for p in exc.value.problems] == ["cpu_weight", "memory_high", "cpus"]
    assert cgroups.option_name("limits.swap_max") == "--swap-max" and cgroups.option_name("name") == "name"


def test_names_are_escaped_or_refused() -> None:
    assert cgroups.escape_name("web") == "web"
    assert cgroups.escape_name("tasks") == "_tasks"
    assert cgroups.escape_name("cpu.shares") == "_cpu.shares"
    assert cgroups.escape_name("cgroup.procs") == "_cgroup.procs"
    assert cgroups.escape_name("web.example") == "web.example"
    for bad in ("..", "a/b", "", "x\n", "a b"):
        with pytest.raises(ConfigError):
            cgroups.escape_name(bad)


# -- life of a machine's cgroup ---------------------------------------------------------------------------
def test_stale_groups_are_cleaned_and_busy_names_get_a_suffix(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeV2(tmp_path / "cg", monkeypatch)
    driver = cgroups.detect(kernel.mounts())
    assert driver is not None
    with cgroups.parent_lock(driver):
        live = cgroups.create(driver, "web", Limits())
        stale = cgroups.create(driver, "old", Limits())
    (tmp_path / "cg" / "vmkit" / "web" / "cgroup.procs").open("w").write("4242\n")  # a running machine
    assert stale.pids() == set() and live.pids() == {4242}
    with cgroups.parent_lock(driver):
        assert cgroups.clean_stale(driver) == ["vmkit/old"]
        other = cgroups.create(driver, "web", Limits())  # another home's machine of the same name
    assert other.rel == "vmkit/web-2"
    with pytest.raises(HostError, match="still in it"):
        driver.rmdir(live.rel, wait=0.1)
    (tmp_path / "cg" / "vmkit" / "web" / "cgroup.procs").open("w").write("")
    live.remove()
    other.remove()
    assert driver.children(cgroups.PARENT) == []


def test_the_parent_lock_excludes_a_second_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeV2(tmp_path / "cg", monkeypatch)
    driver = cgroups.detect(kernel.mounts())
    assert driver is not None
    with cgroups.parent_lock(driver), pytest.raises(HostError, match="stayed locked"):
        cgroups.lock_parent(driver, timeout=0.2)
    os.close(cgroups.lock_parent(driver, timeout=0.2))


# -- children join before they execute --------------------------------------------------------------------
def test_children_write_their_own_pid_before_exec(tmp_path: Path) -> None:
    procs = [tmp_path / "a.procs", tmp_path / "with space.procs"]
    for p in procs:
        p.write_text("")
    proc.place_children([str(p) for p in procs])
    try:
        argv = proc.owned(["sh", "-c", "echo $$"])
    finally:
        proc.place_children(())
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    pid = out.stdout.strip()
    assert [p.read_text().strip() for p in procs] == [pid, pid]  # exec kept the pid that joined
    assert proc.owned(["true"])[0].endswith("setpriv")  # no cgroup: unchanged

    proc.place_children([str(tmp_path / "missing-dir" / "cgroup.procs")])
    try:
        failed = subprocess.run(proc.owned(["true"]), capture_output=True, text=True)
    finally:
        proc.place_children(())
    assert failed.returncode == 126 and "cannot join the cgroup" in failed.stderr


# -- steal ------------------------------------------------------------------------------------------------
def test_steal_is_the_average_wait_over_wall_time() -> None:
    before = {10: 0, 11: 5_000_000_000}
    after = {10: 500_000_000, 11: 5_250_000_000, 12: 9}
    assert steal_percent(before, after, 1.0) == 37.5  # (0.5 + 0.25) / (1 s x 2 vCPUs)
    assert steal_percent({}, after, 1.0) == 0.0
    assert steal_percent(before, after, 0) == 0.0


def test_steal_meter_reads_real_schedstat() -> None:
    pid = os.getpid()
    meter = StealMeter(interval=0.05)
    value = asyncio.run(meter.percent(pid, [pid]))
    assert 0.0 <= value <= 100.0


def test_the_parent_weighs_as_much_as_its_machines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeV1(tmp_path / "cg", monkeypatch)
    driver = cgroups.detect(kernel.mounts())
    assert driver is not None
    parent = tmp_path / "cg" / "cpu" / "vmkit" / "cpu.shares"
    with cgroups.parent_lock(driver):
        a = cgroups.create(driver, "a", Limits(cpu_weight=200))
        b = cgroups.create(driver, "b", Limits())
    assert parent.read_text() == str(2048 + 1024)
    b.apply(Limits(cpu_weight=50))
    assert parent.read_text() == str(2048 + 512)
    b.remove()
    assert parent.read_text() == "2048"
    a.remove()
    assert parent.read_text() == "1024"  # no machine: the default
