"""``vmkit create dock --template docker && vmkit start dock``: one command to a ready Docker host.

The image ``debian-12-docker`` (debian-12 plus Debian's docker.io) is built once per cache by the
session fixture below (mmdebstrap: a few minutes, more on a loaded host). No registry is reachable,
so the container image is built in the guest from its own files (``FROM scratch``), and the host's
docker CLI (no engine on the host) imports one made of the host's static busybox, reaching the
guest's engine through ``DOCKER_HOST=ssh://dock`` with vmkit's ssh config and through the engine's
socket forwarded over that SSH. One booted guest."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from conftest import build_current_derived, vmkit
from vmkit.host.images import catalogue
from vmkit.host.images.store import Image

pytestmark = pytest.mark.e2e

BUILD_AND_RUN = r"""
set -e
rm -rf /tmp/ctx && mkdir /tmp/ctx && cd /tmp/ctx
# a root file system of one dynamically linked program and what it loads (tar -h follows /lib64)
tar -chf rootfs.tar -C / usr/bin/echo $(ldd /usr/bin/echo | grep -o '/[^ ]*' | sed 's|^/||' | sort -u)
printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/usr/bin/echo", "hello from a container"]\n' > Dockerfile
docker build -q -t vmkit-test/echo . >/dev/null
docker run --rm vmkit-test/echo
"""


@pytest.fixture(scope="session")
def debian12_docker() -> Image:
    return build_current_derived(catalogue.DEBIAN_12_DOCKER)


@pytest.mark.timeout(1200)
def test_docker_template_gives_a_ready_docker_host(vmkit_home: Path, debian12_docker: Image) -> None:
    vmkit("create", "dock", "--template", "docker")
    started = vmkit("start", "dock")
    assert "Docker is ready in dock" in started.stdout + started.stderr  # the template's message
    log = (vmkit_home / "instances" / "dock" / "provision.log").read_text()
    assert "probe 1/1: passed" in log and "engine 20.10" in log  # `docker info` answered before start returned
    assert "docker" in vmkit("exec", "dock", "--", "id", "-nG", "vmkit").stdout.split()  # the once-script ran
    ran = vmkit("exec", "dock", "--timeout", "600", "--", "sh", "-c", BUILD_AND_RUN, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.strip().splitlines()[-1] == "hello from a container"
    listed = vmkit("exec", "dock", "--", "docker", "images", "--format", "{{.Repository}}").stdout.split()
    assert "vmkit-test/echo" in listed
    _host_docker_cli_reaches_the_engine(vmkit_home)
    vmkit("stop", "dock", "--force")
    vmkit("delete", "dock")


BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static (scripts/install.sh): a static binary runs FROM scratch


def _busybox_rootfs() -> bytes:
    """A container root file system of one static busybox (and /bin/sh), as a tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(BUSYBOX, arcname="bin/busybox")
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
    return buf.getvalue()


def _host_docker_cli_reaches_the_engine(home: Path) -> None:
    """The host's docker CLI against the guest's engine: over ``DOCKER_HOST=ssh://dock`` (ssh reads
    the config `vmkit ssh-config` prints; ssh takes ~/.ssh/config from the passwd entry, not $HOME,
    so a wrapper puts ``-F`` in front here instead of writing root's real ~/.ssh/config), then through
    the engine's socket forwarded to a host socket by ``ssh -L``."""
    docker = shutil.which("docker")
    assert docker is not None, "no docker CLI on the host: scripts/install.sh installs Debian's (client only)"
    assert BUSYBOX.is_file(), "no static busybox on the host: scripts/install.sh installs busybox-static"
    work = home / "docker-cli"
    (work / "bin").mkdir(parents=True)
    config = work / "ssh_config"
    config.write_text(vmkit("ssh-config", "dock").stdout)
    wrapper = work / "bin" / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F "{config}" "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{work / 'bin'}:{os.environ['PATH']}", "DOCKER_CONFIG": str(work / "cfg"),
           "DOCKER_HOST": "ssh://dock"}
    env.pop("DOCKER_CONTEXT", None)

    def cli(*args: str, stdin: bytes | None = None, host: str | None = None) -> str:
        res = subprocess.run([docker, *args], input=stdin, capture_output=True, timeout=300,
                             env={**env, **({"DOCKER_HOST": host} if host else {})})
        assert res.returncode == 0, f"docker {' '.join(args)}: {res.stdout!r} {res.stderr!r}"
        return res.stdout.decode()

    assert cli("info", "--format", "{{.ServerVersion}} {{.OperatingSystem}}").startswith("20.10")  # the guest's
    cli("import", "-", "vmkit-test/busybox", stdin=_busybox_rootfs())
    ran = cli("run", "--rm", "vmkit-test/busybox", "/bin/sh", "-c", "echo over ssh $((6 * 7))")
    assert ran.strip() == "over ssh 42"

    sock = work / "docker.sock"
    fwd = subprocess.Popen(["/usr/bin/ssh", "-F", str(config), "-N", "-o", "ExitOnForwardFailure=yes",
                            "-o", "StreamLocalBindUnlink=yes", "-L", f"{sock}:/var/run/docker.sock", "dock"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert fwd.poll() is None, f"ssh -L exited: {fwd.stderr.read() if fwd.stderr else b''!r}"
            assert time.monotonic() < deadline, "the forwarded socket never appeared"
            time.sleep(0.2)
        through = f"unix://{sock}"
        assert "vmkit-test/busybox" in cli("images", "--format", "{{.Repository}}", host=through).split()
        ran = cli("run", "--rm", "vmkit-test/busybox", "/bin/busybox", "echo", "over the socket", host=through)
        assert ran.strip() == "over the socket"
    finally:
        fwd.terminate()
        fwd.wait(timeout=30)
