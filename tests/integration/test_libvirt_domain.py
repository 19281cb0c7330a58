"""The generated domain XML in a real libvirtd (private, tests/libvirt_daemon.py): a micro machine
exported by `vmkit export --libvirt` boots (its serial log, written by virtlogd, shows VMKIT-READY),
and a machine using most of vm.yaml's settings is accepted by libvirt's own parser and validation
(define), and reads back."""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import vmkit
from libvirt_daemon import LibvirtDaemon
from vmkit import Client as vmkit_client
from vmkit.config import PortForward, parse_config, port_is_free
from vmkit.host.images.store import Image
from vmkit.host.provision import free_port
from vmkit.libvirt.domain import NicTarget, config_from_domain_xml, domain_xml, hostfwd_commands

pytestmark = pytest.mark.integration


def empty_root_ports(xml: str) -> int:
    """PCIe root ports no device sits behind (what a disk attached to the running machine can use)."""
    root = ET.fromstring(xml)
    ports = {c.get("index") for c in root.iter("controller") if c.get("model") == "pcie-root-port"}
    used = {str(int(a.get("bus", "0"), 16)) for a in root.iter("address") if a.get("type") == "pci"}
    return len(ports - used)


def _name(prefix: str) -> str:
    return f"vmkit-test-{prefix}-{uuid.uuid4().hex[:6]}"


def test_exported_micro_machine_boots_in_libvirt(lv: LibvirtDaemon, vmkit_home: Path, micro_image: Image,
                                                 tmp_path: Path) -> None:
    """`vmkit export NAME --libvirt -o FILE` of a vmkit machine, defined and started by libvirtd:
    the guest's serial log (virtlogd writes it in libvirt's log directory) shows VMKIT-READY."""
    name = _name("micro")
    vmkit("create", name, "--image", "micro", "--memory", "256M")
    xml_file = tmp_path / "domain.xml"
    vmkit("export", name, "--libvirt", "--output", str(xml_file))
    assert xml_file.stat().st_mode & 0o777 == 0o600
    assert vmkit("export", name, "--libvirt").stdout == xml_file.read_text()
    config = vmkit_client().get(name).config
    lv.virsh("define", str(xml_file))
    lv.virsh("start", name)
    log = lv.root / "log" / "qemu" / f"{name}-serial.log"  # /var/log/libvirt/qemu in the daemon's namespace
    try:
        deadline = time.monotonic() + 180
        text = ""
        while "VMKIT-READY" not in text:
            assert time.monotonic() < deadline, f"no VMKIT-READY on the serial log:\n{text[-2000:]}\n" \
                                                f"{lv.domain_log(name)[-2000:]}"
            time.sleep(0.5)
            text = log.read_text(errors="replace") if log.exists() else ""
        assert lv.virsh("domstate", name).stdout.strip() == "running"
        # a port forward added to the running domain, as a libvirt backend does (no element for it in 9.0)
        port = free_port()
        fwd = config.model_copy(update={"network": config.network.model_copy(update={  # type: ignore[union-attr]
            "forwards": (PortForward(host_port=port, guest_port=22),)})})
        for cmd in hostfwd_commands(fwd):
            assert lv.virsh("qemu-monitor-command", "--hmp", name, cmd).stdout.strip() == ""
        assert not port_is_free("127.0.0.1", port)
        # what libvirt keeps is the machine vmkit wrote: its configuration comes back from the metadata
        stored = lv.virsh("dumpxml", name).stdout
        assert config_from_domain_xml(stored) == config
        assert empty_root_ports(stored) == config.hotplug_slots
    finally:
        lv.virsh("destroy", name, check=False)
        lv.virsh("undefine", name)
    assert name not in lv.virsh("list", "--all", "--name").stdout


def test_export_refuses_by_name(vmkit_home: Path, micro_image: Image) -> None:
    vmkit("create", "fwd", "--image", "micro", "--port", "8080:80")
    res = vmkit("export", "fwd", "--libvirt", check=False)
    assert res.returncode == 2 and "network.forwards" in res.stderr, res.stderr
    assert vmkit("export", "nope", "--libvirt", check=False).returncode == 3
    res = vmkit("export", "fwd", check=False)
    assert res.returncode == 2 and "--libvirt" in res.stderr
    res = vmkit("export", "fwd", "--libvirt", "--hostfwd")
    assert "8080" not in res.stdout.split("</metadata>")[1]
    assert "virsh qemu-monitor-command --hmp fwd 'hostfwd_add hostua-net0 tcp:127.0.0.1:8080-:80'" in res.stderr


def test_rich_machine_is_accepted_by_libvirt(lv: LibvirtDaemon, micro_image: Image, tmp_path: Path) -> None:
    """Disks (qcow2, raw read-only, USB, SATA, NBD), shares (virtiofs, 9p), a user NIC and a bridge NIC,
    agent, display, virtio-mem, vCPU ceiling, limits: libvirt's define validates all of it against
    this QEMU's capabilities; what it stores keeps the devices vmkit asked for."""
    name = _name("rich")
    assert micro_image.kernel is not None
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"")
    disk2 = tmp_path / "disk2.img"
    disk2.write_bytes(b"")
    seed = tmp_path / "seed.iso"
    seed.write_bytes(b"")
    share = tmp_path / "share"
    share.mkdir()
    config = parse_config({
        "name": name, "cpus": 2, "max_cpus": 4, "memory": "1G", "max_memory": "2G", "plugged_memory": "256M",
        "boot": {"kind": "linux", "kernel": str(micro_image.kernel), "cmdline": "console=ttyS0"},
        "storage": [
            {"id": "root", "attachment": {"type": "disk-image", "path": str(disk), "format": "qcow2"}},
            {"id": "seed", "serial": "SEED1",
             "attachment": {"type": "disk-image", "path": str(seed), "format": "raw", "read_only": True,
                            "cache": "none"}},
            {"kind": "usb-storage", "id": "stick", "attachment": {"type": "disk-image", "path": "/dev/null"}},
            {"kind": "sata", "id": "sata", "attachment": {"type": "disk-image", "path": str(disk2)}},
            {"id": "remote", "attachment": {"type": "nbd", "url": "nbd://127.0.0.1:10809/exp",
                                            "reconnect_delay": 0, "on_error": "report"}},
        ],
        "shares": [{"type": "virtiofs", "host_path": str(share), "cache": "always"},
                   {"type": "9p", "host_path": str(share), "read_only": True, "tag": "ro"}],
        "network": {"mode": "user", "mac": "52:54:00:aa:bb:01"},
        "networks": [{"network": "lab", "mac": "52:54:00:aa:bb:02", "model": "e1000"}],
        "agent": True, "display": {"width": 1024, "height": 768}, "memory_merge": False,
        "limits": {"cpu_weight": 50, "cpu_max": 150, "cpu_pin": "0-1", "memory_max": "3G", "memory_high": "2G",
                   "swap_max": "1G"},
    })
    xml_file = tmp_path / "domain.xml"
    xml_file.write_text(domain_xml(config, domain_type="qemu", nics={"lab": NicTarget("bridge", "vmkbr-none")}))
    lv.virsh("define", str(xml_file))
    try:
        stored = lv.virsh("dumpxml", "--inactive", name).stdout
        for want in ("model='virtio-mem'",
                     "<driver type='virtiofs' queue='1024'/>", "accessmode='squash'", "<source bridge='vmkbr-none'/>",
                     "name='org.qemu.guest_agent.0'", "<alias name='ua-root'/>", "<alias name='ua-stick'/>",
                     "bus='usb'", "bus='sata'", "protocol='nbd'", "<global_quota>150000</global_quota>",
                     "<nosharepages/>",
                     "<resolution x='1024' y='768'/>", "freePageReporting='on'", "<vcpu placement='static' "
                     "current='2'>4</vcpu>"):
            assert want in stored, f"{want} is not in what libvirt stored:\n{stored}"
        assert config_from_domain_xml(stored) == config
        assert empty_root_ports(stored) == config.hotplug_slots, stored
    finally:
        lv.virsh("undefine", name)
