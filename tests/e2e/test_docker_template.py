"""``vmkit create dock --template docker && vmkit start dock``: one command to a ready Docker host.

The image ``debian-12-docker`` (debian-12 plus Debian's docker.io) is built once per cache by the
session fixture below (mmdebstrap: a few minutes, more on a loaded host). No registry is reachable,
so the container image is built in the guest from its own files (``FROM scratch``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import image_build_lock, image_cache_dir, vmkit
from vmkit.host.images import catalogue
from vmkit.host.images.store import Image, ImageStore

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
    from vmkit.host.images import debian

    name = catalogue.DEBIAN_12_DOCKER
    store = ImageStore(image_cache_dir())
    with image_build_lock(name):
        # an older recipe, or built before a package was added to the list
        outdated = store.exists(name) and (debian.is_outdated(store.get(name)) or any(
            f" {p}" not in store.get(name).manifest.source for p in catalogue.DERIVED[name]))
        return debian.build_debian(store, name=name, extra_packages=catalogue.DERIVED[name], force=outdated)


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
    vmkit("stop", "dock", "--force")
    vmkit("delete", "dock")
