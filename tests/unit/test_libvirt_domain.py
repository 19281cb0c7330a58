"""The libvirt domain XML of vmkit machines, against golden files, each checked with libvirt's own
schema (``virt-xml-validate FILE domain``); the settings libvirt cannot express are refused by
their vm.yaml field; the configuration comes back from the metadata. ``VMKIT_UPDATE_GOLDEN=1``
rewrites the golden files. (That libvirtd really defines and boots them:
tests/integration/test_libvirt_domain.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from vmkit.config import MachineConfig, parse_config
from vmkit.errors import ConfigError
from vmkit.libvirt.domain import (
    DomainFiles,
    NicTarget,
    config_from_domain_xml,
    domain_xml,
    hostfwd_commands,
    problems,
)

GOLDEN = Path(__file__).parent / "golden" / "libvirt"
BOOT = {"kind": "linux", "kernel": "/img/micro/vmlinuz", "initrd": "/img/micro/initrd.img",
        "cmdline": "console=ttyS0 panic=-1 quiet"}


def check(name: str, text: str, tmp_path: Path) -> None:
    path = GOLDEN / name
    if os.environ.get("VMKIT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} is missing: run with VMKIT_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"differs from {path} (VMKIT_UPDATE_GOLDEN=1 regenerates it)"
    assert shutil.which("virt-xml-validate"), "virt-xml-validate is missing: scripts/install.sh (libvirt-clients)"
    out = tmp_path / name
    out.write_text(text)
    res = subprocess.run(["virt-xml-validate", str(out), "domain"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def config(**kw: Any) -> MachineConfig:
    return parse_config({"name": "web", "boot": BOOT, **kw})


def test_micro(tmp_path: Path) -> None:
    """The micro guest: kernel + initrd boot, user networking, the serial console logged."""
    c = config(name="micro", readiness={"serial_marker": "VMKIT-READY"})
    check("micro.xml", domain_xml(c, files=DomainFiles(serial_log="/var/log/vmkit/micro-serial.log")), tmp_path)


def test_cloud_guest_with_files_in_a_pool(tmp_path: Path) -> None:
    """The Debian cloud guest: qcow2 overlay + NoCloud seed, the agent channel; its files where a
    storage pool on another host keeps them (paths are parameters, not the local instance dir)."""
    inst = "/home/u/.local/share/vmkit/instances/web"
    c = config(cpus=2, memory="1G", boot={**BOOT, "cmdline": "root=/dev/vda rw console=ttyS0"},
               storage=[{"kind": "virtio-blk", "id": "root",
                         "attachment": {"type": "disk-image", "path": f"{inst}/disk.qcow2", "format": "qcow2"}},
                        {"kind": "virtio-blk", "id": "seed",
                         "attachment": {"type": "disk-image", "path": f"{inst}/seed.iso", "format": "raw",
                                        "read_only": True}}],
               agent=True, readiness={"agent": True, "timeout": 300}, image="debian-12")
    pool = "/var/lib/libvirt/images"
    xml = domain_xml(c, uuid="5b0f3a4e-8d2c-4c1e-9a51-0d6f2b7c9e10",
                     files=DomainFiles(kernel=f"{pool}/web-vmlinuz", initrd=f"{pool}/web-initrd.img",
                                       disks={"root": f"{pool}/web.qcow2", "seed": f"{pool}/web-seed.iso"},
                                       serial_log="/var/log/libvirt/qemu/web-serial.log"))
    check("cloud.xml", xml, tmp_path)
    assert inst not in xml


def test_everything_libvirt_can_express(tmp_path: Path) -> None:
    c = config(
        cpus=2, max_cpus=6, memory="1G", max_memory="2G", plugged_memory="256M", accel="kvm",
        cpu_model="EPYC,+pdpe1gb,-x2apic,la57=off",
        storage=[{"id": "root", "serial": "ROOT1",
                  "attachment": {"type": "disk-image", "path": "/vm/root.qcow2", "cache": "none"}},
                 {"kind": "usb-storage", "id": "stick",
                  "attachment": {"type": "disk-image", "path": "/vm/stick.img", "read_only": True}},
                 {"id": "tcp", "attachment": {"type": "nbd", "url": "nbd://10.0.0.5:10810/data", "reconnect_delay": 0}},
                 {"attachment": {"type": "nbd", "url": "nbd+unix:///scratch?socket=/run/nbd.sock",
                                 "reconnect_delay": 0, "on_error": "report", "read_only": True}}],
        hotplug_slots=4,
        shares=[{"type": "virtiofs", "host_path": "/srv/src", "cache": "none"},
                {"type": "9p", "host_path": "/srv/ro", "read_only": True, "tag": "ro"}],
        network={"mode": "user", "mac": "52:54:00:00:00:01", "model": "e1000e"},
        networks=[{"network": "lab", "mac": "52:54:00:00:00:02"},
                  {"network": "dmz", "model": "rtl8139", "address": "10.9.0.7"}],
        agent=True, serial={"console": False}, entropy=False, balloon=False, memory_merge=False,
        display={"width": 1024, "height": 768},
        limits={"cpu_weight": 300, "cpu_max": 250, "cpu_pin": "2-3,6", "memory_max": "3G", "memory_high": "2G",
                "swap_max": "512M"},
    )
    xml = domain_xml(c, name="web-copy", domain_type="kvm",
                     files=DomainFiles(serial_log="/logs/web.log", agent_socket="/run/vmkit/web/qga.sock",
                                       vnc_socket="/run/vmkit/web/vnc.sock"),
                     nics={"lab": NicTarget("bridge", "vmkbr-lab"), "dmz": NicTarget("network", "default")})
    check("full.xml", xml, tmp_path)


def test_pc_machine_and_cpu_models(tmp_path: Path) -> None:
    """i440fx (no PCIe root ports), IDE and SATA disks (SATA and USB share the sdX names), the host
    CPU under KVM, no network, no serial log, a display on a loopback VNC port."""
    c = config(machine="pc", cpus=4, max_cpus=4, cpu_model="host", network=None, serial={"log": False},
               display={}, usb=True,
               storage=[{"kind": "ide", "attachment": {"type": "disk-image", "path": "/vm/old.img"}},
                        {"kind": "sata", "attachment": {"type": "disk-image", "path": "/vm/a.qcow2"}},
                        {"kind": "usb-storage", "attachment": {"type": "disk-image", "path": "/vm/stick.img"}},
                        {"kind": "ide", "attachment": {"type": "disk-image", "path": "/vm/old2.img"}}])
    check("pc.xml", domain_xml(c, domain_type="kvm"), tmp_path)
    assert "<cpu mode=\"maximum\" />" in domain_xml(config(cpu_model="max"), domain_type="kvm")
    assert "<cpu mode=\"host-passthrough\" />" in domain_xml(config(), domain_type="kvm")
    assert "<cpu mode=\"maximum\" />" in domain_xml(config())


def test_accel_picks_the_domain_type() -> None:
    assert domain_xml(config(accel="tcg")).startswith('<domain type="qemu">')
    assert domain_xml(config(accel="kvm")).startswith('<domain type="kvm">')
    assert domain_xml(config(), domain_type="kvm").startswith('<domain type="kvm">')
    with pytest.raises(ConfigError) as err:
        domain_xml(config(accel="tcg"), domain_type="kvm")
    assert [p.field for p in err.value.problems] == ["accel"]


def test_configuration_round_trips_through_the_metadata() -> None:
    c = config(cpus=2, shares=[{"type": "9p", "host_path": "/srv"}], limits={"cpu_max": 50})
    assert config_from_domain_xml(domain_xml(c)) == c
    assert config_from_domain_xml(domain_xml(c, metadata=False)) is None
    with pytest.raises(ConfigError):
        config_from_domain_xml("<domain")


def test_names_and_text_are_escaped() -> None:
    """Nothing in vm.yaml can add XML: text and attributes are escaped, the domain name is checked."""
    c = config(boot={**BOOT, "cmdline": "console=ttyS0 x=\"a<b>&c\" </cmdline><devices/>"})
    xml = domain_xml(c)
    assert "x=&quot;a&lt;b&gt;&amp;c&quot; &lt;/cmdline&gt;&lt;devices/&gt;</cmdline>" in xml \
        or "x=\"a&lt;b&gt;&amp;c\" &lt;/cmdline&gt;&lt;devices/&gt;</cmdline>" in xml
    with pytest.raises(ConfigError) as err:
        domain_xml(c, name="a</name>")
    assert err.value.problems[0].field == "name"


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"storage": [{"kind": "nvme", "attachment": {"type": "disk-image", "path": "/d.img"}}]}, "storage[0].kind"),
    ({"storage": [{"attachment": {"type": "nbd", "url": "nbd://h/e"}}]}, "storage[0].attachment.reconnect_delay"),
    ({"storage": [{"attachment": {"type": "disk-image", "path": "d.img"}}]}, "storage[0].attachment.path"),
    ({"shares": [{"type": "sshfs", "host_path": "/srv"}],
      "network": {"forwards": [{"host_port": 2, "guest_port": 22}]}}, "shares[0].type"),
    ({"shares": [{"type": "virtiofs", "host_path": "/srv", "read_only": True}]}, "shares[0].read_only"),
    ({"network": {"forwards": [{"host_port": 2222, "guest_port": 22}]}}, "network.forwards"),
    ({"network": {"mode": "none", "forwards": [{"host_port": 2222, "guest_port": 22}]},
      "networks": [{"network": "lab"}]}, "network.forwards"),
    ({"networks": [{"network": "lab"}]}, "networks[0].network"),
    ({"serial": {"log_max": "1M"}}, "serial.log_max"),
    ({"display": {"type": "virtio-gpu"}}, "display.type"),
    ({"balloon_min": "128M"}, "balloon_min"),
    ({"balloon_shares": 0}, "balloon_shares"),
    ({"limits": {"memory_min": "256M"}}, "limits.memory_min"),
    ({"limits": {"swap_max": "256M"}}, "limits.swap_max"),
    ({"storage": [{"kind": "ide", "attachment": {"type": "disk-image", "path": "/d.img"}}]}, "storage[0].kind"),
    ({"storage": [{"kind": "sata", "attachment": {"type": "disk-image", "path": "/d.img", "read_only": True}}]},
     "storage[0].attachment.read_only"),
    ({"arch": "aarch64"}, "arch"),
    ({"binfmt": ["aarch64"], "agent": True}, "binfmt"),
    ({"cpu_model": "max,level=5"}, "cpu_model"),
    ({"cpu_model": "host,+avx"}, "cpu_model"),
]


@pytest.mark.parametrize(("settings", "field"), REFUSED, ids=[f for _, f in REFUSED])
def test_what_libvirt_cannot_express_is_refused_by_name(settings: dict[str, Any], field: str) -> None:
    c = config(**settings)
    with pytest.raises(ConfigError) as err:
        domain_xml(c, nics={"lab": NicTarget("bridge", "vmkbr-lab")} if field != "networks[0].network" else None)
    assert field in [p.field for p in err.value.problems], err.value.problems
    assert all(p.message for p in err.value.problems)


def test_every_problem_at_once() -> None:
    c = config(storage=[{"kind": "nvme", "attachment": {"type": "disk-image", "path": "/d.img"}}],
               display={"type": "virtio-gpu"}, limits={"memory_min": "256M"})
    fields = [p.field for p in problems(c)]
    assert fields == ["storage[0].kind", "display.type", "limits.memory_min"]
    with pytest.raises(ConfigError):
        domain_xml(c, files=DomainFiles(disks={"nope": "/x"}))
    assert "storage" in [p.field for p in problems(config(), files=DomainFiles(disks={"nope": "/x"}))]
    nbd = config(storage=[{"attachment": {"type": "nbd", "url": "nbd://h/e", "reconnect_delay": 0}}])
    assert [p.field for p in problems(nbd, files=DomainFiles(disks={"disk0": "/x"}))] == ["storage[0].attachment"]


def test_user_forwards_left_to_the_caller() -> None:
    """``forwards="hostfwd"``: the XML has no forward (libvirt 9.0 has no element for it); the caller
    adds each to the running domain with the HMP commands given."""
    c = config(network={"forwards": [{"host_port": 2222, "guest_port": 22},
                                     {"host_addr": "0.0.0.0", "host_port": 5353, "guest_port": 53, "protocol": "udp"}]})
    xml = domain_xml(c, forwards="hostfwd")
    assert "2222" not in xml.split("</metadata>")[1]
    assert hostfwd_commands(c) == ["hostfwd_add hostua-net0 tcp:127.0.0.1:2222-:22",
                                   "hostfwd_add hostua-net0 udp:0.0.0.0:5353-:53"]
    assert hostfwd_commands(config(network=None)) == []


def test_tcg_cache_becomes_libvirts_tb_cache_on_qemu_domains_only() -> None:
    tcg = ET.fromstring(domain_xml(config(tcg_cache="128M"), domain_type="qemu"))
    cache = tcg.find("features/tcg/tb-cache")
    assert cache is not None and cache.text == "128" and cache.get("unit") == "MiB"
    kvm = ET.fromstring(domain_xml(config(tcg_cache="128M", accel="kvm"), domain_type="kvm"))
    assert kvm.find("features/tcg") is None
