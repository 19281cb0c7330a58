#!/usr/bin/env python3
"""Benchmark vmkit's NBD server against qemu-nbd and nbdkit (file plugin).

The same file (in /dev/shm by default, so the disk is not what is measured) is served by each
server on a unix socket and driven by the same client, fio's ``nbd`` engine (libnbd):

* sequential 1 MiB reads and writes, queue depth 8 per connection;
* random 4 KiB reads, queue depth 32 per connection;
* each with 1 and with 4 connections (fio jobs; each job opens its own NBD connection).

Before timing, each server's export is read whole with nbdcopy and compared with the file.
Optionally (``--nbdcopy``) also ``nbdcopy URI null:`` (whole-file sequential read, 1 and 4
connections). Prints MB/s, IOPS and the ratio to qemu-nbd. Every server process is killed at the
end, whatever happens.

    .venv/bin/python benchmarks/nbd_bench.py [--size-mib 512] [--runtime 5] [--repeat 1]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    conns: int


WORKLOADS = [
    Workload("seq read 1M", "read", "1M", 8, 1),
    Workload("seq read 1M", "read", "1M", 8, 4),
    Workload("seq write 1M", "write", "1M", 8, 1),
    Workload("seq write 1M", "write", "1M", 8, 4),
    Workload("rand read 4K", "randread", "4k", 32, 1),
    Workload("rand read 4K", "randread", "4k", 32, 4),
]


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                except OSError:
                    pass
                else:
                    # a bare connect is an (aborted) client; give the server a moment
                    time.sleep(0.05)
                    return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {path} within {timeout} s")


def server_argv(kind: str, image: Path, sock: Path, extra: list[str]) -> list[str]:
    if kind == "vmkit":
        return [sys.executable, "-m", "vmkit.nbd", "serve", str(image), "--socket", str(sock), *extra]
    if kind == "qemu-nbd":
        return ["qemu-nbd", "-f", "raw", "-k", str(sock), "-t", "-e", "64", "--cache=writeback", str(image)]
    if kind == "nbdkit":
        return ["nbdkit", "-f", "-U", str(sock), "file", f"file={image}"]
    raise ValueError(kind)


@contextlib.contextmanager
def running_server(kind: str, image: Path, workdir: Path, extra: list[str]) -> Iterator[str]:
    sock = workdir / f"{kind}.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        server_argv(kind, image, sock, extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    try:
        wait_for_socket(sock, proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stderr is not None:
            errors = proc.stderr.read().decode(errors="replace")
            proc.stderr.close()
            if proc.returncode not in (0, -signal.SIGTERM, 130, 143) and errors.strip():
                print(f"[{kind}] exited {proc.returncode}: {errors.strip()[-2000:]}", file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def run_fio(uri: str, w: Workload, size: int, runtime: float) -> tuple[float, float]:
    """(MB/s, IOPS) of one fio run."""
    per_job = size // w.conns
    argv = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={w.rw}",
        f"--bs={w.bs}",
        f"--iodepth={w.iodepth}",
        f"--numjobs={w.conns}",
        f"--size={per_job}",
        f"--offset_increment={per_job}",
        "--time_based",
        f"--runtime={runtime}",
        "--ramp_time=1",
        "--group_reporting",
        "--randrepeat=0",
        "--output-format=json",
    ]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=runtime * 4 + 60, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"fio failed: {res.stderr.strip() or res.stdout.strip()}")
    job = json.loads(res.stdout[res.stdout.index("{") :])["jobs"][0]
    side = job["write"] if "write" in w.rw else job["read"]
    return side["bw_bytes"] / 1e6, side["iops"]


def run_nbdcopy(uri: str, conns: int, size: int) -> tuple[float, float]:
    argv = ["nbdcopy", f"--connections={conns}", "--request-size=1048576", uri, "null:"]
    started = time.perf_counter()
    subprocess.run(argv, check=True, timeout=300)
    elapsed = time.perf_counter() - started
    return size / elapsed / 1e6, size / (1 << 20) / elapsed


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_contents(uri: str, image: Path) -> None:
    """Read the whole export with nbdcopy and compare it with the file: fast must also be right."""
    h = hashlib.sha256()
    with subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 22):
            h.update(chunk)
    if proc.returncode != 0 or h.hexdigest() != sha256_file(image):
        raise RuntimeError(f"{uri}: the export's contents differ from the file")


def make_image(path: Path, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for i in range(size >> 20):
            fh.write(chunk[i % 4096 :] + chunk[: i % 4096])  # not all blocks equal


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512, help="image size (default 512)")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per fio run (default 5)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is shown")
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    ap.add_argument("--servers", default="qemu-nbd,nbdkit,vmkit")
    ap.add_argument("--only", default="", help="substring filter on workload names")
    ap.add_argument("--nbdcopy", action="store_true", help="also time nbdcopy URI null:")
    ap.add_argument("--vmkit-arg", action="append", default=[], help="extra argument for vmkit nbd serve")
    args = ap.parse_args()

    servers = [s for s in args.servers.split(",") if s]
    missing = [t for t in ["fio", *(s for s in servers if s != "vmkit")] if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (apt-get install fio qemu-utils nbdkit)", file=sys.stderr)
        return 2
    size = args.size_mib << 20
    load_before = os.getloadavg()[0]
    workloads = [w for w in WORKLOADS if args.only in w.name]
    results: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="nbd-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        image = work / "image.raw"
        make_image(image, size)
        cells: list[tuple[str, int, Callable[[str], tuple[float, float]]]] = []
        for w in workloads:
            cells.append((w.name, w.conns, lambda uri, w=w: run_fio(uri, w, size, args.runtime)))
        if args.nbdcopy:
            for conns in (1, 4):
                cells.append(("nbdcopy to null:", conns, lambda uri, c=conns: run_nbdcopy(uri, c, size)))
        for _ in range(args.repeat):
            for kind in servers:
                extra = args.vmkit_arg if kind == "vmkit" else []
                with running_server(kind, image, work, extra) as uri:
                    check_contents(uri, image)
                    for name, conns, fn in cells:
                        value = fn(uri)
                        results.setdefault((name, conns, kind), []).append(value)
                        line = f"  {kind:9} {name:17} x{conns}: {value[0]:9.1f} MB/s {value[1]:10.0f} IOPS"
                        print(line, file=sys.stderr)

    print()
    print(
        f"NBD servers, file of {args.size_mib} MiB in {args.dir or tempfile.gettempdir()}, unix socket, "
        f"client fio {fio_version()} (nbd engine), {args.runtime:g} s per run, median of {args.repeat}, "
        f"{os.cpu_count()} CPUs, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after"
    )
    header = f"{'workload':18} {'conns':>5} {'server':9} {'MB/s':>9} {'IOPS':>10} {'vs qemu-nbd':>11}"
    print(header)
    print("-" * len(header))
    seen: list[tuple[str, int]] = []
    for name, conns, _kind in results:
        if (name, conns) not in seen:
            seen.append((name, conns))
    for name, conns in seen:
        base = results.get((name, conns, "qemu-nbd"))
        base_bw = statistics.median(v[0] for v in base) if base else None
        for kind in servers:
            vals = results.get((name, conns, kind))
            if not vals:
                continue
            bw = statistics.median(v[0] for v in vals)
            iops = statistics.median(v[1] for v in vals)
            ratio = f"{bw / base_bw:.2f}x" if base_bw else "-"
            print(f"{name:18} {conns:>5} {kind:9} {bw:9.1f} {iops:10.0f} {ratio:>11}")
    return 0


def fio_version() -> str:
    try:
        return subprocess.run(["fio", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
