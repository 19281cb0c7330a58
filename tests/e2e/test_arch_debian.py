"""Debian guests and other architectures, end to end: an x86-64 guest runs an aarch64 program through
binfmt (the interpreter vmkit copied in), and a Debian aarch64 guest (virt, TCG) answers through its
agent and SSH and is saved and resumed.

The aarch64 Debian test is slow: the image build runs every maintainer script under qemu-user-static
(measured: 54 min on a 2-core host at load average ~20, once: it is cached) and the guest boots under
full emulation (measured: `vmkit start` returned after 2 min, cloud-init done at 141 s guest time).
It is marked ``slow`` as well as ``e2e``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import processes_mentioning, vmkit, vmkit_process, wait_until
from vmkit.host.images import debpkg
from vmkit.host.images.store import Image

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def aarch64_busybox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's busybox-static for arm64, unpacked on the host."""
    work = tmp_path_factory.mktemp("busybox-arm64")
    debs = debpkg.download(["busybox-static:arm64"], work)
    root = debpkg.extract(debs["busybox-static:arm64"].path, work / "root")
    return root / "bin" / "busybox"


@pytest.mark.timeout(1200)
def test_x86_guest_runs_an_aarch64_program_through_binfmt(vmkit_home: Path, debian12: Image,
                                                          aarch64_busybox: Path) -> None:
    vmkit("create", "bf", "--image", "debian-12", "--binfmt", "aarch64")
    res = vmkit("start", "bf")
    assert "binfmt: the guest runs aarch64 programs" in " ".join(res.stdout.split() + res.stderr.split())
    assert vmkit("exec", "bf", "--", "uname", "-m").stdout.strip() == "x86_64"
    vmkit("cp", str(aarch64_busybox), "bf:/tmp/busybox")
    vmkit("exec", "bf", "--", "chmod", "0755", "/tmp/busybox")
    # the guest's kernel hands the aarch64 ELF to qemu-aarch64-static, which reports its own machine
    assert vmkit("exec", "bf", "--", "/tmp/busybox", "uname", "-m").stdout.strip() == "aarch64"
    entry = vmkit("exec", "bf", "--", "cat", "/proc/sys/fs/binfmt_misc/qemu-aarch64").stdout
    assert entry.startswith("enabled") and "flags: PF" in entry
    # registered in the guest kernel's memory: a save and resume keeps it
    vmkit("stop", "--save", "bf")
    vmkit("start", "bf")
    assert vmkit("exec", "bf", "--", "/tmp/busybox", "echo", "still").stdout.strip() == "still"
    vmkit("stop", "--force", "bf")
    # a 1 GiB QEMU takes a while to be gone on a loaded host after the hard stop
    assert wait_until(lambda: processes_mentioning(str(vmkit_home)) == [], 60), processes_mentioning(str(vmkit_home))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_debian_aarch64_guest_answers_through_agent_and_ssh_and_resumes(vmkit_home: Path,
                                                                        debian12_aarch64: Image) -> None:
    vmkit("create", "arm", "--image", "debian-12", "--arch", "aarch64")
    vmkit("start", "arm", "--timeout", "1800")
    assert vmkit("exec", "arm", "--", "uname", "-m").stdout.strip() == "aarch64"
    # `vmkit shell` becomes ssh (exec): in a process of its own, not this one
    assert vmkit_process("shell", "arm", "--", "uname", "-m").stdout.strip() == "aarch64"
    vmkit("stop", "--save", "arm")
    assert json.loads(vmkit("list", "--json").stdout)[0]["state"] == "saved"
    assert "resumed from" in vmkit("start", "arm").stdout
    assert vmkit("exec", "arm", "--", "uname", "-m").stdout.strip() == "aarch64"
    vmkit("stop", "--force", "arm")
    assert wait_until(lambda: processes_mentioning(str(vmkit_home)) == [], 60), processes_mentioning(str(vmkit_home))
