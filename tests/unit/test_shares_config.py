"""Unit tests: share configuration checks, QEMU arguments and virtiofsd argv."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import check_golden
from vmkit.config import MachineConfig, parse_config
from vmkit.errors import ConfigError
from vmkit.runtime.qemu import cmdline
from vmkit.runtime.virtiofs import virtiofsd_argv


def cfg(tmp_path: Path, shares: list[dict[str, Any]], **extra: Any) -> MachineConfig:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    return parse_config({"name": "s", "memory": "1G", "boot": {"kernel": str(kernel)}, "network": None,
                         "shares": shares, **extra})


def test_golden_share_args(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    c = cfg(tmp_path, [{"type": "virtiofs", "host_path": "/srv/src", "tag": "src"},
                       {"type": "9p", "host_path": "/srv/data", "read_only": True},
                       {"type": "sshfs", "host_path": "/srv/other"}], hotplug_slots=0)
    rt = cmdline.Runtime(qmp_fd=3, serial_fd=4, share_dir=Path("/inst/dev"))
    argv = cmdline.base_args(c, cmdline.AccelChoice("tcg", "x"))[:4] + cmdline.shared_memory_args(c) \
        + cmdline.share_args(c, rt)
    check_golden("shares", argv)
    assert "q35,memory-backend=mem" in argv  # virtiofs needs guest RAM in shared memory


def test_no_shared_memory_without_virtiofs(tmp_path: Path) -> None:
    c = cfg(tmp_path, [{"type": "9p", "host_path": "/srv/data"}])
    assert not c.needs_shared_memory
    assert cmdline.shared_memory_args(c) == ["-object", f"memory-backend-ram,id=mem,size={c.memory >> 20}M"]


def test_share_problems_are_all_reported(tmp_path: Path) -> None:
    existing = tmp_path / "code"
    existing.mkdir()
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    c = cfg(tmp_path, [
        {"host_path": str(existing), "tag": "t"},
        {"host_path": str(existing), "tag": "t", "guest_path": "/elsewhere"},  # rw twice, same tag
        {"host_path": str(tmp_path / "missing"), "guest_path": "/m"},
        {"host_path": str(afile), "guest_path": "/f"},
        {"host_path": "relative/dir", "guest_path": "/r"},
    ])
    problems = {p.field: p.message for p in c.validate()}
    assert set(problems) == {"shares[1].tag", "shares[1].host_path", "shares[2].host_path",
                             "shares[3].host_path", "shares[4].host_path"}
    assert "read-write only once" in problems["shares[1].host_path"]
    assert "does not exist" in problems["shares[2].host_path"]
    assert "not a directory" in problems["shares[3].host_path"]
    assert "relative" in problems["shares[4].host_path"]


def test_same_folder_read_only_twice_is_fine(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    c = cfg(tmp_path, [{"host_path": str(d), "read_only": True, "guest_path": "/a"},
                       {"host_path": str(d), "guest_path": "/b"}])
    assert c.validate() == []


@pytest.mark.parametrize(("share", "field"), [
    ({"host_path": "/x", "guest_path": "rel"}, "shares[0].guest_path"),
    ({"host_path": "/x", "tag": "a" * 37}, "shares[0].tag"),
    ({"host_path": "/x", "type": "nfs"}, "shares[0].type"),
])
def test_bad_share_fields(tmp_path: Path, share: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(tmp_path, [share])
    assert [p.field for p in exc.value.problems] == [field]


def test_virtiofsd_argv_read_only_uses_a_read_only_bind_mount(tmp_path: Path) -> None:
    c = cfg(tmp_path, [{"host_path": str(tmp_path), "read_only": True, "cache": "none"}])
    argv = virtiofsd_argv(c.shares[0], 7, binary="/usr/lib/qemu/virtiofsd")
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert "remount,bind,ro" in argv[6] and argv[8] == str(tmp_path.resolve())
    assert "--fd=7" in argv and "cache=none" in argv
    rw = virtiofsd_argv(c.shares[0].model_copy(update={"read_only": False}), 7, binary="vfsd")
    assert rw[0] == "vfsd" and "unshare" not in rw


@pytest.mark.skipif(not Path("/usr/lib/qemu/virtiofsd").exists(), reason="needs Debian's virtiofsd")
@pytest.mark.parametrize("name", ["proj,source=/etc", "a\\,b", "back\\slash", "oct\\101al", "trail,", "sp ace"])
def test_virtiofsd_takes_the_folder_literally(tmp_path: Path, name: str) -> None:
    """The real virtiofsd parses the escaped ``-o source=`` back to the folder's exact path (it names
    the path it cannot stat, so a missing folder shows what it parsed)."""
    import subprocess

    c = cfg(tmp_path, [{"host_path": str(tmp_path)}])
    missing = tmp_path / name / "missing"
    share = c.shares[0].model_copy(update={"host_path": missing})
    argv = virtiofsd_argv(share, 7, binary="/usr/lib/qemu/virtiofsd")
    argv = [a for a in argv if not a.startswith("--fd=")] + [f"--socket-path={tmp_path}/s.sock"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert res.returncode != 0
    assert f'failed to stat source ("{missing}")' in res.stderr, res.stderr


@pytest.mark.parametrize(("model", "ok"), [
    ("max", True), ("max,+pdpe1gb,la57=off", True), ("Skylake-Client-v4", True),
    ("max,x=1\n", False), ("max,,x", False), ("max x", False), (",max", False), ("max,x=a,b=", False),
])
def test_cpu_model_is_refused_unless_plain_qemu_syntax(tmp_path: Path, model: str, ok: bool) -> None:
    if ok:
        assert cfg(tmp_path, [], cpu_model=model).cpu_model == model
    else:
        with pytest.raises(ConfigError) as err:
            cfg(tmp_path, [], cpu_model=model)
        assert err.value.problems[0].field == "cpu_model"


def test_fio_directory_is_escaped() -> None:
    from vmkit.bench.fs import fio_dir_escape

    assert fio_dir_escape("/mnt/a:b/.vmkit-fsbench-x") == "/mnt/a\\:b/.vmkit-fsbench-x"
    with pytest.raises(ConfigError):
        fio_dir_escape("/mnt/a\\b")


@pytest.mark.parametrize(("spec", "expected"), [
    ("/src", {"host_path": "/src"}),
    ("/src:/mnt/src", {"host_path": "/src", "guest_path": "/mnt/src"}),
    ("/src::ro", {"host_path": "/src", "read_only": True}),
    ("/src:/m:ro,type=9p,tag=code", {"host_path": "/src", "guest_path": "/m", "read_only": True, "type": "9p",
                                     "tag": "code"}),
])
def test_parse_mount(spec: str, expected: dict[str, Any]) -> None:
    from vmkit.host.builder import parse_mount

    assert parse_mount(spec) == expected


def test_bad_mount_option_names_the_option() -> None:
    from vmkit.host.builder import parse_mount

    with pytest.raises(ValueError, match="unknown mount option 'speed=9'"):
        parse_mount("/src,speed=9")
