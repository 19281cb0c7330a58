"""Unit tests: balloon target checks, KSM's sysfs knobs against a fake sysfs directory, /proc readings,
and the `vmkit host ksm` / `vmkit set` / `vmkit stats` commands' input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmkit.config import MachineConfig, parse_config
from vmkit.errors import ConfigError, ExitCode, HostError
from vmkit.host import ksm
from vmkit.runtime import balloon

MiB = 1 << 20


def machine(**kw: object) -> MachineConfig:
    return parse_config({"name": "vm1", "boot": {"kernel": "/k"}, "memory": "512M", **kw})


def test_balloon_target_is_checked_against_memory_and_a_minimum() -> None:
    cfg = machine()
    assert balloon.check_target(cfg, 256 * MiB) == 256 * MiB
    assert balloon.check_target(cfg, 512 * MiB) == 512 * MiB
    with pytest.raises(ConfigError) as big:
        balloon.check_target(cfg, 513 * MiB, field="--balloon")
    assert big.value.problems[0].field == "--balloon" and "512M" in big.value.problems[0].message
    with pytest.raises(ConfigError) as small:
        balloon.check_target(cfg, 63 * MiB)
    assert small.value.problems[0].field == "target" and "64M" in small.value.problems[0].message
    with pytest.raises(ConfigError) as none:
        balloon.check_target(machine(balloon=False), 256 * MiB)
    assert none.value.problems[0].field == "balloon"


def fake_sysfs(tmp_path: Path, **values: int) -> Path:
    root = tmp_path / "ksm"
    root.mkdir()
    base = {"run": 0, "pages_to_scan": 100, "sleep_millisecs": 20, "pages_shared": 7, "pages_sharing": 300}
    for name, value in {**base, **values}.items():
        (root / name).write_text(f"{value}\n")
    return root


def test_ksm_status_on_and_off_write_the_knobs(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path)
    st = ksm.status(root)
    assert (st.run, st.mode, st.pages_to_scan, st.pages_shared, st.pages_sharing) == (0, "off", 100, 7, 300)
    assert st.saved_bytes == 300 * os.sysconf("SC_PAGE_SIZE") == st.to_dict()["saved_bytes"]
    on = ksm.enable(root)
    assert (on.run, on.pages_to_scan, on.sleep_millisecs) == (1, ksm.PAGES_TO_SCAN, ksm.SLEEP_MILLISECS)
    assert (root / "run").read_text() == "1\n"
    assert ksm.enable(root, pages_to_scan=250, sleep_millisecs=50).pages_to_scan == 250
    assert ksm.disable(root).run == 0
    assert ksm.disable(root, unmerge=True).mode == "unmerging"
    assert ksm.shared_bytes(root) == 300 * os.sysconf("SC_PAGE_SIZE")
    assert st.smart_scan is None and not (root / "smart_scan").exists()  # an older kernel: left alone


def test_ksm_on_turns_smart_scan_off_where_the_kernel_has_it(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, smart_scan=1)
    assert ksm.status(root).smart_scan == 1
    on = ksm.enable(root)
    assert on.smart_scan == 0 and (root / "smart_scan").read_text() == "0\n"
    assert ksm.enable(root, smart_scan=True).to_dict()["smart_scan"] == 1


def test_ksm_bad_settings_and_missing_ksm_are_clear_errors(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path)
    with pytest.raises(ConfigError) as bad:
        ksm.enable(root, pages_to_scan=0)
    assert bad.value.problems[0].field == "--pages-to-scan"
    assert (root / "run").read_text() == "0\n"  # nothing written
    with pytest.raises(HostError) as missing:
        ksm.status(tmp_path / "nothing")
    assert missing.value.exit_code == ExitCode.HOST_MISSING and "no KSM" in missing.value.message
    assert ksm.shared_bytes(tmp_path / "nothing") is None


def test_proc_readings_of_this_process() -> None:
    assert balloon.rss_bytes(os.getpid()) > 10 * MiB
    assert balloon.cpu_seconds(os.getpid()) > 0


def test_ksm_merged_bytes_of_a_process(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "ksm_merging_pages").write_text("256\n")
    assert balloon.ksm_merged_bytes(42, proc=str(tmp_path)) == 256 * os.sysconf("SC_PAGE_SIZE")
    assert balloon.ksm_merged_bytes(43, proc=str(tmp_path)) is None  # an older kernel: unknown
    if Path(f"/proc/{os.getpid()}/ksm_merging_pages").exists():
        assert balloon.ksm_merged_bytes(os.getpid()) == 0  # nothing of this process is mergeable


def cli(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vmkit.cli.main", *args]
    if user is not None:  # a real unprivileged user (writing KSM's knobs needs root)
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.skipif(not Path("/sys/kernel/mm/ksm/run").exists(), reason="this kernel has no KSM")
def test_host_ksm_cli_status_and_refusal_without_root(tmp_path: Path) -> None:
    st = json.loads(cli("host", "ksm", "status", "--json").stdout)
    assert {"run", "pages_to_scan", "sleep_millisecs", "pages_shared", "pages_sharing", "saved_bytes"} <= set(st)
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    before = Path("/sys/kernel/mm/ksm/run").read_text()
    refused = cli("host", "ksm", "on", user="65534")
    assert refused.returncode == ExitCode.HOST_MISSING, refused.stderr
    assert "needs root" in refused.stderr
    assert Path("/sys/kernel/mm/ksm/run").read_text() == before


def test_set_and_stats_cli_input_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKIT_HOME", str(tmp_path))
    nothing = cli("set", "box")
    assert nothing.returncode == ExitCode.BAD_INPUT and "--balloon" in nothing.stderr
    assert cli("stats", "box").returncode == ExitCode.NOT_FOUND
    assert cli("set", "box", "--balloon", "128M").returncode == ExitCode.NOT_FOUND
