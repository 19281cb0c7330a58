"""Automatic ballooning on a real micro guest: `vmkit host autoballoon on` with a simulated host (a
meminfo file the test writes, so the host need not run out of memory) shrinks the guest's balloon
step by step down to its balloon_min and no further, grows it back when the host has room again,
and `off` stops the controller and leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import pytest

from conftest import vmkit, wait_until
from vmkit.host.images.store import Image

pytestmark = pytest.mark.integration
MiB = 1 << 20


def balloon(name: str) -> int:
    return int(json.loads(vmkit("stats", name, "--json").stdout)["balloon_bytes"])


def simulated_host(path: Path, total_mib: int, available_mib: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"MemTotal:       {total_mib << 10} kB\nMemFree:        {available_mib << 10} kB\n"
                   f"MemAvailable:   {available_mib << 10} kB\n")
    tmp.replace(path)


def auto_status() -> dict[str, object]:
    data: dict[str, object] = json.loads(vmkit("host", "autoballoon", "status", "--json").stdout)
    return data


@pytest.mark.timeout(600)
def test_controller_shrinks_to_balloon_min_and_regrows(vmkit_home: Path, micro_image: Image, tmp_path: Path) -> None:
    bad = vmkit("create", "nope", "--image", "micro", "--memory", "256M", "--balloon-min", "512M", check=False)
    assert bad.returncode == 2 and "--balloon-min" in bad.stderr and "256M" in bad.stderr, bad.stderr
    vmkit("create", "box", "--image", "micro", "--memory", "256M", "--balloon-min", "160M")
    vmkit("start", "box")
    meminfo = tmp_path / "meminfo"
    simulated_host(meminfo, 2048, 100)  # 95 % used: far above the 80 % target
    on = vmkit("host", "autoballoon", "on", "--meminfo", str(meminfo), "--interval", "1", "--step", "40M")
    assert "autoballoon is on" in on.stdout, on.stdout
    first = auto_status()
    again = vmkit("host", "autoballoon", "on", "--interval", "3", "--json")
    second = json.loads(again.stdout)
    assert second["already_running"] is True and second["pid"] == first["pid"]
    assert second["interval_seconds"] == 1.0  # the running controller's settings, unchanged

    d = vmkit_home / "autoballoon"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in ("pid", "status.json", "lock", "controller.log"):
        assert stat.S_IMODE((d / f).stat().st_mode) == 0o600, f

    assert wait_until(lambda: balloon("box") <= 160 * MiB + MiB, 120, interval=1), vmkit("host", "autoballoon",
                                                                                         "status").stdout
    time.sleep(4)  # a few more rounds: it stays at the floor
    assert abs(balloon("box") - 160 * MiB) < MiB
    st = auto_status()
    assert st["action"] == "none" and st["goal_bytes"] < 0  # type: ignore[operator]
    guests = st["guests"]
    assert isinstance(guests, list) and guests[0]["name"] == "box" and guests[0]["balloon_min_bytes"] == 160 * MiB
    assert "box" in vmkit("host", "autoballoon", "status").stdout

    simulated_host(meminfo, 2048, 1900)  # the host has room again
    assert wait_until(lambda: balloon("box") >= 256 * MiB - MiB, 120, interval=1)

    log = (d / "controller.log").read_text()
    moves = [(a, int(m), int(n)) for a, m, n in re.findall(r"(shrink|grow) box: (\d+) -> (\d+) MiB", log)]
    assert [a for a, _, _ in moves][:1] == ["shrink"] and "grow" in [a for a, _, _ in moves], log
    assert all(abs(n - m) <= 40 and n >= 160 for _, m, n in moves), moves

    # a lower floor holds at once (vm.yaml is read every round)
    simulated_host(meminfo, 2048, 100)
    vmkit("set", "box", "--balloon-min", "96M", "--balloon-shares", "500")
    assert wait_until(lambda: balloon("box") <= 96 * MiB + MiB, 120, interval=1)
    assert "balloon_min: 96M" in (vmkit_home / "instances" / "box" / "vm.yaml").read_text()

    pid = int(first["pid"])  # type: ignore[call-overload]
    off = vmkit("host", "autoballoon", "off")
    assert "autoballoon is off" in off.stdout
    assert not (d / "pid").exists()
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10), "the controller is still there"
    assert auto_status()["running"] is False
    assert "autoballoon is off" in vmkit("host", "autoballoon", "off").stdout  # again: nothing to do
    vmkit("stop", "box", "--force")


def test_controller_refuses_bad_options_and_exits_with_its_home(vmkit_home: Path, tmp_path: Path) -> None:
    for args, option in ((["--target", "120"], "--target"), (["--step", "lots"], "--step"),
                         (["--interval", "0"], "--interval"), (["--meminfo", str(tmp_path / "none")], "--meminfo")):
        res = vmkit("host", "autoballoon", "on", *args, check=False)
        assert res.returncode == 2 and option in res.stderr, (args, res.stderr)
    assert auto_status()["running"] is False
    on = json.loads(vmkit("host", "autoballoon", "on", "--interval", "1", "--json").stdout)
    assert on["running"] is True and on["rounds"] >= 1 and on["guests"] == []  # no machine runs
    pid = int(on["pid"])
    assert os.getpgid(pid) == pid  # its own session: it survives the command that started it
    (vmkit_home / "autoballoon" / "lock").unlink()  # the home is going away
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists() or
                      Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", 10)
