"""vmkit.net.system's process handling: a daemon it stops (dnsmasq) counts as gone once it has exited,
not once PID 1 has reaped it (this host's PID 1 reaps about once a second: every network join or
leave of a running network restarts its dnsmasq, and waited that long)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from vmkit.net import system


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def test_kill_and_wait_returns_once_a_daemon_has_exited() -> None:
    # a daemon: its parent (the shell) exits at once, so it belongs to PID 1, as a dnsmasq does
    out = subprocess.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                         check=True).stdout
    pid = int(out.strip())
    assert _state(pid) in ("S", "R")
    began = time.monotonic()
    assert system.kill_and_wait(pid, timeout=10)
    took = time.monotonic() - began
    assert _state(pid) in ("Z", "gone")  # exited (reaped or not)
    assert took < 0.5, f"kill_and_wait took {took:.2f} s"
    assert system.kill_and_wait(pid)  # gone already: nothing to wait for


def test_kill_and_wait_kills_what_ignores_sigterm() -> None:
    out = subprocess.run(["sh", "-c", "(trap '' TERM; exec sleep 600) >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True).stdout
    pid = int(out.strip())
    time.sleep(0.2)  # the trap is set before the exec
    began = time.monotonic()
    assert system.kill_and_wait(pid, timeout=0.5)
    assert _state(pid) in ("Z", "gone")
    assert 0.4 < time.monotonic() - began < 5
