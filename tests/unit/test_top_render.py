"""`vmkit top`'s table renders every field of MachineStats, also ones added later (a generic column
with a unit from the field's name), and a machine whose statistics could not be read."""

from __future__ import annotations

import io

import pytest
from pydantic import BaseModel
from rich.console import Console

from vmkit.api import models
from vmkit.cli import resources

MiB = 1 << 20


class Limits(BaseModel):
    memory_max_bytes: int | None = None
    cpu_weight: int | None = None


class NewerStats(models.MachineStats):
    vcpus_online: int
    steal_percent: float
    limits: Limits
    swap_bytes: int | None = None


def render(table: object) -> str:
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_new_stats_fields_get_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "MachineStats", NewerStats)
    stats = NewerStats(balloon_bytes=128 * MiB, memory_bytes=256 * MiB, guest_mem_total_bytes=None,
                       guest_mem_available_bytes=100 * MiB, host_rss_bytes=300 * MiB, ksm_shared_bytes=64 * MiB,
                       vcpus=4, cpu_percent=12.345, vcpus_online=3, steal_percent=7.25,
                       limits=Limits(memory_max_bytes=512 * MiB, cpu_weight=200))
    machines = [models.MachineTop(name="web", state="running", stats=stats),
                models.MachineTop(name="gone", state="running", error="the machine is stopped")]
    text = render(resources.top_table(machines))
    header = next(line for line in text.splitlines() if "name" in line)
    cols = [c.strip() for c in header.strip("┃ ").split("┃")]
    assert cols == ["name", "state", "vCPUs", "online", "CPU %", "steal %", "memory", "usable", "guest total",
                    "guest avail", "host RSS", "limits", "swap"]
    web = next(line for line in text.splitlines() if "web" in line)
    cells = [c.strip() for c in web.strip("│ ").split("│")]
    assert cells == ["web", "running", "4", "3", "12.3", "7.2", "256 MiB", "128 MiB", "-", "100 MiB", "300 MiB",
                     "memory_max_bytes=512 MiB cpu_weight=200", "-"]
    assert "KSM saves 64 MiB on this host" in text  # host-wide: once, not per machine
    gone = next(line for line in text.splitlines() if "gone" in line)
    assert "the machine is stopped" in gone
    assert "2 running machines" in text
