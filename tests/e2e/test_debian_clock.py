"""The periodic clock fix-up on the Debian guest: a guest clock set 5 s wrong is put right by the
supervisor within a few checks, and `vmkit events` shows a clock-fixed event; with clock_sync off it
stays wrong."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import follow_events, vmkit, wait_until
from vmkit.config import MachineConfig, parse_config
from vmkit.host.images.store import Image

pytestmark = pytest.mark.e2e
BACK_5S = "date -s @$(($(date +%s) - 5))"
"""Sets the guest's clock 5 s back from its own (a time computed on the host would be late by the exec's delay)."""


def guest_offset(name: str) -> float:
    t0 = time.time()
    guest = float(vmkit("exec", name, "--", "date", "+%s.%N").stdout)
    return guest - (t0 + time.time()) / 2


def set_clock_sync(home: Path, name: str, **fields: object) -> None:
    path = home / "instances" / name / "vm.yaml"
    import yaml

    data = yaml.safe_load(path.read_text())
    data["clock_sync"] = {**data.get("clock_sync", {}), **fields}
    config: MachineConfig = parse_config(data)
    config.save(path)


@pytest.mark.timeout(1200)
def test_supervisor_puts_a_wrong_guest_clock_right(vmkit_home: Path, debian12: Image) -> None:
    vmkit("create", "deb", "--image", "debian-12")
    set_clock_sync(vmkit_home, "deb", interval=3)
    vmkit("start", "deb")
    events = follow_events("deb")  # subscribed: nothing after is missed
    try:
        vmkit("exec", "deb", "--", "sh", "-c", BACK_5S)
        assert wait_until(lambda: abs(guest_offset("deb")) < 1.0, 90, interval=2), guest_offset("deb")
        vmkit("stop", "deb", "--force")
        out, _ = events.communicate(timeout=30)
    finally:
        events.kill()
        events.wait()
    fixed = [e for e in map(json.loads, out.splitlines()) if e["kind"] == "clock-fixed"]
    assert fixed and fixed[0]["detail"]["periodic"] is True and -7 < fixed[0]["detail"]["offset_seconds"] < -3, out

    set_clock_sync(vmkit_home, "deb", enabled=False, interval=3)  # off: nothing puts it right
    log = vmkit_home / "instances" / "deb" / "supervisor.log"
    fixes_before = log.read_text().count("guest clock was")
    vmkit("start", "deb")
    vmkit("exec", "deb", "--", "sh", "-c", BACK_5S)
    time.sleep(12)
    assert guest_offset("deb") < -3
    assert log.read_text().count("guest clock was") == fixes_before
    vmkit("stop", "deb", "--force")
