"""Unit tests for ``vmkit bench fs``'s pure parts: the job matrix, fio's command line and JSON
report, the guest's mount table, winners and the JSON/Markdown outputs.

The fio reports in ``data/fsbench`` are real: made by fio 3.33 (the host's, and for the failing
mmap on 9p and the mount table, the Debian guest's) from :func:`vmkit.bench.fs.fio_argv`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmkit.bench import fs as fb
from vmkit.config import MachineConfig, parse_config
from vmkit.errors import ConfigError, ExitCode

DATA = Path(__file__).parent / "data" / "fsbench"

# the job files of github.com/rhvgoyal/virtiofs-tests (fio-jobs/*.job)
SUITE_JOBS = {
    f"{w}-{e}{m}" for w in ("seqread", "randread", "seqwrite", "randwrite", "randrw")
    for e in ("psync", "mmap", "libaio") for m in ("", "-multi")
}


def raw(name: str) -> dict[str, Any]:
    text = (DATA / name).read_text()
    parsed: dict[str, Any] = json.loads(text[text.index("{"):])
    return parsed


def measured(name: str) -> fb.Measurement:
    return fb.parse_fio_json((DATA / name).read_text())


# --------------------------------------------------------------------------- job matrix


def test_matrix_is_the_virtiofs_tests_suite() -> None:
    jobs = fb.all_jobs()
    assert len(jobs) == 30
    assert {j.name for j in jobs} == SUITE_JOBS
    assert [j.name for j in jobs[:3]] == ["seqread-psync", "seqread-psync-multi", "seqread-mmap"]
    assert all(j.numjobs in (1, 4) for j in jobs)
    assert set(fb.QUICK_JOBS) <= SUITE_JOBS
    assert {fb.job_by_name(n).workload for n in fb.QUICK_JOBS} == set(fb.WORKLOADS)


def test_parse_jobs_keeps_order_and_reports_every_bad_name() -> None:
    assert [j.name for j in fb.parse_jobs("randrw-libaio-multi, seqread-psync")] == [
        "randrw-libaio-multi", "seqread-psync"]
    with pytest.raises(ConfigError) as e:
        fb.parse_jobs("seqread-psync,seqread-io_uring,randomread-psync,seqread-psync")
    assert e.value.exit_code == ExitCode.BAD_INPUT
    assert [p.field for p in e.value.problems] == ["--jobs"] * 3
    assert "seqread-io_uring" in e.value.message and "listed twice" in e.value.message
    with pytest.raises(ConfigError, match="at least one job"):
        fb.parse_jobs(" , ")


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as e:
        fb.Settings(size=4096, runtime=0)
    assert {p.field for p in e.value.problems} == {"--size", "--runtime"}


def test_fio_argv_carries_the_suite_options() -> None:
    s = fb.Settings()
    argv = fb.fio_argv(fb.job_by_name("randrw-libaio-multi"), "/mnt/src/.x", s)
    assert argv[0] == "fio"
    for opt in ("--rw=randrw", "--rwmixread=75", "--ioengine=libaio", "--bs=4096", "--iodepth=16", "--direct=1",
                "--numjobs=4", "--group_reporting=1", "--directory=/mnt/src/.x", "--output-format=json",
                f"--size={64 << 20}", "--runtime=3"):
        assert opt in argv
    single = fb.fio_argv(fb.job_by_name("seqread-mmap"), "/d", fb.Settings(direct=False))
    assert "--rw=read" in single and "--numjobs=1" in single and "--direct=0" in single
    assert not any(a.startswith("--rwmixread") for a in single)


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed on the host")
def test_fio_accepts_the_argv_and_reuses_the_laid_out_files(tmp_path: Path) -> None:
    s = fb.Settings(size=1 << 20, runtime=1)
    layout = subprocess.run(fb.layout_argv(str(tmp_path), s), capture_output=True, text=True, timeout=60)
    assert fb.parse_fio_json(layout.stdout, layout.stderr, layout.returncode).ok
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["fio-file0", "fio-file1", "fio-file2", "fio-file3"]
    assert all((tmp_path / f).stat().st_size == 1 << 20 for f in files)
    job = fb.job_by_name("randread-psync-multi")
    run = subprocess.run(fb.fio_argv(job, str(tmp_path), fb.Settings(size=1 << 20, runtime=1, direct=False)),
                         capture_output=True, text=True, timeout=60)
    m = fb.parse_fio_json(run.stdout, run.stderr, run.returncode)
    assert m.ok and m.read_bw > 0 and m.read_iops > 0 and m.write_bw == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no new files: the rows share them


# --------------------------------------------------------------------------- fio's JSON report


def test_parse_single_job_report() -> None:
    job = raw("seqread-psync.json")["jobs"][0]
    m = measured("seqread-psync.json")  # fio prints a note before the JSON: it is skipped
    assert m.ok
    assert m.read_bw == job["read"]["bw_bytes"] > 0
    assert m.read_iops == pytest.approx(job["read"]["iops"])
    assert m.write_bw == 0 and m.write_iops == 0
    assert m.bw == m.read_bw


def test_parse_group_reported_multi_job_mixed_report() -> None:
    report = raw("randrw-libaio-multi.json")
    assert len(report["jobs"]) == 1 and report["jobs"][0]["job options"]["numjobs"] == "4"
    m = measured("randrw-libaio-multi.json")
    job = report["jobs"][0]
    assert m.read_bw == job["read"]["bw_bytes"] and m.write_bw == job["write"]["bw_bytes"]
    assert m.read_bw > 0 and m.write_bw > 0
    assert 0.6 < m.read_iops / m.iops < 0.9  # rwmixread=75
    cell = fb.cell_text(m, fb.job_by_name("randrw-libaio-multi"))
    assert cell.count(" / ") == 2 and cell.endswith("IOPS")


def test_failed_job_gives_fios_reason() -> None:
    # the Debian guest: a writable shared mmap on 9p with the default cache=none is refused
    m = fb.parse_fio_json((DATA / "randwrite-mmap-9p.stdout").read_text(),
                          (DATA / "randwrite-mmap-9p.stderr").read_text(),
                          int((DATA / "randwrite-mmap-9p.exitcode").read_text()))
    assert not m.ok and m.bw == 0
    assert "func=mmap" in (m.error or "")
    assert fb.cell_text(m, fb.job_by_name("randwrite-mmap")) == "failed: mmap: Invalid argument"


def test_no_report_at_all() -> None:
    m = fb.parse_fio_json("", "fio: unrecognized option '--bogus'\n", 1)
    assert m.error == "fio: unrecognized option '--bogus'"
    m = fb.parse_fio_json("{ truncated", "", 137)
    assert m.error is not None and "exited 137" in m.error


# --------------------------------------------------------------------------- mounts


def machine(tmp_path: Path, shares: list[dict[str, Any]]) -> MachineConfig:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    return parse_config({"name": "dev", "boot": {"kernel": str(kernel)}, "network": None, "shares": shares})


MOUNTED = [{"type": "virtiofs", "host_path": "/srv/a", "guest_path": "/mnt/vfs"},
           {"type": "9p", "host_path": "/srv/b", "guest_path": "/mnt/p9"},
           {"type": "sshfs", "host_path": "/srv/c", "guest_path": "/mnt/ssh"}]


def test_parse_guest_mountinfo() -> None:
    entries = fb.parse_mountinfo((DATA / "mountinfo.txt").read_text())
    assert fb.mount_at(entries, "/mnt/vfs") == fb.MountEntry("/mnt/vfs", "virtiofs", "share0", "rw,relatime,rw")
    p9 = fb.mount_at(entries, "/mnt/p9/")
    assert p9 is not None and p9.fstype == "9p" and "trans=virtio" in p9.options
    ssh = fb.mount_at(entries, "/mnt/ssh")
    assert ssh is not None and ssh.fstype == "fuse.sshfs"
    assert fb.mount_at(entries, "/var/tmp") is None
    root = fb.mount_containing(entries, "/var/tmp")
    assert root is not None and (root.mount_point, root.fstype, root.source) == ("/", "ext4", "/dev/vda")
    spaced = fb.parse_mountinfo("90 27 0:50 / /mnt/my\\040src rw - virtiofs src rw\n")
    assert spaced[0].mount_point == "/mnt/my src"


def test_plan_measures_every_mounted_share_and_the_disk(tmp_path: Path) -> None:
    plan = fb.plan_mechanisms(machine(tmp_path, MOUNTED), (DATA / "mountinfo.txt").read_text())
    assert [m.name for m in plan.mechanisms] == ["virtiofs", "9p", "sshfs", "disk"]
    assert [m.baseline for m in plan.mechanisms] == [False, False, False, True]
    assert plan.mechanisms[3].fstype == "ext4" and plan.notes == ()
    only = fb.plan_mechanisms(machine(tmp_path, MOUNTED), (DATA / "mountinfo.txt").read_text(),
                              shares=["share1"], disk=False)
    assert [m.name for m in only.mechanisms] == ["9p"]


def test_plan_skips_read_only_and_names_missing_types(tmp_path: Path) -> None:
    shares = [MOUNTED[0], {**MOUNTED[1], "read_only": True}]
    plan = fb.plan_mechanisms(machine(tmp_path, shares), (DATA / "mountinfo.txt").read_text())
    assert [m.name for m in plan.mechanisms] == ["virtiofs", "disk"]
    assert any("share1" in n and "read-only" in n for n in plan.notes)
    assert any("no writable 9p or sshfs share" in n for n in plan.notes)


def test_plan_refuses_shares_that_are_not_mounted(tmp_path: Path) -> None:
    shares = [{**MOUNTED[0], "guest_path": "/home/me/src"}, {**MOUNTED[1], "guest_path": "/mnt/ssh"}]
    with pytest.raises(fb.ShareNotMountedError) as e:
        fb.plan_mechanisms(machine(tmp_path, shares), (DATA / "mountinfo.txt").read_text())
    assert e.value.exit_code == ExitCode.WRONG_STATE
    assert "share share0 (virtiofs) is not mounted at /home/me/src" in e.value.message
    assert "/mnt/ssh is a fuse.sshfs mount" in e.value.message
    assert e.value.hint is not None
    assert "vmkit exec dev -- mount -t virtiofs -o defaults,nofail share0 /home/me/src" in e.value.hint
    assert "mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap,nofail share1 /mnt/ssh" in e.value.hint
    with pytest.raises(ConfigError) as bad:
        fb.plan_mechanisms(machine(tmp_path, shares), "", shares=["src"])
    assert bad.value.problems[0].field == "--share" and "share0, share1" in bad.value.message


def test_plan_checks_the_tag(tmp_path: Path) -> None:
    shares = [{**MOUNTED[0], "tag": "src"}]
    with pytest.raises(fb.ShareNotMountedError, match="mounted from tag 'share0', not 'src'"):
        fb.plan_mechanisms(machine(tmp_path, shares), (DATA / "mountinfo.txt").read_text())


# --------------------------------------------------------------------------- report


def sample_report(tmp_path: Path) -> fb.Report:
    plan = fb.plan_mechanisms(machine(tmp_path, MOUNTED[:2]), (DATA / "mountinfo.txt").read_text())
    failed = fb.parse_fio_json((DATA / "randwrite-mmap-9p.stdout").read_text(),
                               (DATA / "randwrite-mmap-9p.stderr").read_text(), 1)
    rows = [
        fb.Row(fb.job_by_name("randrw-libaio-multi"), {"virtiofs": measured("randrw-libaio-multi.json"),
                                                       "9p": measured("randwrite-mmap-multi.json"),
                                                       "disk": measured("seqread-psync.json")}),
        fb.Row(fb.job_by_name("randwrite-mmap"), {"virtiofs": measured("randwrite-mmap-multi.json"), "9p": failed,
                                                  "disk": measured("randwrite-mmap-multi.json")}),
    ]
    return fb.Report("dev", fb.QUICK_SETTINGS, plan.mechanisms, rows, plan.notes, started=1.0e9, finished=1.0e9 + 60,
                     guest={"fio": "fio-3.33"})


def test_winner_is_the_fastest_share_never_the_disk(tmp_path: Path) -> None:
    report = sample_report(tmp_path)
    first, second = report.rows
    a, b = raw("randrw-libaio-multi.json")["jobs"][0], raw("randwrite-mmap-multi.json")["jobs"][0]
    expected = "virtiofs" if a["read"]["bw_bytes"] + a["write"]["bw_bytes"] > \
        b["read"]["bw_bytes"] + b["write"]["bw_bytes"] else "9p"
    assert first.winner(report.mechanisms) == expected
    assert second.winner(report.mechanisms) == "virtiofs"  # 9p failed; the disk does not compete
    summ = report.summary()
    assert summ["decided_rows"] == 2 and sum(summ["wins"].values()) == 2 and "disk" not in summ["wins"]


def test_json_and_markdown_outputs(tmp_path: Path) -> None:
    report = sample_report(tmp_path)
    assert report.complete
    paths = fb.write_report(report, tmp_path / "out" / "r.json", tmp_path / "out" / "r.md")
    assert [p.name for p in paths] == ["r.json", "r.md"]
    data = json.loads((tmp_path / "out" / "r.json").read_text())
    assert data["format"] == "vmkit-fsbench" and data["instance"] == "dev"
    assert [r["job"] for r in data["rows"]] == ["randrw-libaio-multi", "randwrite-mmap"]
    assert [m["name"] for m in data["mechanisms"]] == ["virtiofs", "9p", "disk"]
    for row, rep_row in zip(data["rows"], report.rows, strict=True):
        assert set(row["results"]) == {"virtiofs", "9p", "disk"}
        for name, cell in row["results"].items():
            assert fb.Measurement.from_dict(cell).bw == pytest.approx(rep_row.results[name].bw, abs=1)
    assert data["rows"][1]["results"]["9p"]["error"].startswith("fio: pid=")
    assert data["settings"]["direct"] is True and data["settings"]["iodepth"] == 16
    md = (tmp_path / "out" / "r.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert table[0] == "| job | virtiofs | 9p | disk (baseline) |"
    assert len(table) == 2 + 2 and all(ln.count("|") == 5 for ln in table)
    assert md.count("★") == 2 + 1  # once per decided row, once in the legend
    assert "failed: mmap: Invalid argument" in md
    assert "- note: dev has no writable sshfs share: not measured" in md
