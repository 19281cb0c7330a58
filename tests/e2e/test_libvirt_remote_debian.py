"""Issue 16's done-when with the Debian guest: two libvirt hosts reached only over ``qemu+ssh://`` (each a
private libvirtd in network and mount namespaces of its own, with a distinct host_uuid and an sshd; both on
one bridge, tests/libvirt_daemon.py). ``vmkit --connect qemu+ssh://HOST/system create web --image debian-12``
uploads the image and the seed into HOST's pool; the guest starts and answers ``exec``; ``migrate web
qemu+ssh://OTHER/system --copy-storage`` moves it to OTHER (the same guest: what it keeps in RAM is still
there) and it is gone from HOST. ONE Debian guest for the whole file."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from conftest import image_cache_dir, vmkit
from libvirt_daemon import RemoteLibvirt, remote_libvirt_hosts
from vmkit.host.images.store import Image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

NAME = "web"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RemoteLibvirt]]:
    with remote_libvirt_hosts(tmp_path_factory.mktemp("lvhosts"), prefix="lvdeb", subnet="10.232.7") as made:
        yield made


@pytest.fixture(scope="module")
def web(hosts: list[RemoteLibvirt], debian12: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``web`` created and started on HOST over ssh (deleted from wherever it is at the end)."""
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("VMKIT_HOME", str(tmp_path_factory.mktemp("home")))
        mp.setenv("VMKIT_IMAGE_CACHE", str(image_cache_dir()))
        mp.delenv("VMKIT_CONNECT", raising=False)
        host = hosts[0].ssh_uri
        vmkit("--connect", host, "create", NAME, "--image", "debian-12", timeout=1200)
        try:
            vmkit("--connect", host, "start", NAME, "--timeout", "1200")
            yield NAME
        finally:
            for h in hosts:
                vmkit("--connect", h.ssh_uri, "delete", "--force", NAME, check=False)
    finally:
        mp.undo()


def states(uri: str) -> dict[str, str]:
    return {r["name"]: r["state"] for r in json.loads(vmkit("--connect", uri, "list", "--json").stdout)}


def test_created_on_the_remote_host_from_its_pool(hosts: list[RemoteLibvirt], web: str) -> None:
    host = hosts[0]
    assert host.daemon.virsh("domstate", web).stdout.strip() == "running"
    vols = host.daemon.virsh("vol-list", "vmkit").stdout
    assert "disk.qcow2" in vols and f"{web}-seed.iso" in vols and f"{web}-root.qcow2" in vols, vols
    assert states(host.ssh_uri)[web] == "running"
    res = vmkit("--connect", host.ssh_uri, "exec", web, "--", "uname", "-a")
    assert res.stdout.startswith(f"Linux {web} "), res.stdout
    assert web not in states(hosts[1].ssh_uri)


def test_migrate_needs_the_disks_on_the_target(hosts: list[RemoteLibvirt], web: str) -> None:
    """The hosts share no storage: without --copy-storage the move is refused before anything moves."""
    res = vmkit("--connect", hosts[0].ssh_uri, "migrate", web, hosts[1].ssh_uri, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "--copy-storage" in res.stderr
    assert states(hosts[0].ssh_uri)[web] == "running"
    assert web not in states(hosts[1].ssh_uri)


def test_migrate_moves_it_to_the_other_host(hosts: list[RemoteLibvirt], web: str) -> None:
    host, other = hosts
    vmkit("--connect", host.ssh_uri, "exec", web, "--", "sh", "-c", "echo from-host > /dev/shm/mark")
    res = vmkit("--connect", host.ssh_uri, "migrate", web, other.ssh_uri, "--copy-storage", check=False,
                timeout=1800)
    assert res.returncode == 0, res.stdout + res.stderr + host.daemon.domain_log(web)[-2000:]
    # QEMU 7.2 under TCG can lose pages in a live pre-copy: vmkit chose libvirt's paused migration
    assert "migrated" in res.stdout and "paused" in res.stdout, res.stdout
    assert states(other.ssh_uri)[web] == "running"
    assert other.daemon.virsh("domstate", web).stdout.strip() == "running"
    assert web not in host.daemon.virsh("list", "--all", "--name").stdout.split()
    assert web not in states(host.ssh_uri)
    assert f"{web}-" not in host.daemon.virsh("vol-list", "vmkit").stdout  # its volumes there are gone
    # the same guest, still alive there: its RAM came along, and it answers exec on OTHER
    assert vmkit("--connect", other.ssh_uri, "exec", web, "--", "cat", "/dev/shm/mark").stdout.strip() == "from-host"
    assert vmkit("--connect", other.ssh_uri, "exec", web, "--", "uname", "-n").stdout.strip() == web
