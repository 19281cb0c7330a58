"""``vmkit bench cpu --quick`` and ``vmkit bench devices --quick`` through the CLI, on one shared
Debian guest (the ``--machine`` path: no throw-away guest is booted here) that has a scratch disk of
each device model and a virtio-net and an e1000 NIC, each on a vmkit nat network of its own: the
printed tables, every cell a number, the JSON, the PNG plots, and nothing left in the guest or on
the host afterwards."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import image_cache_dir, processes_mentioning, vmkit, wait_until
from vmkit.bench import devices
from vmkit.host.images.store import Image

pytestmark = pytest.mark.e2e

GUEST = "bench"
NETS = {"virtio": "bnv", "e1000": "bne"}


@pytest.fixture(scope="module")
def bench_guest(tmp_path_factory: pytest.TempPathFactory, debian12: Image) -> Iterator[str]:
    """A running debian-12 guest (2 vCPUs) with a 64M scratch disk per device model, serials
    vmkit-bench-<kind>, as ``vmkit bench devices --machine`` wants them."""
    home = Path(tempfile.mkdtemp(prefix="vmkit-home-", dir="/tmp"))  # short: socket paths
    disks = tmp_path_factory.mktemp("bench-disks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMKIT_HOME", str(home))
        mp.setenv("VMKIT_IMAGE_CACHE", str(image_cache_dir()))
        specs = devices.bench_disk_specs(disks, devices.Settings(size=64 << 20))
        nics = ["user", *[net if model == "virtio" else f"{net},model={model}" for model, net in NETS.items()]]
        try:
            for net in NETS.values():
                vmkit("network", "create", net, "--mode", "nat")
            vmkit("create", GUEST, "--image", "debian-12", "--cpus", "2", *[a for s in specs for a in ("--disk", s)],
                  *[a for n in nics for a in ("--network", n)])
            vmkit("start", GUEST)
            yield GUEST
        finally:
            vmkit("delete", "--force", GUEST, check=False)
            for net in NETS.values():
                vmkit("network", "delete", net, "--force", check=False)
            assert wait_until(lambda: not processes_mentioning(str(home)), 30), "a process outlived the bench tests"
            shutil.rmtree(home, ignore_errors=True)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def table_lines(stdout: str) -> list[list[str]]:
    """The cells of rich's table: the header row (between ┃) first, then the body rows (between │)."""
    return [[c.strip() for c in line.replace("┃", "│").split("│")[1:-1]] for line in stdout.splitlines()
            if line.replace("┃", "│").count("│") > 2]


@pytest.mark.timeout(600)
def test_bench_cpu_quick_prints_the_table(bench_guest: str, tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "cpu.json", tmp_path / "cpu.png"
    t0 = time.monotonic()
    run = vmkit("bench", "cpu", "--quick", "--threads", "2", "--machine", bench_guest, "--target", "host",
                "--target", "container", "--target", "x86_64-tcg", "--target", "x86_64-kvm",
                "--json", str(out_json), "--plot", str(out_png))
    print(run.stdout)
    print(f"bench cpu --quick took {time.monotonic() - t0:.0f} s")
    rows = {r[0]: r for r in table_lines(run.stdout)}
    assert rows["target"][1:] == ["events/s, 1 thread", "vs host (1)", "events/s, 2 threads", "vs host (2)"]
    for target in ("host", "container (unshare + chroot)", "x86-64 guest, TCG"):
        cells = rows[target]
        assert float(cells[1].replace(",", "")) > 0 and float(cells[3].replace(",", "")) > 0, cells
        assert cells[2].endswith("x") and cells[4].endswith("x"), cells
    assert rows["host"][2] == "1.00x"
    assert rows["x86-64 guest, KVM"][1] == "skipped" and "skipped:" in run.stdout

    data = json.loads(out_json.read_text())
    by = {r["target"]: r for r in data["rows"]}
    assert data["sysbench"] and data["settings"]["threads"] == [1, 2]
    tcg = by["x86_64-tcg"]
    # no bound on the ratio: on a loaded shared host a 2 s run of the host can lose to the guest
    assert tcg["results"]["1"]["events_per_s"] > 0 and tcg["ratio_to_host"]["1"] > 0
    assert by["x86_64-kvm"]["skipped"]
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    # the bundle is gone from the guest
    assert "vmkit-sysbench" not in vmkit("exec", bench_guest, "--", "ls", "/var/tmp").stdout


@pytest.mark.timeout(600)
def test_bench_devices_quick_prints_the_table(bench_guest: str, tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "dev.json", tmp_path / "dev.png"
    t0 = time.monotonic()
    run = vmkit("bench", "devices", "--quick", "--machine", bench_guest, "--json", str(out_json),
                "--plot", str(out_png))
    print(run.stdout)
    print(f"bench devices --quick took {time.monotonic() - t0:.0f} s")
    rows = table_lines(run.stdout)
    assert rows[0] == ["workload", "virtio-blk", "NVMe", "SATA (AHCI)", "IDE (PIIX3)"]
    assert [r[0] for r in rows[1:5]] == ["seqread (1M)", "seqwrite (1M)", "randread (4K)", "randwrite (4K)"]
    for r in rows[1:5]:
        assert r[1].endswith(("MB/s", "IOPS")), r
        for cell in r[2:]:
            assert cell.endswith("x)") and "failed" not in cell, r
    # the network table: iperf3 both ways through each NIC model
    assert rows[5] == ["iperf3", "virtio-net", "e1000"]
    assert [r[0] for r in rows[6:]] == ["TCP guest to host", "TCP host to guest"]
    for r in rows[6:]:
        assert r[1].endswith("Mbit/s"), r
        for cell in r[2:]:
            assert cell.endswith("x)") and "Mbit/s" in cell, r

    data = json.loads(out_json.read_text())
    assert [d["kind"] for d in data["disks"]] == list(devices.KINDS)
    for row in data["rows"]:
        assert row["ratio_to_virtio"]["virtio-blk"] == 1.0
        for kind in devices.KINDS:
            assert row["results"][kind]["bw_bytes"] > 0, (row["workload"], kind)
    net = data["network"]
    assert [(n["model"], n["network"]) for n in net["nics"]] == list(NETS.items())
    for row in net["rows"]:
        for model in NETS:
            assert row["results"][model]["bits_per_s"] > 0, (row["flow"], model)
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in processes_mentioning("iperf3") if any(n["gateway"] in cmdline(p) for n in net["nics"])], \
        "an iperf3 server outlived the bench"

    # a machine without the scratch disks is refused by option, before anything runs
    refused = vmkit("bench", "devices", "--quick", "--machine", "nosuch", check=False)
    assert refused.returncode != 0 and "nosuch" in refused.stderr
