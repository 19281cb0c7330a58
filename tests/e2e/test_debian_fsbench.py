"""``vmkit bench fs --quick`` on the Debian guest with a virtiofs and a 9p share, through the CLI:
a complete table (every row has a number for every mechanism), JSON with the same rows, the
Markdown file, no scratch files left; and a clear error when a share is not mounted.

Precondition: the shares are mounted at boot (fstab written by cloud-init, issue 6); ``vmkit bench
fs`` itself never mounts anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import processes_mentioning, vmkit
from vmkit.bench.fs import QUICK_JOBS
from vmkit.host.images.store import Image

pytestmark = pytest.mark.e2e


def guest_mounts(name: str) -> dict[str, str]:
    """mount point -> file system type, from the guest's /proc/self/mountinfo."""
    text = vmkit("exec", name, "--", "cat", "/proc/self/mountinfo").stdout
    return {line.split()[4]: line.split(" - ")[1].split()[0] for line in text.splitlines() if " - " in line}


@pytest.mark.timeout(900)
def test_bench_fs_quick_table(vmkit_home: Path, debian12: Image, tmp_path: Path) -> None:
    vfs, p9 = tmp_path / "vfs", tmp_path / "p9"
    vfs.mkdir()
    p9.mkdir()
    # like `vmkit create dev --image debian-12 --mount ~/src`: the guest path is the host path
    vmkit("create", "fsb", "--image", "debian-12", "--mount", str(vfs), "--mount", f"{p9}:/mnt/p9,type=9p")
    vmkit("start", "fsb")

    # precondition (boot-time mounting, issue 6): the shares are mounted when `start` returns
    mounts = guest_mounts("fsb")
    assert mounts.get(str(vfs)) == "virtiofs" and mounts.get("/mnt/p9") == "9p", (
        f"PRECONDITION: shares are not mounted at boot: {mounts}")

    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    t0 = time.monotonic()
    run = vmkit("bench", "fs", "fsb", "--quick", "--json", str(out_json), "--markdown", str(out_md))
    took = time.monotonic() - t0
    print(run.stdout)
    print(f"bench fs --quick took {took:.0f} s")

    # the printed table: every quick row, a column per mechanism, a winner marked
    header = next(line for line in run.stdout.splitlines() if "virtiofs" in line)
    assert "9p" in header and "disk (baseline)" in header
    for job in QUICK_JOBS:
        assert any(line.split("│")[1].strip() == job for line in run.stdout.splitlines() if line.count("│") > 2)
    assert "★" in run.stdout
    assert f"wrote {out_json}" in run.stdout and f"wrote {out_md}" in run.stdout

    # the JSON: the same rows, a number for every mechanism in every row
    data = json.loads(out_json.read_text())
    assert [r["job"] for r in data["rows"]] == list(QUICK_JOBS)
    names = [m["name"] for m in data["mechanisms"]]
    assert names == ["virtiofs", "9p", "disk"]
    for row in data["rows"]:
        assert set(row["results"]) == set(names), row
        for name, cell in row["results"].items():
            assert "error" not in cell, (row["job"], name, cell)
            assert cell["bw_bytes"] > 0 and cell["iops"] > 0, (row["job"], name, cell)
        assert row["winner"] in ("virtiofs", "9p")

    # the Markdown: one table line per row with as many cells
    table = [line for line in out_md.read_text().splitlines() if line.startswith("| ")]
    assert table[0] == "| job | virtiofs | 9p | disk (baseline) |"
    assert [line.split(" | ")[0][2:] for line in table[1:]] == list(QUICK_JOBS)
    assert all(line.count(" | ") == 3 for line in table)

    # no scratch files left, on the host or in the guest
    assert list(vfs.iterdir()) == [] and list(p9.iterdir()) == []
    assert "vmkit-fsbench" not in vmkit("exec", "fsb", "--", "ls", "-a", "/var/tmp").stdout

    # a share that is not mounted: a clear error, exit code 4 (wrong state), nothing created
    vmkit("exec", "fsb", "--", "umount", "/mnt/p9")
    refused = vmkit("bench", "fs", "fsb", "--quick", "--share", "share1", check=False)
    assert refused.returncode == 4
    assert "share share1 (9p) is not mounted at /mnt/p9" in refused.stderr
    bad = vmkit("bench", "fs", "fsb", "--jobs", "seqread-nope", check=False)
    assert bad.returncode == 2 and "--jobs" in bad.stderr

    vmkit("stop", "fsb")
    assert processes_mentioning(str(vmkit_home)) == []
