"""The README's main path on the full Debian guest, through the CLI: create from the image with
user-data and a port forward, start (ready when the agent answers), exec, shell, stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import processes_mentioning, vmkit
from vmkit.host.images.store import Image
from vmkit.host.provision import free_port

pytestmark = pytest.mark.e2e




@pytest.mark.timeout(900)
def test_debian_instance_end_to_end(vmkit_home: Path, debian12: Image, tmp_path: Path) -> None:
    web = free_port()
    user_data = tmp_path / "user-data.yaml"
    user_data.write_text(
        "#cloud-config\n"
        "write_files:\n"
        "  - path: /srv/www/index.html\n"
        "    content: served-from-the-guest\n"
        "runcmd:\n"
        "  - [sh, -c, 'echo runcmd-ran > /var/tmp/runcmd.txt']\n"
        "  - [sh, -c, 'cd /srv/www && nohup python3 -m http.server 8000 >/dev/null 2>&1 &']\n"
    )
    vmkit("create", "web", "--image", "debian-12", "--disk", "3G", "--port", f"{web}:8000",
          "--user-data", str(user_data))
    inst = vmkit_home / "instances" / "web"
    assert {p.name for p in inst.iterdir()} >= {"disk.qcow2", "seed.iso", "known_hosts", "ssh_config", "vm.yaml"}
    assert (inst / "ssh" / "id_ed25519").stat().st_mode & 0o777 == 0o600

    vmkit("start", "web")
    assert json.loads(vmkit("list", "--json").stdout)[0]["state"] == "running"
    assert vmkit("exec", "web", "--", "cat", "/etc/hostname").stdout.strip() == "web"
    failing = vmkit("exec", "web", "--", "sh", "-c", "echo oops >&2; exit 7", check=False)
    assert failing.returncode == 7 and "oops" in failing.stderr
    # codes 125-127 are vmkit's own (as with docker exec): never confused with the command's
    nosuch = vmkit("exec", "web", "--", "no-such-command", check=False)
    assert nosuch.returncode == 127 and "no-such-command" in nosuch.stderr
    assert vmkit("exec", "web", "--", "/etc/hostname", check=False).returncode == 126
    assert vmkit("exec", "ghost", "--", "true", check=False).returncode == 125  # no such machine
    size = vmkit("exec", "web", "--", "lsblk", "-bdno", "SIZE", "/dev/vda").stdout
    assert int(size) == 3 << 30  # the overlay was grown to --disk

    # files in and out through the agent (3 MiB: several 1 MiB pieces)
    import hashlib

    blob = os.urandom(3 * (1 << 20) + 123)
    (tmp_path / "blob.bin").write_bytes(blob)
    vmkit("cp", str(tmp_path / "blob.bin"), "web:/var/tmp/blob.bin")
    digest = vmkit("exec", "web", "--", "sha256sum", "/var/tmp/blob.bin").stdout.split()[0]
    assert digest == hashlib.sha256(blob).hexdigest()
    vmkit("cp", "web:/etc/hostname", str(tmp_path / "hostname"))
    assert (tmp_path / "hostname").read_text().strip() == "web"
    # host modes: a new file gets the guest file's (640) less the umask; an existing file keeps its own;
    # a directory destination gets the guest file's name
    umask = os.umask(0o022)
    os.umask(umask)
    vmkit("cp", "web:/etc/shadow", str(tmp_path / "shadow"))
    assert (tmp_path / "shadow").stat().st_mode & 0o777 == 0o640 & ~umask
    (tmp_path / "private").write_text("old")
    (tmp_path / "private").chmod(0o600)
    vmkit("cp", "web:/etc/hostname", str(tmp_path / "private"))
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600
    (tmp_path / "into").mkdir()
    vmkit("cp", "web:/etc/hostname", str(tmp_path / "into"))
    assert (tmp_path / "into" / "hostname").read_text().strip() == "web"
    assert vmkit("cp", "a", "b", check=False).returncode == 2  # no guest side
    missing = vmkit("cp", "web:/nonexistent", str(tmp_path / "nothing"), check=False)
    assert missing.returncode == 3 and "not found" in missing.stderr
    assert not (tmp_path / "nothing").exists()

    # two commands at once share the supervisor's one agent connection: the quick one is not held up
    import time

    slow = subprocess.Popen([sys.executable, "-m", "vmkit.cli.main", "exec", "web", "--", "sh", "-c",
                             "sleep 6; echo slow-done"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    began = time.monotonic()
    assert vmkit("exec", "web", "--", "echo", "quick").stdout.strip() == "quick"
    assert slow.poll() is None, "the slow command should still be running"
    assert time.monotonic() - began < 4
    out, _ = slow.communicate(timeout=60)
    assert slow.returncode == 0 and out.strip() == "slow-done"

    # user-data: runcmd ran (wait for cloud-init to finish first)
    vmkit("exec", "web", "--timeout", "300", "--", "cloud-init", "status", "--wait")
    assert vmkit("exec", "web", "--", "cat", "/var/tmp/runcmd.txt").stdout.strip() == "runcmd-ran"

    # OpenSSH with the pinned host key; exit codes are forwarded
    assert subprocess.run([sys.executable, "-m", "vmkit.cli.main", "shell", "web", "--", "true"],
                          timeout=120).returncode == 0
    assert subprocess.run([sys.executable, "-m", "vmkit.cli.main", "shell", "web", "--", "exit", "5"],
                          timeout=120).returncode == 5
    known = inst / "known_hosts"
    good = known.read_text()
    host, kind, _key = good.split()
    other = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                           capture_output=True)
    assert other.returncode == 0
    known.write_text(f"{host} {kind} {(tmp_path / 'k.pub').read_text().split()[1]}\n")
    spoofed = subprocess.run([sys.executable, "-m", "vmkit.cli.main", "shell", "web", "--", "true"],
                             capture_output=True, text=True, timeout=120)
    assert spoofed.returncode != 0  # a different pinned key: ssh refuses to connect
    known.write_text(good)

    # the port forward reaches a service in the guest
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/index.html", timeout=30) as r:
        assert r.read().decode().strip() == "served-from-the-guest"

    # a port forward added to the running machine works at once and is kept in vm.yaml
    late = free_port()
    vmkit("port", "add", "web", f"{late}:8000")
    with urllib.request.urlopen(f"http://127.0.0.1:{late}/index.html", timeout=30) as r:
        assert r.read().decode().strip() == "served-from-the-guest"
    assert late in [f["host_port"] for f in json.loads(vmkit("port", "list", "web", "--json").stdout)]
    dup = vmkit("port", "add", "web", f"{late}:81", check=False)
    assert dup.returncode == 2 and "already forwarded" in dup.stderr

    vmkit("stop", "web")
    assert json.loads(vmkit("list", "--json").stdout)[0]["state"] == "stopped"
    assert processes_mentioning(str(vmkit_home)) == []

    # a clone runs beside its source, with its own identity
    assert vmkit("clone", "web", "web2", check=False).returncode == 0
    vmkit("start", "web")
    vmkit("start", "web2")
    assert vmkit("exec", "web2", "--", "cat", "/etc/hostname").stdout.strip() == "web2"
    assert vmkit("exec", "web", "--", "cat", "/etc/hostname").stdout.strip() == "web"
    ids = [vmkit("exec", n, "--", "cat", "/var/lib/cloud/data/instance-id").stdout for n in ("web", "web2")]
    assert ids[0] != ids[1]
    assert subprocess.run([sys.executable, "-m", "vmkit.cli.main", "shell", "web2", "--", "true"],
                          timeout=120).returncode == 0
    assert (inst.parent / "web2" / "known_hosts").read_text() != known.read_text()  # its own host key
    vmkit("stop", "web")
    vmkit("stop", "web2")
    assert processes_mentioning(str(vmkit_home)) == []
