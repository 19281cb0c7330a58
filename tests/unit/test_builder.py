"""Unit tests: from `vmkit create` options (and --from files, and images) to a configuration."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmkit.config import MachineConfig
from vmkit.errors import ConfigError, ExitCode
from vmkit.host.builder import CreateOptions, config_from_options, disk_size_option, parse_disk, random_mac
from vmkit.host.images import micro
from vmkit.host.images.store import ImageManifest, ImageStore


def add_image(store: ImageStore, name: str, kind: str = "initramfs", *, kernel: bool = True) -> None:
    with store.staging(name) as d:
        (d / "vmlinuz").write_bytes(b"fake kernel")
        (d / "initrd.img").write_bytes(b"fake initrd")
        store.commit(d, ImageManifest(
            name=name, kind=kind, kernel="vmlinuz" if kernel else None, initrd="initrd.img",
            cmdline="console=ttyS0 panic=-1", ready_marker="VMKIT-READY",
        ))


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    s = ImageStore(tmp_path / "images")
    add_image(s, micro.NAME)
    return s


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"k")
    return k


def build(store: ImageStore | None = None, **kw: Any) -> MachineConfig:
    kw.setdefault("name", "vm1")
    return config_from_options(CreateOptions(**kw), store)


def problems(store: ImageStore | None = None, **kw: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        build(store, **kw)
    assert info.value.exit_code == ExitCode.BAD_INPUT
    return {p.field: p.message for p in info.value.problems}


# --------------------------------------------------------------------------- images


def test_image_sets_boot_and_readiness(store: ImageStore) -> None:
    cfg = build(store, image="micro")
    image_dir = store.path("micro")
    assert cfg.boot.kernel == image_dir / "vmlinuz"
    assert cfg.boot.initrd == image_dir / "initrd.img"
    assert cfg.boot.cmdline == "console=ttyS0 panic=-1"
    assert cfg.readiness.serial_marker == "VMKIT-READY"
    assert cfg.image == "micro"
    assert cfg.validate() == []  # the image's files exist


def test_cmdline_option_is_added_to_the_images(store: ImageStore) -> None:
    assert build(store, image="micro", cmdline="loglevel=7").boot.cmdline == "console=ttyS0 panic=-1 loglevel=7"


def test_run_adds_the_vmkit_run_parameter(store: ImageStore) -> None:
    command = "echo hello; uname -r"
    cfg = build(store, image="micro", run=command)
    params = cfg.boot.cmdline.split()
    assert params[:2] == ["console=ttyS0", "panic=-1"]
    runs = [p for p in params if p.startswith("vmkit.run=")]
    assert len(runs) == 1
    assert base64.b64decode(runs[0].removeprefix("vmkit.run=")).decode() == command


def test_run_without_the_micro_image_is_a_problem(store: ImageStore, kernel: Path) -> None:
    assert "--image micro" in problems(store, kernel=kernel, run="true")["--run"]
    add_image(store, "other")
    assert "--image micro" in problems(store, image="other", run="true")["--run"]


def test_run_that_is_too_long_or_empty(store: ImageStore) -> None:
    assert "too long" in problems(store, image="micro", run="x" * 4000)["--run"]
    assert "empty" in problems(store, image="micro", run="   ")["--run"]


def test_kernel_and_image_together_is_a_problem(store: ImageStore, kernel: Path) -> None:
    assert "either --image or --kernel" in problems(store, image="micro", kernel=kernel)["--kernel"]


def test_missing_image_says_how_to_get_it(tmp_path: Path) -> None:
    msg = problems(ImageStore(tmp_path / "empty"), image="micro")["--image"]
    assert "'micro' not found" in msg and "vmkit image build micro" in msg


def test_image_without_kernel_or_of_another_kind(store: ImageStore) -> None:
    add_image(store, "disky", kind="disk")
    assert "has no disk" in problems(store, image="disky")["--image"]
    add_image(store, "nokernel", kernel=False)
    assert "no kernel" in problems(store, image="nokernel")["--image"]


def test_no_kernel_at_all(store: ImageStore) -> None:
    msg = problems(store)["--kernel"]
    assert "--kernel PATH or --image NAME" in msg and "vmkit image build micro" in msg


# --------------------------------------------------------------------------- options


def test_plain_kernel_options(kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"i")
    monkeypatch.chdir(tmp_path)
    cfg = build(kernel=Path("vmlinuz"), initrd=Path("initrd.img"), cmdline="console=ttyS0",
                cpus=2, memory="1G", accel="tcg")
    assert cfg.boot.kernel == kernel and cfg.boot.kernel.is_absolute()  # relative options are resolved
    assert cfg.boot.initrd == initrd
    assert cfg.boot.cmdline == "console=ttyS0"
    assert (cfg.cpus, cfg.memory, cfg.accel.value) == (2, 1 << 30, "tcg")
    assert cfg.image is None and cfg.readiness.serial_marker is None


def test_disk_flags(kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = build(kernel=kernel, disks=["root.qcow2", "/data/d.img:ro", "/x/y.img:format=qcow2:cache=none",
                                      "/z.qcow2:ro:format=raw"])
    atts = [d.attachment for d in cfg.storage]
    assert atts[0].path == tmp_path / "root.qcow2" and atts[0].format == "qcow2" and not atts[0].read_only
    assert atts[1].path == Path("/data/d.img") and atts[1].read_only and atts[1].format == "raw"
    assert (atts[2].format, atts[2].cache) == ("qcow2", "none")
    assert (atts[3].format, atts[3].read_only) == ("raw", True)
    assert all(d.kind == "virtio-blk" for d in cfg.storage)


def test_parse_disk_rejects_unknown_flags() -> None:
    with pytest.raises(ValueError, match=r"unknown disk flag 'rw'.*PATH\[:ro\]"):
        parse_disk("/d.img:rw")


def test_parse_disk_takes_a_kind_and_a_serial() -> None:
    dev = parse_disk("/d.raw:kind=sata:serial=vmkit-bench-sata")
    assert dev["kind"] == "sata" and dev["serial"] == "vmkit-bench-sata"
    assert parse_disk("nbd://h/e,kind=ide,serial=s1")["serial"] == "s1"


def test_port_options(kernel: Path) -> None:
    cfg = build(kernel=kernel, ports=["8080:80", "0.0.0.0:2222:22", "5353:53/udp"])
    assert cfg.network is not None
    assert [str(f) for f in cfg.network.forwards] == [
        "127.0.0.1:8080->80/tcp", "0.0.0.0:2222->22/tcp", "127.0.0.1:5353->53/udp"]


def test_many_bad_options_are_reported_together(kernel: Path) -> None:
    found = problems(kernel=kernel, memory="lots", ports=["80"], disks=["/d.img:bogus"], cpus=0, accel="hvf")
    assert set(found) == {"--memory", "--port", "--disk", "cpus", "accel"}
    assert "not a size" in found["--memory"]
    assert "HOST:GUEST" in found["--port"]
    assert "unknown disk flag" in found["--disk"]


def test_bad_name_is_reported_with_the_other_problems(kernel: Path) -> None:
    found = problems(name="../escape", kernel=kernel, memory="lots")
    assert set(found) == {"name", "--memory"}


def test_generated_mac_is_locally_administered_unicast(kernel: Path) -> None:
    for _ in range(32):
        mac = random_mac()
        first = int(mac.split(":")[0], 16)
        assert first & 0x01 == 0, "multicast bit set"
        assert first & 0x02 == 0x02, "not locally administered"
        assert len(mac.split(":")) == 6
    cfg = build(kernel=kernel)
    assert cfg.network is not None and cfg.network.mac is not None
    assert int(cfg.network.mac[:2], 16) & 0x03 == 0x02
    assert len({random_mac() for _ in range(16)}) > 1  # random, not a constant


# --------------------------------------------------------------------------- --from FILE


def test_from_file_merges_with_options(kernel: Path, tmp_path: Path) -> None:
    src = tmp_path / "base.yaml"
    src.write_text(yaml.safe_dump({
        "name": "ignored",
        "cpus": 2,
        "memory": "1G",
        "boot": {"kernel": str(kernel), "cmdline": "console=ttyS0"},
        "network": {"mac": "52:54:00:aa:bb:cc", "forwards": [{"host_port": 2222, "guest_port": 22}]},
        "entropy": False,
    }))
    cfg = build(from_file=src, memory="768M", ports=["8080:80"], cmdline="quiet")
    assert cfg.name == "vm1"  # the NAME argument wins
    assert (cfg.cpus, cfg.memory, cfg.entropy) == (2, 768 << 20, False)
    assert cfg.boot.cmdline == "console=ttyS0 quiet"
    assert cfg.network is not None
    assert cfg.network.mac == "52:54:00:aa:bb:cc"  # kept, not regenerated
    assert [f.host_port for f in cfg.network.forwards] == [2222, 8080]


def test_from_file_without_network_refuses_ports(kernel: Path, tmp_path: Path) -> None:
    src = tmp_path / "nonet.yaml"
    src.write_text(yaml.safe_dump({"boot": {"kernel": str(kernel)}, "network": None}))
    assert build(from_file=src).network is None
    assert "no network" in problems(from_file=src, ports=["8080:80"])["--port"]


def test_from_file_problems(tmp_path: Path) -> None:
    assert "does not exist" in problems(from_file=tmp_path / "nope.yaml")["--from"]
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "mapping" in problems(from_file=tmp_path / "list.yaml")["--from"]
    (tmp_path / "bad.yaml").write_text("cpus: [\n")
    assert "not valid YAML" in problems(from_file=tmp_path / "bad.yaml")["--from"]
    (tmp_path / "typo.yaml").write_text("boot: {kernel: /k}\ncpu: 2\n")
    assert "unknown setting" in problems(from_file=tmp_path / "typo.yaml")["cpu"]


def test_cloud_image_gets_root_and_seed_disks_agent_and_ssh_forward(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKIT_HOME", str(tmp_path / "home"))
    store = ImageStore(tmp_path / "images")
    with store.staging("deb") as d:
        (d / "vmlinuz").write_bytes(b"k")
        (d / "disk.qcow2").write_bytes(b"QFI\xfb")
        store.commit(d, ImageManifest(name="deb", kind="disk", kernel="vmlinuz", disk="disk.qcow2",
                                      disk_format="qcow2", cmdline="root=/dev/vda"))
    config = config_from_options(CreateOptions(name="web", image="deb", disks=["20G"], ports=["8080:80"]), store)
    assert [d.id for d in config.storage] == ["root", "seed"]
    assert config.storage[1].attachment.read_only
    assert str(config.storage[0].attachment.path).endswith("instances/web/disk.qcow2")  # type: ignore[union-attr]
    assert config.agent and config.readiness.agent and config.memory == 1 << 30
    assert config.network is not None
    guest_ports = sorted(f.guest_port for f in config.network.forwards)
    assert guest_ports == [22, 80]
    assert disk_size_option(CreateOptions(name="web", disks=["20G"])) == "20G"
