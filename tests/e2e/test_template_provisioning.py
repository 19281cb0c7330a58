"""Provisioning from a template on the Debian guest: scripts run through the guest agent while
``vmkit start`` waits, as root and as the user, their output streamed and logged; a failing script
fails the start with its exit code and last lines. Then the machine is stopped and started again:
the ``once`` script that succeeded does not run again, the ``boot`` ones do. Two boots of one guest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import vmkit
from vmkit.errors import ExitCode
from vmkit.host.images.store import Image

pytestmark = pytest.mark.e2e

# fails at the first boot only (its marker is on the guest's disk, so it survives the reboot)
FAIL_AT_FIRST_BOOT = """\
if [ -e /var/lib/vmkit-test-failed-once ]; then echo third passes; exit 0; fi
touch /var/lib/vmkit-test-failed-once && sync
echo about to fail
echo on stderr >&2
exit 3
"""


@pytest.mark.timeout(1500)
def test_provisioning_fails_with_its_exit_code_and_once_scripts_run_once(vmkit_home: Path, debian12: Image,
                                                                          tmp_path: Path) -> None:
    template = tmp_path / "failing.yaml"
    template.write_text(yaml.safe_dump({
        "base": "default",
        "description": "provisioning that fails in its third script at the first boot",
        "provision": [
            {"mode": "system", "when": "once",
             "script": "echo as-root $(id -un)\necho once-ran >> /etc/provisioned-once\n"},
            {"mode": "user", "script": "echo as-user $(id -un) home $HOME\necho user-ran >> ~/user-ran\n"},
            {"script": FAIL_AT_FIRST_BOOT},
            {"script": "echo last-runs\n"},
        ],
        "probes": [{"script": "true"}],
    }))
    vmkit("create", "prov", "--template", str(template))
    res = vmkit("start", "prov", check=False)
    text = res.stdout + res.stderr
    assert res.returncode == ExitCode.PROVISION_FAILED, text
    assert "script 3 of 4" in text and "exit code 3" in text
    assert "about to fail" in text and "on stderr" in text  # its last lines
    log_file = vmkit_home / "instances" / "prov" / "provision.log"
    first = log_file.read_text()
    assert "as-root root" in first and "as-user vmkit home /home/vmkit" in first
    assert "about to fail" in first and "last-runs" not in first
    # the machine is left running for a look; the first two scripts did their work
    assert vmkit("exec", "prov", "--", "cat", "/home/vmkit/user-ran").stdout.split() == ["user-ran"]
    assert vmkit("exec", "prov", "--", "cat", "/etc/provisioned-once").stdout.split() == ["once-ran"]

    # a second boot (a plain stop: no saved state, so `start` boots and provisions again)
    vmkit("stop", "prov")
    again = vmkit("start", "prov", check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    second = log_file.read_text()[len(first):]
    assert "provision 1/4 (system, once): done on an earlier boot, skipped" in second, second
    assert "as-root" not in second  # the once script did not run again...
    assert "as-user vmkit home /home/vmkit" in second and "third passes" in second  # ...the boot ones did
    assert "last-runs" in second and "probe 1/1: passed" in second
    # and the guest's state says the same: one line from the once script, two from the boot one
    assert vmkit("exec", "prov", "--", "cat", "/etc/provisioned-once").stdout.split() == ["once-ran"]
    assert vmkit("exec", "prov", "--", "cat", "/home/vmkit/user-ran").stdout.split() == ["user-ran", "user-ran"]
    vmkit("stop", "prov", "--force")
    vmkit("delete", "prov")
