"""Each running machine's cgroup: reservations, limits, CPU weight, cap and pinning (cgroup v1 and v2).

One interface, two drivers, as libvirt's ``vircgroupv1.c`` and ``vircgroupv2.c``: :func:`detect`
picks v2 when a ``cgroup2`` mount has controllers (a unified host, typical Debian with systemd),
else the v1 per-controller mounts (a hybrid host such as one without systemd, whose v2 mount has
no controllers, is v1).

Every machine's QEMU and its helpers (virtiofsd, sftp-server, ssh) run in ``vmkit/<name>`` under
the root of each hierarchy (v2: one tree; v1: the same path under ``cpu``, ``cpuacct``, ``cpuset``
and ``memory``). The supervisor creates it before QEMU starts (children join it before they
execute, see :func:`vmkit.runtime.proc.place_children`), writes the limits, and removes it when the
machine stops. A supervisor that was killed leaves an empty cgroup behind: the next start of any
machine removes every empty one under ``vmkit`` and says which. Creating, cleaning and the first
child joining happen under an ``flock`` on the ``vmkit`` directory (the supervisor releases it as
soon as a child is in), so a cleaner never removes a cgroup that another supervisor has just made.
A name taken by a live machine of another vmkit home gets ``-2``, ``-3``...; names that could be
mistaken for cgroup files (``tasks``, ``cpu.x``, ``cgroup.x``) are prefixed with ``_`` (as libvirt
escapes them).

What each setting becomes:

============  ==========================  ===========================================================
setting       v2                          v1
============  ==========================  ===========================================================
memory_min    memory.min                  memory.soft_limit_in_bytes (v1 has no reservation; the soft
                                          limit is where reclaim under host pressure stops first)
memory_high   memory.high                 memory.soft_limit_in_bytes (wins over memory_min)
memory_max    memory.max                  memory.limit_in_bytes
swap_max      memory.swap.max             memory.memsw.limit_in_bytes = memory_max + swap_max (memory
                                          and swap together; needs memory_max and swap accounting)
cpu_weight    cpu.weight (1-10000)        cpu.shares = weight x 1024 / 100 (the kernel's and systemd's
                                          scale: weight 100 = 1024 shares)
cpu_max       cpu.max "QUOTA 100000"      cpu.cfs_quota_us = QUOTA, cpu.cfs_period_us = 100000
cpu_pin       cpuset.cpus                 cpuset.cpus (and cpuset.mems, copied from the parent)
============  ==========================  ===========================================================

The ``vmkit`` parent weighs as much as its machines together (its ``cpu.shares`` or ``cpu.weight`` is
the sum of theirs, kept so as machines start, stop and change weight): otherwise all machines together
would get the CPU share of one process against the rest of the host (on v1 without systemd, every
other process at the root competes with the whole ``vmkit`` group).

An unset setting writes the controller's default (``max``, ``-1``, weight 100, the parent's CPUs),
so clearing a limit live works.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from vmkit.config import Limits, format_cpu_list, format_size, parse_cpu_list, parse_size
from vmkit.errors import ConfigError, HostError, Problem

log = logging.getLogger(__name__)

PARENT = "vmkit"
PERIOD_US = 100_000
"""The CFS period of ``cpu_max`` (100 ms, the kernel's default)."""
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory")
V2_CONTROLLERS = ("cpu", "cpuset", "memory")
_RESERVED = {"tasks", "notify_on_release", "release_agent", "cgroup"}
_CONTROLLER_NAMES = {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "io", "pids",
                     "net_cls", "net_prio", "perf_event", "hugetlb", "rdma", "misc", "cgroup"}
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,90}")


@dataclass(frozen=True)
class Write:
    """One value written to one cgroup file (``controller`` is the v1 hierarchy; ``""`` on v2)."""

    controller: str
    file: str
    value: str

    def __str__(self) -> str:
        return f"{self.file}={self.value}"


def escape_name(name: str) -> str:
    """The cgroup directory name for a machine: refused unless plain, ``_``-prefixed where it could be
    read as a cgroup file (libvirt's ``virCgroupPartitionEscape``)."""
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ConfigError.single("name", f"{name!r} cannot name a cgroup: use letters, digits, '.', '_', '-'")
    head = name.split(".", 1)[0]
    if name.startswith("_") or name in _RESERVED or ("." in name and head in _CONTROLLER_NAMES):
        return "_" + name
    return name


def shares_from_weight(weight: int) -> int:
    """cgroup v2 ``cpu.weight`` -> v1 ``cpu.shares`` (100 -> 1024), as the kernel and systemd scale it."""
    return max(2, round(weight * 1024 / 100))


def quota_us(percent: int) -> int:
    return percent * PERIOD_US // 100


# -- what gets written: pure functions (golden-tested) --------------------------------------------------
def plan_v2(limits: Limits) -> list[Write]:
    return [
        Write("", "memory.min", str(limits.memory_min or 0)),
        Write("", "memory.high", _max(limits.memory_high)),
        Write("", "memory.max", _max(limits.memory_max)),
        Write("", "memory.swap.max", _max(limits.swap_max)),
        Write("", "cpu.weight", str(limits.cpu_weight or 100)),
        Write("", "cpu.max", f"{quota_us(limits.cpu_max) if limits.cpu_max else 'max'} {PERIOD_US}"),
        Write("", "cpuset.cpus", limits.cpu_pin or ""),
    ]


def plan_v1(limits: Limits, *, parent_cpus: str, memsw: bool, current_memsw: int | None = None) -> list[Write]:
    """``current_memsw``: the memory+swap limit in force now, -1 or None for none (the order of the two
    memory writes depends on it: the kernel refuses a memory limit above the memory+swap limit)."""
    soft = limits.memory_high if limits.memory_high is not None else limits.memory_min
    limit = limits.memory_max if limits.memory_max is not None else -1
    writes = [Write("memory", "memory.soft_limit_in_bytes", str(soft if soft is not None else -1))]
    mem = Write("memory", "memory.limit_in_bytes", str(limit))
    if memsw:
        total = limit + limits.swap_max if limits.memory_max is not None and limits.swap_max is not None else -1
        sw = Write("memory", "memory.memsw.limit_in_bytes", str(total))
        # the kernel keeps memory limit <= memory+swap limit at every step
        def inf(v: int | None) -> float:
            return float("inf") if v is None or v == -1 else v
        writes += [mem, sw] if inf(limit) <= inf(current_memsw) else [sw, mem]
    else:
        writes.append(mem)
    writes += [
        Write("cpu", "cpu.shares", str(shares_from_weight(limits.cpu_weight or 100))),
        Write("cpu", "cpu.cfs_period_us", str(PERIOD_US)),
        Write("cpu", "cpu.cfs_quota_us", str(quota_us(limits.cpu_max) if limits.cpu_max else -1)),
        Write("cpuset", "cpuset.cpus", limits.cpu_pin or parent_cpus),
    ]
    return writes


def _max(value: int | None) -> str:
    return "max" if value is None else str(value)


# -- the drivers -----------------------------------------------------------------------------------------
class Driver(ABC):
    """One cgroup hierarchy layout. Paths given to methods are relative (``vmkit/web``)."""

    version: ClassVar[int]

    @property
    @abstractmethod
    def controllers(self) -> tuple[str, ...]:
        """The controllers vmkit can use here (of cpu, cpuacct, cpuset, memory)."""

    @abstractmethod
    def dirs(self, rel: str) -> list[Path]:
        """Every directory of cgroup ``rel`` (one per hierarchy)."""

    @abstractmethod
    def _file(self, controller: str, rel: str, name: str) -> Path: ...

    @abstractmethod
    def _prepare(self, rel: str, *, parent: str) -> None:
        """Make directory ``rel`` usable (v1 cpuset: copy cpus and mems; v2: enable controllers)."""

    @abstractmethod
    def plan(self, rel: str, limits: Limits) -> list[Write]: ...

    @abstractmethod
    def host_cpus(self) -> tuple[int, ...]: ...

    @abstractmethod
    def swap_accounting(self) -> bool: ...

    @abstractmethod
    def cpu_usage_ns(self, rel: str) -> int | None: ...

    def mkdir(self, rel: str, *, parent: str = "") -> None:
        made: list[Path] = []
        try:
            for d in self.dirs(rel):
                try:
                    d.mkdir()
                    made.append(d)
                except FileExistsError:
                    continue
            self._prepare(rel, parent=parent)
        except OSError as exc:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise HostError(f"cannot create the cgroup {rel}: {exc.strerror} ({exc.filename})",
                            hint="vmkit needs root for cgroup limits; see `vmkit doctor`") from None

    def exists(self, rel: str) -> bool:
        return any(d.is_dir() for d in self.dirs(rel))

    def pids(self, rel: str) -> set[int]:
        out: set[int] = set()
        for d in self.dirs(rel):
            with contextlib.suppress(FileNotFoundError):
                out.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return out

    def procs_files(self, rel: str) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs(rel)]

    def children(self, rel: str) -> list[str]:
        names: set[str] = set()
        for d in self.dirs(rel):
            with contextlib.suppress(FileNotFoundError):
                names.update(p.name for p in d.iterdir() if p.is_dir())
        return sorted(names)

    def rmdir(self, rel: str, *, wait: float = 5.0) -> None:
        """Remove cgroup ``rel`` in every hierarchy, waiting up to ``wait`` s for exiting processes."""
        deadline = time.monotonic() + wait
        for d in self.dirs(rel):
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        raise HostError(f"cannot remove the cgroup {d}: {exc.strerror}",
                                        hint="a process is still in it: see its cgroup.procs") from None
                    time.sleep(0.05)

    def read(self, controller: str, rel: str, name: str) -> str | None:
        try:
            return self._file(controller, rel, name).read_text().strip()
        except FileNotFoundError:
            return None

    def write(self, rel: str, writes: list[Write]) -> list[Write]:
        """Write each value in order; the ones for controllers vmkit cannot use here are skipped.
        Returns what was written."""
        done = []
        for w in writes:
            if w.controller and w.controller not in self.controllers:
                continue
            path = self._file(w.controller, rel, w.file)
            if not path.exists():
                continue  # e.g. memory.swap.max without swap accounting: refused earlier when it matters
            try:
                path.write_text(w.value)
            except OSError as exc:
                raise HostError(f"the kernel refused {w.file}={w.value} for cgroup {rel}: {exc.strerror}",
                                hint=f"see {path}") from None
            done.append(w)
        return done

    def check(self, limits: Limits, *, prefix: str = "") -> None:
        """Refuse what this host cannot do, naming the setting (``prefix``: ``--`` for command-line
        options, else the vm.yaml field)."""
        def name(field: str) -> str:
            return f"--{field.replace('_', '-')}" if prefix == "--" else f"{prefix}{field}"

        problems = []
        if limits.cpu_pin is not None:
            have = self.host_cpus()
            missing = [c for c in limits.cpus if c not in have]
            if missing:
                problems.append((name("cpu_pin"), f"this host has no CPU {format_cpu_list(missing)}: use CPUs "
                                 f"of {format_cpu_list(have)}"))
        if limits.cpu_max is not None and limits.cpu_max > 100 * len(self.host_cpus()):
            problems.append((name("cpu_max"), f"{limits.cpu_max} % is more than this host's "
                             f"{len(self.host_cpus())} CPUs can give: give at most {100 * len(self.host_cpus())}"))
        if limits.swap_max is not None:
            if not self.swap_accounting():
                problems.append((name("swap_max"), "this host's kernel does not account swap per cgroup "
                                 "(v1: boot with swapaccount=1; v2: memory.swap.max missing): leave it unset"))
            elif self.version == 1 and limits.memory_max is None:
                problems.append((name("swap_max"), "cgroup v1 limits memory and swap together: give "
                                 "memory_max too"))
        wanted = {"cpu_weight": "cpu", "cpu_max": "cpu", "cpu_pin": "cpuset", "memory_min": "memory",
                  "memory_high": "memory", "memory_max": "memory", "swap_max": "memory"}
        for field, ctrl in wanted.items():
            if getattr(limits, field) is not None and ctrl not in self.controllers:
                problems.append((name(field), f"the {ctrl} cgroup controller is not available here: "
                                 "leave it unset (see `vmkit doctor`)"))
        if problems:
            raise ConfigError([Problem(f, m) for f, m in problems])

    def apply(self, rel: str, limits: Limits) -> list[Write]:
        self.check(limits)
        return self.write(rel, self.plan(rel, limits))

    def describe(self) -> str:
        return f"cgroup v{self.version} ({', '.join(self.controllers) or 'no controllers'})"


class V1Driver(Driver):
    """Per-controller hierarchies (``/sys/fs/cgroup/cpu``, ``.../memory`` ...)."""

    version = 1

    def __init__(self, mounts: dict[str, Path]) -> None:
        self.mounts = {c: p for c, p in mounts.items() if c in V1_CONTROLLERS}

    @property
    def controllers(self) -> tuple[str, ...]:
        return tuple(c for c in V1_CONTROLLERS if c in self.mounts)

    def dirs(self, rel: str) -> list[Path]:
        return [self.mounts[c] / rel for c in self.controllers]

    def _file(self, controller: str, rel: str, name: str) -> Path:
        return self.mounts[controller] / rel / name

    def _prepare(self, rel: str, *, parent: str) -> None:
        if "cpuset" in self.mounts:  # a v1 cpuset takes no task until it has CPUs and memory nodes
            for name in ("cpuset.mems", "cpuset.cpus"):
                path = self._file("cpuset", rel, name)
                if not path.read_text().strip():
                    path.write_text(self._file("cpuset", parent, name).read_text().strip())

    def plan(self, rel: str, limits: Limits) -> list[Write]:
        current = self.read("memory", rel, "memory.memsw.limit_in_bytes")
        return plan_v1(limits, parent_cpus=self._parent_cpus(rel), memsw=self.swap_accounting(),
                       current_memsw=_int_limit(current))

    def _parent_cpus(self, rel: str) -> str:
        parent = str(Path(rel).parent) if "/" in rel else ""
        return (self.read("cpuset", parent, "cpuset.cpus") or "") if "cpuset" in self.mounts else ""

    def host_cpus(self) -> tuple[int, ...]:
        text = self.read("cpuset", "", "cpuset.effective_cpus") or self.read("cpuset", "", "cpuset.cpus") \
            if "cpuset" in self.mounts else None
        return parse_cpu_list(text) if text else tuple(range(os.cpu_count() or 1))

    def swap_accounting(self) -> bool:
        return "memory" in self.mounts and self._file("memory", "", "memory.memsw.limit_in_bytes").exists()

    def cpu_usage_ns(self, rel: str) -> int | None:
        text = self.read("cpuacct", rel, "cpuacct.usage") if "cpuacct" in self.mounts else None
        return int(text) if text else None


class V2Driver(Driver):
    """The unified hierarchy (``/sys/fs/cgroup`` with ``cgroup.controllers``)."""

    version = 2

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def controllers(self) -> tuple[str, ...]:
        try:
            have = set((self.root / "cgroup.controllers").read_text().split())
        except FileNotFoundError:
            return ()
        return tuple(c for c in V2_CONTROLLERS if c in have)

    def dirs(self, rel: str) -> list[Path]:
        return [self.root / rel]

    def _file(self, controller: str, rel: str, name: str) -> Path:
        return self.root / rel / name

    def _prepare(self, rel: str, *, parent: str) -> None:
        # a child can use a controller only if its parent lists it in cgroup.subtree_control
        pdir = self.root / parent
        enabled = set((pdir / "cgroup.subtree_control").read_text().split())
        for c in self.controllers:
            if c not in enabled:
                (pdir / "cgroup.subtree_control").write_text(f"+{c}")

    def plan(self, rel: str, limits: Limits) -> list[Write]:
        return plan_v2(limits)

    def host_cpus(self) -> tuple[int, ...]:
        text = self.read("", "", "cpuset.cpus.effective")
        return parse_cpu_list(text) if text else tuple(range(os.cpu_count() or 1))

    def swap_accounting(self) -> bool:
        """The root has no memory.swap.max: look in its children (the ``vmkit`` parent first)."""
        if "memory" not in self.controllers:
            return False
        candidates = [self.root / PARENT, *(p for p in self.root.iterdir() if p.is_dir())]
        return any((d / "memory.swap.max").exists() for d in candidates)

    def cpu_usage_ns(self, rel: str) -> int | None:
        text = self.read("", rel, "cpu.stat")
        for line in (text or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) * 1000
        return None


def _int_limit(text: str | None) -> int | None:
    if text is None:
        return None
    value = int(text)
    return -1 if value >= (1 << 62) else value  # the kernel shows "unlimited" as a page-rounded LONG_MAX


# -- finding the hierarchies ----------------------------------------------------------------------------
def detect(mounts_text: str | None = None) -> Driver | None:
    """The cgroup layout of this host (``/proc/self/mounts``): v2 if a ``cgroup2`` mount has
    controllers, else v1 if any of cpu, cpuacct, cpuset, memory is mounted, else None."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    v1: dict[str, Path] = {}
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        where, fstype, options = Path(fields[1].replace("\\040", " ")), fields[2], fields[3].split(",")
        if fstype == "cgroup2":
            with contextlib.suppress(OSError):
                if set((where / "cgroup.controllers").read_text().split()) & {"cpu", "memory"}:
                    return V2Driver(where)
        elif fstype == "cgroup":
            for c in V1_CONTROLLERS:
                if c in options:
                    v1.setdefault(c, where)
    return V1Driver(v1) if v1 else None


# -- one machine's cgroup -------------------------------------------------------------------------------
@dataclass
class MachineCgroup:
    driver: Driver
    rel: str
    """``vmkit/<name>``, relative to each hierarchy's root."""

    @property
    def paths(self) -> list[str]:
        return [str(d) for d in self.driver.dirs(self.rel)]

    @property
    def path(self) -> str:
        """The directory to show: v2's one, v1's in the memory hierarchy (else the first)."""
        if isinstance(self.driver, V1Driver) and "memory" in self.driver.mounts:
            return str(self.driver.mounts["memory"] / self.rel)
        return str(self.driver.dirs(self.rel)[0])

    def apply(self, limits: Limits, *, balance: bool = True) -> list[Write]:
        """Write ``limits`` (after :meth:`Driver.check`); the parent's weight follows (see
        :func:`balance_parent`). Blocks while another supervisor holds the parent lock."""
        written = self.driver.apply(self.rel, limits)
        if not balance:
            return written
        with parent_lock(self.driver):
            balance_parent(self.driver)
        return written

    def pids(self) -> set[int]:
        return self.driver.pids(self.rel)

    def cpu_usage_ns(self) -> int | None:
        return self.driver.cpu_usage_ns(self.rel)

    def remove(self) -> None:
        """Remove the cgroup (its processes must have exited), and weigh the parent again."""
        self.driver.rmdir(self.rel)
        with contextlib.suppress(HostError, OSError), parent_lock(self.driver, timeout=5):
            balance_parent(self.driver)


def lock_parent(driver: Driver, *, timeout: float = 60.0) -> int:
    """Make the ``vmkit`` parent if missing and lock it (``flock``): creating, cleaning and the first
    child joining are never concurrent. Returns the lock's descriptor: close it to unlock. Blocks (up to
    ``timeout`` s): call it in a thread from async code."""
    driver.mkdir(PARENT)
    fd = os.open(driver.dirs(PARENT)[0], os.O_RDONLY | os.O_DIRECTORY)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise HostError(f"the cgroup {PARENT} stayed locked for {timeout:.0f} s",
                                hint="another vmkit supervisor is starting a machine; try again") from None
            time.sleep(0.05)


@contextlib.contextmanager
def parent_lock(driver: Driver, *, timeout: float = 60.0) -> Iterator[None]:
    """:func:`lock_parent` for the length of a ``with`` block."""
    fd = lock_parent(driver, timeout=timeout)
    try:
        yield
    finally:
        os.close(fd)


def balance_parent(driver: Driver) -> str | None:
    """Give the ``vmkit`` parent the CPU weight of its machines together (v1 ``cpu.shares``, v2
    ``cpu.weight``: the sum of its children's), so grouping the machines does not make them, together,
    weigh as little as one process against the rest of the host. Call with :func:`parent_lock` held.
    Returns the value written (None: no cpu controller)."""
    if "cpu" not in driver.controllers:
        return None
    name, default, low, high = ("cpu.shares", 1024, 2, 262144) if driver.version == 1 else \
        ("cpu.weight", 100, 1, 10000)
    total = 0
    for child in driver.children(PARENT):
        text = driver.read("cpu", f"{PARENT}/{child}", name)
        total += int(text) if text and text.isdigit() else default
    value = str(min(high, max(low, total or default)))
    driver.write(PARENT, [Write("cpu" if driver.version == 1 else "", name, value)])
    return value


def clean_stale(driver: Driver) -> list[str]:
    """Remove every empty cgroup under ``vmkit`` (left by supervisors that were killed); call with
    :func:`parent_lock` held. Returns the paths removed."""
    cleaned = []
    for child in driver.children(PARENT):
        rel = f"{PARENT}/{child}"
        if driver.pids(rel) or driver.children(rel):
            continue
        try:
            driver.rmdir(rel, wait=0)
        except HostError:
            continue  # a process joined meanwhile
        cleaned.append(rel)
    return cleaned


def create(driver: Driver, name: str, limits: Limits) -> MachineCgroup:
    """A new cgroup for machine ``name`` with ``limits`` written; call with :func:`parent_lock` held.
    On failure nothing is left behind."""
    driver.check(limits, prefix="limits.")
    base = escape_name(name)
    rel = f"{PARENT}/{base}"
    n = 1
    while driver.exists(rel):
        if not driver.pids(rel) and not driver.children(rel):
            break  # stale and empty: reuse it
        n += 1
        rel = f"{PARENT}/{base}-{n}"
    driver.mkdir(rel, parent=PARENT)
    group = MachineCgroup(driver, rel)
    try:
        group.apply(limits, balance=False)  # the caller holds the lock
        balance_parent(driver)
    except BaseException:
        with contextlib.suppress(HostError):
            group.remove()
        raise
    return group


def kernel_values(driver: Driver, rel: str) -> dict[str, str | None]:
    """What the kernel holds now for cgroup ``rel`` (file name -> content), for ``vmkit stats``."""
    files = {"memory": ("memory.soft_limit_in_bytes", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
             "cpu": ("cpu.shares", "cpu.cfs_quota_us", "cpu.cfs_period_us"), "cpuset": ("cpuset.cpus",)}
    if driver.version == 2:
        files = {"": ("memory.min", "memory.high", "memory.max", "memory.swap.max", "cpu.weight", "cpu.max",
                      "cpuset.cpus")}
    out: dict[str, str | None] = {}
    for ctrl, names in files.items():
        if ctrl and ctrl not in driver.controllers:
            continue
        for n in names:
            out[n] = driver.read(ctrl, rel, n)
    return out


def summary(limits: Limits) -> str:
    parts = []
    for field in type(limits).model_fields:
        value = getattr(limits, field)
        if value is None:
            continue
        if field.startswith(("memory", "swap")):
            value = format_size(value)
        parts.append(f"{field}={value}")
    return ", ".join(parts) or "none"


LIMIT_SIZES = ("memory_min", "memory_high", "memory_max", "swap_max")
LIMIT_INTS = ("cpu_weight", "cpu_max")


def parse_limit_changes(changes: dict[str, int | str | None]) -> dict[str, int | str | None]:
    """``{"cpu_max": "50", "memory_max": "1G", "cpu_pin": "none"}`` -> the API's values (bytes, ints;
    ``None`` or ``"none"`` removes that limit). Each problem names its field."""
    problems: list[Problem] = []
    out: dict[str, int | str | None] = {}
    for field, value in changes.items():
        if field not in Limits.model_fields:
            problems.append(Problem(field, f"not a limit: use one of {', '.join(Limits.model_fields)}"))
            continue
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            out[field] = None
            continue
        try:
            if field in LIMIT_SIZES:
                out[field] = parse_size(value)
            elif field in LIMIT_INTS:
                if isinstance(value, bool) or (isinstance(value, str) and not value.strip().isdigit()):
                    raise ValueError(f"{value!r} is not a whole number (or none to remove the limit)")
                out[field] = int(value)
            else:
                out[field] = str(value)
        except ValueError as exc:
            problems.append(Problem(field, str(exc)))
    if problems:
        raise ConfigError(problems)
    return out


def option_name(field: str) -> str:
    """A limit's command-line option (``cpu_max`` -> ``--cpu-max``); other fields as they are."""
    bare = field.removeprefix("limits.")
    return f"--{bare.replace('_', '-')}" if bare in Limits.model_fields else field
