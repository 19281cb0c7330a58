"""SSH key generation, files and known_hosts pinning (no ssh-keygen needed, but checked if present)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from vmkit.errors import ConfigError
from vmkit.host import sshkeys as keys


def test_user_keypair_is_ed25519_openssh() -> None:
    pair = keys.generate_keypair(comment="vmkit@test")
    assert pair.key_type == "ed25519"
    assert pair.private_openssh.startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert pair.private_openssh.endswith("-----END OPENSSH PRIVATE KEY-----\n")
    algo, blob, comment = pair.public_openssh.split()
    assert (algo, comment) == ("ssh-ed25519", "vmkit@test")
    private = serialization.load_ssh_private_key(pair.private_openssh.encode(), password=None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert public.decode() == f"{algo} {blob}" == pair.public_key
    assert pair.fingerprint.startswith("SHA256:") and "=" not in pair.fingerprint


@pytest.mark.parametrize("key_type,algo", [("rsa", "ssh-rsa"), ("ecdsa", "ecdsa-sha2-nistp256")])
def test_other_key_types(key_type: keys.KeyType, algo: str) -> None:
    pair = keys.generate_keypair(key_type)
    assert pair.algorithm == algo
    assert pair.key_type == key_type


def test_unknown_key_type() -> None:
    with pytest.raises(ConfigError, match="not a key type"):
        keys.generate_keypair("dsa")  # type: ignore[arg-type]


def test_write_mode_and_roundtrip(tmp_path: Path) -> None:
    pair = keys.generate_keypair(comment="me@host")
    path = tmp_path / "ssh" / "id_ed25519"
    pair.write(path)
    for p in (path, tmp_path / "ssh" / "id_ed25519.pub"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert (tmp_path / "ssh" / "id_ed25519.pub").read_text() == pair.public_openssh + "\n"
    assert keys.load_keypair(path) == pair
    # no temp files left behind
    assert sorted(p.name for p in (tmp_path / "ssh").iterdir()) == ["id_ed25519", "id_ed25519.pub"]


def test_ensure_keypair_is_idempotent(tmp_path: Path) -> None:
    first = keys.ensure_keypair(tmp_path / "id_ed25519", comment="c")
    second = keys.ensure_keypair(tmp_path / "id_ed25519", comment="other")
    assert first == second


def test_load_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "k"
    bad.write_text("not a key")
    with pytest.raises(keys.SshKeyError, match="not an unencrypted OpenSSH private key"):
        keys.load_keypair(bad)
    with pytest.raises(keys.SshKeyError, match="cannot read"):
        keys.load_keypair(tmp_path / "missing")


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    pair = keys.generate_keypair()
    pair.write(tmp_path / "k")
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "k.pub")], capture_output=True,
                         text=True, check=True).stdout
    assert out.split()[1] == pair.fingerprint
    # ssh-keygen accepts our private key too (derives the same public key)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(tmp_path / "k")], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert derived == pair.public_key


def test_host_keys_cloud_config_and_known_hosts(tmp_path: Path) -> None:
    host = keys.generate_host_keys(["ed25519", "rsa"])
    cfg = host.cloud_config()
    assert set(cfg) == {"ed25519_private", "ed25519_public", "rsa_private", "rsa_public"}
    assert cfg["ed25519_public"].startswith("ssh-ed25519 ")
    lines = host.known_hosts(2222).splitlines()
    assert lines[0] == f"[127.0.0.1]:2222 {host.keys[0].public_key}"
    assert lines[1].startswith("[127.0.0.1]:2222 ssh-rsa ")
    assert keys.known_hosts_line(host.keys[0].public_openssh, 22) == f"127.0.0.1 {host.keys[0].public_key}"

    host.write(tmp_path)
    assert keys.HostKeys.load(tmp_path) == host
    keys.write_known_hosts(tmp_path / "known_hosts", host, 2222)
    kh = tmp_path / "known_hosts"
    assert kh.read_text() == host.known_hosts(2222)
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600


def test_host_keys_default_is_ed25519_only() -> None:
    host = keys.generate_host_keys()
    assert [k.key_type for k in host.keys] == ["ed25519"]
    assert host.get("rsa") is None and host.get("ed25519") is host.keys[0]


def test_host_keys_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        keys.HostKeys(())
    pair = keys.generate_keypair()
    with pytest.raises(ConfigError, match="one key per type"):
        keys.HostKeys((pair, pair))
    with pytest.raises(ConfigError, match="not a TCP port"):
        keys.known_hosts_host(0)
    with pytest.raises(keys.SshKeyError):
        keys.HostKeys.load(tmp_path)


def test_known_hosts_is_accepted_by_ssh_keygen(tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    host = keys.generate_host_keys()
    keys.write_known_hosts(tmp_path / "kh", host, 2345)
    out = subprocess.run(["ssh-keygen", "-F", "[127.0.0.1]:2345", "-f", str(tmp_path / "kh")],
                         capture_output=True, text=True, check=True).stdout
    assert host.keys[0].public_key in out
