"""The Debian cloud guest as a libvirt domain: a machine vmkit created (qcow2 overlay on the cached
image, NoCloud seed, agent channel, SSH forward) runs under a private libvirtd from the generated XML;
its agent answers on the channel libvirt made, and SSH reaches it through the forward added to the
running domain (libvirt 9.0 has no element for user-mode forwards)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import vmkit
from libvirt_daemon import LibvirtDaemon
from vmkit import Client
from vmkit.host.images.store import Image
from vmkit.libvirt.domain import DomainFiles, domain_xml, hostfwd_commands

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(1800)
def test_debian_machine_runs_as_a_libvirt_domain(lv: LibvirtDaemon, vmkit_home: Path, debian12: Image,
                                                 tmp_path: Path) -> None:
    name = "vmkit-test-lvdeb"
    vmkit("create", name, "--image", "debian-12")
    inst = Client().get(name)
    config = inst.config
    xml = tmp_path / "domain.xml"
    xml.write_text(domain_xml(config, forwards="hostfwd", files=DomainFiles(serial_log=tmp_path / "serial.log")))
    lv.virsh("define", str(xml))
    lv.virsh("start", name)
    try:
        for cmd in hostfwd_commands(config):
            assert lv.virsh("qemu-monitor-command", "--hmp", name, cmd).stdout.strip() == ""
        deadline = time.monotonic() + 1200  # a loaded TCG host: the agent answers in 30 s alone, minutes under load
        while True:
            res = lv.virsh("qemu-agent-command", "--timeout", "5", name, '{"execute":"guest-ping"}', check=False)
            if res.returncode == 0:
                assert json.loads(res.stdout) == {"return": {}}
                break
            assert time.monotonic() < deadline, f"the agent never answered: {res.stderr}\n" \
                + (tmp_path / "serial.log").read_text(errors="replace")[-3000:]
            time.sleep(3)
        ssh_config = inst.directory / "ssh_config"
        deadline = time.monotonic() + 300
        while True:
            ssh = subprocess.run(["ssh", "-F", str(ssh_config), name, "cat", "/etc/hostname"], capture_output=True,
                                 text=True, timeout=60, stdin=subprocess.DEVNULL)
            if ssh.returncode == 0:
                break
            assert time.monotonic() < deadline, f"SSH through the forward failed: {ssh.stderr}"
            time.sleep(3)
        assert ssh.stdout.strip() == name
        assert lv.virsh("domstate", name).stdout.strip() == "running"
    finally:
        lv.virsh("destroy", name, check=False)
        lv.virsh("undefine", name)
