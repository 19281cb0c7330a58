"""What ``vmkit bench cpu`` and ``vmkit bench devices`` share: the throw-away machines they boot,
a running machine's commands, and the host's own programs copied into a guest.

A throw-away machine is named ``vmkit-bench-<what>-<hex>``, made from an image with
:func:`vmkit.backends.local.control.create_from_options` and deleted (stopped hard first) when the
``with`` block ends, also on an error or Ctrl-C.

The guest image has no sysbench (and the shared debian-12 recipe must not change for a benchmark):
:func:`make_bundle` copies the host's binary with every library ``ldd`` names and the dynamic
loader into one directory, with a ``run`` script that starts the binary through that loader
(``ld-linux-x86-64.so.2 --library-path DIR DIR/sysbench``). So the guest and a chroot run the very
same files as the host, whatever libraries their root file system has; :func:`install_bundle` copies
the bundle in as one tarball (``vmkit cp``) and unpacks it under ``/var/tmp``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from vmkit.backends.local import control
from vmkit.config import MachineConfig
from vmkit.errors import ConfigError, HostError, StateError, VmkitError
from vmkit.fsutil import atomic_write
from vmkit.host.builder import CreateOptions
from vmkit.runtime.guest.agent import GuestAgentError
from vmkit.runtime.guest.execute import ExecResult


class Exec(Protocol):
    """Run argv in the guest with a timeout (seconds) and optional stdin: the agent's ``guest-exec``."""

    def __call__(self, argv: list[str], timeout: float, stdin: bytes | None = None) -> ExecResult: ...

Progress = Callable[[str], None]

PREFIX = "vmkit-bench-"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BUNDLE_RUN = "run"
_RUN_SCRIPT = ('#!/bin/sh\nd=$(dirname "$0")\nexec "$d/{loader}" --library-path "$d" "$d/{binary}" "$@"\n')


class BestOf:
    """What a table cell measured as the best of several runs, or why there is none: the part the cpu and
    device benchmarks' cells share. A subclass is a frozen dataclass with the figure in the field named
    ``KEY`` (rounded to ``DIGITS`` places in JSON, to a whole number with None) and ``error`` and
    ``samples`` (every run's figure) fields."""

    KEY: ClassVar[str]
    DIGITS: ClassVar[int | None] = None
    error: str | None
    samples: tuple[float, ...]

    @property
    def value(self) -> float:
        return float(getattr(self, self.KEY))

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        return {self.KEY: round(self.value, self.DIGITS),
                "runs": [round(x, self.DIGITS) for x in self.samples or (self.value,)]}


def format_ratio(x: float | None) -> str:
    """A ratio for a table: ``1.23x``, ``0.045x`` (three digits below 0.1), ``-`` for none."""
    if x is None:
        return "-"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.3f}x"


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only (the Agg backend), or why ``--plot`` cannot work."""
    try:
        import matplotlib
    except ImportError:
        raise HostError("--plot needs matplotlib, which is not installed",
                        hint="pip install 'vmkit[bench]' (or matplotlib>=3.8,<4)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown(title: str, header: list[str], rows: list[list[str]], footer: list[str]) -> str:
    """A report as Markdown: a heading, the table, its footer lines as a list."""
    out = [f"# {title}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    out += ["", *[f"- {line}" for line in footer]]
    return "\n".join(out) + "\n"


def save_plot(plt: Any, fig: Any, path: Path) -> Path:
    """Write ``fig`` (made with :func:`pyplot`'s ``plt``) to ``path`` as PNG and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise ConfigError.single("--plot", f"cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)
    return path


def write_json(text: str, path: Path) -> Path:
    """``--json FILE``: the report's JSON, written whole or not at all."""
    try:
        atomic_write(path, text, 0o644)
    except OSError as exc:
        raise ConfigError.single("--json", f"cannot write {path}: {exc.strerror}") from None
    return path


def text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class GuestExec:
    """:data:`Exec` for a machine by name (``machine``: where ``vmkit cp`` can copy to)."""

    machine: str

    def __call__(self, argv: list[str], timeout: float, stdin: bytes | None = None) -> ExecResult:
        return control.exec_in_guest(self.machine, argv, timeout=timeout, stdin=stdin)


def guest_exec(name: str) -> GuestExec:
    return GuestExec(name)


def running_config(name: str, what: str) -> tuple[MachineConfig, str | None]:
    """A running machine's configuration and accelerator (``--machine NAME``), or a state error."""
    inst = control.get(name)
    status = inst.reconcile()
    if not inst.is_supervised() or status.state != "running":
        raise StateError(what, status.state, ["running"])
    config = inst.load_config()
    if not config.agent:
        raise HostError(f"{name} has no guest agent: {what} runs its programs through it",
                        hint="use a machine made from a cloud image (vmkit create NAME --image debian-12)")
    return config, status.accel


def create_options_supported(field: str) -> bool:
    """Whether ``vmkit create`` has this option (``arch`` came with the aarch64 guests)."""
    return field in {f.name for f in dataclasses.fields(CreateOptions)}


@contextlib.contextmanager
def throwaway(what: str, *, image: str, cpus: int, memory: str = "1G", accel: str | None = None,
              disks: list[str] | None = None, arch: str | None = None, networks: list[str] | None = None,
              ready_timeout: float | None = None, progress: Progress | None = None) -> Iterator[str]:
    """Create and start a machine for one measurement; always deleted afterwards. ``ready_timeout``:
    seconds the boot may take instead of the image's (an emulated foreign CPU on a loaded host)."""
    name = f"{PREFIX}{what}-{secrets.token_hex(3)}"
    extra = {"arch": arch} if arch is not None else {}
    opts = CreateOptions(name=name, cpus=cpus, memory=memory, image=image, accel=accel, disks=list(disks or []),
                         networks=list(networks or []),
                         **extra)  # type: ignore[arg-type]  # arch exists where create_options_supported says so
    if progress is not None:
        progress(f"creating {name} from {image}")
    control.create_from_options(opts)
    try:
        if ready_timeout is not None:
            inst = control.get(name)
            config = inst.load_config()
            inst.save_config(config.model_copy(
                update={"readiness": config.readiness.model_copy(update={"timeout": ready_timeout})}))
        if progress is not None:
            progress(f"booting {name}")
        say = progress
        control.start(name, progress=(lambda line: say(f"booting {name}: {_ANSI.sub('', line)}")) if say else None)
        yield name
    finally:
        with contextlib.suppress(VmkitError):
            control.delete(name, force=True)


# --------------------------------------------------------------------------- host programs in a guest


def parse_ldd(output: str) -> tuple[list[Path], Path | None]:
    """``ldd BINARY`` -> (the libraries it resolves, the dynamic loader). A library ldd cannot find
    is an error naming it."""
    libs: list[Path] = []
    loader: Path | None = None
    for line in output.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise HostError(f"ldd cannot find {line.split()[0]}", hint="reinstall the program's package")
        m = re.match(r"\S+ => (/\S+) \(0x[0-9a-f]+\)$", line)
        if m:
            libs.append(Path(m.group(1)))
            continue
        m = re.match(r"(/\S*ld-linux\S*) \(0x[0-9a-f]+\)$", line)
        if m:
            loader = Path(m.group(1))
    return libs, loader


@dataclass(frozen=True)
class Bundle:
    """A program with its loader and libraries in one directory (:func:`make_bundle`)."""

    directory: Path
    libraries: dict[str, Path]
    """Each library's file name in the bundle -> where it came from on the host."""

    @property
    def run(self) -> Path:
        return self.directory / BUNDLE_RUN


def make_bundle(binary: Path, directory: Path) -> Bundle:
    """Copy ``binary``, its libraries and its loader into ``directory`` with a ``run`` script."""
    res = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise HostError(f"ldd {binary} failed: {res.stderr.strip() or res.stdout.strip()}")
    libs, loader = parse_ldd(res.stdout)
    if loader is None:
        raise HostError(f"{binary} is not a dynamically linked program (ldd names no loader)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for src in (binary, loader, *libs):
        shutil.copy2(src.resolve(), directory / src.name)
    run = directory / BUNDLE_RUN
    run.write_text(_RUN_SCRIPT.format(loader=loader.name, binary=binary.name))
    run.chmod(0o755)
    return Bundle(directory, {lib.name: lib for lib in libs})


def parse_sha256sum(output: str) -> dict[str, str]:
    """``sha256sum FILE...`` -> file -> digest (files it could not read are left out)."""
    sums = {}
    for line in output.splitlines():
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if m:
            sums[m.group(2)] = m.group(1)
    return sums


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


STDIN_PIECE = 40 << 10
"""Bytes sent per ``guest-exec`` (its stdin travels base64 in one API request of at most 64 KiB)."""

CORE_LIBRARIES = frozenset({"libc.so.6", "libm.so.6", "libpthread.so.0", "libgcc_s.so.1", "libluajit-5.1.so.2"})
"""The libraries sysbench's CPU test runs in (its loop is Lua on LuaJIT calling libc and libm): always
the host's files. The others (database drivers, TLS) are only loaded, never run, by that test."""


@dataclass(frozen=True)
class Installed:
    run: str
    copied: list[str]
    """Libraries copied in (missing in the guest, or a core one that differs there)."""
    guest_own: list[str]
    """Libraries that differ from the host's and are not core: the guest's own build is used."""


def install_bundle(exec_: Exec, bundle: Bundle, guest_dir: str, *, progress: Progress | None = None) -> Installed:
    """Copy a bundle into the guest at ``guest_dir``: the program, the loader and the libraries it
    needs from the host (see :data:`CORE_LIBRARIES`); a library the guest has at the same path with
    the same SHA-256 is not copied (the loader finds that same file there). They go in as one
    tarball through the agent: ``vmkit cp``, or if the agent is too slow for that on a loaded host,
    in pieces on ``guest-exec``'s stdin (each with its own time limit).
    """
    res = exec_(["mkdir", "-m", "0700", "-p", guest_dir], 30.0)
    if res.exit_code != 0:
        raise VmkitError(f"cannot create {guest_dir} in the guest: {text(res.stderr).strip()}")
    paths = {name: str(src) for name, src in bundle.libraries.items()}
    res = exec_(["sha256sum", "--", *paths.values()], 60.0)
    have = parse_sha256sum(text(res.stdout))
    copied, guest_own = [], []
    for name, src in sorted(paths.items()):
        if src not in have or (name in CORE_LIBRARIES and have[src] != _sha256(bundle.directory / name)):
            copied.append(name)
        elif have[src] != _sha256(bundle.directory / name):
            guest_own.append(name)
    tarball = bundle.directory.parent / f"{bundle.directory.name}.tar.gz"
    with tarfile.open(tarball, "w:gz", compresslevel=9) as tar:
        for f in sorted(bundle.directory.iterdir()):
            if f.name not in bundle.libraries or f.name in copied:
                tar.add(f, arcname=f.name)
    target = f"{guest_dir}/bundle.tar.gz"
    try:
        if progress is not None:
            progress(f"copying {tarball.stat().st_size >> 10} KiB into the guest")
        _push(exec_, tarball, target, progress)
    finally:
        tarball.unlink(missing_ok=True)
    res = exec_(["tar", "-xzf", target, "-C", guest_dir], 120.0)
    if res.exit_code != 0:
        raise VmkitError(f"cannot unpack the bundle in the guest: {text(res.stderr).strip()}")
    return Installed(f"{guest_dir}/{BUNDLE_RUN}", copied, guest_own)


def _push(exec_: Exec, local: Path, target: str, progress: Progress | None) -> None:
    name = getattr(exec_, "machine", None)
    if isinstance(name, str):
        try:
            control.copy(str(local), f"{name}:{target}")
            return
        except GuestAgentError:
            pass  # a 1 MiB guest-file-write may outlast the agent's time limit on a loaded host
    data = local.read_bytes()
    for i in range(0, len(data), STDIN_PIECE):
        if progress is not None:
            progress(f"copying {len(data) >> 10} KiB into the guest: {i * 100 // len(data)}%")
        res = exec_(["sh", "-c", 'cat >> "$1"' if i else 'cat > "$1"', "sh", target], 120.0, data[i:i + STDIN_PIECE])
        if res.exit_code != 0:
            raise VmkitError(f"cannot write {target} in the guest: {text(res.stderr).strip()}")


def remove_in_guest(exec_: Exec, path: str) -> None:
    with contextlib.suppress(VmkitError):
        exec_(["rm", "-rf", "--", path], 60.0)


def host_cpus() -> int:
    return len(os.sched_getaffinity(0))
