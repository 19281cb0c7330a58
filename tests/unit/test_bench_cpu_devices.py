"""Unit tests: ``vmkit bench cpu`` and ``vmkit bench devices`` without a guest: parsing sysbench,
fio, lsblk, ldd and sha256sum output captured on this host and in the debian-12 guest, the ratio
math, the tables, the JSON and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmkit.bench import cpu, devices, guests
from vmkit.bench.fs import Measurement, parse_fio_json
from vmkit.errors import ConfigError, HostError

DATA = Path(__file__).parent / "data" / "bench"


def read(name: str) -> str:
    return (DATA / name).read_text()


# --------------------------------------------------------------------------- sysbench


def test_parse_sysbench_host_and_guest_reports() -> None:
    one = cpu.parse_sysbench(read("sysbench-host-1thread.txt"))
    assert (one.threads, one.prime, one.version) == (1, 10000, "1.0.20")
    assert one.events_per_s == 2288.69 and one.events == 4580
    two = cpu.parse_sysbench(read("sysbench-host-2threads.txt"))
    assert (two.threads, two.events_per_s, two.events) == (2, 8295.12, 16599)
    guest = cpu.parse_sysbench(read("sysbench-guest-tcg-1thread.txt"))
    assert guest.threads == 1 and guest.version == "1.0.20" and 0 < guest.events_per_s < one.events_per_s


def test_a_failed_sysbench_run_is_a_cell_with_the_reason() -> None:
    settings = cpu.Settings(prime=10000, seconds=1, threads=2)
    bad = cpu.cell_from_run(read("sysbench-bad-option.txt"), "", 1, settings, 1)
    assert not bad.ok and bad.error is not None and "invalid option: --nonsense=1" in bad.error
    assert cpu.cell_from_run("", "sh: 1: /var/tmp/x/run: not found", 127, settings, 1).error == (
        "exit 127: sh: 1: /var/tmp/x/run: not found")
    # a report for other settings, or from another sysbench, is not a number for this table
    other = cpu.cell_from_run(read("sysbench-host-2threads.txt"), "", 0, settings, 1)
    assert other.error == "sysbench ran 2 threads with prime 10000, not 1 with 10000"
    assert "not the host's 1.0.19" in (cpu.cell_from_run(read("sysbench-host-1thread.txt"), "", 0, settings, 1,
                                                         "1.0.19").error or "")


def test_best_of_keeps_the_fastest_run_and_every_sample() -> None:
    runs = iter([cpu.Cell(90.0), cpu.Cell(120.0), cpu.Cell(100.0)])
    best = cpu.best_of(lambda: next(runs), 3)
    assert best.events_per_s == 120.0 and best.samples == (90.0, 120.0, 100.0)
    assert best.to_dict() == {"events_per_s": 120.0, "runs": [90.0, 120.0, 100.0]}
    failing = iter([cpu.Cell(90.0), cpu.Cell(error="exit 1: boom"), cpu.Cell(100.0)])
    assert cpu.best_of(lambda: next(failing), 3).error == "exit 1: boom"


def test_settings_and_arguments() -> None:
    quick = cpu.settings_for(quick=True, threads=4)
    assert (quick.prime, quick.seconds, quick.thread_counts, quick.repeat) == (10000, 2, [1, 4], 1)
    assert cpu.settings_for(threads=2).repeat == 3
    assert cpu.settings_for(threads=1).thread_counts == [1]
    assert cpu.sysbench_args(4, quick) == ["cpu", "--cpu-max-prime=10000", "--threads=4", "--time=2", "run"]
    with pytest.raises(ConfigError) as exc:
        cpu.Settings(prime=5, seconds=0, threads=0, repeat=0)
    assert [p.field for p in exc.value.problems] == ["--prime", "--time", "--threads", "--repeat"]


def report_with(host: dict[int, float], others: dict[str, dict[int, float | str]]) -> cpu.Report:
    rows = [cpu.Row("host", {t: cpu.Cell(v) for t, v in host.items()})]
    for target, cells in others.items():
        rows.append(cpu.Row(target, {t: cpu.Cell(v) if isinstance(v, float) else cpu.Cell(error=v)
                                     for t, v in cells.items()}))
    rows.append(cpu.Row("x86_64-kvm", skipped="KVM is not usable here: nested PVM"))
    return cpu.Report(cpu.Settings(prime=10000, seconds=2, threads=2), rows, version="1.0.20", host_cpu="AMD EPYC")


def test_ratios_to_the_host_per_thread_count() -> None:
    r = report_with({1: 1000.0, 2: 2000.0}, {"container": {1: 990.0, 2: 2010.0},
                                             "x86_64-tcg": {1: 50.0, 2: "exit 1: boom"}})
    assert r.ratio("container", 1) == pytest.approx(0.99)
    assert r.ratio("container", 2) == pytest.approx(1.005)
    assert r.ratio("x86_64-tcg", 1) == pytest.approx(0.05)
    assert r.ratio("x86_64-tcg", 2) is None          # a failed cell has no ratio
    assert r.ratio("x86_64-kvm", 1) is None          # nor a skipped row
    assert guests.format_ratio(0.05) == "0.050x" and guests.format_ratio(1.005) == "1.00x"
    assert guests.format_ratio(None) == "-"


def test_table_json_markdown_and_plot(tmp_path: Path) -> None:
    r = report_with({1: 1000.0, 2: 2000.0}, {"container": {1: 990.0, 2: 2010.0}, "x86_64-tcg": {1: 50.0, 2: 90.0}})
    header, rows = cpu.table_rows(r)
    assert header == ["target", "events/s, 1 thread", "vs host (1)", "events/s, 2 threads", "vs host (2)"]
    assert rows[2] == ["x86-64 guest, TCG", "50.0", "0.050x", "90.0", "0.045x"]
    assert rows[3] == ["x86-64 guest, KVM", "skipped", "", "skipped", ""]
    assert any("KVM is not usable here" in line for line in cpu.footer_lines(r))
    data = json.loads(cpu.write_json(r, tmp_path / "cpu.json").read_text())
    assert data["rows"][1]["ratio_to_host"] == {"1": 0.99, "2": 1.005}
    assert data["rows"][3]["skipped"].startswith("KVM")
    md = cpu.render_markdown(r)
    assert "| container (unshare + chroot) | 990.0 | 0.99x | 2,010.0 | 1.00x |" in md
    png = cpu.plot(r, tmp_path / "cpu.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_unknown_target_is_refused_by_option() -> None:
    with pytest.raises(ConfigError) as exc:
        cpu.run(cpu.Settings(), targets=["host", "vax"])
    assert exc.value.problems[0].field == "--target" and "vax" in exc.value.problems[0].message


def test_container_command_is_an_argv_with_the_paths_as_arguments() -> None:
    argv = cpu.container_argv(Path("/t/r o,ot.raw"), Path("/t/root"), Path("/t/b"), ["cpu", "run"])
    assert argv[:9] == ["unshare", "--mount", "--pid", "--fork", "--uts", "--ipc", "--net", "--propagation", "private"]
    assert argv[9:11] == ["sh", "-c"] and argv[13:] == ["/t/r o,ot.raw", "/t/root", "/t/b", "cpu", "run"]
    assert '"$raw"' in argv[11]  # quoted in the script, never spliced into it


# --------------------------------------------------------------------------- the bundle


def test_parse_ldd_finds_libraries_and_the_loader() -> None:
    libs, loader = guests.parse_ldd(read("ldd-sysbench.txt"))
    assert loader == Path("/lib64/ld-linux-x86-64.so.2")
    names = [p.name for p in libs]
    assert "libluajit-5.1.so.2" in names and "libc.so.6" in names and "linux-vdso.so.1" not in names
    with pytest.raises(HostError, match=r"libfoo\.so\.1"):
        guests.parse_ldd("\tlibfoo.so.1 => not found\n")


def test_make_bundle_runs_the_hosts_sysbench(tmp_path: Path) -> None:
    if not cpu.SYSBENCH.exists():
        pytest.skip("sysbench is not installed on this host (scripts/install.sh installs it)")
    import subprocess

    bundle = guests.make_bundle(cpu.SYSBENCH, tmp_path / "b")
    assert "libluajit-5.1.so.2" in bundle.libraries
    res = subprocess.run([str(bundle.run), "--version"], capture_output=True, text=True, check=True)
    assert res.stdout.startswith(f"sysbench {cpu.host_sysbench_version()}")


def test_parse_sha256sum_skips_missing_files() -> None:
    sums = guests.parse_sha256sum(read("sha256sum-guest.txt"))
    assert "/lib/x86_64-linux-gnu/libc.so.6" in sums
    assert all(len(v) == 64 for v in sums.values())
    assert "/lib/x86_64-linux-gnu/libluajit-5.1.so.2" not in sums  # not in the guest image


# --------------------------------------------------------------------------- devices


def test_parse_lsblk_maps_serials_to_devices() -> None:
    found = devices.parse_lsblk(read("lsblk-guest.json"))
    assert {devices.SERIALS[k] for k in devices.KINDS} <= set(found)
    assert found["vmkit-bench-nvme"].startswith("nvme")
    assert found["vmkit-bench-virtio"].startswith("vd")
    assert found["vmkit-bench-sata"].startswith("sd") and found["vmkit-bench-ide"].startswith("sd")


def test_device_fio_reports_from_the_guest() -> None:
    seq = parse_fio_json(read("fio-guest-seqread-virtio.json"))
    rnd = parse_fio_json(read("fio-guest-randwrite-ide.json"))
    assert seq.ok and seq.read_bw > 0 and seq.write_bw == 0
    assert rnd.ok and rnd.write_iops > 0 and rnd.read_iops == 0


def dev_report() -> devices.Report:
    disks = [devices.Disk("virtio-blk", "vdb"), devices.Disk("nvme", "nvme0n1"), devices.Disk("ide", "sdb")]
    rows = [devices.Row(devices.WORKLOADS[0], {"virtio-blk": Measurement(read_bw=400e6, read_iops=400),
                                               "nvme": Measurement(read_bw=300e6, read_iops=300),
                                               "ide": Measurement(read_bw=40e6, read_iops=40)}),
            devices.Row(devices.WORKLOADS[2], {"virtio-blk": Measurement(read_bw=40e6, read_iops=10000),
                                               "nvme": Measurement(error="fio exited 1"),
                                               "ide": Measurement(read_bw=4e6, read_iops=1000)})]
    return devices.Report(devices.Settings(size=64 << 20, runtime=1), disks, rows, machine="g", fio="fio-3.33")


def test_device_ratios_table_json_and_plot(tmp_path: Path) -> None:
    r = dev_report()
    assert r.ratio("nvme", devices.WORKLOADS[0]) == pytest.approx(0.75)
    assert r.ratio("ide", devices.WORKLOADS[2]) == pytest.approx(0.1)
    assert r.ratio("nvme", devices.WORKLOADS[2]) is None
    header, rows = devices.table_rows(r)
    assert header == ["workload", "virtio-blk", "NVMe", "IDE (PIIX3)"]
    assert rows[0] == ["seqread (1M)", "400.0 MB/s", "300.0 MB/s (0.75x)", "40.0 MB/s (0.10x)"]
    assert rows[1] == ["randread (4K)", "10,000 IOPS", "failed: fio exited 1", "1,000 IOPS (0.10x)"]
    data = json.loads(devices.write_json(r, tmp_path / "d.json").read_text())
    assert data["rows"][0]["ratio_to_virtio"] == {"virtio-blk": 1.0, "nvme": 0.75, "ide": 0.1}
    assert "| seqread (1M) | 400.0 MB/s |" in devices.render_markdown(r)
    assert devices.plot(r, tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_fio_argv_and_settings() -> None:
    s = devices.settings_for(quick=True)
    assert (s.size, s.runtime) == (64 << 20, 1)
    argv = devices.fio_argv(devices.WORKLOADS[3], "sdb", s)
    assert "--filename=/dev/sdb" in argv and "--rw=randwrite" in argv and "--bs=4096" in argv
    assert "--time_based=1" in argv and "--direct=1" in argv
    with pytest.raises(ConfigError) as exc:
        devices.settings_for(size="1M")
    assert exc.value.problems[0].field == "--size"
    with pytest.raises(ConfigError) as exc:
        devices.run(s, kinds=["nvme", "scsi"])
    assert exc.value.problems[0].field == "--kind"


def test_bench_disk_specs_are_sparse_files_with_kind_and_serial(tmp_path: Path) -> None:
    specs = devices.bench_disk_specs(tmp_path, devices.Settings(size=32 << 20))
    assert specs[2] == f"{tmp_path}/sata.raw:format=raw:kind=sata:serial=vmkit-bench-sata"
    assert (tmp_path / "ide.raw").stat().st_size == 32 << 20
    assert all(len(s) <= 20 for s in devices.SERIALS.values())


# --------------------------------------------------------------------------- network devices


def test_parse_iperf3_reports_and_errors() -> None:
    from vmkit.net.probes import iperf3_client_argv, parse_iperf3

    assert parse_iperf3(read("iperf3-client.json")) > 0
    with pytest.raises(ValueError, match="unable to connect to server"):
        parse_iperf3(read("iperf3-refused.json"))
    with pytest.raises(ValueError, match="no JSON report"):
        parse_iperf3("iperf3: error - unable to connect\n")
    assert iperf3_client_argv("10.0.0.1", 5201, 3, reverse=True) == [
        "iperf3", "-c", "10.0.0.1", "-p", "5201", "-t", "3", "-J", "-R"]


def net_report() -> devices.Report:
    r = dev_report()
    r.nics = [devices.Nic("virtio", "nv", "10.1.0.1"), devices.Nic("e1000", "ne", "10.2.0.1"),
              devices.Nic("rtl8139", "nr", "10.3.0.1")]
    send, receive = devices.FLOWS
    r.net_rows = [devices.NetRow(send, {"virtio": devices.NetResult(2000e6), "e1000": devices.NetResult(500e6),
                                        "rtl8139": devices.NetResult(error="no result within 63 s")}),
                  devices.NetRow(receive, {"virtio": devices.NetResult(1000e6),
                                           "e1000": devices.NetResult(250e6), "rtl8139": devices.NetResult(100e6)})]
    return r


def test_network_ratios_table_json_markdown_and_plot(tmp_path: Path) -> None:
    r = net_report()
    send, receive = devices.FLOWS
    assert r.net_ratio("e1000", send) == pytest.approx(0.25)
    assert r.net_ratio("rtl8139", send) is None
    assert r.net_ratio("rtl8139", receive) == pytest.approx(0.1)
    header, rows = devices.net_table_rows(r)
    assert header == ["iperf3", "virtio-net", "e1000", "RTL8139"]
    assert rows == [["TCP guest to host", "2,000 Mbit/s", "500 Mbit/s (0.25x)", "failed: no result within 63 s"],
                    ["TCP host to guest", "1,000 Mbit/s", "250 Mbit/s (0.25x)", "100 Mbit/s (0.10x)"]]
    assert any(line.startswith("network: iperf3 TCP") for line in devices.footer_lines(r))
    data = json.loads(devices.write_json(r, tmp_path / "d.json").read_text())
    net = data["network"]
    assert net["skipped"] is None and [n["model"] for n in net["nics"]] == ["virtio", "e1000", "rtl8139"]
    assert net["rows"][1]["ratio_to_virtio"] == {"virtio": 1.0, "e1000": 0.25, "rtl8139": 0.1}
    assert net["rows"][0]["results"]["rtl8139"] == {"error": "no result within 63 s"}
    assert "| TCP host to guest | 1,000 Mbit/s |" in devices.render_markdown(r)
    assert devices.plot(r, tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"

    r.nics, r.net_rows, r.net_skipped = [], [], "vmkit nat networks need root"
    assert "network: skipped: vmkit nat networks need root" in devices.footer_lines(r)


def test_nic_models_are_checked_by_option() -> None:
    assert devices.check_nic_models(["rtl8139"]) == ["virtio", "rtl8139"]
    with pytest.raises(ConfigError) as exc:
        devices.run(devices.settings_for(quick=True), nics=["e1000", "ne2k"])
    assert exc.value.problems[0].field == "--nic" and "ne2k" in exc.value.problems[0].message
