"""vmkit networks with micro guests: an isolated network rejects forwarded traffic (and counts it)
while its guests still get DHCP and reach the host; a rootless pair reaches each other; a killed
supervisor leaves no tap; a network whose definition vanished is cleaned up; bad input is refused.

Traffic goes only to the networks these tests create and a network namespace they make.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import vmkit, wait_until
from vmkit.host.images.store import Image
from vmkit.net.definition import tap_name
from vmkit.net.system import nft_counters

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="bridged networks need root")
NETNS = "vmknet-iso"
VETH_HOST, VETH_NS = "vmkni-h", "vmkni-n"

DHCP = (
    "ip link set eth0 up; "
    "printf '#!/bin/sh\\n[ \"$1\" = bound ] && ip addr add $ip/$mask dev $interface\\nexit 0\\n' > /tmp/dh; "
    "chmod +x /tmp/dh; udhcpc -i eth0 -q -n -t 20 -T 1 -s /tmp/dh >/dev/null 2>&1; "
    "echo ADDR $(ip -4 -o addr show eth0 | awk '{print $4}'); "
)


def console(name: str) -> str:
    return (Path(os.environ["VMKIT_HOME"]) / "instances" / name / "serial.log").read_text(errors="replace")


def wait_console(name: str, *markers: str, timeout: float = 240) -> str:
    """Wait until one of the complete markers is in the machine's console log (never a part of one)."""
    assert wait_until(lambda: any(m in console(name) for m in markers), timeout, 0.5), console(name)[-3000:]
    return console(name)


@pytest.fixture
def outside() -> Iterator[str]:
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        for argv in (["link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS],
                     ["link", "set", VETH_NS, "netns", NETNS], ["addr", "add", "192.168.252.1/24", "dev", VETH_HOST],
                     ["link", "set", VETH_HOST, "up"], ["-n", NETNS, "addr", "add", "192.168.252.2/24", "dev", VETH_NS],
                     ["-n", NETNS, "link", "set", VETH_NS, "up"]):
            subprocess.run(["ip", *argv], check=True)
        yield "192.168.252.2"
    finally:
        subprocess.run(["ip", "link", "del", VETH_HOST], capture_output=True)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


@ROOT
@pytest.mark.timeout(600)
def test_isolated_network_rejects_forwarded_traffic(vmkit_home: Path, micro_image: Image, outside: str) -> None:
    vmkit("network", "create", "iso", "--mode", "isolated", "--subnet", "10.118.7.0/24")
    try:
        # the guest routes to the outside through the host anyway (isolated DHCP gives it no default route)
        run = (DHCP + "ping -c 2 -W 3 10.118.7.1 >/dev/null && echo GATEWAY-OK; "
               f"ip route add {outside}/32 via 10.118.7.1; "
               f"ping -c 2 -W 3 {outside} >/dev/null && echo OUTSIDE-REACHED || echo OUTSIDE-BLOCKED; echo DONE")
        vmkit("create", "i1", "--image", "micro", "--network", "iso", "--run", run)
        vmkit("start", "i1")
        log = wait_console("i1", "DONE")
        assert "ADDR 10.118.7.2/24" in log  # the static lease
        assert "GATEWAY-OK" in log and "OUTSIDE-BLOCKED" in log and "OUTSIDE-REACHED" not in log
        assert nft_counters("vmkit-iso")["rejected_out"] >= 2  # the pings were rejected by vmkit's table
        vmkit("delete", "i1", "--force")
    finally:
        vmkit("network", "delete", "iso", "--force", check=False)
    assert "vmkbr-iso" not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout


@pytest.mark.timeout(600)
def test_rootless_pair_reaches_each_other(vmkit_home: Path, micro_image: Image) -> None:
    vmkit("network", "create", "rl", "--mode", "rootless", "--subnet", "10.118.9.0/24")
    try:
        for name, me, peer in (("r1", "10.118.9.2", "10.118.9.3"), ("r2", "10.118.9.3", "10.118.9.2")):
            run = (f"ip link set eth0 up; ip addr add {me}/24 dev eth0; "
                   f"for i in $(seq 60); do ping -c 1 -W 1 {peer} >/dev/null && break; done; "
                   f"ping -c 3 -W 2 {peer} >/dev/null && echo PEER-REACHED || echo PEER-UNREACHABLE")
            vmkit("create", name, "--image", "micro", "--network", "rl", "--run", run)
        net = json.loads(vmkit("network", "inspect", "rl").stdout)
        assert {m["machine"]: m["address"] for m in net["machines"]} == {"r1": "10.118.9.2", "r2": "10.118.9.3"}
        assert net["bridge"] is None and net["up"] and net["switch_pid"]
        vmkit("start", "r1")
        vmkit("start", "r2")
        for name in ("r1", "r2"):
            log = wait_console(name, "PEER-REACHED", "PEER-UNREACHABLE")
            assert "PEER-REACHED" in log, log[-2000:]
        for name in ("r1", "r2"):
            vmkit("delete", name, "--force")
    finally:
        vmkit("network", "delete", "rl", "--force", check=False)
    assert not (vmkit_home / "networks" / "rl").exists()


@ROOT
@pytest.mark.timeout(600)
def test_killed_supervisor_leaves_no_tap_and_the_machine_starts_again(vmkit_home: Path, micro_image: Image) -> None:
    vmkit("network", "create", "crash", "--subnet", "10.118.8.0/24")
    try:
        vmkit("create", "c1", "--image", "micro", "--network", "crash")
        vmkit("start", "c1")
        tap = tap_name(vmkit_home / "instances" / "c1", 0)
        assert Path("/sys/class/net", tap, "brport").exists()  # on the bridge
        state = json.loads((vmkit_home / "instances" / "c1" / "state.json").read_text())
        os.kill(state["supervisor_pid"], signal.SIGKILL)
        assert wait_until(lambda: not Path("/sys/class/net", tap).exists(), 30, 0.1), "the tap outlived QEMU"
        vmkit("start", "c1")  # nothing in the way
        assert Path("/sys/class/net", tap).exists()
        vmkit("delete", "c1", "--force")
        assert wait_until(lambda: not Path("/sys/class/net", tap).exists(), 10, 0.1)
    finally:
        vmkit("network", "delete", "crash", "--force", check=False)


@ROOT
def test_a_vanished_definition_is_cleaned_up(vmkit_home: Path) -> None:
    vmkit("network", "create", "gone", "--subnet", "10.118.6.0/24")
    netdir = vmkit_home / "networks" / "gone"
    pid = int((netdir / "dnsmasq.pid").read_text())
    subprocess.run(["rm", "-rf", str(netdir)], check=True)  # as if the home was wiped
    out = vmkit("network", "clean").stdout
    assert "bridge vmkbr-gone" in out and "vmkit-gone" in out and f"dnsmasq pid {pid}" in out
    assert not Path("/sys/class/net/vmkbr-gone").exists()
    assert "vmkit-gone" not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), 5)
    assert vmkit("network", "clean").stdout.strip() == "nothing to clean"


@ROOT
def test_bad_input(vmkit_home: Path, micro_image: Image) -> None:
    vmkit("network", "create", "one", "--subnet", "10.118.5.0/24")
    try:
        res = vmkit("network", "create", "two", "--subnet", "10.118.5.128/25", check=False)
        assert res.returncode == 2 and "overlaps network 'one'" in res.stderr
        res = vmkit("network", "create", "one", "--subnet", "10.118.4.0/24", check=False)
        assert res.returncode != 0 and "already exists" in res.stderr
        route = subprocess.run(["ip", "-j", "-4", "route"], capture_output=True, text=True).stdout
        connected = next(r["dst"] for r in json.loads(route) if r.get("dst", "default") != "default"
                         and "/" in r["dst"] and r.get("dev") != "vmkbr-one")
        res = vmkit("network", "create", "three", "--subnet", connected, check=False)
        assert res.returncode == 2 and "clashes with the host's route" in res.stderr
        res = vmkit("network", "create", "x;y", check=False)
        assert res.returncode == 2 and "not a network name" in res.stderr
        res = vmkit("create", "m", "--image", "micro", "--network", "nosuch", check=False)
        assert res.returncode != 0 and "nosuch" in res.stderr
        assert not (vmkit_home / "instances" / "m").exists()
        res = vmkit("create", "m", "--image", "micro", "--network", "one,model=ne2k", check=False)
        assert res.returncode == 2 and "not a NIC model" in res.stderr
    finally:
        vmkit("network", "delete", "one")


@ROOT
def test_bridged_network_without_root_says_what_to_do(tmp_path: Path) -> None:
    """A normal user (nobody here) asking for a nat network gets the reason and the rootless hint."""
    home = Path(tempfile.mkdtemp(prefix="vmkit-nobody-", dir="/tmp"))
    try:
        os.chown(home, 65534, 65534)
        env = {**os.environ, "VMKIT_HOME": str(home), "COLUMNS": "250"}
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", sys.executable, "-m",
                "vmkit.cli.main", "network", "create", "lab"]
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 6, res.stderr  # HostError: the host (here: its user) lacks something
        assert "needs root" in res.stderr and "--mode rootless" in res.stderr
        assert not (home / "networks" / "lab").exists()
    finally:
        shutil.rmtree(home, ignore_errors=True)
