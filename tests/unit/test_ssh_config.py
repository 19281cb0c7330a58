"""The instance's ssh_config quotes its paths: a VMKIT_HOME with spaces (or '#', '%', "'") still
gives OpenSSH the right IdentityFile and UserKnownHostsFile; what cannot be written is refused."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

import conftest
from vmkit.errors import ConfigError
from vmkit.host.provision import ssh_config_text

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH's ssh")

AWKWARD = "my vms #1 50%h it's"


def ssh_g(config: Path, host: str) -> dict[str, str]:
    """What ``ssh -G`` says the config means (option -> value)."""
    r = subprocess.run(["ssh", "-G", "-F", str(config), host], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return {k: v for k, _, v in (ln.partition(" ") for ln in r.stdout.splitlines())}


def identity_files_loaded(config: Path, host: str, port: int) -> list[str]:
    """The identity files ``ssh -v`` really loads (after % expansion), against a listener that hangs up."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(1)

        def hang_up() -> None:
            conn, _ = srv.accept()
            conn.recv(100)
            conn.close()

        t = threading.Thread(target=hang_up, daemon=True)
        t.start()
        r = subprocess.run(["ssh", "-v", "-F", str(config), "-o", "BatchMode=yes", host, "true"],
                           capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        t.join(5)
    return [ln.split("identity file ", 1)[1].rsplit(" type ", 1)[0]
            for ln in r.stderr.splitlines() if "identity file " in ln]


def test_paths_with_spaces_and_specials_come_out_right(tmp_path: Path) -> None:
    inst = tmp_path / AWKWARD / "instances" / "web"
    inst.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = inst / "ssh_config"
    cfg.write_text(ssh_config_text(inst, "web", port))
    opts = ssh_g(cfg, "web")
    assert opts["userknownhostsfile"] == str(inst / "known_hosts")
    assert opts["port"] == str(port) and opts["user"] == "vmkit" and opts["hostname"] == "127.0.0.1"
    assert identity_files_loaded(cfg, "web", port)[0] == str(inst / "ssh" / "id_ed25519")


@pytest.mark.parametrize("bad", ['quote"d', "back\\slash", "new\nline", "${HOME}", "tab\there"])
def test_unrepresentable_paths_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        ssh_config_text(tmp_path / bad / "web", "web", 2222)
    assert info.value.problems[0].field == "VMKIT_HOME"
    assert "OpenSSH config file cannot hold" in info.value.message


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cache = os.environ.get("VMKIT_IMAGE_CACHE") or str(Path(__file__).resolve().parents[2] / ".cache" / "images")
    env = {**os.environ, "VMKIT_HOME": str(home), "VMKIT_IMAGE_CACHE": cache, "COLUMNS": "250"}
    return conftest.vmkit(*args, check=False, env=env)


@pytest.fixture
def debian_image() -> None:
    cache = Path(os.environ.get("VMKIT_IMAGE_CACHE") or Path(__file__).resolve().parents[2] / ".cache" / "images")
    if not (cache / "debian-12" / "manifest.json").is_file():
        pytest.skip("needs the debian-12 image in the cache (vmkit image build debian-12)")


def test_create_in_a_home_with_spaces_gives_a_working_ssh_config(tmp_path: Path, debian_image: None) -> None:
    home = tmp_path / AWKWARD
    r = _cli(home, "create", "web", "--image", "debian-12")
    assert r.returncode == 0, r.stderr
    inst = home / "instances" / "web"
    printed = _cli(home, "ssh-config", "web")
    assert printed.returncode == 0, printed.stderr
    cfg = tmp_path / "printed_config"
    cfg.write_text(printed.stdout)
    for config in (inst / "ssh_config", cfg):
        opts = ssh_g(config, "web")
        assert opts["userknownhostsfile"] == str(inst / "known_hosts")
        assert identity_files_loaded(config, "web", int(opts["port"]))[0] == str(inst / "ssh" / "id_ed25519")
    assert (inst / "ssh" / "id_ed25519").is_file() and (inst / "known_hosts").is_file()


def test_create_in_a_home_ssh_cannot_name_leaves_nothing(tmp_path: Path, debian_image: None) -> None:
    home = tmp_path / 'q"uote'
    r = _cli(home, "create", "web", "--image", "debian-12")
    assert r.returncode == 2, r.stderr
    assert "VMKIT_HOME" in r.stderr and "OpenSSH config file cannot hold" in " ".join(r.stderr.split())
    assert list((home / "instances").iterdir()) == []
