"""Unit tests: QEMU argv builders (golden files), option escaping, blockdev JSON, accelerator arguments.

Golden files live in ``tests/unit/golden/<name>.txt``, one argument per line. After an intended
change to the command line, regenerate them with ``VMKIT_UPDATE_GOLDEN=1 pytest tests/unit/test_cmdline.py``
and review the diff.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from conftest import check_golden
from vmkit.config import DiskImage, MachineConfig, StorageDevice, parse_config
from vmkit.errors import ConfigError
from vmkit.runtime.qemu import cmdline
from vmkit.runtime.qemu.accel import AccelChoice
from vmkit.runtime.qemu.cmdline import Runtime

GOLDEN = Path(__file__).parent / "golden"
TCG = AccelChoice("tcg", "test")
KVM = AccelChoice("kvm", "test")
RUNTIME = Runtime(qmp_fd=3, serial_fd=4, pidfile=Path("/run/vmkit/vm1/qemu.pid"))


def config(**overrides: Any) -> MachineConfig:
    data: dict[str, Any] = {
        "name": "vm1",
        "boot": {"kernel": "/images/micro/vmlinuz", "initrd": "/images/micro/initrd.img",
                 "cmdline": "console=ttyS0 panic=-1 quiet"},
        "network": {"mac": "52:54:00:12:34:56"},
    }
    data.update(overrides)
    return parse_config(data)


def device(path: str, **att: Any) -> StorageDevice:
    return StorageDevice.model_validate({"attachment": {"type": "disk-image", "path": path, **att}})


# --------------------------------------------------------------------------- golden, one per builder


def test_golden_base_args() -> None:
    check_golden("base", cmdline.base_args(config(cpus=2, memory="1G"), TCG))


def test_golden_boot_args() -> None:
    check_golden("boot", cmdline.boot_args(config()))


def test_golden_monitor_args() -> None:
    check_golden("monitor", cmdline.monitor_args(RUNTIME))


def test_golden_serial_args() -> None:
    check_golden("serial", cmdline.serial_args(RUNTIME))


def test_golden_storage_args() -> None:
    argv = (cmdline.storage_args(0, device("/vms/root.qcow2"))
            + cmdline.storage_args(1, device("/vms/data.img", read_only=True, cache="writethrough")))
    argv += cmdline.storage_args(2, StorageDevice.model_validate(
        {"attachment": {"type": "disk-image", "path": "/vms/scratch.img", "cache": "unsafe"}, "serial": "scr,atch"}))
    check_golden("storage", argv)


def test_golden_network_args() -> None:
    cfg = config(network={"mac": "52:54:00:12:34:56", "forwards": [
        {"host_port": 2222, "guest_port": 22},
        {"protocol": "udp", "host_addr": "0.0.0.0", "host_port": 5353, "guest_port": 53},
    ]})
    assert cfg.network is not None
    check_golden("network", cmdline.network_args(cfg.network))


def test_golden_entropy_args() -> None:
    check_golden("entropy", cmdline.entropy_args())


def test_golden_balloon_args() -> None:
    check_golden("balloon", cmdline.balloon_args())


def test_golden_hotplug_memory_args() -> None:
    cfg = config(memory="512M", max_memory="2G", plugged_memory="256M", cpus=2, max_cpus=6)
    check_golden("hotplug", [*cmdline.base_args(cfg, TCG), *cmdline.hotplug_memory_args(cfg)])


def test_vcpu_ceiling_and_memory_region_on_the_command_line() -> None:
    argv = cmdline.build_argv(config(cpus=3), TCG, RUNTIME)
    assert argv[argv.index("-smp") + 1] == "3,maxcpus=6"  # default: twice cpus
    assert argv[argv.index("-m") + 1] == "512M"
    assert "virtio-mem-pci" not in " ".join(argv)  # no max_memory: no region
    # a virtio-blk's queues follow the ceiling, not the vCPUs now (a hot-plug must not change the device)
    disk = config(cpus=3, storage=[{"attachment": {"type": "disk-image", "path": "/d.img"}}])
    argv = cmdline.build_argv(disk, TCG, RUNTIME)
    assert any(a.startswith("virtio-blk-pci,") and "num-queues=6" in a for a in argv)
    shared = config(memory="1G", max_memory="1152M", memory_merge=False,
                    shares=[{"type": "virtiofs", "host_path": "/srv"}])
    argv = cmdline.build_argv(shared, TCG, RUNTIME)
    assert argv[argv.index("-m") + 1] == "1024M,maxmem=1152M"
    backend = next(a for a in argv if a.startswith("memory-backend-") and "vmem0-mem" in a)
    assert backend == "memory-backend-memfd,id=vmem0-mem,size=128M,share=on,merge=off"  # virtiofsd maps it too
    assert "virtio-mem-pci,id=vmem0,memdev=vmem0-mem,block-size=2M,requested-size=0M" in argv


def test_balloon_on_by_default_and_off_when_asked() -> None:
    on = cmdline.build_argv(config(), TCG, RUNTIME)
    assert "virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on" in option_values(on, "-device")
    off = cmdline.build_argv(config(balloon=False), TCG, RUNTIME)
    assert not any(d.startswith("virtio-balloon") for d in option_values(off, "-device"))


def test_memory_merge_off_is_on_the_machine_option() -> None:
    assert option_values(cmdline.build_argv(config(), TCG, RUNTIME), "-machine") == ["q35,memory-backend=mem"]
    argv = cmdline.build_argv(config(memory_merge=False), TCG, RUNTIME)
    assert option_values(argv, "-machine") == ["q35,memory-backend=mem,mem-merge=off"]
    assert option_values(argv, "-object")[0] == "memory-backend-ram,id=mem,size=512M,merge=off"
    shared = config(memory_merge=False, shares=[{"type": "virtiofs", "host_path": "/srv"}])
    assert option_values(cmdline.build_argv(shared, TCG, RUNTIME), "-machine") == [
        "q35,memory-backend=mem,mem-merge=off"]


def test_golden_full_argv() -> None:
    cfg = config(
        cpus=2, memory="768M",
        storage=[{"attachment": {"type": "disk-image", "path": "/vms/root.qcow2"}, "serial": "root"}],
        network={"mac": "52:54:00:12:34:56", "forwards": [{"host_port": 2222, "guest_port": 22}]},
    )
    check_golden("full", cmdline.build_argv(cfg, TCG, RUNTIME))


def test_golden_minimal_argv() -> None:
    cfg = parse_config({"name": "bare", "boot": {"kernel": "/k"}, "network": None, "entropy": False})
    check_golden("minimal", cmdline.build_argv(cfg, TCG, Runtime(qmp_fd=5, serial_fd=6)))


# --------------------------------------------------------------------------- structure of the full argv


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


def test_full_argv_shape() -> None:
    cfg = config(storage=[{"attachment": {"type": "disk-image", "path": "/a.img"}},
                          {"attachment": {"type": "disk-image", "path": "/b.img"}}])
    argv = cmdline.build_argv(cfg, TCG, RUNTIME, binary="/opt/qemu/bin/qemu-system-x86_64")
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert cmdline.build_argv(cfg, TCG, RUNTIME)[0] == "qemu-system-x86_64"
    assert option_values(argv, "-kernel") == ["/images/micro/vmlinuz"]
    assert option_values(argv, "-append") == ["console=ttyS0 panic=-1 quiet"]  # one argument, never split
    assert option_values(argv, "-pidfile") == ["/run/vmkit/vm1/qemu.pid"]
    assert [json.loads(b)["node-name"] for b in option_values(argv, "-blockdev")] == ["disk0", "disk1"]
    assert "-S" in argv and "-nodefaults" in argv
    # the command line round-trips through shlex (what --dry-run prints is what runs)
    assert shlex.split(cmdline.render(argv)) == argv


def test_optional_parts_are_left_out() -> None:
    cfg = parse_config({"name": "bare", "boot": {"kernel": "/k"}, "network": None, "entropy": False})
    argv = cmdline.build_argv(cfg, TCG, Runtime(qmp_fd=3, serial_fd=4))
    for absent in ("-initrd", "-append", "-netdev", "-blockdev", "-pidfile"):
        assert absent not in argv
    assert option_values(argv, "-object") == ["memory-backend-ram,id=mem,size=512M"]  # the RAM only: no RNG
    assert cmdline.boot_args(parse_config({"name": "x", "boot": {"kernel": "/k", "cmdline": ""}})) == ["-kernel", "/k"]


def test_network_without_mac_lets_qemu_choose() -> None:
    cfg = config(network={"mac": None})
    assert cfg.network is not None
    assert cmdline.network_args(cfg.network)[-1] == "virtio-net-pci,netdev=net0,id=net0-dev"


# --------------------------------------------------------------------------- escaping


@pytest.mark.parametrize(
    ("value", "escaped"),
    [("plain", "plain"), ("a,b", "a,,b"), ("a,,b", "a,,,,b"), (",", ",,"), ("", "")],
)
def test_opt_escape(value: str, escaped: str) -> None:
    assert cmdline.opt_escape(value) == escaped


def test_user_strings_inside_option_lists_are_escaped() -> None:
    dev = StorageDevice.model_validate({"attachment": {"type": "disk-image", "path": "/x.img"},
                                        "serial": "a,drive=evil"})
    device_opt = cmdline.storage_args(0, dev)[3]
    assert device_opt.endswith(",serial=a,,drive=evil")
    # a comma in a path is safe inside the blockdev JSON
    spec = json.loads(cmdline.storage_args(0, device("/vms/a,b.img"))[1])
    assert spec["file"]["filename"] == "/vms/a,b.img"


# --------------------------------------------------------------------------- blockdev JSON


def blockdev(**att: Any) -> dict[str, Any]:
    att_model = DiskImage.model_validate({"path": "/d.img", **att})
    out: dict[str, Any] = json.loads(cmdline.blockdev_json("disk0", att_model))
    return out


def test_blockdev_raw_read_write() -> None:
    spec = blockdev()
    assert spec["driver"] == "raw" and spec["node-name"] == "disk0" and spec["read-only"] is False
    assert spec["file"] == {"driver": "file", "filename": "/d.img", "node-name": "disk0-file",
                            "cache": {"direct": False, "no-flush": False}, "read-only": False, "locking": "on"}


def test_blockdev_qcow2() -> None:
    assert blockdev(format="qcow2")["driver"] == "qcow2"
    assert json.loads(cmdline.blockdev_json("d", DiskImage(path=Path("/v/x.qcow2"))))["driver"] == "qcow2"


def test_blockdev_read_only() -> None:
    spec = blockdev(read_only=True)
    assert spec["read-only"] is True and spec["file"]["read-only"] is True
    assert "locking" not in spec["file"]  # QEMU's default (shared read lock) lets others read it too


@pytest.mark.parametrize(
    ("cache", "direct", "no_flush", "write_cache_off"),
    [
        ("writeback", False, False, False),
        ("none", True, False, False),
        ("writethrough", False, False, True),
        ("directsync", True, False, True),
        ("unsafe", False, True, False),
    ],
)
def test_blockdev_cache_modes(cache: str, direct: bool, no_flush: bool, write_cache_off: bool) -> None:
    spec = blockdev(cache=cache)
    want = {"direct": direct, "no-flush": no_flush}
    assert spec["cache"] == want and spec["file"]["cache"] == want
    device_opt = cmdline.storage_args(0, device("/d.img", cache=cache))[3]
    assert ("write-cache=off" in device_opt) is write_cache_off


def test_blockdev_json_is_one_compact_argument() -> None:
    text = cmdline.blockdev_json("disk0", DiskImage(path=Path("/d.img")))
    assert " " not in text and text.startswith("{")


# --------------------------------------------------------------------------- accelerator


def test_tcg_accel_args_and_default_cpu() -> None:
    argv = cmdline.base_args(config(), TCG)
    assert option_values(argv, "-accel") == ["tcg,thread=multi"]
    assert option_values(argv, "-cpu") == ["max"]


def test_tcg_cache_sets_tb_size_under_tcg_only() -> None:
    assert option_values(cmdline.base_args(config(tcg_cache="128M"), TCG), "-accel") == ["tcg,thread=multi,tb-size=128"]
    assert option_values(cmdline.base_args(config(tcg_cache="128M"), KVM), "-accel") == ["kvm"]


@pytest.mark.parametrize(("value", "needle"), [("100K", "whole number of MiB"), ("8M", "16M to 2G"),
                                               ("4G", "16M to 2G")])
def test_tcg_cache_out_of_range_is_refused_by_name(value: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(tcg_cache=value)
    assert "tcg_cache" in str(err.value) and needle in str(err.value)


def test_kvm_accel_args_and_default_cpu() -> None:
    argv = cmdline.base_args(config(), KVM)
    assert option_values(argv, "-accel") == ["kvm"]
    assert option_values(argv, "-cpu") == ["host"]


def test_configured_cpu_model_wins_over_the_default() -> None:
    for accel in (TCG, KVM):
        assert option_values(cmdline.base_args(config(cpu_model="Skylake-Client"), accel), "-cpu") == ["Skylake-Client"]


def test_memory_and_cpus() -> None:
    argv = cmdline.base_args(config(cpus=3, memory="2G"), TCG)
    assert option_values(argv, "-smp") == ["3,maxcpus=6"]
    assert option_values(argv, "-m") == ["2048M"]
    assert option_values(argv, "-machine") == ["q35,memory-backend=mem"]
    assert option_values(cmdline.base_args(config(machine="pc"), TCG), "-machine") == ["pc,memory-backend=mem"]


def test_padded_ram() -> None:
    """A TCG guest on QEMU < 9.0 gets 8 KiB more RAM (vmkit.runtime.qemu.dirtysync): -m and the
    backend object say the same size, in KiB."""
    cfg = config(memory="1G")
    argv = cmdline.build_argv(cfg, TCG, Runtime(qmp_fd=3, serial_fd=4, ram_pad=8 << 10))
    assert argv[argv.index("-m") + 1] == "1048584K"
    assert "memory-backend-ram,id=mem,size=1048584K" in argv
    plain = cmdline.build_argv(cfg, TCG, Runtime(qmp_fd=3, serial_fd=4))
    assert plain[plain.index("-m") + 1] == "1024M"
