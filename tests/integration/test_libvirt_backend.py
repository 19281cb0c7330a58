"""The libvirt backend with a real libvirtd (private, see tests/libvirt_daemon.py) and the micro guest:
``vmkit --connect URI ...`` drives a domain that virsh sees, and virsh's changes show in vmkit;
libvirt's errors come back as vmkit's exit codes. One machine is shared by the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import vmkit
from libvirt_daemon import LibvirtDaemon
from vmkit.errors import ExitCode
from vmkit.host.images.store import Image
from vmkit.host.provision import free_port

pytestmark = pytest.mark.timeout(600)

NAME = "lvm1"
PORT = free_port()


@pytest.fixture(scope="module")
def machine(lv: LibvirtDaemon, lv_home: Path, micro_image: Image) -> Iterator[str]:
    vmkit("--connect", lv.uri, "create", NAME, "--image", "micro", "--memory", "256M", "--port", f"{PORT}:8080")
    yield NAME
    vmkit("--connect", lv.uri, "delete", "--force", NAME, check=False)


def virsh_state(lv: LibvirtDaemon, name: str) -> str:
    return lv.virsh("domstate", name).stdout.strip()


def vmkit_state(lv: LibvirtDaemon, name: str) -> str:
    rows = json.loads(vmkit("--connect", lv.uri, "list", "--json").stdout)
    return next(r["state"] for r in rows if r["name"] == name)


def test_lifecycle_through_connect_is_what_virsh_sees(lv: LibvirtDaemon, machine: str) -> None:
    assert machine in lv.virsh("list", "--all", "--name").stdout.split()
    assert virsh_state(lv, machine) == "shut off"
    assert vmkit_state(lv, machine) == "stopped"
    vmkit("--connect", lv.uri, "start", machine, "--timeout", "600")  # returns once VMKIT-READY is on the console
    assert virsh_state(lv, machine) == "running"
    assert "VMKIT-READY" in vmkit("--connect", lv.uri, "console", machine, "--log").stdout

    vmkit("--connect", lv.uri, "pause", machine)
    assert virsh_state(lv, machine) == "paused"
    vmkit("--connect", lv.uri, "resume", machine)
    assert virsh_state(lv, machine) == "running"

    lv.virsh("suspend", machine)  # changed behind vmkit's back: vmkit list shows it
    assert vmkit_state(lv, machine) == "paused"
    lv.virsh("resume", machine)
    assert vmkit_state(lv, machine) == "running"

    # the guest's console answers through libvirt's console stream
    res = vmkit("--connect", lv.uri, "console", machine, "--log", "--until", "VMKIT-READY", "--timeout", "5")
    assert "VMKIT-READY" in res.stdout

    # the port forward libvirt 9.0 cannot express is on the running QEMU (HMP hostfwd_add through libvirt)
    usernet = lv.virsh("qemu-monitor-command", "--hmp", machine, "info usernet").stdout
    assert "HOST_FORWARD" in usernet and str(PORT) in usernet, usernet

    info = json.loads(vmkit("--connect", lv.uri, "inspect", machine).stdout)
    assert info["config"]["image"] == "micro" and info["runtime"]["state"] == "running"
    assert info["uuid"] == lv.virsh("domuuid", machine).stdout.strip()


def test_events_come_from_libvirt(lv: LibvirtDaemon, machine: str) -> None:
    if virsh_state(lv, machine) != "running":
        vmkit("--connect", lv.uri, "start", machine, "--timeout", "600")
    proc = subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "events", machine], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "VMKIT_CONNECT": lv.uri})
    try:
        assert proc.stdout is not None
        hello = json.loads(proc.stdout.readline())
        assert hello["kind"] == "hello" and hello["state"] == "running"
        lv.virsh("suspend", machine)
        ev = json.loads(proc.stdout.readline())
        assert (ev["kind"], ev["state"]) == ("state-changed", "paused")
        lv.virsh("resume", machine)
        ev = json.loads(proc.stdout.readline())
        assert (ev["kind"], ev["state"]) == ("state-changed", "running")
    finally:
        proc.kill()
        proc.wait()


def test_libvirt_errors_are_vmkits(lv: LibvirtDaemon, machine: str, tmp_path: Path) -> None:
    res = vmkit("--connect", lv.uri, "start", "nosuch", check=False)
    assert res.returncode == ExitCode.NOT_FOUND and "'nosuch' not found" in res.stderr
    if virsh_state(lv, machine) != "running":
        vmkit("--connect", lv.uri, "start", machine, "--timeout", "600")
    res = vmkit("--connect", lv.uri, "start", machine, check=False)  # already running
    assert res.returncode == ExitCode.WRONG_STATE, res.stderr
    res = vmkit("--connect", lv.uri, "create", machine, "--image", "micro", check=False)
    assert res.returncode == ExitCode.CONFLICT, res.stderr
    gone = f"qemu:///system?socket={tmp_path}/nobody-listens"
    res = vmkit("--connect", gone, "list", check=False)
    assert res.returncode == ExitCode.UNREACHABLE and "cannot connect" in res.stderr
    res = vmkit("--connect", "xen:///system", "list", check=False)
    assert res.returncode == ExitCode.BAD_INPUT and "--connect" in res.stderr
    res = vmkit("--connect", lv.uri, "top", check=False)  # a command libvirt does not have: refused by name
    assert res.returncode == ExitCode.BAD_INPUT and "top" in res.stderr and "not supported" in res.stderr
    res = vmkit("--connect", lv.uri, "exec", machine, "--", "true", check=False)  # the micro guest has no agent
    assert res.returncode == ExitCode.EXEC_FAILED and "no guest agent" in res.stderr  # exec: vmkit's own failures 125


def test_python_client_connect(lv: LibvirtDaemon, machine: str) -> None:
    import vmkit as vk

    client = vk.Client(connect=lv.uri)
    assert machine in [r.name for r in client.rows()]
    inst = client.get(machine)
    if inst.state != "running":
        inst.start(timeout=600)
    assert inst.pause().state == "paused"
    assert inst.resume().state == "running"
    assert inst.stop(force=True).state == "stopped"
    assert virsh_state(lv, machine) == "shut off"


def test_delete_removes_domain_and_volumes(lv: LibvirtDaemon, micro_image: Image, lv_home: Path) -> None:
    vmkit("--connect", lv.uri, "create", "lvgone", "--image", "micro", "--memory", "256M")
    vmkit("--connect", lv.uri, "start", "lvgone", "--timeout", "600")
    res = vmkit("--connect", lv.uri, "delete", "lvgone", check=False)
    assert res.returncode == ExitCode.WRONG_STATE
    vmkit("--connect", lv.uri, "delete", "--force", "lvgone")
    assert "lvgone" not in lv.virsh("list", "--all", "--name").stdout.split()
    vols = lv.virsh("vol-list", "vmkit").stdout
    assert "lvgone-" not in vols and "base-" in vols  # shared kernel and initrd stay for the next machine
