"""`vmkit top`'s table renders every field of MachineStats, also ones added later (a generic column
with a unit from the field's name), and a machine whose statistics could not be read; on a terminal
it redraws until q or Ctrl-C and leaves the terminal as it was."""

from __future__ import annotations

import io
import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from vmkit.api import models
from vmkit.cli import resources
from vmkit.config import Limits

MiB = 1 << 20


class NewerStats(models.MachineStats):
    """What a later vmkit may add: a field top has never heard of."""

    swap_bytes: int | None = None
    guest_pressure: bool = False


def render(table: object) -> str:
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_new_stats_fields_get_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "MachineStats", NewerStats)
    stats = NewerStats(balloon_bytes=128 * MiB, memory_bytes=256 * MiB, guest_mem_total_bytes=None,
                       guest_mem_available_bytes=100 * MiB, host_rss_bytes=300 * MiB, ksm_shared_bytes=64 * MiB,
                       ksm_merged_bytes=10 * MiB, vcpus=4, vcpus_online=3, max_cpus=8, memory_plugged_bytes=None,
                       max_memory_bytes=None, cpu_percent=12.345, steal_percent=7.25,
                       limits=Limits(memory_max=512 * MiB, cpu_weight=200), cgroup="/sys/fs/cgroup/memory/vmkit/web",
                       cgroup_version=1, cgroup_files={"memory.limit_in_bytes": "536870912"}, swap_bytes=5 * MiB)
    machines = [models.MachineTop(name="web", state="running", stats=stats),
                models.MachineTop(name="gone", state="running", error="the machine is stopped")]
    text = render(resources.top_table(machines))
    header = next(line for line in text.splitlines() if "name" in line)
    cols = [c.strip() for c in header.strip("┃ ").split("┃")]
    assert cols == ["name", "state", "vCPUs", "online", "CPU %", "steal %", "memory", "usable", "guest total",
                    "guest avail", "host RSS", "ksm merged", "memory plugged", "limits", "swap", "guest pressure"]
    web = next(line for line in text.splitlines() if "web" in line)
    cells = [c.strip() for c in web.strip("│ ").split("│")]
    assert cells == ["web", "running", "4", "3", "12.3", "7.2", "256 MiB", "128 MiB", "-", "100 MiB", "300 MiB",
                     "10 MiB", "-", "cpu_weight=200 memory_max=512M", "5 MiB", "no"]
    assert "KSM saves 64 MiB on this host" in text  # host-wide: once, not per machine
    gone = next(line for line in text.splitlines() if "gone" in line)
    assert "the machine is stopped" in gone
    assert "2 running machines" in text


def _on_a_terminal(home: Path, keys: bytes, after: float) -> tuple[int, bytes]:
    """`vmkit top` on a pseudo-terminal: ``keys`` typed once it has drawn a frame and ``after`` seconds
    more passed; returns its exit code and everything it drew."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes vmkit
        os.environ.update({"VMKIT_HOME": str(home), "COLUMNS": "120", "LINES": "30"})
        os.execv(sys.executable, [sys.executable, "-m", "vmkit.cli.main", "top", "--interval", "0.2"])
    drawn = b""
    deadline = time.monotonic() + 60
    typed_at: float | None = None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child is gone (EIO)
                break
            if not chunk:
                break
            drawn += chunk
        if typed_at is None and drawn.count(b"running machines") >= 2:
            typed_at = time.monotonic() + after
        if typed_at is not None and time.monotonic() >= typed_at and keys:
            os.write(fd, keys)
            keys = b""
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), drawn


@pytest.mark.parametrize("keys", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_top_refreshes_on_a_terminal_and_quits_cleanly(tmp_path: Path, keys: bytes) -> None:
    tmp_path.chmod(0o700)
    code, drawn = _on_a_terminal(tmp_path, keys, after=0.5)
    assert code == 0, drawn[-2000:]
    assert drawn.count(b"0 running machines") >= 3  # it redrew
    assert b"q quits" in drawn and b"Traceback" not in drawn and b"interrupted" not in drawn
    assert b"\x1b[?1049l" in drawn  # left the full-screen (alternate) buffer: the terminal is as it was
