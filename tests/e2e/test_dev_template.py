"""``vmkit create d --template dev && vmkit start d``: a development machine with build tools and
the user's home shared (reverse sshfs, as Lima mounts it) and writable by the guest's user.

The image ``debian-12-dev`` (debian-12 plus build-essential, git, ...) is built once per cache by the
session fixture (mmdebstrap on the host, as for debian-12-docker: apt in a TCG guest would take far
longer at every first boot). The home is a directory the test makes, given as ``HOME`` to `create`
(the template's ``~``), not the real one."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import build_current_derived, vmkit
from vmkit.host.images import catalogue
from vmkit.host.images.store import Image

pytestmark = pytest.mark.e2e

HELLO_C = '#include <stdio.h>\nint main(void) { printf("built in the guest: %d\\n", 6 * 7); return 0; }\n'
MAKEFILE = "hello: hello.c\n\tcc -O2 -Wall -o $@ $<\n"


@pytest.fixture(scope="session")
def debian12_dev() -> Image:
    return build_current_derived(catalogue.DEBIAN_12_DEV)


@pytest.mark.timeout(1200)
def test_dev_template_builds_in_the_shared_home(vmkit_home: Path, debian12_dev: Image, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    (home / "src" / "hello.c").write_text(HELLO_C)
    (home / "src" / "Makefile").write_text(MAKEFILE)
    vmkit("create", "d", "--template", "dev", env={"HOME": str(home)})
    shares = vmkit("mount", "list", "d", "--json").stdout
    assert str(home) in shares and "/mnt/home" in shares and "sshfs" in shares
    started = vmkit("start", "d")
    assert "your home is at /mnt/home" in started.stdout + started.stderr  # the template's message
    log = (vmkit_home / "instances" / "d" / "provision.log").read_text()
    assert "probe 1/2: passed" in log and "probe 2/2: passed" in log, log

    # the guest's user builds from the shared home with the guest's tool chain, and writes there
    user = ["exec", "d", "--timeout", "300", "--", "runuser", "-l", "vmkit", "-c"]
    made = vmkit(*user, "cd /mnt/home/src && make hello && ./hello > out.txt && id -un > who.txt", check=False)
    assert made.returncode == 0, made.stdout + made.stderr
    assert (home / "src" / "out.txt").read_text() == "built in the guest: 42\n"
    assert (home / "src" / "hello").stat().st_size > 0  # the binary landed in the host's folder
    assert (home / "src" / "who.txt").read_text() == "vmkit\n"
    # and the tools the template promises are there
    tools = vmkit("exec", "d", "--", "sh", "-c", "git --version && pkg-config --version && python3 --version")
    assert "git version" in tools.stdout and "Python 3" in tools.stdout
    # a file the host writes now is seen in the guest
    (home / "later.txt").write_text("from the host\n")
    assert vmkit("exec", "d", "--", "cat", "/mnt/home/later.txt").stdout == "from the host\n"
    vmkit("stop", "d")
    vmkit("delete", "d")
