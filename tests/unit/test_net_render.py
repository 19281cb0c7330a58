"""Generated dnsmasq configs and nftables rulesets, against golden files (as libvirt's
networkxml2confdata and networkxml2firewalldata); names, addresses and MACs; bad input.
``VMKIT_UPDATE_GOLDEN=1`` rewrites the golden files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmkit.config import NetworkInterface, parse_config
from vmkit.errors import ConfigError
from vmkit.host.builder import parse_network
from vmkit.net.definition import (
    Member,
    Members,
    NetworkDef,
    bridge_name,
    derive_mac,
    tap_name,
)
from vmkit.net.render import dnsmasq_conf, nft_replace, nft_ruleset
from vmkit.runtime.qemu.cmdline import NicBackend, nic_args

GOLDEN = Path(__file__).parent / "golden" / "net"
NETDIR = Path("/home/u/.local/share/vmkit/networks/lab")


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("VMKIT_UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    assert path.is_file(), f"{path} is missing: run with VMKIT_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"differs from {path} (VMKIT_UPDATE_GOLDEN=1 regenerates it)"


def lab(mode: str = "nat", subnet: str = "10.117.3.0/24", domain: str = "lab") -> NetworkDef:
    return NetworkDef(name="lab", mode=mode, subnet=subnet, domain=domain)


MEMBERS = Members(machines={
    "web": Member(mac="52:54:00:00:00:02", address="10.117.3.3"),
    "db": Member(mac="52:54:00:00:00:01", address="10.117.3.2"),
    "Odd_Name": Member(mac="52:54:00:00:00:03", address="10.117.3.4"),  # not a DNS label: DHCP only
})


@pytest.mark.parametrize("mode", ["nat", "isolated", "routed"])
def test_dnsmasq_conf(mode: str) -> None:
    check(f"dnsmasq-{mode}.conf", dnsmasq_conf(lab(mode), MEMBERS, NETDIR))


def test_dnsmasq_conf_empty_small_network_other_domain() -> None:
    net = NetworkDef(name="tiny", mode="nat", subnet="192.168.77.0/28", domain="corp.internal")
    check("dnsmasq-tiny.conf", dnsmasq_conf(net, Members(), Path("/v/networks/tiny")))


@pytest.mark.parametrize("mode", ["nat", "isolated", "routed"])
def test_nft_ruleset(mode: str) -> None:
    check(f"nft-{mode}.nft", nft_ruleset(lab(mode)))


@pytest.mark.skipif(shutil.which("nft") is None or os.geteuid() != 0, reason="nft --check needs nft and root")
@pytest.mark.parametrize("mode", ["nat", "isolated", "routed"])
def test_nft_accepts_the_ruleset(mode: str) -> None:
    res = subprocess.run(["nft", "--check", "-f", "-"], input=nft_replace(lab(mode)), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")
def test_dnsmasq_accepts_the_config(tmp_path: Path) -> None:
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(dnsmasq_conf(lab(), MEMBERS, tmp_path))
    res = subprocess.run(["dnsmasq", "--test", f"--conf-file={conf}"], capture_output=True, text=True)
    assert res.returncode == 0 and "syntax check OK" in res.stderr, res.stderr


def test_names_fit_ifnamsiz_and_are_stable() -> None:
    assert bridge_name("lab") == "vmkbr-lab"
    long = bridge_name("a-much-longer-network-name")
    assert len(long) == 15 and long.startswith("vmkbr-") and long == bridge_name("a-much-longer-network-name")
    assert len(bridge_name("abcdefgh")) == 14  # readable up to 8 characters: never the length of a hashed one
    tap = tap_name(Path("/h/instances/web"), 0)
    assert len(tap) == 15 and tap.startswith("vmkt-") and tap == tap_name(Path("/h/instances/web"), 0)
    assert tap != tap_name(Path("/h/instances/web"), 1) != tap_name(Path("/other/instances/web"), 0)


def test_mac_is_derived_from_machine_and_network() -> None:
    mac = derive_mac("web", "lab")
    assert mac == derive_mac("web", "lab") and mac != derive_mac("web2", "lab") != derive_mac("web", "lab2")
    first = int(mac[:2], 16)
    assert first & 1 == 0 and first & 2 == 2  # unicast, locally administered
    NetworkInterface(network="lab", mac=mac)  # a valid MAC for the config model


def test_addresses_come_from_the_lower_half_and_skip_taken_ones() -> None:
    net = lab()
    assert str(net.gateway) == "10.117.3.1"
    assert [str(a) for a in net.static_range()] == ["10.117.3.2", "10.117.3.127"]
    assert [str(a) for a in net.dynamic_range()] == ["10.117.3.128", "10.117.3.254"]
    assert str(MEMBERS.free_address(net)) == "10.117.3.5"
    tiny = NetworkDef(name="t", subnet="10.1.0.0/28", domain="t")
    full = Members(machines={f"m{i}": Member(mac=f"52:54:00:00:00:{i:02x}", address=f"10.1.0.{i}")
                             for i in range(2, 8)})
    assert full.free_address(tiny) is None


@pytest.mark.parametrize(("field", "value", "words"), [
    ("subnet", "10.117.3.0", "no prefix length"),
    ("subnet", "10.117.3.1/24", "host bits"),
    ("subnet", "8.8.8.0/24", "not a private subnet"),
    ("subnet", "10.0.0.0/8", "prefix length"),
    ("subnet", "10.1.2.0/24,x", "not an IPv4 subnet"),
    ("name", "Lab", "not a network name"),
    ("name", "la;b", "not a network name"),
    ("name", "user", "not a network name"),
    ("name", "lab\n", "not a network name"),
    ("domain", "lab/evil", "not a DNS domain"),
    ("domain", "-lab", "not a DNS domain"),
])
def test_bad_definitions_are_refused(field: str, value: str, words: str) -> None:
    data = {"name": "lab", "subnet": "10.117.3.0/24", "domain": "lab", field: value}
    with pytest.raises(ValueError, match=words):
        NetworkDef.model_validate(data)


def test_nic_models_on_the_command_line() -> None:
    for model, driver in (("virtio", "virtio-net-pci"), ("e1000", "e1000"), ("e1000e", "e1000e"),
                          ("rtl8139", "rtl8139")):
        iface = NetworkInterface(network="lab", model=model, mac="52:54:00:00:00:09")
        assert nic_args(1, iface, NicBackend(tap_fd=7)) == [
            "-netdev", "tap,id=vnet1,fd=7", "-device", f"{driver},netdev=vnet1,id=vnet1-dev,mac=52:54:00:00:00:09"]
    rootless = nic_args(0, NetworkInterface(network="lab"), NicBackend(local=Path("/i/a,b.sock"),
                                                                        remote=Path("/n/switch.sock")))
    assert rootless[1] == ("dgram,id=vnet0,local.type=unix,local.path=/i/a,,b.sock,"
                           "remote.type=unix,remote.path=/n/switch.sock")


def test_network_options_and_config(tmp_path: Path) -> None:
    assert parse_network("lab,model=e1000") == {"network": "lab", "model": "e1000"}
    with pytest.raises(ValueError, match="not a NIC model"):
        parse_network("lab,model=ne2k")
    with pytest.raises(ValueError, match="not a NIC option"):
        parse_network("lab,vhost=on")
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    base = {"name": "vm", "boot": {"kind": "linux", "kernel": str(kernel)}}
    old = parse_config({**base, "network": {"mac": "52:54:00:00:00:01", "forwards": []}})  # a vm.yaml from before
    assert old.user_nic is not None and old.networks == ()
    cfg = parse_config({**base, "network": {"mode": "none", "forwards": [{"host_port": 8080, "guest_port": 80}]},
                        "networks": [{"network": "lab", "model": "e1000"}, {"network": "lab"}]})
    assert cfg.user_nic is None
    assert {p.field for p in cfg.validate(host=False)} == {"networks[1].network"}  # joined twice
    lonely = parse_config({**base, "network": {"mode": "none", "forwards": [{"host_port": 8080, "guest_port": 80}]}})
    assert [p.field for p in lonely.validate(host=False)] == ["network.forwards"]
    with pytest.raises(ConfigError, match=r"networks\[0\]\.address"):
        parse_config({**base, "networks": [{"network": "lab", "address": "10.1.2.300"}]})


def test_seed_writes_the_networks_resolver_at_every_boot() -> None:
    import yaml

    from vmkit.host.cloudinit import SeedSpec, render_seed

    text = "search lab\nnameserver 10.117.3.1\nnameserver 10.0.2.3\n"
    seed = render_seed(SeedSpec(instance_id="i-1", hostname="web", authorized_keys=("ssh-ed25519 AAAA x",),
                                resolv_conf=text))
    user_data = yaml.safe_load(seed.user_data)
    assert user_data["bootcmd"][0][-1] == text and "/etc/resolv.conf" in user_data["bootcmd"][0][2]
    plain = render_seed(SeedSpec(instance_id="i-1", hostname="web", authorized_keys=("ssh-ed25519 AAAA x",)))
    assert "resolv.conf" not in plain.user_data


def test_a_reused_address_loses_the_stale_lease_of_the_machine_that_left(tmp_path: Path) -> None:
    """A machine that left the network keeps its lease in dnsmasq's file until it expires; a new machine given
    its address would get another one from dnsmasq ("leased to ..."). The restart drops such leases."""
    from vmkit.net.system import drop_stale_leases

    leases = tmp_path / "leases"
    gone = "1796590000 52:54:00:aa:aa:aa 10.117.0.2 old 01:52:54:00:aa:aa:aa"
    mine = "1796590000 52:54:00:bb:bb:bb 10.117.0.3 b 01:52:54:00:bb:bb:bb"
    dynamic = "1796590000 52:54:00:cc:cc:cc 10.117.0.200 * *"
    leases.write_text(f"{gone}\n{mine}\n{dynamic}\n")
    reserved = {"10.117.0.2": "52:54:00:dd:dd:dd", "10.117.0.3": "52:54:00:BB:BB:BB"}
    assert drop_stale_leases(leases, reserved) == [gone]
    assert leases.read_text() == f"{mine}\n{dynamic}\n"
    assert drop_stale_leases(leases, reserved) == [] and drop_stale_leases(tmp_path / "none", reserved) == []
