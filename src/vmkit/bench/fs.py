"""``vmkit bench fs``: fio inside the guest on each shared folder and on the guest's own disk.

The job matrix is the one of the public virtiofs-tests suite (github.com/rhvgoyal/virtiofs-tests,
``fio-jobs/*.job`` and ``run-fio-test.sh``), which the virtiofs vs sshfs vs 9p comparisons use:
five workloads (seqread, randread, seqwrite, randwrite, randrw with 75 % reads) times three
engines (psync, mmap, libaio), each as a single job on one file and as four jobs on four files
("-multi", one file per job, ``group_reporting``). Like the suite's runner: block size 4 KiB,
iodepth 16, ``direct=1`` (the guest page cache is bypassed, so the transport is measured, not
guest RAM; mmap still goes through the page cache), page cache dropped before each job, files
laid out once and reused by every job. Unlike it, each job runs once (not 3 times) with a small
file size and a short runtime cap, so the whole table takes minutes under TCG.

Each mechanism is a directory in the guest: a fresh scratch directory inside the mount point of
every writable share (``virtiofs``, ``9p``, ``sshfs``) plus one under ``/var/tmp`` (the guest's own
disk, the baseline). vmkit mounts nothing here: a share whose mount point is not a mount of its
type is an error (:class:`ShareNotMountedError`). Scratch directories are removed afterwards,
also when the run is interrupted (and any fio still running in the guest is stopped).

Pure parts (job matrix, fio argv, fio JSON parsing, winners, JSON and Markdown rendering) are
separate from :func:`run`, which talks to the guest through the guest agent.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmkit.backends.local import control
from vmkit.config import MachineConfig, Share, format_size, parse_size
from vmkit.errors import ConfigError, ExitCode, HostError, Problem, StateError, VmkitError, VmTimeoutError
from vmkit.fsutil import atomic_write
from vmkit.host.provision import fstab_entry
from vmkit.runtime.guest.execute import ExecResult

WORKLOADS: tuple[str, ...] = ("seqread", "randread", "seqwrite", "randwrite", "randrw")
ENGINES: tuple[str, ...] = ("psync", "mmap", "libaio")
MULTI_JOBS = 4
RWMIXREAD = 75
_RW = {"seqread": "read", "randread": "randread", "seqwrite": "write", "randwrite": "randwrite", "randrw": "randrw"}

#: ``bench fs --quick``: one row per workload, every engine and both job counts appear.
QUICK_JOBS: tuple[str, ...] = ("seqread-psync", "randread-mmap", "seqwrite-libaio", "randwrite-psync-multi",
                               "randrw-libaio-multi")

#: the guest file system type a share of each type is mounted as
MOUNT_FSTYPE = {"virtiofs": "virtiofs", "9p": "9p", "sshfs": "fuse.sshfs"}
DISK = "disk"
SCRATCH_PREFIX = "vmkit-fsbench-"
DISK_PARENT = "/var/tmp"
FORMAT_VERSION = 1


class ShareNotMountedError(VmkitError):
    """A share's guest path is not (or not correctly) mounted in the guest."""

    exit_code = ExitCode.WRONG_STATE


# --------------------------------------------------------------------------- job matrix


@dataclass(frozen=True, order=True)
class Job:
    """One row of the table: a workload with an engine, as 1 job or :data:`MULTI_JOBS` jobs."""

    workload: str
    engine: str
    numjobs: int = 1

    @property
    def name(self) -> str:
        """The virtiofs-tests job file name: ``seqread-psync``, ``randrw-libaio-multi``."""
        return f"{self.workload}-{self.engine}" + ("-multi" if self.numjobs > 1 else "")

    @property
    def reads(self) -> bool:
        return self.workload in ("seqread", "randread", "randrw")

    @property
    def writes(self) -> bool:
        return self.workload in ("seqwrite", "randwrite", "randrw")


def all_jobs() -> list[Job]:
    """The full matrix, 30 rows, in the issue's order (workload, then engine, single before multi)."""
    return [Job(w, e, n) for w in WORKLOADS for e in ENGINES for n in (1, MULTI_JOBS)]


def job_by_name(name: str) -> Job:
    for job in all_jobs():
        if job.name == name:
            return job
    raise KeyError(name)


def parse_jobs(spec: str, *, option: str = "--jobs") -> list[Job]:
    """``seqread-psync,randrw-libaio-multi`` -> jobs in the given order (every bad name reported)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError.single(option, "give at least one job, e.g. seqread-psync,randwrite-libaio-multi")
    jobs: list[Job] = []
    problems: list[Problem] = []
    for name in names:
        try:
            job = job_by_name(name)
        except KeyError:
            problems.append(Problem(option, f"unknown job {name!r}: use WORKLOAD-ENGINE[-multi] with WORKLOAD one of "
                                            f"{', '.join(WORKLOADS)} and ENGINE one of {', '.join(ENGINES)}"))
            continue
        if job in jobs:
            problems.append(Problem(option, f"{name!r} is listed twice"))
            continue
        jobs.append(job)
    if problems:
        raise ConfigError(problems)
    return jobs


@dataclass(frozen=True)
class Settings:
    """fio options shared by every job (virtiofs-tests' run-fio-test.sh knobs)."""

    size: int = 64 << 20          # per file; the suite uses 4G
    runtime: int = 3              # seconds, a cap (not time_based), as in the suite (20 s there)
    block_size: int = 4096
    iodepth: int = 16
    direct: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.size < self.block_size * 16:
            problems.append(Problem("--size", f"{self.size} bytes is too small: use at least "
                                              f"{format_size(self.block_size * 16)} (e.g. 64M)"))
        if self.runtime < 1:
            problems.append(Problem("--runtime", "use at least 1 second"))
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "runtime": self.runtime, "block_size": self.block_size, "iodepth": self.iodepth,
                "direct": self.direct, "multi_jobs": MULTI_JOBS, "rwmixread": RWMIXREAD}


QUICK_SETTINGS = Settings(size=4 << 20, runtime=1)


def select_jobs(jobs: str | None = None, *, quick: bool = False) -> list[Job]:
    """The rows to run: ``jobs`` (``--jobs``, comma-separated names), else the quick set, else all 30."""
    if jobs is not None:
        return parse_jobs(jobs)
    if quick:
        return [job_by_name(n) for n in QUICK_JOBS]
    return all_jobs()


def settings_for(*, quick: bool = False, size: str | None = None, runtime: int | None = None,
                 buffered: bool = False) -> Settings:
    """The fio settings from ``bench fs``'s options: the quick or the default ones, with ``size``
    (e.g. ``64M``: ``--size``) and ``runtime`` (seconds) replaced if given; ``buffered``: direct=0."""
    base = QUICK_SETTINGS if quick else Settings()
    size_bytes = base.size
    if size is not None:
        try:
            size_bytes = parse_size(size)
        except ValueError as exc:
            raise ConfigError([Problem("--size", str(exc))]) from None
    return Settings(size=size_bytes, runtime=base.runtime if runtime is None else runtime, direct=not buffered)


def fio_dir_escape(directory: str) -> str:
    """fio splits ``--directory`` on ``:`` (several directories) unless escaped as ``\\:``."""
    if "\\" in directory:
        raise ConfigError.single("shares[].guest_path", f"{directory!r}: fio cannot take a directory with a "
                                 "backslash; benchmark a share mounted at a path without one")
    return directory.replace(":", "\\:")


def _common(directory: str, settings: Settings) -> list[str]:
    # One file per job, named like the suite's fio-file1..4 and shared by all rows ($jobnum: 0..3).
    return [f"--directory={fio_dir_escape(directory)}", "--filename_format=fio-file$jobnum", f"--size={settings.size}",
            "--output-format=json"]


def fio_argv(job: Job, directory: str, settings: Settings) -> list[str]:
    """The fio command line for one row in ``directory`` (a list, never a shell string)."""
    argv = ["fio", f"--name={job.name}", *_common(directory, settings), f"--rw={_RW[job.workload]}",
            f"--ioengine={job.engine}", f"--bs={settings.block_size}", f"--iodepth={settings.iodepth}",
            f"--direct={int(settings.direct)}", f"--runtime={settings.runtime}", f"--numjobs={job.numjobs}",
            "--group_reporting=1"]
    if job.workload == "randrw":
        argv.append(f"--rwmixread={RWMIXREAD}")
    return argv


def layout_argv(directory: str, settings: Settings) -> list[str]:
    """Create the :data:`MULTI_JOBS` files every row reuses (1 MiB writes: layout is not measured)."""
    return ["fio", "--name=layout", *_common(directory, settings), "--rw=write", "--bs=1M",
            f"--numjobs={MULTI_JOBS}", "--create_only=1", "--group_reporting=1"]


# --------------------------------------------------------------------------- fio output


@dataclass(frozen=True)
class Measurement:
    """One cell: bandwidth in bytes/s and IOPS per direction, or why there is no number."""

    read_bw: float = 0.0
    read_iops: float = 0.0
    write_bw: float = 0.0
    write_iops: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def bw(self) -> float:
        return self.read_bw + self.write_bw

    @property
    def iops(self) -> float:
        return self.read_iops + self.write_iops

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        return {"bw_bytes": round(self.bw), "iops": round(self.iops, 1),
                "read": {"bw_bytes": round(self.read_bw), "iops": round(self.read_iops, 1)},
                "write": {"bw_bytes": round(self.write_bw), "iops": round(self.write_iops, 1)}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        if "error" in data:
            return cls(error=str(data["error"]))
        return cls(read_bw=float(data["read"]["bw_bytes"]), read_iops=float(data["read"]["iops"]),
                   write_bw=float(data["write"]["bw_bytes"]), write_iops=float(data["write"]["iops"]))


def _fio_error_line(text: str) -> str | None:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("fio:")]
    return lines[-1] if lines else None


def parse_fio_json(stdout: str, stderr: str = "", exit_code: int = 0) -> Measurement:
    """fio's ``--output-format=json`` report -> one :class:`Measurement` (jobs summed).

    fio may print notes before the JSON object; a job with ``error`` set, or no report at all,
    gives a cell with the reason (fio's own ``fio: ...`` line when there is one).
    """
    start = stdout.find("\n{") + 1 if not stdout.startswith("{") else 0
    report: Any = None
    if stdout.startswith("{") or start > 0:
        with contextlib.suppress(ValueError):
            report, _ = json.JSONDecoder().raw_decode(stdout[start:])
    reason = _fio_error_line(stderr) or _fio_error_line(stdout)
    if not isinstance(report, dict) or not isinstance(report.get("jobs"), list) or not report["jobs"]:
        tail = (stderr.strip().splitlines() or stdout.strip().splitlines() or [""])[-1]
        return Measurement(error=reason or f"fio exited {exit_code} without a report{': ' + tail if tail else ''}")
    jobs: list[dict[str, Any]] = report["jobs"]
    failed = [j for j in jobs if int(j.get("error", 0))]
    if failed:
        code = int(failed[0]["error"])
        return Measurement(error=reason or f"fio job failed with error {code}")
    if exit_code != 0:
        return Measurement(error=reason or f"fio exited {exit_code}")
    totals = {f"{d}_{k}": sum(float(j[d][k]) for j in jobs) for d in ("read", "write") for k in ("bw_bytes", "iops")}
    return Measurement(read_bw=totals["read_bw_bytes"], read_iops=totals["read_iops"],
                       write_bw=totals["write_bw_bytes"], write_iops=totals["write_iops"])


# --------------------------------------------------------------------------- mounts in the guest


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (the fields vmkit needs)."""

    mount_point: str
    fstype: str
    source: str
    options: str


def _unescape(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """``/proc/self/mountinfo`` -> entries in mount order (a later entry hides an earlier one)."""
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 6 or len(rf) < 2:
            continue
        entries.append(MountEntry(_unescape(lf[4]), rf[0], _unescape(rf[1]), f"{lf[5]},{rf[2] if len(rf) > 2 else ''}"))
    return entries


def mount_at(entries: Sequence[MountEntry], path: str) -> MountEntry | None:
    """The file system mounted exactly at ``path`` (the topmost one), if any."""
    norm = "/" + path.strip("/") if path.strip("/") else "/"
    found = [e for e in entries if e.mount_point == norm]
    return found[-1] if found else None


def mount_containing(entries: Sequence[MountEntry], path: str) -> MountEntry | None:
    """The file system ``path`` lives on (longest mount point prefix)."""
    best: MountEntry | None = None
    for e in entries:
        mp = e.mount_point.rstrip("/")
        if (path == e.mount_point or path.startswith(mp + "/")) and (best is None or len(e.mount_point) >= len(
                best.mount_point)):
            best = e
    return best


@dataclass(frozen=True)
class Mechanism:
    """One column: a share of the machine, or the guest's own disk (``kind == "disk"``)."""

    name: str
    kind: str
    guest_path: str
    fstype: str
    source: str
    tag: str | None = None
    host_path: str | None = None

    @property
    def baseline(self) -> bool:
        return self.kind == DISK

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "guest_path": self.guest_path, "fstype": self.fstype,
                "source": self.source, "tag": self.tag, "host_path": self.host_path, "baseline": self.baseline}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mechanism:
        return cls(name=d["name"], kind=d["kind"], guest_path=d["guest_path"], fstype=d["fstype"],
                   source=d["source"], tag=d.get("tag"), host_path=d.get("host_path"))


@dataclass(frozen=True)
class Plan:
    """What a run measures, and what it leaves out and why (notes for the user)."""

    mechanisms: tuple[Mechanism, ...]
    notes: tuple[str, ...] = ()


def plan_mechanisms(config: MachineConfig, mountinfo: str, *, shares: Sequence[str] | None = None,
                    disk: bool = True) -> Plan:
    """Columns for ``config``'s shares as mounted in the guest (``mountinfo``), plus the disk.

    ``shares``: tags to measure (default: every share). Read-only shares are skipped with a note;
    a share whose guest path is not a mount of its type raises :class:`ShareNotMountedError`
    (every such share in one message).
    """
    entries = parse_mountinfo(mountinfo)
    tags = [config.share_tag(i) for i in range(len(config.shares))]
    if shares is not None:
        unknown = [t for t in shares if t not in tags]
        if unknown:
            have = ", ".join(tags) or "none"
            raise ConfigError([Problem("--share", f"{config.name} has no share with tag {t!r} (its shares: {have})")
                               for t in unknown])
    notes: list[str] = []
    chosen: list[tuple[str, Share, MountEntry]] = []
    missing: list[str] = []
    fixes: list[str] = []
    for tag, share in zip(tags, config.shares, strict=True):
        if shares is not None and tag not in shares:
            continue
        if share.read_only:
            notes.append(f"share {tag} ({share.type}, {share.mount_point()}) skipped: it is read-only")
            continue
        point = share.mount_point()
        entry = mount_at(entries, point)
        want = MOUNT_FSTYPE[share.type]
        if entry is not None and entry.fstype == want and (share.type == "sshfs" or entry.source == tag):
            chosen.append((tag, share, entry))
            continue
        if entry is None:
            missing.append(f"share {tag} ({share.type}) is not mounted at {point} in the guest")
        elif entry.fstype != want:
            missing.append(f"share {tag} ({share.type}): {point} is a {entry.fstype} mount ({entry.source}), "
                           f"not {want}")
        else:
            missing.append(f"share {tag} ({share.type}): {point} is mounted from tag {entry.source!r}, not {tag!r}")
        fixes.append(_mount_fix(config.name, share, tag))
    if missing:
        raise ShareNotMountedError(
            "cannot benchmark: " + "; ".join(missing),
            hint="mount it in the guest (" + "; ".join(fixes) + "), or leave it out with --share TAG for the others "
                 "(vmkit bench never mounts anything itself)")
    count: dict[str, int] = {}
    for _, share, _e in chosen:
        count[share.type] = count.get(share.type, 0) + 1
    mechs: list[Mechanism] = []
    for tag, share, entry in chosen:
        name = share.type if count[share.type] == 1 else f"{share.type}:{tag}"
        mechs.append(Mechanism(name, share.type, share.mount_point(), entry.fstype, entry.source, tag,
                               str(share.host_path)))
    present = {m.kind for m in mechs}
    absent = [t for t in MOUNT_FSTYPE if t not in present]
    if absent and shares is None:
        notes.append(f"{config.name} has no writable {' or '.join(absent)} share: not measured")
    if disk:
        entry = mount_containing(entries, DISK_PARENT)
        mechs.append(Mechanism(DISK, DISK, DISK_PARENT, entry.fstype if entry else "?",
                               entry.source if entry else "?"))
    if not mechs:
        raise ConfigError.single("--share", "nothing to measure: give a writable, mounted share or drop --no-disk")
    return Plan(tuple(mechs), tuple(notes))


def _mount_fix(name: str, share: Share, tag: str) -> str:
    """The command that mounts ``share`` as the guest does at boot (the same fstab entry)."""
    entry = fstab_entry(share, tag)
    if entry is None:
        return f"sshfs shares are mounted by vmkit start: restart {name}"
    return shlex.join(["vmkit", "exec", name, "--", "mount", "-t", entry.vfstype, "-o", entry.options,
                       entry.spec, entry.file])


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    job: Job
    results: dict[str, Measurement] = field(default_factory=dict)

    def winner(self, mechanisms: Sequence[Mechanism]) -> str | None:
        """The share with the highest bandwidth (read + write); the disk baseline does not compete."""
        candidates = [(self.results[m.name].bw, m.name) for m in mechanisms
                      if not m.baseline and m.name in self.results and self.results[m.name].ok]
        if len([m for m in mechanisms if not m.baseline]) < 2 or not candidates:
            return None
        return max(candidates)[1]


@dataclass
class Report:
    instance: str
    settings: Settings
    mechanisms: tuple[Mechanism, ...]
    rows: list[Row]
    notes: tuple[str, ...] = ()
    started: float = field(default_factory=time.time)
    finished: float | None = None
    guest: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """How often each share won, and virtiofs against sshfs on sequential reads (the issue's targets)."""
        wins: dict[str, int] = {m.name: 0 for m in self.mechanisms if not m.baseline}
        decided = 0
        for row in self.rows:
            w = row.winner(self.mechanisms)
            if w is not None:
                wins[w] += 1
                decided += 1
        out: dict[str, Any] = {"rows": len(self.rows), "decided_rows": decided, "wins": wins}
        names = {m.name for m in self.mechanisms}
        if "virtiofs" in names and "sshfs" in names:
            ratios = {}
            for row in self.rows:
                if row.job.workload != "seqread":
                    continue
                v, s = row.results.get("virtiofs"), row.results.get("sshfs")
                if v and s and v.ok and s.ok and s.bw > 0:
                    ratios[row.job.name] = round(v.bw / s.bw, 2)
            out["virtiofs_vs_sshfs_seqread"] = ratios
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "vmkit-fsbench", "version": FORMAT_VERSION, "instance": self.instance,
            "started": _iso(self.started), "finished": _iso(self.finished) if self.finished else None,
            "settings": self.settings.to_dict(), "guest": self.guest,
            "mechanisms": [m.to_dict() for m in self.mechanisms], "notes": list(self.notes),
            "rows": [{"job": r.job.name, "workload": r.job.workload, "engine": r.job.engine, "numjobs": r.job.numjobs,
                      "winner": r.winner(self.mechanisms),
                      "results": {k: v.to_dict() for k, v in r.results.items()}} for r in self.rows],
            "summary": self.summary(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @property
    def complete(self) -> bool:
        """Every row has a cell for every mechanism."""
        return all(m.name in r.results for r in self.rows for m in self.mechanisms)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def human_bw(bytes_per_s: float) -> str:
    mib = bytes_per_s / (1 << 20)
    if mib >= 100:
        return f"{mib:.0f} MiB/s"
    if mib >= 1:
        return f"{mib:.1f} MiB/s"
    return f"{bytes_per_s / 1024:.0f} KiB/s"


def human_iops(iops: float) -> str:
    return f"{iops / 1000:.1f}k" if iops >= 1000 else f"{iops:.0f}"


def cell_text(m: Measurement, job: Job) -> str:
    """``12.3 MiB/s, 3.1k IOPS``; randrw shows read/write; an error shows a short reason."""
    if not m.ok:
        return f"failed: {short_error(m.error or '')}"
    if job.reads and job.writes:
        return (f"{human_bw(m.read_bw)} / {human_bw(m.write_bw)}, "
                f"{human_iops(m.read_iops)} / {human_iops(m.write_iops)} IOPS")
    return f"{human_bw(m.bw)}, {human_iops(m.iops)} IOPS"


def short_error(error: str) -> str:
    """fio's ``fio: pid=375, err=22/file:engines/mmap.c:118, func=mmap, error=Invalid argument``
    -> ``mmap: Invalid argument``."""
    m = re.search(r"func=([^,]+), error=(.+)$", error)
    return f"{m.group(1)}: {m.group(2)}" if m else error


def column_title(m: Mechanism) -> str:
    return f"{m.name} (baseline)" if m.baseline else m.name


def render_markdown(report: Report) -> str:
    """The table as Markdown: one row per job, one column per mechanism, the winner in bold with ★."""
    s = report.settings
    lines = [f"# vmkit bench fs: {report.instance}", "",
             f"fio {report.guest.get('fio', '')} in the guest, block size {s.block_size} B, iodepth {s.iodepth}, "
             f"direct={int(s.direct)}, {format_size(s.size)} per file, runtime cap {s.runtime} s, "
             f"-multi = {MULTI_JOBS} jobs on {MULTI_JOBS} files; read/write for randrw ({RWMIXREAD}% reads). "
             f"★ = fastest share (bandwidth); the disk is the baseline and does not compete.", ""]
    mechs = report.mechanisms
    lines.append("| job | " + " | ".join(column_title(m) for m in mechs) + " |")
    lines.append("|---|" + "---|" * len(mechs))
    for row in report.rows:
        win = row.winner(mechs)
        cells = []
        for m in mechs:
            meas = row.results.get(m.name)
            if meas is None:
                cells.append("not run")
                continue
            text = cell_text(meas, row.job).replace("|", "\\|")
            cells.append(f"**{text}** ★" if m.name == win else text)
        lines.append(f"| {row.job.name} | " + " | ".join(cells) + " |")
    lines.append("")
    for m in mechs:
        where = f"host {m.host_path} → " if m.host_path else ""
        lines.append(f"- {m.name}: {where}guest {m.guest_path} ({m.fstype} from {m.source})")
    for note in report.notes:
        lines.append(f"- note: {note}")
    lines.extend(["", *[f"- {ln}" for ln in summary_lines(report)]])
    return "\n".join(lines).rstrip() + "\n"


def summary_lines(report: Report) -> list[str]:
    summ = report.summary()
    lines = []
    if summ["decided_rows"]:
        parts = [f"{name} {n}/{summ['decided_rows']} ({100 * n / summ['decided_rows']:.0f}%)"
                 for name, n in summ["wins"].items()]
        lines.append("fastest share per row: " + ", ".join(parts))
    ratios = summ.get("virtiofs_vs_sshfs_seqread")
    if ratios:
        lines.append("virtiofs / sshfs on sequential read: " + ", ".join(f"{k} {v:g}x" for k, v in ratios.items()))
    return lines


# --------------------------------------------------------------------------- running in the guest

Exec = Callable[[list[str], float], ExecResult]
"""Run argv in the guest with a timeout (seconds): the guest agent's ``guest-exec``."""


@dataclass(frozen=True)
class Step:
    """Progress: what runs now (``index`` of ``total`` measurements, 0-based)."""

    index: int
    total: int
    job: str
    mechanism: str
    phase: str  # "layout", "run", "cleanup"


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def _sh(script: str, *args: str) -> list[str]:
    return ["sh", "-c", script, "vmkit-fsbench", *args]


def guest_mountinfo(exec_: Exec) -> str:
    res = exec_(["cat", "/proc/self/mountinfo"], 30.0)
    if res.exit_code != 0:
        raise VmkitError(f"cannot read /proc/self/mountinfo in the guest: {_text(res.stderr).strip()}")
    return _text(res.stdout)


def guest_fio_version(exec_: Exec) -> str:
    res = exec_(_sh("command -v fio >/dev/null && fio --version"), 30.0)
    if res.exit_code != 0:
        raise HostError("fio is not installed in the guest",
                        hint="install it in the guest (apt-get install fio), or recreate the machine from a "
                             "rebuilt debian-12 image, which has it")
    return _text(res.stdout).strip()


def _layout_timeout(settings: Settings) -> float:
    # 4 files written at >= 1 MiB/s, plus fio's start-up under TCG
    return 120.0 + MULTI_JOBS * settings.size / (1 << 20)


def run(instance: str, exec_: Exec, plan: Plan, jobs: Sequence[Job], settings: Settings, *,
        progress: Callable[[Step], None] | None = None) -> Report:
    """Measure every job on every mechanism of ``plan``; always removes the scratch directories.

    Rows are run job by job, each on every mechanism in turn (so load changes on the host hit all
    columns alike). If interrupted (KeyboardInterrupt) or on an error, fio processes still running
    in the guest are stopped and the scratch directories removed before the exception propagates.
    """
    token = secrets.token_hex(4)
    scratch = {m.name: _scratch_dir(m, token) for m in plan.mechanisms}
    report = Report(instance, settings, plan.mechanisms, [Row(j) for j in jobs], plan.notes)
    report.guest["fio"] = guest_fio_version(exec_)
    total = len(jobs) * len(plan.mechanisms)

    def tell(i: int, job: str, mech: str, phase: str) -> None:
        if progress is not None:
            progress(Step(i, total, job, mech, phase))

    made: list[str] = []
    try:
        for m in plan.mechanisms:
            tell(0, "layout", m.name, "layout")
            res = exec_(["mkdir", scratch[m.name]], 30.0)
            if res.exit_code != 0:
                hint = ("the guest agent runs as root: a FUSE mount (sshfs) must allow it (-o allow_other)"
                        if m.kind == "sshfs" else f"is {m.guest_path} writable in the guest?")
                raise VmkitError(f"cannot create {scratch[m.name]} in the guest ({m.name}): "
                                 f"{_text(res.stderr).strip()}", hint=hint)
            made.append(scratch[m.name])
            res = exec_(layout_argv(scratch[m.name], settings), _layout_timeout(settings))
            laid = parse_fio_json(_text(res.stdout), _text(res.stderr), res.exit_code)
            if not laid.ok:
                raise VmkitError(f"cannot lay out the fio files in {scratch[m.name]} ({m.name}): {laid.error}",
                                 hint=f"is there room for {MULTI_JOBS} x {format_size(settings.size)}? try --size")
        i = 0
        for row in report.rows:
            for m in plan.mechanisms:
                tell(i, row.job.name, m.name, "run")
                row.results[m.name] = _measure(exec_, row.job, m, scratch[m.name], settings)
                i += 1
        report.finished = time.time()
        return report
    finally:
        tell(total, "cleanup", "", "cleanup")
        cleanup(exec_, token, made)


def _scratch_dir(m: Mechanism, token: str) -> str:
    base = m.guest_path.rstrip("/") or "/"
    hidden = "" if m.baseline else "."
    return f"{base}/{hidden}{SCRATCH_PREFIX}{token}"


_DROP_CACHES_AND_RUN = 'sync; echo 3 > /proc/sys/vm/drop_caches; exec "$@"'


def _measure(exec_: Exec, job: Job, mech: Mechanism, directory: str, settings: Settings) -> Measurement:
    argv = _sh(_DROP_CACHES_AND_RUN, *fio_argv(job, directory, settings))
    # the runtime is a cap fio checks between I/Os; generous margin for start-up and slow mmap
    limit = settings.runtime * 3 + 90.0
    try:
        res = exec_(argv, limit)
    except VmTimeoutError:
        # fio ignores its runtime only when an I/O never returns: the file system is stuck
        raise VmTimeoutError(
            f"fio {job.name} on {mech.name} ({directory}) gave no result within {limit:.0f} s",
            hint=f"the {mech.name} mount may be hung in the guest (processes in state D); "
                 "leave it out with --share, or restart the machine") from None
    return parse_fio_json(_text(res.stdout), _text(res.stderr), res.exit_code)


def cleanup(exec_: Exec, token: str, dirs: Iterable[str]) -> None:
    """Stop this run's fio processes in the guest and remove its scratch directories (best effort)."""
    dirs = list(dirs)
    # fio processes (by name) whose command line holds this run's token; not a pattern over every
    # process, which would also match this shell (its arguments hold the token too)
    script = ('t="$1"; shift; '
              'mine() { for p in $(pgrep -x fio); do tr "\\0" " " < /proc/$p/cmdline 2>/dev/null '
              '| grep -qF -- "$t" && echo $p; done; }; '
              'for i in $(seq 20); do p=$(mine); [ -z "$p" ] && break; kill $p 2>/dev/null; sleep 0.5; done; '
              'rm -rf -- "$@"')
    with contextlib.suppress(VmkitError):
        exec_(_sh(script, f"{SCRATCH_PREFIX}{token}", *dirs), 60.0)


def describe_argv(job: Job, settings: Settings, directory: str = "DIR") -> str:
    """The fio command of a row, for the docs and ``--dry-run`` style output."""
    return shlex.join(fio_argv(job, directory, settings))


# --------------------------------------------------------------------------- one call for a named machine


def bench(name: str, jobs: Sequence[Job], settings: Settings, *, shares: Sequence[str] | None = None,
          disk: bool = True, progress: Callable[[Step], None] | None = None) -> Report:
    """``vmkit bench fs NAME``: plan the columns from the running machine's mounts, then :func:`run`."""
    inst = control.get(name)
    status = inst.reconcile()
    if not inst.is_supervised() or status.state != "running":
        raise StateError("benchmark the file systems", status.state, ["running"])
    config = inst.load_config()

    def exec_(argv: list[str], timeout: float) -> ExecResult:
        return control.exec_in_guest(name, argv, timeout=timeout)

    plan = plan_mechanisms(config, guest_mountinfo(exec_), shares=shares, disk=disk)
    return run(name, exec_, plan, jobs, settings, progress=progress)


def default_output_paths(name: str, when: float | None = None) -> tuple[Path, Path]:
    """``fsbench-YYYYmmdd-HHMMSS.json`` and ``.md`` in the instance directory."""
    stamp = datetime.fromtimestamp(time.time() if when is None else when, UTC).strftime("%Y%m%d-%H%M%S")
    base = control.get(name).dir / f"fsbench-{stamp}"
    return base.with_suffix(".json"), base.with_suffix(".md")


def write_report(report: Report, json_path: Path | None, markdown_path: Path | None) -> list[Path]:
    """Write the JSON and/or Markdown atomically; returns the paths written."""
    written = []
    for path, text in ((json_path, report.to_json), (markdown_path, lambda: render_markdown(report))):
        if path is None:
            continue
        try:
            atomic_write(path, text(), 0o644)
        except OSError as exc:
            raise ConfigError.single("--json" if path == json_path else "--markdown",
                                     f"cannot write {path}: {exc.strerror}") from None
        written.append(path)
    return written
