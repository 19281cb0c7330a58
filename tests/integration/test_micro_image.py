"""Integration: build the micro image (once, cached) and boot it in plain QEMU under TCG.

The image cache is ``$VMKIT_IMAGE_CACHE`` or ``<repo>/.cache/images`` so the image is built once
and reused by later runs. Every QEMU started here is killed in the fixture finaliser, and the
serial log is printed (shown by pytest when a test fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from qemu.qmp import EventListener, ExecInterruptedError, QMPClient

from vmkit.host.images.micro import (
    POWEROFF_MARKER,
    READY_MARKER,
    build_micro,
    guest_cmdline,
    has_line,
    parse_run_output,
    parse_ticks,
)
from vmkit.host.images.store import Image, ImageStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"),
]

REPO = Path(__file__).resolve().parents[2]


def image_cache() -> Path:
    env = os.environ.get("VMKIT_IMAGE_CACHE")
    return Path(env).expanduser() if env else REPO / ".cache" / "images"


@pytest.fixture(scope="session")
def micro_image() -> Image:
    stages: list[str] = []
    image = build_micro(ImageStore(image_cache()), progress=stages.append)
    image.verify()
    return image


class Guest:
    """A QEMU process running the micro image, its serial output (stdout) and QMP socket."""

    def __init__(self, proc: asyncio.subprocess.Process, qmp_path: Path, started: float) -> None:
        self.proc = proc
        self.qmp_path = qmp_path
        self.started = started
        self.serial = ""
        self.marks: dict[str, float] = {}
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(4096):
            self.serial += chunk.decode(errors="replace")
            self._changed.set()
        self._changed.set()

    async def wait_until(self, what: str, predicate: Callable[[str], bool], timeout: float) -> float:
        """Wait until ``predicate(serial)`` holds; return seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        while not predicate(self.serial):
            if self.proc.returncode is not None and self._reader.done():
                raise AssertionError(f"QEMU exited ({self.proc.returncode}) before {what}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        self.marks[what] = time.monotonic() - self.started
        return self.marks[what]

    async def wait_line(self, marker: str, timeout: float = 60) -> float:
        return await self.wait_until(marker, lambda s: has_line(s, marker), timeout)

    async def drain(self, timeout: float = 5) -> None:
        """After QEMU exited: wait until all of its output has been read."""
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            self._reader.cancel()
            await self._reader


BootFn = Callable[[str], Awaitable[Guest]]


@pytest.fixture
async def boot(micro_image: Image, tmp_path: Path) -> AsyncIterator[BootFn]:
    guests: list[Guest] = []

    async def start(cmdline: str) -> Guest:
        qmp_path = tmp_path / f"qmp{len(guests)}.sock"
        argv = [
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,thread=multi", "-m", "256",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", "stdio",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-kernel", str(micro_image.kernel), "-initrd", str(micro_image.initrd),
            "-append", cmdline,
        ]
        print("+", shlex.join(argv))
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        guest = Guest(proc, qmp_path, started)
        guests.append(guest)
        return guest

    try:
        yield start
    finally:
        for g in guests:
            await g.kill()
            print(f"--- serial log (exit {g.proc.returncode}, marks {g.marks}) ---\n{g.serial}")


@pytest.mark.timeout(180)
async def test_boot_run_counter_and_powerdown(boot: BootFn, micro_image: Image,
                                              record_property: Callable[[str, object], None]) -> None:
    command = "echo hello from micro; uname -r; ls /dev/input | grep -c event; printf 'no newline'; exit 3"
    guest = await boot(guest_cmdline(micro_image.manifest.cmdline, run=command, counter=True))

    ready = await guest.wait_line(READY_MARKER, timeout=90)
    record_property("boot_to_ready_s", round(ready, 2))
    print(f"boot to {READY_MARKER}: {ready:.2f} s")
    assert "no power button" not in guest.serial

    await guest.wait_until("run result", lambda s: parse_run_output(s) is not None, timeout=30)
    result = parse_run_output(guest.serial)
    assert result is not None
    assert result.rc == 3
    assert result.output == (f"hello from micro\n{micro_image.manifest.kernel_version}\n"
                             f"{result.output.splitlines()[2]}\nno newline\n")
    assert int(result.output.splitlines()[2]) >= 1  # the power button's event device exists

    # the counter advances: 0, 1, 2, ... without gaps
    await guest.wait_until("tick 3", lambda s: 3 in parse_ticks(s), timeout=30)
    ticks = parse_ticks(guest.serial)
    assert ticks == list(range(len(ticks)))

    qmp = QMPClient("vmkit-test")
    await qmp.connect(str(guest.qmp_path))
    try:
        shutdown = EventListener("SHUTDOWN")
        with qmp.listen(shutdown):
            sent = time.monotonic()
            # the guest may power off so fast that QEMU exits before it replies
            with contextlib.suppress(EOFError, ConnectionError, ExecInterruptedError):
                await qmp.execute("system_powerdown")
            event = await asyncio.wait_for(shutdown.get(), 10)
        data = event["data"]
        assert isinstance(data, dict) and data["guest"] is True  # the guest powered itself off
    finally:
        with contextlib.suppress(EOFError, ConnectionError):  # QEMU may already be gone
            await qmp.disconnect()
    rc = await asyncio.wait_for(guest.proc.wait(), 10)
    await guest.drain()
    elapsed = time.monotonic() - sent
    record_property("powerdown_to_exit_s", round(elapsed, 2))
    print(f"system_powerdown to QEMU exit: {elapsed:.2f} s")
    assert rc == 0
    assert has_line(guest.serial, POWEROFF_MARKER)
    assert elapsed < 5


@pytest.mark.timeout(120)
async def test_run_then_poweroff_exits_qemu(boot: BootFn, micro_image: Image) -> None:
    command = "cat /proc/cmdline | grep -o 'vmkit.then=[a-z]*'; lsmod | grep -c '^virtio_blk ' >&2"
    guest = await boot(guest_cmdline(micro_image.manifest.cmdline, run=command, poweroff=True))
    rc = await asyncio.wait_for(guest.proc.wait(), 90)
    await guest.drain()
    assert rc == 0
    result = parse_run_output(guest.serial)
    assert result is not None
    assert result.rc == 0
    assert result.output == "vmkit.then=poweroff\n1\n"
    assert has_line(guest.serial, POWEROFF_MARKER)
