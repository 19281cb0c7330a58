"""``vmkit bench cpu``: sysbench's CPU test on the host, in a container, and in guests.

The table virtualization-rs printed (its VM against Docker and VirtualBox), extended to what the
lectures contrast: the same sysbench binary (the host's, with its libraries: see
:mod:`vmkit.bench.guests`), the same ``--cpu-max-prime`` and run time, with 1 thread and with N
threads, on

- ``host``: this machine, no isolation;
- ``container``: the debian-12 image's root file system without a VM: its disk image attached
  read-only to a loop device inside ``unshare --mount --pid --uts --ipc --net``, ``chroot`` into it
  (systemd-nspawn would do the same; it is not installed here). Same kernel, same CPU: the ratio
  shows what namespaces cost (nothing, for a CPU loop);
- ``x86_64-tcg``: a debian-12 guest under QEMU's binary translation (TCG);
- ``x86_64-kvm``: the same under KVM, where usable (skipped with vmkit's reason otherwise);
- ``aarch64-tcg``: an arm64 debian-12 guest, every instruction translated from another
  architecture (where this vmkit has aarch64 guests; skipped with the reason otherwise). The x86-64
  bundle cannot run there: the guest installs Debian's own sysbench package, and the version it
  reports must match the host's.

Each measurement is ``events per second`` (sysbench's primes found per second); the ratio is to the
host with the same thread count. Pure parts (arguments, parsing, ratios, rendering, the plot) are
separate from the runners.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from vmkit.bench import guests
from vmkit.errors import ConfigError, HostError, Problem, VmkitError
from vmkit.host.images.store import ImageStore
from vmkit.runtime.qemu.accel import kvm_status

SYSBENCH = Path("/usr/bin/sysbench")
IMAGE = "debian-12"
FORMAT_VERSION = 1
TARGETS: tuple[str, ...] = ("host", "container", "x86_64-tcg", "x86_64-kvm", "aarch64-tcg")
TITLES = {"host": "host", "container": "container (unshare + chroot)", "x86_64-tcg": "x86-64 guest, TCG",
          "x86_64-kvm": "x86-64 guest, KVM", "aarch64-tcg": "aarch64 guest, TCG"}
GUEST_DIR_PREFIX = "/var/tmp/vmkit-sysbench-"


@dataclass(frozen=True)
class Settings:
    """sysbench's knobs, the same for every target."""

    prime: int = 20000
    seconds: int = 10
    threads: int = 2
    repeat: int = 3
    """Runs per cell; the best counts (a shared host's load only ever slows a run down)."""

    def __post_init__(self) -> None:
        problems = []
        if not 100 <= self.prime <= 10_000_000:
            problems.append(Problem("--prime", f"{self.prime}: use 100 to 10000000 (sysbench's --cpu-max-prime)"))
        if not 1 <= self.seconds <= 3600:
            problems.append(Problem("--time", f"{self.seconds}: use 1 to 3600 seconds"))
        if not 1 <= self.threads <= 256:
            problems.append(Problem("--threads", f"{self.threads}: use 1 to 256"))
        if not 1 <= self.repeat <= 100:
            problems.append(Problem("--repeat", f"{self.repeat}: use 1 to 100"))
        if problems:
            raise ConfigError(problems)

    @property
    def thread_counts(self) -> list[int]:
        return sorted({1, self.threads})

    def to_dict(self) -> dict[str, Any]:
        return {"prime": self.prime, "seconds": self.seconds, "threads": self.thread_counts, "repeat": self.repeat}


def settings_for(*, quick: bool = False, threads: int | None = None, prime: int | None = None,
                 seconds: int | None = None, repeat: int | None = None) -> Settings:
    """The full run: prime 20000, 10 s, best of 3; ``quick``: prime 10000, 2 s, once. Threads default
    to the host's CPUs."""
    base = Settings(prime=10000, seconds=2, repeat=1) if quick else Settings()
    return Settings(prime=base.prime if prime is None else prime, seconds=base.seconds if seconds is None else seconds,
                    threads=guests.host_cpus() if threads is None else threads,
                    repeat=base.repeat if repeat is None else repeat)


def sysbench_args(threads: int, settings: Settings) -> list[str]:
    """sysbench's arguments (after the program) for one measurement."""
    return ["cpu", f"--cpu-max-prime={settings.prime}", f"--threads={threads}", f"--time={settings.seconds}", "run"]


# --------------------------------------------------------------------------- sysbench output


@dataclass(frozen=True)
class Sample:
    """One sysbench run as it reported itself."""

    events_per_s: float
    events: int
    threads: int
    prime: int
    version: str


def parse_sysbench(stdout: str) -> Sample:
    """sysbench 1.0's ``cpu run`` report -> :class:`Sample`; ValueError naming what is missing."""
    def find(pattern: str, what: str) -> str:
        m = re.search(pattern, stdout, re.MULTILINE)
        if not m:
            last = (stdout.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"sysbench printed no {what} ({last.strip()})")
        return m.group(1)

    return Sample(events_per_s=float(find(r"^\s*events per second:\s*([0-9.]+)", "events per second")),
                  events=int(find(r"^\s*total number of events:\s*([0-9]+)", "event count")),
                  threads=int(find(r"^Number of threads:\s*([0-9]+)", "thread count")),
                  prime=int(find(r"^Prime numbers limit:\s*([0-9]+)", "prime limit")),
                  version=find(r"^sysbench (\S+)", "version line"))


@dataclass(frozen=True)
class Cell(guests.BestOf):
    """A measurement, or why there is none."""

    KEY: ClassVar[str] = "events_per_s"
    DIGITS: ClassVar[int | None] = 2
    events_per_s: float = 0.0
    error: str | None = None
    samples: tuple[float, ...] = ()
    """Every run's events/s when the cell is the best of several."""


def best_of(run_once: Callable[[], Cell], times: int) -> Cell:
    """Run ``times`` times; the fastest run counts (the first failure ends it, and is the cell)."""
    cells = []
    for _ in range(times):
        cell = run_once()
        if not cell.ok:
            return cell
        cells.append(cell)
    best = max(cells, key=lambda c: c.events_per_s)
    return Cell(best.events_per_s, samples=tuple(c.events_per_s for c in cells))


def cell_from_run(stdout: str, stderr: str, exit_code: int, settings: Settings, threads: int,
                  version: str | None = None) -> Cell:
    """A cell from one run's output, checked against what was asked (threads, prime, version)."""
    try:
        sample = parse_sysbench(stdout)
    except ValueError as exc:
        tail = (stderr.strip().splitlines() or [""])[-1]
        return Cell(error=f"exit {exit_code}: {tail}" if exit_code and tail else str(exc))
    if sample.threads != threads or sample.prime != settings.prime:
        return Cell(error=f"sysbench ran {sample.threads} threads with prime {sample.prime}, "
                          f"not {threads} with {settings.prime}")
    if version is not None and sample.version != version:
        return Cell(error=f"sysbench {sample.version}, not the host's {version}: not comparable")
    return Cell(sample.events_per_s)


@dataclass
class Row:
    """One target: its cells by thread count, or why it was skipped."""

    target: str
    results: dict[int, Cell] = field(default_factory=dict)
    skipped: str | None = None
    detail: str = ""

    @property
    def title(self) -> str:
        return TITLES.get(self.target, self.target)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "title": self.title, "skipped": self.skipped, "detail": self.detail,
                "results": {str(t): c.to_dict() for t, c in sorted(self.results.items())}}


@dataclass
class Report:
    settings: Settings
    rows: list[Row]
    version: str = ""
    host_cpu: str = ""
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def row(self, target: str) -> Row:
        return next(r for r in self.rows if r.target == target)

    def ratio(self, target: str, threads: int) -> float | None:
        """events/s of ``target`` over the host's, with the same thread count (None: no pair)."""
        return ratio_to(self.row(target), self.row("host"), threads) if any(
            r.target == "host" for r in self.rows) else None

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            d = r.to_dict()
            d["ratio_to_host"] = {str(t): _round(self.ratio(r.target, t)) for t in self.settings.thread_counts}
            rows.append(d)
        return {"format": FORMAT_VERSION, "benchmark": "cpu", "sysbench": self.version, "host_cpu": self.host_cpu,
                "settings": self.settings.to_dict(), "rows": rows, "notes": self.notes,
                "started": self.started, "finished": self.finished}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def ratio_to(row: Row, base: Row, threads: int) -> float | None:
    a, b = row.results.get(threads), base.results.get(threads)
    if a is None or b is None or not a.ok or not b.ok or b.events_per_s <= 0:
        return None
    return a.events_per_s / b.events_per_s


def cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "not run"
    return f"{cell.events_per_s:,.1f}" if cell.ok else f"failed: {cell.error}"


def table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table (the CLI draws it with rich, Markdown from the same cells)."""
    counts = report.settings.thread_counts
    header = ["target"]
    for t in counts:
        header += [f"events/s, {t} thread{'s' if t > 1 else ''}", f"vs host ({t})"]
    rows = []
    for r in report.rows:
        if r.skipped is not None:
            rows.append([r.title, *(["skipped", ""] * len(counts))])
            continue
        cells = [r.title]
        for t in counts:
            cells += [cell_text(r.results.get(t)), guests.format_ratio(report.ratio(r.target, t))]
        rows.append(cells)
    return header, rows


def footer_lines(report: Report) -> list[str]:
    s = report.settings
    lines = [f"sysbench {report.version} cpu, --cpu-max-prime={s.prime}, --time={s.seconds}, best of {s.repeat}; "
             f"host CPU: {report.host_cpu or 'unknown'}"]
    for r in report.rows:
        if r.skipped is not None:
            lines.append(f"{r.title}: skipped: {r.skipped}")
        elif r.detail:
            lines.append(f"{r.title}: {r.detail}")
    lines += [f"note: {n}" for n in report.notes]
    return lines


def render_markdown(report: Report) -> str:
    header, rows = table_rows(report)
    return guests.markdown("vmkit bench cpu", header, rows, footer_lines(report))


def plot(report: Report, path: Path) -> Path:
    """A bar chart (PNG): events/s per target, one bar per thread count, the ratio to the host above
    each bar; a log scale, since emulation is orders of magnitude slower."""
    plt = guests.pyplot()
    rows = [r for r in report.rows if r.skipped is None]
    counts = report.settings.thread_counts
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(rows) + 2), 4.5), dpi=100)
    width = 0.8 / len(counts)
    for k, t in enumerate(counts):
        xs = [i + (k - (len(counts) - 1) / 2) * width for i in range(len(rows))]
        ys = [c.events_per_s if (c := r.results.get(t)) is not None and c.ok else 0.0 for r in rows]
        bars = ax.bar(xs, ys, width, label=f"{t} thread{'s' if t > 1 else ''}")
        for bar, r in zip(bars, rows, strict=True):
            ratio = report.ratio(r.target, t)
            if ratio is not None:
                ax.annotate(guests.format_ratio(ratio), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [r.title.replace(", ", "\n") for r in rows], fontsize=8)
    if any(c.ok and c.events_per_s > 0 for r in rows for c in r.results.values()):
        ax.set_yscale("log")
    ax.set_ylabel("events per second (log)")
    s = report.settings
    ax.set_title(f"sysbench {report.version} cpu, prime {s.prime}, {s.seconds} s (ratio to host above bars)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return guests.save_plot(plt, fig, path)


def write_json(report: Report, path: Path) -> Path:
    return guests.write_json(report.to_json(), path)


# --------------------------------------------------------------------------- runners


def host_cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return ""


def host_sysbench_version(binary: Path = SYSBENCH) -> str:
    if not binary.exists():
        raise HostError(f"sysbench is not installed on the host ({binary})",
                        hint="apt-get install sysbench (scripts/install.sh installs it)")
    res = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    m = re.match(r"sysbench (\S+)", res.stdout)
    if res.returncode != 0 or not m:
        raise HostError(f"{binary} --version failed: {res.stderr.strip() or res.stdout.strip()}")
    return m.group(1)


def _run_host(argv: list[str], settings: Settings, threads: int, version: str) -> Cell:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=settings.seconds * 3 + 60, check=False)
    except subprocess.TimeoutExpired:
        return Cell(error=f"no result within {settings.seconds * 3 + 60} s")
    return cell_from_run(res.stdout, res.stderr, res.returncode, settings, threads, version)


# unshare: new mount, PID, UTS, IPC and network namespaces (a container without a VM); the image's
# root file system attached read-only (loop, autoclear: detached when the namespace's mount goes),
# the bundle bound over its /mnt, /proc mounted for the new PID namespace, then chroot.
CONTAINER_SCRIPT = ('set -e; raw=$1 root=$2 bundle=$3; shift 3; '
                    'mount -o loop,ro "$raw" "$root"; mount --bind "$bundle" "$root/mnt"; '
                    'mount -t proc proc "$root/proc"; exec chroot "$root" /mnt/run "$@"')


def container_argv(raw: Path, root: Path, bundle: Path, args: Sequence[str]) -> list[str]:
    return ["unshare", "--mount", "--pid", "--fork", "--uts", "--ipc", "--net", "--propagation", "private",
            "sh", "-c", CONTAINER_SCRIPT, "vmkit-bench-container", str(raw), str(root), str(bundle), *args]


def _container_skip(store: ImageStore) -> str | None:
    if os.geteuid() != 0:
        return "needs root (a loop mount of the image's root file system)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    if not store.exists(IMAGE):
        return f"no {IMAGE} image: build it with `vmkit image build {IMAGE}`"
    return None


def _guest_rows(row: Row, exec_: guests.Exec, name: str, bundle: guests.Bundle | None, settings: Settings,
                version: str, progress: guests.Progress) -> None:
    """Run every thread count in ``name`` (the bundle copied in, or Debian's package installed)."""
    guest_dir = GUEST_DIR_PREFIX + name.rsplit("-", 1)[-1]
    try:
        if bundle is not None:
            progress(f"{row.title}: copying sysbench in")
            inst = guests.install_bundle(exec_, bundle, guest_dir, progress=lambda m: progress(f"{row.title}: {m}"))
            run = inst.run
            detail = (f"the host's sysbench and loader; of its {len(bundle.libraries)} libraries "
                      f"{len(inst.copied)} copied in ({', '.join(inst.copied)}), "
                      + (f"{len(inst.guest_own)} the guest's own build ({', '.join(inst.guest_own)}: not run by "
                         "the CPU test), " if inst.guest_own else "")
                      + "the rest the same files in the guest")
        else:
            detail = ""
            progress(f"{row.title}: installing Debian's sysbench package in the guest")
            run = _apt_sysbench(exec_)
        nproc = exec_(["nproc"], 30.0)
        cpus = int(guests.text(nproc.stdout).strip() or "0") if nproc.exit_code == 0 else 0
        row.detail = f"{name}: {cpus} vCPUs; " + (detail if bundle is not None else "Debian's sysbench package")
        for t in settings.thread_counts:
            progress(f"{row.title}: sysbench, {t} thread{'s' if t > 1 else ''}")
            def once(t: int = t) -> Cell:
                res = exec_([run, *sysbench_args(t, settings)], settings.seconds * 5 + 120.0)
                return cell_from_run(guests.text(res.stdout), guests.text(res.stderr), res.exit_code, settings, t,
                                     version)
            row.results[t] = best_of(once, settings.repeat)
            if cpus and t > cpus:
                row.detail += f"; {t} threads on {cpus} vCPUs"
    finally:
        if bundle is not None:
            guests.remove_in_guest(exec_, guest_dir)


def _apt_sysbench(exec_: guests.Exec) -> str:
    """Debian's sysbench in a guest of another architecture (the host's binary cannot run there)."""
    have = exec_(["sh", "-c", "command -v sysbench"], 30.0)
    if have.exit_code != 0:
        res = exec_(["sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                                 "apt-get install -y -qq --no-install-recommends sysbench"], 1800.0)
        if res.exit_code != 0:
            raise VmkitError("cannot install sysbench in the guest: "
                             f"{(guests.text(res.stderr).strip().splitlines() or ['apt-get failed'])[-1]}",
                             hint="the guest needs to reach a Debian mirror (user-mode NAT)")
    return "sysbench"


def aarch64_skip(store: ImageStore) -> str | None:
    """Why there is no aarch64 row on this vmkit and host (None: there can be one)."""
    if not guests.create_options_supported("arch"):
        return "this vmkit has no aarch64 guests yet (vmkit create --arch aarch64)"
    if shutil.which("qemu-system-aarch64") is None:
        return "qemu-system-aarch64 is not installed (Debian: qemu-system-arm)"
    if not store.exists(aarch64_image()):
        return f"no aarch64 {IMAGE} image: build it with `vmkit image build {IMAGE} --arch aarch64`"
    return None


AARCH64_READY_TIMEOUT = 1200.0
"""Seconds the aarch64 guest may take to boot (every instruction translated; 5 min were not enough at a
load average of 23 on 2 cores)."""


def _first_line(exc: VmkitError) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def aarch64_image() -> str:
    """The store name of the aarch64 build of the image (``vmkit image build debian-12 --arch aarch64``)."""
    return f"{IMAGE}-aarch64"


def run(settings: Settings, *, machine: str | None = None, targets: Sequence[str] = TARGETS,
        progress: Callable[[str], None] | None = None) -> Report:
    """Measure every target of ``targets`` (see the module docstring). ``machine``: a running x86-64
    machine to use for its accelerator's row instead of booting a throw-away one.

    Throw-away guests and temporary files are removed also when interrupted.
    """
    say = progress or (lambda _m: None)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ConfigError.single("--target", f"{', '.join(unknown) or 'nothing'}: pick from {', '.join(TARGETS)}")
    version = host_sysbench_version()
    report = Report(settings, [Row(t) for t in TARGETS if t in targets], version=version, host_cpu=host_cpu_model())
    store = ImageStore()
    given_accel: str | None = None
    if machine is not None:
        config, given_accel = guests.running_config(machine, "benchmark the CPU")
        if config.arch != "x86_64":
            raise ConfigError.single("--machine", f"{machine} is a {config.arch} machine: give an x86-64 one")
    with tempfile.TemporaryDirectory(prefix="vmkit-benchcpu-") as tmp_:
        tmp = Path(tmp_)
        say("copying sysbench and its libraries")
        bundle = guests.make_bundle(SYSBENCH, tmp / "bundle")
        for row in report.rows:
            if row.target == "host":
                for t in settings.thread_counts:
                    say(f"host: sysbench, {t} thread{'s' if t > 1 else ''}")
                    argv = [str(bundle.run), *sysbench_args(t, settings)]
                    row.results[t] = best_of(partial(_run_host, argv, settings, t, version), settings.repeat)
            elif row.target == "container":
                row.skipped = _container_skip(store)
                if row.skipped is None:
                    _run_container(row, store, tmp, bundle, settings, version, say)
            elif row.target in ("x86_64-tcg", "x86_64-kvm"):
                accel = row.target.split("-")[1]
                if machine is not None and given_accel == accel:
                    row.detail = f"{machine} (given)"
                    _guest_rows(row, guests.guest_exec(machine), machine, bundle, settings, version, say)
                    continue
                if accel == "kvm" and not (kvm := kvm_status()).usable:
                    row.skipped = f"KVM is not usable here: {kvm.reason}"
                    continue
                if not store.exists(IMAGE):
                    row.skipped = f"no {IMAGE} image: build it with `vmkit image build {IMAGE}`"
                    continue
                try:
                    with guests.throwaway(f"cpu-{accel}", image=IMAGE, cpus=settings.threads, accel=accel,
                                          progress=say) as name:
                        _guest_rows(row, guests.guest_exec(name), name, bundle, settings, version, say)
                except VmkitError as exc:
                    row.results = {t: Cell(error=_first_line(exc)) for t in settings.thread_counts}
            elif row.target == "aarch64-tcg":
                row.skipped = aarch64_skip(store)
                if row.skipped is None:
                    try:
                        with guests.throwaway("cpu-arm", image=IMAGE, cpus=settings.threads, accel="tcg",
                                              arch="aarch64", ready_timeout=AARCH64_READY_TIMEOUT,
                                              progress=say) as name:
                            _guest_rows(row, guests.guest_exec(name), name, None, settings, version, say)
                    except VmkitError as exc:  # the other rows stand; this one says why it has no numbers
                        row.results = {t: Cell(error=_first_line(exc)) for t in settings.thread_counts}
    report.finished = time.time()
    return report


def _run_container(row: Row, store: ImageStore, tmp: Path, bundle: guests.Bundle, settings: Settings, version: str,
                   say: Callable[[str], None]) -> None:
    image = store.get(IMAGE)
    disk = image.file(image.manifest.disk)
    if disk is None:
        row.skipped = f"the {IMAGE} image has no disk"
        return
    raw, root = tmp / "rootfs.raw", tmp / "root"
    root.mkdir(mode=0o700)
    say(f"container: the {IMAGE} root file system as a raw image")
    fmt = image.manifest.disk_format or "qcow2"
    res = subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(disk), str(raw)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        row.skipped = f"qemu-img convert {disk} failed: {res.stderr.strip()}"
        return
    row.detail = f"chroot into {IMAGE}'s root file system in new mount, PID, UTS, IPC and network namespaces"
    try:
        for t in settings.thread_counts:
            say(f"container: sysbench, {t} thread{'s' if t > 1 else ''}")
            argv = container_argv(raw, root, bundle.directory, sysbench_args(t, settings))
            row.results[t] = best_of(partial(_run_host, argv, settings, t, version), settings.repeat)
    finally:
        raw.unlink(missing_ok=True)
