"""Unit tests: guests of another architecture and foreign binaries (configuration refusals by name,
aarch64's QEMU command line, the accelerator per architecture, doctor's rows, binfmt registration)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import vmkit
from vmkit.config import ARCHES, parse_config
from vmkit.errors import ConfigError, ExitCode, HostError
from vmkit.host import doctor
from vmkit.host.builder import image_for_arch
from vmkit.runtime.guest import binfmt
from vmkit.runtime.qemu import accel, cmdline
from vmkit.runtime.qemu.cmdline import Runtime

BOOT = {"kernel": "/images/micro-aarch64/vmlinuz", "cmdline": "console=ttyAMA0"}


def arm(**overrides: Any) -> Any:
    return parse_config({"name": "arm", "arch": "aarch64", "boot": BOOT, **overrides})


def problems(**overrides: Any) -> dict[str, str]:
    return {p.field: p.message for p in arm(**overrides).validate(host=False)}


def kvm_host(tmp_path: Path) -> tuple[Path, Path]:
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    mods = tmp_path / "sys-module"
    (mods / "kvm_intel").mkdir(parents=True)
    return dev, mods


def test_aarch64_runs_on_virt_with_no_vcpu_hotplug_room() -> None:
    config = arm(cpus=2)
    assert config.machine == "virt" and config.cpu_ceiling == 2
    assert config.validate(host=False) == []
    argv = cmdline.build_argv(config, accel.AccelChoice("tcg", "test"), Runtime(qmp_fd=3, serial_fd=4))
    assert argv[0] == "qemu-system-aarch64"
    assert argv[argv.index("-machine") + 1] == "virt,gic-version=max,memory-backend=mem"
    assert argv[argv.index("-smp") + 1] == "2,maxcpus=2"
    assert argv[argv.index("-cpu") + 1] == "max"
    x86 = parse_config({"name": "pc", "boot": BOOT})
    assert x86.machine == "q35" and x86.arch == "x86_64"
    screen = cmdline.build_argv(arm(display={"type": "virtio-gpu"}), accel.AccelChoice("tcg", "test"),
                                Runtime(qmp_fd=3, serial_fd=4))
    assert "virtio-keyboard-pci,id=kbd0" in screen  # virt has no PS/2 keyboard
    # empty PCIe root ports on virt's pcie.0 take hot-plugged disks, as on q35
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-device" and "root-port" in argv[i + 1]] == [
        "pcie-root-port,id=hotplug0,chassis=1,bus=pcie.0", "pcie-root-port,id=hotplug1,chassis=2,bus=pcie.0"]


def test_what_qemu_cannot_give_an_aarch64_machine_is_refused_by_name() -> None:
    found = problems(cpus=1, max_cpus=4, max_memory="1G", memory="512M", machine="q35",
                     display={"type": "virtio-vga"}, binfmt=["aarch64"],
                     storage=[{"attachment": {"type": "disk-image", "path": "/d/a.raw"}},
                              {"kind": "ide", "attachment": {"type": "disk-image", "path": "/d/b.raw"}}])
    assert "PIIX3 IDE controller" in found["storage[1].kind"] and "storage[0].kind" not in found
    assert "vCPU hot-plug" in found["max_cpus"]
    assert "virtio-mem" in found["max_memory"]
    assert "q35 is not a machine for aarch64" in found["machine"]
    assert "use type: virtio-gpu" in found["display.type"]
    assert "the guest's own architecture" in found["binfmt[0]"]
    assert "guest agent" in found["binfmt"]
    assert problems(display={"type": "virtio-gpu"}) == {}
    x86 = parse_config({"name": "pc", "machine": "virt", "boot": BOOT})
    assert "virt is not a machine for x86_64" in x86.validate(host=False)[0].message
    with pytest.raises(ConfigError) as exc:
        parse_config({"name": "m", "arch": "riscv64", "boot": BOOT})
    assert exc.value.problems[0].field == "arch"


def test_a_foreign_architecture_gets_tcg_with_the_reason_even_where_kvm_works(tmp_path: Path) -> None:
    dev, mods = kvm_host(tmp_path)
    own = accel.choose("auto", arch="x86_64", dev=dev, sys_module=mods)
    assert own.name == "kvm"
    foreign = accel.choose("auto", arch="aarch64", dev=dev, sys_module=mods)
    assert foreign.name == "tcg" and "not this host's architecture" in foreign.reason
    with pytest.raises(HostError) as exc:
        accel.choose("kvm", arch="aarch64", dev=dev, sys_module=mods)
    assert exc.value.exit_code == ExitCode.HOST_MISSING and "KVM runs guests of the host's own" in exc.value.message


def test_doctor_has_a_row_per_architecture_saying_how_it_runs() -> None:
    rows = {c.name: c for c in doctor.arch_checks(host="x86_64")}
    assert set(rows) == {f"arch {a}" for a in ARCHES}
    assert "TCG" in rows["arch aarch64"].detail and "not this host's architecture" in rows["arch aarch64"].detail
    assert rows["arch x86_64"].required and not rows["arch aarch64"].required
    on_arm = {c.name: c for c in doctor.arch_checks(host="aarch64")}
    assert "not this host's architecture (aarch64)" in on_arm["arch x86_64"].detail


def test_binfmt_entry_comes_from_qemu_user_static_description(tmp_path: Path) -> None:
    (tmp_path / "qemu-aarch64").write_text(
        "package qemu-user-static\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n"
        "magic \\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00\noffset 0\nmask \\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\n")
    entry = binfmt.entry_for("aarch64", binfmts=tmp_path)
    assert entry.register_line() == (
        ":qemu-aarch64:M:0:\\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00:"
        "/usr/local/lib/vmkit/binfmt/qemu-aarch64-static:FP")
    with pytest.raises(HostError) as exc:
        binfmt.entry_for("x86_64", binfmts=tmp_path)
    assert "qemu-user-static" in str(exc.value)


def test_create_picks_the_image_built_for_the_architecture(vmkit_home: Path) -> None:
    assert image_for_arch("debian-12", "aarch64") == "debian-12-aarch64"
    assert image_for_arch("debian-12-aarch64", "aarch64") == "debian-12-aarch64"
    assert image_for_arch("debian-12", "x86_64") == image_for_arch("debian-12", None) == "debian-12"
    res = vmkit("create", "a", "--image", "micro", "--arch", "sparc", check=False)
    assert res.returncode == ExitCode.BAD_INPUT and "--arch" in res.stderr and "x86_64, aarch64" in res.stderr
    res = vmkit("create", "b", "--image", "nosuch", "--arch", "aarch64", check=False)
    assert res.returncode == ExitCode.BAD_INPUT
    assert "vmkit image build nosuch --arch aarch64" in " ".join(res.stderr.split())
    assert not (vmkit_home / "instances" / "a").exists() and not (vmkit_home / "instances" / "b").exists()


def test_micro_recipe_sees_the_virt_machines_gpio_power_key(tmp_path: Path) -> None:
    """The micro image's /init polls the PL061 power key where the kernel has the controller and sysfs
    GPIO lines (Debian's arm64 cloud kernel: no gpio-keys driver); images of older recipes are outdated."""
    from vmkit.host.images import micro
    from vmkit.host.images.store import ImageManifest

    (tmp_path / "boot").mkdir()
    config = tmp_path / "boot" / "config-6.1.0-57-cloud-arm64"
    config.write_text("CONFIG_GPIOLIB=y\nCONFIG_GPIO_PL061=y\nCONFIG_GPIO_SYSFS=y\n# CONFIG_KEYBOARD_GPIO is not set\n")
    assert micro.gpio_power_key(tmp_path, "6.1.0-57-cloud-arm64")
    config.write_text("CONFIG_GPIO_PL061=y\n# CONFIG_GPIO_SYSFS is not set\n")
    assert not micro.gpio_power_key(tmp_path, "6.1.0-57-cloud-arm64")
    assert not micro.gpio_power_key(tmp_path, "6.1.0-57-amd64")  # no config file
    assert "/proc/device-tree/gpio-keys/poweroff/gpios" in micro.INIT_SCRIPT

    def image(recipe: str | None) -> Any:
        m = ImageManifest(name="micro-aarch64", kind="initramfs", source="apt: linux-image-6.1.0-57-cloud-arm64",
                          kernel="vmlinuz", initrd="initrd.img", recipe=recipe)
        return type("Img", (), {"manifest": m})()

    assert micro.is_outdated(image(None)) and not micro.is_outdated(image(micro.RECIPE))
