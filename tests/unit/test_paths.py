"""Where vmkit keeps things, and who else could change them: a VMKIT_HOME, VMKIT_IMAGE_CACHE or
any parent that another user owns or may write is refused (as OpenSSH refuses such ~/.ssh)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

import conftest
from vmkit.errors import ExitCode, HostError
from vmkit.host import paths

OTHER_UID = 65534  # nobody


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI, in-process (VMKIT_IMAGE_CACHE only if the test gives one)."""
    return conftest.vmkit(*args, check=False, env={"VMKIT_IMAGE_CACHE": None, **env})


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def base(tmp_path: Path) -> Path:
    tmp_path.chmod(0o700)
    return tmp_path


def test_a_home_owned_by_another_user_is_refused(base: Path) -> None:
    home = base / "home"
    home.mkdir(mode=0o700)
    os.chown(home, OTHER_UID, -1)
    r = run({"VMKIT_HOME": str(home)}, "list")
    assert r.returncode == ExitCode.HOST_MISSING, r
    msg = one_line(r.stderr)
    assert f"VMKIT_HOME ({home}) is unsafe" in msg
    assert f"{home} (the directory itself) belongs to uid {OTHER_UID}" in msg or \
        f"{home} (a parent of {home}/instances) belongs to uid {OTHER_UID}" in msg
    assert "hint:" in msg


def test_create_does_not_touch_a_foreign_home(base: Path) -> None:
    home = base / "home"
    home.mkdir(mode=0o755)
    os.chown(home, OTHER_UID, -1)
    r = run({"VMKIT_HOME": str(home)}, "create", "vm1", "--kernel", "/etc/hostname")
    assert r.returncode == ExitCode.HOST_MISSING, r
    assert not (home / "instances").exists()
    assert stat.S_IMODE(home.stat().st_mode) == 0o755  # not chmod'ed by root


def test_a_world_writable_parent_is_refused(base: Path) -> None:
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    home = shared / "home"
    r = run({"VMKIT_HOME": str(home)}, "list", "--json")
    assert r.returncode == ExitCode.HOST_MISSING, r
    msg = one_line(r.stderr)
    assert f"VMKIT_HOME ({home}) is unsafe: {shared}" in msg
    assert "mode 0777" in msg and f"chmod go-w {shared}" in msg


def test_a_group_writable_home_is_refused(base: Path) -> None:
    home = base / "home"
    home.mkdir()
    home.chmod(0o770)
    with pytest.raises(HostError, match="writable by group"):
        paths.check_owned_tree(home, "VMKIT_HOME")


def test_a_root_owned_sticky_parent_like_tmp_is_accepted(base: Path) -> None:
    sticky = base / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert os.stat(sticky).st_uid == 0 or os.geteuid() != 0
    home = sticky / "home"
    r = run({"VMKIT_HOME": str(home)}, "list", "--json")
    assert r.returncode == 0, r
    assert r.stdout.strip() == "[]"


def test_a_sticky_directory_of_another_user_is_refused(base: Path) -> None:
    sticky = base / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    os.chown(sticky, OTHER_UID, -1)
    with pytest.raises(HostError, match=f"belongs to uid {OTHER_UID}"):
        paths.check_owned_tree(sticky / "home", "VMKIT_HOME")


def test_an_image_cache_owned_by_another_user_is_refused(base: Path) -> None:
    cache = base / "cache"
    cache.mkdir(mode=0o755)
    os.chown(cache, OTHER_UID, -1)
    r = run({"VMKIT_HOME": str(base / "home"), "VMKIT_IMAGE_CACHE": str(cache)}, "image", "list")
    assert r.returncode == ExitCode.HOST_MISSING, r
    assert f"VMKIT_IMAGE_CACHE ({cache}) is unsafe" in one_line(r.stderr)


def test_a_symlink_to_a_foreign_directory_is_followed(base: Path) -> None:
    foreign = base / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, OTHER_UID, -1)
    link = base / "link"
    link.symlink_to(foreign)
    with pytest.raises(HostError, match=f"{foreign} .*belongs to uid {OTHER_UID}"):
        paths.check_owned_tree(link, "VMKIT_HOME")


def test_missing_parts_are_created_private_whatever_the_umask(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = base / "a" / "b" / "home"
    monkeypatch.setenv("VMKIT_HOME", str(home))
    old = os.umask(0o002)
    try:
        paths.ensure_private_dir(paths.instances_dir())
    finally:
        os.umask(old)
    for d in (base / "a", base / "a" / "b", home, home / "instances"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert paths.instances_dir() == home / "instances"  # and accepted next time
