"""The supervisor and the CLI, end to end with the micro guest: what a user sees from the shell."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import follow_events, pid_alive, processes_mentioning, vmkit, wait_until
from vmkit.host.images.store import Image
from vmkit.host.instance import Instance

pytestmark = pytest.mark.integration




def listed(name: str) -> dict[str, object]:
    rows = json.loads(vmkit("list", "--json").stdout)
    return next(r for r in rows if r["name"] == name)


def qemu_pid(home: Path, name: str) -> int:
    return int((home / "instances" / name / "qemu.pid").read_text())


def test_cli_lifecycle_survives_cli_exit(vmkit_home: Path, micro_image: Image) -> None:
    vmkit("create", "web", "--image", "micro", "--memory", "256M", "--cmdline", "vmkit.counter=1",
          "--run", "echo guest-says-$((6*7))")
    assert listed("web")["state"] == "stopped"
    vmkit("start", "web")
    # the CLI process has exited; the VM runs on under its supervisor
    row = listed("web")
    assert row["state"] == "running" and row["accel"] in ("tcg", "kvm")
    pid = qemu_pid(vmkit_home, "web")
    assert pid_alive(pid)
    out = vmkit("console", "web", "--log", "--until", r"^VMKIT-RUN-END rc=0", "--timeout", "60").stdout
    assert "guest-says-42" in out

    # typing into the console reaches the guest's shell
    typed = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "console", "web"],
                           input="echo typed-$((40+2))\n", capture_output=True, text=True, timeout=60)
    assert typed.returncode == 0, typed.stderr
    assert "typed-42" in vmkit("console", "web", "--log", "--until", r"^typed-42", "--timeout", "30").stdout

    # the raw console socket works for plain tools too
    con = vmkit_home / "instances" / "web" / "console.sock"
    assert con.stat().st_mode & 0o777 == 0o600
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(con))
        s.sendall(b"echo raw-$((50+5))\n")
        seen = b""
        while b"raw-55\r" not in seen and b"raw-55\n" not in seen:
            chunk = s.recv(4096)
            assert chunk, "console.sock closed"
            seen += chunk

    vmkit("pause", "web")
    assert listed("web")["state"] == "paused"
    wrong = vmkit("pause", "web", check=False)
    assert wrong.returncode == 4 and "paused" in wrong.stderr
    vmkit("resume", "web")
    assert listed("web")["state"] == "running"

    # the micro guest has no agent: vmkit exec fails with vmkit's own code, never a command's
    noagent = vmkit("exec", "web", "--", "true", check=False)
    assert noagent.returncode == 125 and "agent" in noagent.stderr

    info = json.loads(vmkit("inspect", "web").stdout)
    assert info["config"]["name"] == "web" and info["runtime"]["supervised"] is True
    assert (vmkit_home / "instances" / "web" / "api.sock").stat().st_mode & 0o777 == 0o600

    stopped = vmkit("stop", "web")
    assert "stopped" in stopped.stdout and "guest" in stopped.stdout  # the guest powered itself off
    assert not pid_alive(pid)
    assert listed("web")["state"] == "stopped"
    assert processes_mentioning(str(vmkit_home)) == []
    assert not (vmkit_home / "instances" / "web" / "api.sock").exists()
    assert not con.exists()
    again = vmkit("stop", "web", check=False)
    assert again.returncode == 4
    vmkit("delete", "web")
    assert vmkit("inspect", "web", check=False).returncode == 3


def test_force_stop_and_events(vmkit_home: Path, micro_image: Image) -> None:
    vmkit("create", "ev", "--image", "micro", "--memory", "256M")
    vmkit("start", "ev")
    follower = follow_events("ev")  # subscribed: nothing after is missed
    try:
        vmkit("pause", "ev")
        vmkit("resume", "ev")
        vmkit("stop", "--force", "ev")
        out, _ = follower.communicate(timeout=30)
    finally:
        follower.kill()
    states = [json.loads(line)["state"] for line in out.splitlines()]  # after hello: running again once resumed
    assert "paused" in states and "running" in states and states[-1] == "stopped"
    assert listed("ev")["state"] == "stopped"


def test_qemu_killed_is_recorded(vmkit_home: Path, micro_image: Image) -> None:
    vmkit("create", "victim", "--image", "micro", "--memory", "256M")
    vmkit("start", "victim")
    pid = qemu_pid(vmkit_home, "victim")
    os.kill(pid, signal.SIGKILL)
    inst = Instance("victim", vmkit_home / "instances")
    assert wait_until(lambda: not inst.is_supervised(), 15), "the supervisor did not exit after QEMU died"
    row = listed("victim")
    assert row["state"] == "error"
    assert "SIGKILL" in str(row["reason"])
    # the lock goes a moment before the supervisor's process does
    assert wait_until(lambda: processes_mentioning(str(vmkit_home)) == [], 15), processes_mentioning(str(vmkit_home))


def test_killed_supervisor_leaves_no_orphan(vmkit_home: Path, micro_image: Image) -> None:
    vmkit("create", "orphan", "--image", "micro", "--memory", "256M")
    vmkit("start", "orphan")
    inst = Instance("orphan", vmkit_home / "instances")
    qpid = qemu_pid(vmkit_home, "orphan")
    spid = inst.read_status().supervisor_pid
    assert spid is not None and pid_alive(spid)
    os.kill(spid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(qpid), 10), "QEMU outlived its supervisor"
    # the lock is the supervisor's until its last thread has exited (its leader is a zombie sooner)
    assert wait_until(lambda: not inst.is_supervised(), 10), "the killed supervisor still holds the lock"
    row = listed("orphan")  # the next command notices and cleans up
    assert row["state"] == "error" and "supervisor died" in str(row["reason"])
    assert not inst.api_socket.exists()
    assert processes_mentioning(str(vmkit_home)) == []
    # and the instance starts again: no stale lock
    vmkit("start", "orphan")
    assert listed("orphan")["state"] == "running"
    vmkit("stop", "orphan")
    assert listed("orphan")["state"] == "stopped"


def test_start_rejects_a_taken_port_and_reports_every_problem(vmkit_home: Path, micro_image: Image) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        bad = vmkit("create", "p", "--image", "micro", "--port", f"{port}:80", "--memory", "12Q", check=False)
        assert bad.returncode == 2
        assert "--memory" in bad.stderr
        vmkit("create", "p", "--image", "micro", "--port", f"{port + 1}:80")
        # the port is free at create time but taken at start time
        with socket.socket() as s2:
            s2.bind(("127.0.0.1", port + 1))
            s2.listen()
            res = vmkit("start", "p", check=False)
        assert res.returncode == 2 and "network.forwards[0]" in res.stderr and "taken" in res.stderr
    assert listed("p")["state"] == "stopped"
