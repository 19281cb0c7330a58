"""Two libvirt hosts on this machine: host A (a private libvirtd in the tests' network namespace) and
host B (one in a network namespace of its own, ``lvbk1`` at 10.232.1.2, with an sshd), each in a
mount namespace of its own with a distinct host_uuid (tests/libvirt_daemon.py). vmkit drives B
remotely over ``qemu+ssh://`` and ``qemu+tcp://`` (the files are uploaded to B's pool, nothing of
vmkit runs there) and moves a running micro guest from A to B with libvirt's live migration.

B's libvirtd listens on a private socket, so the ssh URI names it (``socket=``) and asks libvirt to
reach it with ``nc -U`` (``proxy=netcat``; package netcat-openbsd): see ``RemoteLibvirt.ssh_uri``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import image_cache_dir, vmkit
from libvirt_daemon import LibvirtDaemon, RemoteLibvirt, ip, libvirt_daemon, sshd_in
from vmkit.host.images.store import Image

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NS = "lvbk1"
HOST_ADDR, NS_ADDR = "10.232.1.1", "10.232.1.2"
REMOTE = f"qemu+tcp://{NS_ADDR}/system"


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """Network namespace ``lvbk1`` joined to this one by a veth pair (10.232.1.1 here, .2 there)."""
    ip("netns", "delete", NS, check=False)
    ip("link", "delete", "lvbk1-h", check=False)
    ip("netns", "add", NS)
    try:
        ip("link", "add", "lvbk1-h", "type", "veth", "peer", "name", "lvbk1-g")
        ip("link", "set", "lvbk1-g", "netns", NS)
        ip("addr", "add", f"{HOST_ADDR}/24", "dev", "lvbk1-h")
        ip("link", "set", "lvbk1-h", "up")
        ip("-n", NS, "addr", "add", f"{NS_ADDR}/24", "dev", "lvbk1-g")
        ip("-n", NS, "link", "set", "lvbk1-g", "up")
        ip("-n", NS, "link", "set", "lo", "up")
        yield NS
    finally:
        ip("link", "delete", "lvbk1-h", check=False)
        ip("netns", "delete", NS, check=False)


@pytest.fixture(scope="module")
def sshd(netns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An sshd for root in the namespace (key login only); yields the client key."""
    with sshd_in(netns, NS_ADDR, tmp_path_factory.mktemp("sshd")) as key:
        yield key


def ssh_uri(daemon: LibvirtDaemon, key: Path) -> str:
    return RemoteLibvirt(daemon, NS_ADDR, key).ssh_uri


@pytest.fixture(scope="module")
def host_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtDaemon]:
    with libvirt_daemon(tmp_path_factory.mktemp("host-a")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def host_b(netns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtDaemon]:
    with libvirt_daemon(tmp_path_factory.mktemp("host-b"), listen=NS_ADDR, netns=netns) as daemon:
        yield daemon


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VMKIT_IMAGE_CACHE", str(image_cache_dir()))


def states(uri: str) -> dict[str, str]:
    return {r["name"]: r["state"] for r in json.loads(vmkit("--connect", uri, "list", "--json").stdout)}


def test_remote_host_over_ssh(host_b: LibvirtDaemon, sshd: Path, micro_image: Image) -> None:
    remote = ssh_uri(host_b, sshd)
    vmkit("--connect", remote, "create", "far", "--image", "micro", "--memory", "256M")
    try:
        vmkit("--connect", remote, "start", "far", "--timeout", "600")
        assert states(remote)["far"] == "running"
        assert states(REMOTE)["far"] == "running"  # the same host over qemu+tcp://
        assert host_b.virsh("domstate", "far").stdout.strip() == "running"
        assert "VMKIT-READY" in vmkit("--connect", REMOTE, "console", "far", "--log").stdout
        # the kernel and initrd were uploaded into B's pool: B needs no vmkit files
        assert "base-" in host_b.virsh("vol-list", "vmkit").stdout
    finally:
        vmkit("--connect", REMOTE, "delete", "--force", "far", check=False)
    assert "far" not in states(REMOTE)


def test_live_migration_between_two_libvirt_hosts(host_a: LibvirtDaemon, host_b: LibvirtDaemon, sshd: Path,
                                                  micro_image: Image) -> None:
    vmkit("--connect", host_a.uri, "create", "mover", "--image", "micro", "--memory", "256M")
    try:
        vmkit("--connect", host_a.uri, "start", "mover", "--timeout", "600")
        res = vmkit("--connect", host_a.uri, "migrate", "mover", ssh_uri(host_b, sshd), check=False)
        assert res.returncode == 0, res.stdout + res.stderr + host_a.domain_log("mover")[-2000:]
        assert "migrated" in res.stdout
        assert states(REMOTE).get("mover") == "running"
        assert "mover" not in states(host_a.uri)
        assert "mover" not in host_a.virsh("list", "--all", "--name").stdout.split()
        # it is the same guest, still alive there: its console answers
        vmkit("--connect", REMOTE, "pause", "mover")
        vmkit("--connect", REMOTE, "resume", "mover")
        assert host_b.virsh("domstate", "mover").stdout.strip() == "running"
    finally:
        vmkit("--connect", host_a.uri, "delete", "--force", "mover", check=False)
        vmkit("--connect", REMOTE, "delete", "--force", "mover", check=False)


def test_migration_copies_storage(host_a: LibvirtDaemon, host_b: LibvirtDaemon, sshd: Path, micro_image: Image,
                                  tmp_path: Path) -> None:
    """``--copy-storage``: the machine's writable disk volume is copied while it runs
    (VIR_MIGRATE_NON_SHARED_DISK); B's pool gets a volume of the same name and size."""
    data = tmp_path / "data.raw"
    with data.open("wb") as f:
        f.truncate(32 << 20)
        f.seek(1 << 20)
        f.write(b"written-on-host-a")
    vmkit("--connect", host_a.uri, "create", "carrier", "--image", "micro", "--memory", "256M",
          "--disk", str(data))
    try:
        vmkit("--connect", host_a.uri, "start", "carrier", "--timeout", "600")
        res = vmkit("--connect", host_a.uri, "migrate", "carrier", ssh_uri(host_b, sshd), "--copy-storage",
                    check=False)
        assert res.returncode == 0, res.stdout + res.stderr + host_a.domain_log("carrier")[-2000:]
        assert states(REMOTE).get("carrier") == "running"
        vols = host_b.virsh("vol-list", "vmkit").stdout
        assert "carrier-disk-disk0" in vols, vols
        copied = (host_b.root / "lib" / "images" / "vmkit" / "carrier-disk-disk0").read_bytes()
        assert copied[1 << 20:(1 << 20) + 17] == b"written-on-host-a"
        assert "carrier-" not in host_a.virsh("vol-list", "vmkit").stdout  # the copies here are gone
        vmkit("--connect", REMOTE, "delete", "--force", "carrier")
        assert "carrier-" not in host_b.virsh("vol-list", "vmkit").stdout  # its extra disk too
    finally:
        vmkit("--connect", host_a.uri, "delete", "--force", "carrier", check=False)
        vmkit("--connect", REMOTE, "delete", "--force", "carrier", check=False)


def test_a_vmkit_network_is_refused_on_another_host(host_b: LibvirtDaemon, sshd: Path, micro_image: Image) -> None:
    """vmkit networks are bridges of this host: B has no network of that name, so the NIC is refused by name
    and nothing is left there."""
    remote = ssh_uri(host_b, sshd)
    res = vmkit("--connect", remote, "create", "netless", "--image", "micro", "--network", "lvbnet", check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "networks[0].network" in res.stderr and "'lvbnet'" in res.stderr, res.stderr
    assert "netless" not in states(remote)
    assert "netless-" not in host_b.virsh("vol-list", "vmkit", check=False).stdout
