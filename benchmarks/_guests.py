"""What the memory and clock benchmarks share: a throw-away vmkit home, Debian guests made through
the public client, and readings of the host (QEMU's RSS, /proc); and for the benchmarks that drive
bare QEMUs (migrate_bench, dirtysync_bench), a QMP connection that waits for QEMU's socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import vmkit
from vmkit.config import MachineConfig

MiB = 1 << 20


@contextlib.contextmanager
def scratch_home(prefix: str) -> Iterator[vmkit.Client]:
    """A client on a fresh VMKIT_HOME in /tmp (short socket paths); every machine in it is stopped and
    deleted afterwards, whatever happened."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir="/tmp") as tmp:
        home = Path(tmp) / "home"
        home.mkdir(mode=0o700)
        os.environ["VMKIT_HOME"] = str(home)
        client = vmkit.Client(home)
        try:
            yield client
        except BaseException:
            for inst in client.list():  # say why before the home goes away
                with contextlib.suppress(Exception):
                    print(f"--- {inst.name}: {inst.status().state} ({inst.status().reason})", file=sys.stderr)
                    for log in ("supervisor.log", "qemu.log", "serial.log"):
                        text = (inst.directory / log).read_text(errors="replace").splitlines()[-15:]
                        print(f"--- {log}:\n" + "\n".join(text), file=sys.stderr)
            raise
        finally:
            for inst in client.list():
                with contextlib.suppress(Exception):
                    inst.stop(force=True)
                with contextlib.suppress(Exception):
                    inst.delete(force=True)


def edit_config(inst: vmkit.Instance, **fields: object) -> None:
    """Change fields of a stopped machine's vm.yaml (a benchmark's variant of the same machine)."""
    config: MachineConfig = inst.config
    new = MachineConfig.model_validate({**config.to_dict(), **fields})
    new.save(inst.directory / "vm.yaml")


def debian(client: vmkit.Client, name: str, *, memory: str = "1G", cpus: int = 1, cold: bool = False,
           **fields: object) -> vmkit.Instance:
    """A started debian-12 machine (its guest agent answers); ``cold``: booted even where a warm template
    of the image would restore it (instant start)."""
    inst = client.create(name, image="debian-12", memory=memory, cpus=cpus)
    if fields:
        edit_config(inst, **fields)
    inst.start(timeout=600, cold=cold)
    return inst


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def settle_rss(inst: vmkit.Instance, *, window: float = 10.0, tolerance: int = 8 * MiB, timeout: float = 180.0) -> int:
    """QEMU's RSS once it has moved less than ``tolerance`` over ``window`` seconds (the guest is idle)."""
    deadline = time.monotonic() + timeout
    samples: list[tuple[float, int]] = []
    while True:
        now = time.monotonic()
        samples.append((now, inst.stats().host_rss_bytes))
        samples = [s for s in samples if now - s[0] <= window]
        values = [s[1] for s in samples]
        if now - samples[0][0] >= window * 0.9 and max(values) - min(values) <= tolerance:
            return samples[-1][1]
        if now > deadline:
            return samples[-1][1]
        time.sleep(1.0)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


async def qmp_connect(path: str | Path, attempts: int = 200) -> Any:
    """A ``qemu.qmp`` client connected to the QMP socket at ``path``, waiting (50 ms at a time) for
    the QEMU that is starting to make it."""
    from qemu.qmp import ConnectError, QMPClient

    for _ in range(attempts):
        client = QMPClient("bench")
        try:
            await client.connect(str(path))
            return client
        except ConnectError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"no QMP at {path}")
