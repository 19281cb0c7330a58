"""Unit tests: which accelerator vmkit picks, and why (fake /dev/kvm and /sys/module trees)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmkit.errors import ExitCode, HostError
from vmkit.runtime.qemu.accel import choose, kvm_status


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    """A stand-in for /dev/kvm that opens read-write."""
    p = tmp_path / "kvm"
    p.write_bytes(b"")
    return p


def modules(tmp_path: Path, *names: str) -> Path:
    root = tmp_path / "sys-module"
    root.mkdir()
    for n in ("kvm", *names):
        (root / n).mkdir()
    return root


def test_kvm_intel_host_uses_kvm(dev: Path, tmp_path: Path) -> None:
    sysmod = modules(tmp_path, "kvm_intel")
    status = kvm_status(dev, sysmod)
    assert status.usable and "kvm_intel" in status.reason
    choice = choose("auto", dev=dev, sys_module=sysmod)
    assert choice.name == "kvm"
    assert choice.argv() == ["-accel", "kvm"] and choice.default_cpu == "host"


def test_kvm_amd_host_uses_kvm(dev: Path, tmp_path: Path) -> None:
    choice = choose("auto", dev=dev, sys_module=modules(tmp_path, "kvm_amd"))
    assert choice.name == "kvm" and "kvm_amd" in choice.reason


def test_nested_pvm_host_uses_tcg_and_says_why(dev: Path, tmp_path: Path) -> None:
    sysmod = modules(tmp_path, "kvm_pvm")
    status = kvm_status(dev, sysmod)
    assert not status.usable and "kvm_pvm" in status.reason
    choice = choose("auto", dev=dev, sys_module=sysmod)
    assert choice.name == "tcg"
    assert "kvm_pvm" in choice.reason and "TCG" in choice.reason
    assert choice.argv() == ["-accel", "tcg,thread=multi"] and choice.default_cpu == "max"


def test_pvm_wins_even_if_a_hardware_module_is_also_listed(dev: Path, tmp_path: Path) -> None:
    assert choose("auto", dev=dev, sys_module=modules(tmp_path, "kvm_pvm", "kvm_intel")).name == "tcg"


def test_no_dev_kvm_uses_tcg(tmp_path: Path) -> None:
    missing = tmp_path / "no-kvm"
    sysmod = modules(tmp_path, "kvm_intel")
    status = kvm_status(missing, sysmod)
    assert not status.usable and "does not exist" in status.reason and str(missing) in status.reason
    choice = choose("auto", dev=missing, sys_module=sysmod)
    assert choice.name == "tcg" and "does not exist" in choice.reason


def test_dev_kvm_without_a_hardware_module_uses_tcg(dev: Path, tmp_path: Path) -> None:
    sysmod = modules(tmp_path)
    status = kvm_status(dev, sysmod)
    assert not status.usable and "neither kvm_intel nor kvm_amd" in status.reason
    assert choose("auto", dev=dev, sys_module=sysmod).name == "tcg"


def test_dev_kvm_that_cannot_be_opened(dev: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root opens any file read-write")
    dev.chmod(0o400)
    status = kvm_status(dev, modules(tmp_path, "kvm_intel"))
    assert not status.usable and "cannot be opened read-write" in status.reason and "kvm group" in status.reason


def test_kvm_requested_but_unusable_is_a_host_error(dev: Path, tmp_path: Path) -> None:
    with pytest.raises(HostError) as info:
        choose("kvm", dev=dev, sys_module=modules(tmp_path, "kvm_pvm"))
    assert info.value.exit_code == ExitCode.HOST_MISSING
    assert "KVM was asked for but is not usable" in info.value.message and "kvm_pvm" in info.value.message
    assert info.value.hint is not None and "tcg" in info.value.hint


def test_kvm_requested_and_usable(dev: Path, tmp_path: Path) -> None:
    assert choose("kvm", dev=dev, sys_module=modules(tmp_path, "kvm_intel")).name == "kvm"


def test_tcg_requested_is_tcg_without_probing(dev: Path, tmp_path: Path) -> None:
    choice = choose("tcg", dev=dev, sys_module=modules(tmp_path, "kvm_intel"))
    assert choice.name == "tcg" and "asked for" in choice.reason


def test_unknown_accelerator_is_an_error(dev: Path, tmp_path: Path) -> None:
    with pytest.raises(HostError, match="unknown accelerator 'hvf'"):
        choose("hvf", dev=dev, sys_module=modules(tmp_path, "kvm_intel"))


@pytest.mark.skipif(not Path("/sys/module/kvm_pvm").exists(), reason="this host is not a nested-PVM host")
def test_this_host_runs_tcg() -> None:
    """This machine runs kvm_pvm, under which stock kernels hang: auto must pick TCG."""
    choice = choose("auto")
    assert choice.name == "tcg"
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert "kvm_pvm" in choice.reason
    assert not kvm_status().usable
