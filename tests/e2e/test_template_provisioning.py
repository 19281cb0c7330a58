"""Provisioning from a template on the Debian guest: scripts run through the guest agent while
``vmkit start`` waits, as root and as the user, their output streamed and logged; a failing script
fails the start with its exit code and last lines. One boot."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import vmkit
from vmkit.errors import ExitCode
from vmkit.host.images.store import Image

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)
def test_a_failing_script_fails_the_start_with_its_exit_code(vmkit_home: Path, debian12: Image,
                                                                tmp_path: Path) -> None:
    template = tmp_path / "failing.yaml"
    template.write_text(yaml.safe_dump({
        "base": "default",
        "description": "provisioning that fails in its third script",
        "provision": [
            {"mode": "system", "when": "once", "script": "echo as-root $(id -un)\ntouch /etc/provisioned-once\n"},
            {"mode": "user", "script": "echo as-user $(id -un) home $HOME\necho user-ran > ~/user-ran\n"},
            {"script": "echo about to fail\necho on stderr >&2\nexit 3\n"},
            {"script": "echo never-runs\n"},
        ],
        "probes": [{"script": "true"}],
    }))
    vmkit("create", "prov", "--template", str(template))
    res = vmkit("start", "prov", check=False)
    text = res.stdout + res.stderr
    assert res.returncode == ExitCode.PROVISION_FAILED, text
    assert "script 3 of 4" in text and "exit code 3" in text
    assert "about to fail" in text and "on stderr" in text  # its last lines
    log = (vmkit_home / "instances" / "prov" / "provision.log").read_text()
    assert "as-root root" in log and "as-user vmkit home /home/vmkit" in log
    assert "about to fail" in log and "never-runs" not in log
    # the machine is left running for a look; the first two scripts did their work
    assert vmkit("exec", "prov", "--", "cat", "/home/vmkit/user-ran").stdout.strip() == "user-ran"
    assert vmkit("exec", "prov", "--", "test", "-e", "/etc/provisioned-once", check=False).returncode == 0
    vmkit("stop", "prov", "--force")
    vmkit("delete", "prov")
