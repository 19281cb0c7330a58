"""Throughput of the state-file format against a plain file copy.

QEMU 7.2 has no ``file:`` migration URI; the plain way to save is ``migrate exec:cat > FILE``
and to restore ``-incoming exec:cat FILE``. This benchmark stands in for QEMU with a child
process that writes (or reads) N MiB through a pipe (``--rate-mib`` paces the writer like a
real migration, HOST-NOTES measured ~140 MiB/s under TCG) and compares:

  save     producer | cat > FILE                  (plain, what QEMU's exec: does)
           producer | cat > FILE; fsync FILE      (plain + the durability vmkit guarantees)
           producer | save_from_fd(FILE)           (vmkit: zstd where it pays, AES-256-GCM chunks,
                                                    O_DIRECT, fsync, rename)
  restore  cat FILE | consumer                    (plain)
           restore_to_fd(FILE) | consumer          (vmkit: authenticated chunk by chunk)

plus the raw in-memory AES-256-GCM rate. The producer's blocks are random (incompressible)
unless ``--compressible`` makes half of each 4 MiB block zeros and text. The restores read the
plain file from the page cache (``cat > FILE`` left it there) and vmkit's file from the disk
(O_DIRECT writes bypass the page cache); ``--cold`` drops both files from the page cache
before each restore (only these two files, nothing else: the machine is shared). Prints a
table and the ratios.

    .venv/bin/python benchmarks/statefile_bench.py [--size-mib 1024] [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from _table import med_best, print_table, ratio, settle
from vmkit.state.file import DEFAULT_CHUNK_SIZE, StateHeader, restore_to_fd, save_from_fd

BLOCK = 4 << 20

PRODUCER = """
import os, time
block = os.urandom({block})
if {compressible}:
    block = block[: len(block) // 2] + bytes(len(block) // 4) + (b"kernel text " * len(block))[: len(block) // 4]
block = memoryview(block)
rate = {rate}
left = {size}
start = time.monotonic()
sent = 0
while left:
    n = os.write(1, block[: min(left, len(block))])
    left -= n
    sent += n
    if rate:
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
"""

CONSUMER = """
import os
buf = bytearray(1 << 20)
total = 0
while n := os.readv(0, [buf]):
    total += n
print(total)
"""


@dataclass
class Sample:
    seconds: float
    cpu: float  # CPU seconds of this process (all threads) and of reaped children


def _cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _measure(fn: Callable[[], None]) -> Sample:
    c0, t0 = _cpu(), time.perf_counter()
    fn()
    return Sample(time.perf_counter() - t0, _cpu() - c0)


RATE = 0  # producer bytes/s, 0 = as fast as it can (set by --rate-mib)
COMPRESSIBLE = False  # set by --compressible


def _producer(size: int) -> subprocess.Popen[bytes]:
    code = PRODUCER.format(block=BLOCK, size=size, rate=RATE, compressible=COMPRESSIBLE)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)


def _consumer(stdin: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", CONSUMER], stdin=stdin, stdout=subprocess.PIPE)


def _check_consumer(proc: subprocess.Popen[bytes], size: int) -> None:
    out, _ = proc.communicate()
    if proc.returncode != 0 or int(out) != size:
        raise SystemExit(f"consumer got {out!r} bytes, expected {size}")


def _header() -> StateHeader:
    return StateHeader(
        qemu_version="7.2.0", machine_type="pc-q35-7.2", config_digest="sha256:" + "0" * 64, ram_bytes=1 << 30
    )


def drop_cache(*files: Path) -> None:
    """Drop these (clean, settled) files from the page cache."""
    for f in files:
        if f.exists():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def plain_save(path: Path, size: int, *, fsync: bool) -> None:
    prod = _producer(size)
    assert prod.stdout is not None
    with open(path, "wb") as out:
        cat = subprocess.run(["cat"], stdin=prod.stdout, stdout=out, check=True)
        if fsync:
            os.fsync(out.fileno())
    prod.stdout.close()
    assert prod.wait() == 0 and cat.returncode == 0
    assert path.stat().st_size == size


def vmkit_save(path: Path, size: int, key: bytes, chunk_size: int) -> None:
    prod = _producer(size)
    assert prod.stdout is not None
    info = asyncio.run(save_from_fd(path, _header(), prod.stdout.fileno(), key, chunk_size=chunk_size))
    prod.stdout.close()
    assert prod.wait() == 0
    assert info.payload_bytes == size


def plain_restore(path: Path, size: int) -> None:
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    assert cat.stdout is not None
    cons = _consumer(cat.stdout.fileno())
    cat.stdout.close()
    _check_consumer(cons, size)
    assert cat.wait() == 0


def vmkit_restore(path: Path, size: int, key: bytes) -> None:
    r, w = os.pipe()
    cons = _consumer(r)
    os.close(r)
    try:
        info = asyncio.run(restore_to_fd(path, key, w))
    finally:
        os.close(w)
    _check_consumer(cons, size)
    assert info.payload_bytes == size


def crypto_only(size: int, chunk_size: int) -> None:
    aead = AESGCM(AESGCM.generate_key(256))
    plain = memoryview(os.urandom(chunk_size))
    out = memoryview(bytearray(chunk_size + 16))
    aad = bytes(33)
    for i in range(size // chunk_size):
        aead.encrypt_into(b"\0\0\0\0" + i.to_bytes(8, "big"), plain, aad, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk-mib", type=int, default=DEFAULT_CHUNK_SIZE >> 20)
    ap.add_argument("--rate-mib", type=int, default=0, help="pace the producer (MiB/s); 0 = unpaced")
    ap.add_argument("--compressible", action="store_true", help="half of each block zeros and text")
    ap.add_argument("--cold", action="store_true", help="restore both files from the disk, not the page cache")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    args = ap.parse_args()
    global RATE, COMPRESSIBLE
    RATE = args.rate_mib << 20
    COMPRESSIBLE = args.compressible
    size = args.size_mib << 20
    chunk = args.chunk_mib << 20
    key = secrets.token_bytes(32)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="vmkit-bench-") as tmp:
        d = Path(tmp)
        plain_file, vmkit_file = d / "plain.bin", d / "vm.state"
        cases: dict[str, Callable[[], None]] = {
            "AES-256-GCM in memory": lambda: crypto_only(size, chunk),
            "save: plain cat > file": lambda: plain_save(plain_file, size, fsync=False),
            "save: plain cat > file + fsync": lambda: plain_save(plain_file, size, fsync=True),
            "save: vmkit save_from_fd": lambda: vmkit_save(vmkit_file, size, key, chunk),
            "restore: plain cat file": lambda: plain_restore(plain_file, size),
            "restore: vmkit restore_to_fd": lambda: vmkit_restore(vmkit_file, size, key),
        }
        results: dict[str, list[Sample]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, fn in cases.items():  # interleaved, so drift on a shared host hits all cases alike
                if name.startswith("save:"):  # start from nothing: no old file to unlink in the timed part
                    (vmkit_file if "vmkit" in name else plain_file).unlink(missing_ok=True)
                results[name].append(_measure(fn))
                settle(plain_file, vmkit_file)
                if args.cold:
                    drop_cache(plain_file, vmkit_file)
        plain_bytes = plain_file.stat().st_size
        vmkit_bytes = vmkit_file.stat().st_size

    seconds = {name: [s.seconds for s in samples] for name, samples in results.items()}
    pace = f"producer paced at {args.rate_mib} MiB/s" if args.rate_mib else "producer unpaced"
    data = "half compressible" if args.compressible else "random"
    data += ", restores from the disk" if args.cold else ""
    print(f"payload {args.size_mib} MiB ({data}), chunk {args.chunk_mib} MiB, {pace}, {args.repeat} runs per case")
    print("seconds: median and best; cpu s: median CPU seconds of this process + its children")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows: list[list[object]] = []
    for name, samples in results.items():
        med, best = med_best(seconds[name])
        cpu = sorted(s.cpu for s in samples)[len(samples) // 2]
        rows.append([name, f"{med:.3f}", f"{best:.3f}", f"{args.size_mib / med:.0f}", f"{cpu:.2f}"])
    print_table(["case", "median s", "best s", "MiB/s", "cpu s"], rows)
    print()
    ratios = [
        ("save: vmkit / plain", "save: vmkit save_from_fd", "save: plain cat > file"),
        ("save: vmkit / plain+fsync", "save: vmkit save_from_fd", "save: plain cat > file + fsync"),
        ("restore: vmkit / plain", "restore: vmkit restore_to_fd", "restore: plain cat file"),
    ]
    rows = [[label, ratio(seconds[a], seconds[b])] for label, a, b in ratios]
    rows.append(["file size: vmkit / plain", f"{vmkit_bytes / plain_bytes:.5f}x ({vmkit_bytes - plain_bytes:+d} B)"])
    print_table(["ratio", "median (best)"], rows)


if __name__ == "__main__":
    main()
