"""An aarch64 guest (QEMU's virt machine under TCG) through the `vmkit` command: the micro guest built
for aarch64 boots, runs a command, and is saved and resumed with its counter going on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import vmkit
from vmkit.host.images import micro
from vmkit.host.images.store import Image


def console_ticks(name: str, pattern: str = r"vmkit-tick \d+") -> list[int]:
    until = rf"(?:{pattern})\n"
    return micro.parse_ticks(vmkit("console", name, "--log", "--until", until, "--timeout", "120").stdout)


@pytest.mark.timeout(600)
def test_aarch64_micro_boots_runs_a_command_saves_and_resumes(vmkit_home: Path, micro_aarch64_image: Image) -> None:
    vmkit("create", "arm", "--image", "micro", "--arch", "aarch64", "--memory", "256M",
          "--cmdline", "vmkit.counter=1", "--run", "uname -m; cat /proc/device-tree/compatible; echo")
    config = (vmkit_home / "instances" / "arm" / "vm.yaml").read_text()
    assert "arch: aarch64" in config and "machine: virt" in config
    assert "qemu-system-aarch64" in vmkit("start", "arm", "--dry-run").stdout
    vmkit("start", "arm")
    row = json.loads(vmkit("list", "--json").stdout)[0]
    assert row["state"] == "running" and row["accel"] == "tcg"
    inst = vmkit_home / "instances" / "arm"
    log = vmkit("console", "arm", "--log", "--until", r"VMKIT-RUN-END rc=\d+", "--timeout", "120").stdout
    result = micro.parse_run_output(log)
    assert result is not None and result.rc == 0, log[-2000:]
    assert result.output.splitlines()[0] == "aarch64"
    assert "linux,dummy-virt" in result.output  # QEMU's virt board's device tree

    console_ticks("arm", r"vmkit-tick [2-9]")
    assert "saved arm to" in vmkit("stop", "--save", "arm").stdout
    last = max(micro.parse_ticks((inst / "serial.log").read_text(errors="replace")))
    res = vmkit("start", "arm")
    assert "resumed from" in res.stdout, res.stdout + res.stderr
    after = console_ticks("arm")
    assert last < after[0] <= last + 2, f"counter {after[0]} after resuming, {last} when saved"
    vmkit("stop", "--force", "arm")
