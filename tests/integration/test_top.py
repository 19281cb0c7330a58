"""`vmkit top` on two micro guests (and a stopped one it leaves out): one row per running machine
with its memory and CPU, the same through `--json` and `vmkit.Client.top()`; the CLI runs in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vmkit as vmkit_pkg
from conftest import vmkit
from vmkit.api import models
from vmkit.host.images.store import Image

pytestmark = pytest.mark.integration
MiB = 1 << 20


def rows_of(table: str) -> dict[str, list[str]]:
    """The table's body rows by machine name (cells between the box-drawing bars)."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) > 3 and cells[0] not in ("name", ""):
            rows[cells[0]] = cells
    return rows


def test_top_shows_every_running_machine(vmkit_home: Path, micro_image: Image) -> None:
    vmkit("create", "alpha", "--image", "micro", "--memory", "256M")
    vmkit("create", "beta", "--image", "micro", "--memory", "192M", "--cpus", "2")
    vmkit("create", "idle", "--image", "micro")
    vmkit("start", "alpha")
    vmkit("start", "beta")
    try:
        snapshot = json.loads(vmkit("top", "--json").stdout)
        assert [(m["name"], m["state"], m["error"]) for m in snapshot] == [("alpha", "running", None),
                                                                           ("beta", "running", None)]
        alpha, beta = (m["stats"] for m in snapshot)
        assert alpha["memory_bytes"] == 256 * MiB and beta["memory_bytes"] == 192 * MiB
        assert alpha["vcpus"] == 1 and beta["vcpus"] == 2
        assert alpha["balloon_bytes"] == 256 * MiB
        assert alpha["host_rss_bytes"] > 16 * MiB and beta["host_rss_bytes"] > 16 * MiB
        assert 0 <= alpha["cpu_percent"] <= 100 * 2

        frame = vmkit("top", "--once").stdout
        header = frame.splitlines()[2]
        for title in ("name", "state", "vCPUs", "CPU %", "memory", "usable", "guest avail", "host RSS"):
            assert title in header, (title, frame)
        rows = rows_of(frame)
        assert set(rows) == {"alpha", "beta"}, frame  # the stopped machine is not shown
        assert rows["alpha"][1] == "running" and "256 MiB" in rows["alpha"] and "192 MiB" in rows["beta"]
        assert rows["beta"][2] == "2"
        assert "2 running machines" in frame and "KSM saves" in frame

        vmkit("pause", "beta")
        top = vmkit_pkg.Client().top()
        assert all(isinstance(m, models.MachineTop) for m in top)
        assert [(m.name, m.state) for m in top] == [("alpha", "running"), ("beta", "paused")]
        assert top[1].stats is not None and top[1].stats.memory_bytes == 192 * MiB

        vmkit("stop", "alpha", "--force")
        assert set(rows_of(vmkit("top", "--once").stdout)) == {"beta"}
    finally:
        for name in ("alpha", "beta"):
            vmkit("stop", name, "--force", check=False)
    assert "0 running machines" in vmkit("top", "--once").stdout


def test_top_refuses_a_bad_interval(vmkit_home: Path) -> None:
    r = vmkit("top", "--interval", "0", check=False)
    assert r.returncode == 2 and "--interval" in r.stderr and r.stdout == ""
