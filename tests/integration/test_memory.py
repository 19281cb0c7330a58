"""Memory on the micro guest: the balloon moved live (`vmkit set --balloon`), its BALLOON_CHANGE events in
`vmkit events`, and `vmkit stats` following it; a balloon that survives a save and restore."""

from __future__ import annotations

import json
import select
import time
from pathlib import Path

import pytest
import yaml

from conftest import follow_events, vmkit, wait_until
from vmkit.host.images.store import Image

pytestmark = pytest.mark.integration
MiB = 1 << 20


def stats(name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(vmkit("stats", name, "--json").stdout)
    return data


def test_balloon_moves_live_and_stats_follow(vmkit_home: Path, micro_image: Image) -> None:
    vmkit("create", "box", "--image", "micro", "--memory", "256M")
    vmkit("start", "box")
    events = follow_events("box")  # subscribed: nothing after is missed
    try:
        before = stats("box")
        assert before["balloon_bytes"] == 256 * MiB and before["memory_bytes"] == 256 * MiB
        assert before["vcpus"] == 1 and isinstance(before["host_rss_bytes"], int) and before["host_rss_bytes"] > 0
        assert isinstance(before["cpu_percent"], float) and before["cpu_percent"] >= 0

        too_big = vmkit("set", "box", "--balloon", "512M", check=False)
        assert too_big.returncode == 2 and "--balloon" in too_big.stderr and "256M" in too_big.stderr
        too_small = vmkit("set", "box", "--balloon", "16M", check=False)
        assert too_small.returncode == 2 and "--balloon" in too_small.stderr and "64M" in too_small.stderr
        assert vmkit("set", "box", "--balloon", "lots", check=False).returncode == 2

        started = time.monotonic()
        moved = vmkit("set", "box", "--balloon", "160M", "--timeout", "60")
        assert "160 MiB usable" in moved.stdout, moved.stdout
        print(f"balloon 256M -> 160M took {time.monotonic() - started:.1f} s")
        assert abs(int(stats("box")["balloon_bytes"]) - 160 * MiB) < MiB  # type: ignore[call-overload]

        # the guest driver reports its memory every 2 s once polling is on
        assert wait_until(lambda: stats("box")["guest_mem_available_bytes"] is not None, 60, interval=1)
        now = stats("box")
        total, available = now["guest_mem_total_bytes"], now["guest_mem_available_bytes"]
        assert isinstance(total, int) and isinstance(available, int) and 0 < available <= total <= 256 * MiB

        table = vmkit("stats", "box").stdout
        assert "balloon (usable)" in table and "160 MiB" in table and "KSM saved (whole host)" in table
        # QEMU sends BALLOON_CHANGE at most once a second: the last one may come after the stats say 160M
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while select.select([events.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            seen.append(events.stdout.readline())
            event = json.loads(seen[-1])
            if event["kind"] == "qmp" and event["detail"].get("event") == "BALLOON_CHANGE" and \
                    abs(event["detail"]["data"]["actual"] - 160 * MiB) < MiB:
                break
        vmkit("stop", "box", "--force")
        rest, _ = events.communicate(timeout=30)
        out = "".join(seen) + rest
    finally:
        events.kill()
        events.wait()
    changes = [e for e in map(json.loads, out.splitlines())
               if e["kind"] == "qmp" and e["detail"].get("event") == "BALLOON_CHANGE"]
    # the events show the balloon moving (QEMU rate-limits them; on a loaded host the last, 160M one
    # was once not sent within 30 s while the stats above already said 160M)
    assert changes and 160 * MiB - MiB < changes[-1]["detail"]["data"]["actual"] < 256 * MiB, out[-2000:]


def test_balloon_survives_save_and_restore(vmkit_home: Path, micro_image: Image) -> None:
    """The balloon device's state is in the saved state: a machine saved and restored by this version
    comes back with the same usable memory (the configuration check accepts it)."""
    vmkit("create", "box", "--image", "micro", "--memory", "256M")
    vmkit("start", "box")
    vmkit("set", "box", "--balloon", "128M", "--timeout", "60")
    vmkit("stop", "box", "--save")
    vmkit("start", "box")
    assert abs(int(stats("box")["balloon_bytes"]) - 128 * MiB) < MiB  # type: ignore[call-overload]
    vmkit("stop", "box", "--force")


def code_cache_bytes(pid: int) -> int:
    """The size of QEMU's TCG translation cache: its read-write-execute mappings."""
    total = 0
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        span, perms = line.split()[:2]
        if perms == "rwxp":
            lo, hi = (int(x, 16) for x in span.split("-"))
            total += hi - lo
    return total


def test_tcg_cache_bounds_qemus_translation_cache(vmkit_home: Path, micro_image: Image) -> None:
    """vm.yaml's tcg_cache becomes QEMU's tb-size: its code cache is that big, not QEMU's 1 GiB default."""
    vmkit("create", "tbbox", "--image", "micro", "--memory", "128M")
    path = vmkit_home / "instances" / "tbbox" / "vm.yaml"
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "tcg_cache": "32M"}))
    vmkit("start", "tbbox")
    try:
        pid = json.loads((vmkit_home / "instances" / "tbbox" / "state.json").read_text())["qemu_pid"]
        assert 0 < code_cache_bytes(pid) <= 32 * MiB, code_cache_bytes(pid)
    finally:
        vmkit("stop", "tbbox", "--force", check=False)
    data["tcg_cache"] = "8M"
    path.write_text(yaml.safe_dump(data))
    refused = vmkit("start", "tbbox", check=False)
    assert refused.returncode == 2 and "tcg_cache" in refused.stderr and "16M to 2G" in refused.stderr


def test_ksm_merges_identical_guests_and_leaves_an_opted_out_one_alone(vmkit_home: Path, micro_image: Image) -> None:
    """`vmkit host ksm on` merges two identical guests' pages (host status and each machine's stats say
    so); a machine with memory_merge: false keeps all of its own; KSM's settings are put back after."""
    knobs = Path("/sys/kernel/mm/ksm")
    saved = {k: (knobs / k).read_text() for k in ("pages_to_scan", "sleep_millisecs", "smart_scan", "run")
             if (knobs / k).is_file()}
    for name in ("ka", "kb", "kc"):
        vmkit("create", name, "--image", "micro", "--memory", "128M")
    path = vmkit_home / "instances" / "kc" / "vm.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "memory_merge": False}))
    try:
        for name in ("ka", "kb", "kc"):
            vmkit("start", name)
        on = json.loads(vmkit("host", "ksm", "on", "--pages-to-scan", "1000", "--json").stdout)
        assert on["mode"] == "on" and on["pages_to_scan"] == 1000
        assert wait_until(lambda: all((stats(n)["ksm_merged_bytes"] or 0) > 4 * MiB  # type: ignore[operator]
                                      for n in ("ka", "kb")), 180, interval=2), [stats(n) for n in ("ka", "kb")]
        status = json.loads(vmkit("host", "ksm", "status", "--json").stdout)
        assert status["pages_sharing"] > 0 and status["saved_bytes"] > 4 * MiB
        assert stats("kc")["ksm_merged_bytes"] == 0
        assert "saved" in vmkit("host", "ksm", "status").stdout
    finally:
        for name in ("ka", "kb", "kc"):
            vmkit("stop", name, "--force", check=False)
        for knob in ("pages_to_scan", "sleep_millisecs", "smart_scan", "run"):
            if knob in saved:
                (knobs / knob).write_text(saved[knob])
