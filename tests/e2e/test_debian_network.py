"""Two Debian guests on a vmkit nat network, through the CLI: they resolve and ping each other by
name (NAME and NAME.DOMAIN), carry a TCP echo both ways, reach the gateway and a server on the
host side of the NAT (in a network namespace this test makes, acting as "outside"), take a host port
forward, and leave nothing on the host when they and the network are gone.

Traffic goes only to this machine's own addresses, the network the test creates and its namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import image_cache_dir, vmkit, vmkit_process
from vmkit.host.images.store import Image
from vmkit.host.provision import free_port
from vmkit.net.probes import PING

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500),  # the first test also waits for two Debian boots
              pytest.mark.skipif(os.geteuid() != 0, reason="bridged networks need root")]

NETNS = "vmknet-outside"
VETH_HOST, VETH_NS = "vmkno-h", "vmkno-n"
OUTSIDE_HOST, OUTSIDE_NS = "192.168.251.1", "192.168.251.2"

ECHO_SERVER = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 7777)); s.listen()\n"
    "while True:\n"
    "    c, _ = s.accept(); d = c.recv(1024); c.sendall(b'echo:' + d); c.close()\n"
)
ECHO_CLIENT = (
    "import socket, sys\n"
    "c = socket.create_connection((sys.argv[1], 7777), timeout=10); c.sendall(sys.argv[2].encode())\n"
    "print(c.recv(1024).decode())\n"
)


def guest(name: str, *argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return vmkit("exec", name, "--timeout", str(int(timeout)), "--", *argv, check=check, timeout=timeout + 60)


@pytest.fixture(scope="module")
def pair(debian12: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("nethome")
    old = os.environ.get("VMKIT_HOME"), os.environ.get("VMKIT_IMAGE_CACHE")
    os.environ["VMKIT_HOME"] = str(home)
    os.environ["VMKIT_IMAGE_CACHE"] = str(image_cache_dir())  # where the debian12 fixture built the image
    try:
        vmkit("network", "create", "lab", "--mode", "nat")
        net = json.loads(vmkit("network", "inspect", "lab").stdout)
        for name in ("a", "b"):
            vmkit("create", name, "--image", "debian-12", "--network", "lab")
            vm_yaml = home / "instances" / name / "vm.yaml"  # two boots on a shared TCG host: be patient
            config = yaml.safe_load(vm_yaml.read_text())
            config["readiness"]["timeout"] = 1200
            vm_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
        t0 = time.monotonic()
        results: dict[str, subprocess.CompletedProcess[str]] = {}
        # two CLI processes at once (the in-process runner swaps sys.stdout: one call at a time)
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, vmkit_process(
                       "start", n, check=False, timeout=900)))
                   for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(results) == {"a", "b"}, results
        for n, res in results.items():
            assert res.returncode == 0, f"start {n}: {res.stderr}"
        print(f"both guests up in {time.monotonic() - t0:.0f} s")
        yield {"home": str(home), "gateway": net["gateway"], "subnet": net["subnet"], "bridge": net["bridge"]}
    finally:
        for name in ("a", "b"):
            vmkit("delete", name, "--force", check=False)
        vmkit("network", "delete", "lab", "--force", check=False)
        for key, value in zip(("VMKIT_HOME", "VMKIT_IMAGE_CACHE"), old, strict=True):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_list_and_inspect_show_the_addresses(pair: dict[str, str]) -> None:
    rows = {r["name"]: r for r in json.loads(vmkit("list", "--json").stdout)}
    net = json.loads(vmkit("network", "inspect", "lab").stdout)
    members = {m["machine"]: m for m in net["machines"]}
    assert set(members) == {"a", "b"} and net["up"] is True
    for name in ("a", "b"):
        assert rows[name]["addresses"] == {"lab": members[name]["address"]}
        assert json.loads(vmkit("inspect", name).stdout)["addresses"] == {"lab": members[name]["address"]}
        shown = guest(name, "ip", "-4", "-o", "addr", "show").stdout
        assert f"{members[name]['address']}/" in shown  # the static lease arrived


def test_guests_resolve_and_ping_each_other_by_name(pair: dict[str, str]) -> None:
    net = json.loads(vmkit("network", "inspect", "lab").stdout)
    addr = {m["machine"]: m["address"] for m in net["machines"]}
    for me, peer in (("a", "b"), ("b", "a")):
        for name in (peer, f"{peer}.lab"):
            assert guest(me, "getent", "hosts", name).stdout.split()[0] == addr[peer]
            assert guest(me, "python3", "-c", PING, name, "2").stdout.split()[0] == addr[peer]


def test_tcp_echo_both_ways(pair: dict[str, str]) -> None:
    for name in ("a", "b"):
        guest(name, "sh", "-c", f"nohup python3 -c \"{ECHO_SERVER}\" >/dev/null 2>&1 &")
    time.sleep(2)
    assert guest("a", "python3", "-c", ECHO_CLIENT, "b", "from-a").stdout.strip() == "echo:from-a"
    assert guest("b", "python3", "-c", ECHO_CLIENT, "a.lab", "from-b").stdout.strip() == "echo:from-b"


def test_gateway_answers(pair: dict[str, str]) -> None:
    assert guest("a", "python3", "-c", PING, pair["gateway"], "2").stdout.startswith(pair["gateway"])


@pytest.fixture
def outside() -> Iterator[subprocess.Popen[bytes]]:
    """A web server in a network namespace of its own, reached through the host (the NAT's far side)."""
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True)

    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
    ip("netns", "add", NETNS)
    server = None
    try:
        ip("link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS)
        ip("link", "set", VETH_NS, "netns", NETNS)
        ip("addr", "add", f"{OUTSIDE_HOST}/24", "dev", VETH_HOST)
        ip("link", "set", VETH_HOST, "up")
        ip("-n", NETNS, "addr", "add", f"{OUTSIDE_NS}/24", "dev", VETH_NS)
        ip("-n", NETNS, "link", "set", VETH_NS, "up")
        ip("-n", NETNS, "link", "set", "lo", "up")
        server = subprocess.Popen(["ip", "netns", "exec", NETNS, "python3", "-m", "http.server", "8088", "--bind",
                                   OUTSIDE_NS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1)
        yield server
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", VETH_HOST], capture_output=True)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


def test_nat_reaches_a_server_outside_and_is_masqueraded(pair: dict[str, str],
                                                         outside: subprocess.Popen[bytes]) -> None:
    fetch = ("import urllib.request; "
             f"print(urllib.request.urlopen('http://{OUTSIDE_NS}:8088/', timeout=10).status)")
    assert guest("a", "python3", "-c", fetch).stdout.strip() == "200"
    outside.kill()
    log = outside.communicate()[0].decode()
    assert f"{OUTSIDE_HOST} - -" in log, log  # the server saw the host's address: masqueraded


def test_port_forward_to_a_network_machine(pair: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    guest("b", "sh", "-c", "mkdir -p /tmp/www && echo served-by-b > /tmp/www/index.html && "
          "cd /tmp/www && nohup python3 -m http.server 8000 >/dev/null 2>&1 &")
    time.sleep(2)
    vmkit("port", "add", "b", f"127.0.0.1:{port}:8000")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as resp:
        assert resp.read().decode().strip() == "served-by-b"


def test_zz_teardown_leaves_nothing(pair: dict[str, str]) -> None:
    """Runs last in this module: stop and delete both machines and the network; nothing remains."""
    assert vmkit("network", "delete", "lab", check=False).returncode == 4  # machines run on it
    for name in ("a", "b"):
        vmkit("delete", name, "--force")
    vmkit("network", "delete", "lab")
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert pair["bridge"] not in links and "vmkt-" not in links
    net_dir = Path(pair["home"]) / "networks" / "lab"
    assert not net_dir.exists()
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "vmkit-lab" not in tables
    procs = subprocess.run(["pgrep", "-af", "dnsmasq"], capture_output=True, text=True).stdout
    assert str(net_dir) not in procs
