"""The NoCloud seed ISO: read back with pycdlib and every file's content checked."""

from __future__ import annotations

import email
import io
import stat
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml

from vmkit.errors import ConfigError
from vmkit.host import cloudinit
from vmkit.host import sshkeys as keys

MAC = "52:54:00:12:34:56"


@pytest.fixture(scope="module")
def user_key() -> keys.KeyPair:
    return keys.generate_keypair(comment="vmkit@test")


@pytest.fixture(scope="module")
def host_keys() -> keys.HostKeys:
    return keys.generate_host_keys()


def _spec(user_key: keys.KeyPair, host_keys: keys.HostKeys, **kw: Any) -> cloudinit.SeedSpec:
    args: dict[str, Any] = {
        "instance_id": "i-0123", "hostname": "web1", "authorized_keys": (user_key.public_openssh,),
        "host_keys": host_keys, "mac": MAC,
    }
    args.update(kw)
    return cloudinit.SeedSpec(**args)


def _cloud_config(text: str) -> dict[str, Any]:
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def test_iso_has_label_and_all_three_files(tmp_path: Path, user_key: keys.KeyPair,
                                          host_keys: keys.HostKeys) -> None:
    iso_path = tmp_path / "seed.iso"
    files = cloudinit.make_seed_iso(iso_path, _spec(user_key, host_keys))
    assert stat.S_IMODE(iso_path.stat().st_mode) == 0o600  # holds the private host key

    assert cloudinit.volume_label(iso_path) == ("cidata", "cidata")
    content = cloudinit.read_seed_iso(iso_path)
    assert set(content) == {"meta-data", "user-data", "network-config"}
    assert content["meta-data"].decode() == files.meta_data
    assert content["user-data"].decode() == files.user_data
    assert content["network-config"].decode() == files.network_config

    # The same content under the Joliet and ISO 9660 names (for readers without Rock Ridge).
    iso = pycdlib.PyCdlib()
    iso.open(str(iso_path))
    try:
        assert iso.has_rock_ridge() and iso.has_joliet()
        for name, iso_name in (("meta-data", "/METADATA.;1"), ("user-data", "/USERDATA.;1"),
                               ("network-config", "/NETWORKCONFIG.;1")):
            for kwargs in ({"joliet_path": f"/{name}"}, {"iso_path": iso_name}):
                buf = io.BytesIO()
                iso.get_file_from_iso_fp(buf, **kwargs)
                assert buf.getvalue() == content[name]
    finally:
        iso.close()


def test_meta_data(user_key: keys.KeyPair, host_keys: keys.HostKeys) -> None:
    files = cloudinit.render_seed(_spec(user_key, host_keys))
    assert yaml.safe_load(files.meta_data) == {"instance-id": "i-0123", "local-hostname": "web1"}


def test_network_config_by_mac_and_by_name(user_key: keys.KeyPair, host_keys: keys.HostKeys) -> None:
    files = cloudinit.render_seed(_spec(user_key, host_keys))
    assert yaml.safe_load(files.network_config) == {
        "version": 2,
        "ethernets": {"nat0": {"match": {"macaddress": MAC}, "dhcp4": True, "dhcp6": False}},
    }
    files = cloudinit.render_seed(_spec(user_key, host_keys, mac=None))
    net = yaml.safe_load(files.network_config)
    assert net["ethernets"]["nat0"]["match"] == {"name": "e*"}


def test_user_data_content(tmp_path: Path, user_key: keys.KeyPair, host_keys: keys.HostKeys) -> None:
    cloudinit.make_seed_iso(tmp_path / "seed.iso", _spec(user_key, host_keys))
    cfg = _cloud_config(cloudinit.read_seed_iso(tmp_path / "seed.iso")["user-data"].decode())
    assert cfg["hostname"] == "web1"
    assert cfg["locale"] is False
    assert cfg["manage_etc_hosts"] is True
    [user] = cfg["users"]
    assert user["name"] == "vmkit"
    assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["lock_passwd"] is True
    assert user["ssh_authorized_keys"] == [user_key.public_openssh]
    # Host keys pinned from the first boot: exactly ours, no others generated.
    pair = host_keys.keys[0]
    assert cfg["ssh_keys"] == {"ed25519_private": pair.private_openssh, "ed25519_public": pair.public_openssh}
    assert cfg["ssh_genkeytypes"] == ["ed25519"]
    assert cfg["ssh_deletekeys"] is True
    # First-boot trims
    assert cfg["no_ssh_fingerprints"] is True
    assert cfg["ssh"] == {"emit_keys_to_console": False}
    assert cfg["package_update"] is False and cfg["package_upgrade"] is False
    assert cfg["final_message"].startswith(cloudinit.FINAL_MARKER)
    # Private keys are readable YAML blocks
    assert "ed25519_private: |" in cloudinit.render_seed(_spec(user_key, host_keys)).user_data


def test_without_host_keys_generates_ed25519_only(user_key: keys.KeyPair) -> None:
    files = cloudinit.render_seed(_spec(user_key, None))
    cfg = _cloud_config(files.user_data)
    assert "ssh_keys" not in cfg
    assert cfg["ssh_genkeytypes"] == ["ed25519"]


def test_merge_rule() -> None:
    base = {"a": {"x": 1, "y": [1]}, "l": [1, 2], "s": "base", "keep": True}
    extra = {"a": {"y": [2], "z": 3}, "l": [3], "s": "user", "new": None}
    merged = cloudinit.merge_user_data(base, extra)
    assert merged == {"a": {"x": 1, "y": [1, 2], "z": 3}, "l": [1, 2, 3], "s": "user", "keep": True,
                      "new": None}
    assert base == {"a": {"x": 1, "y": [1]}, "l": [1, 2], "s": "base", "keep": True}  # untouched
    # type mismatch: the user's value wins
    assert cloudinit.merge_user_data({"k": [1]}, {"k": "x"}) == {"k": "x"}


def test_extra_cloud_config_is_merged(user_key: keys.KeyPair, host_keys: keys.HostKeys) -> None:
    extra = ("#cloud-config\nruncmd:\n  - [touch, /tmp/ran]\nusers:\n  - name: bob\n"
             "locale: en_US.UTF-8\nwrite_files:\n  - path: /etc/x\n    content: hi\n")
    cfg = _cloud_config(cloudinit.render_seed(_spec(user_key, host_keys, extra_user_data=extra)).user_data)
    assert cfg["runcmd"] == [["touch", "/tmp/ran"]]
    assert [u["name"] if isinstance(u, dict) else u for u in cfg["users"]] == ["vmkit", "bob"]
    assert cfg["locale"] == "en_US.UTF-8"  # user values win
    assert cfg["write_files"] == [{"path": "/etc/x", "content": "hi"}]
    assert cfg["ssh_keys"]["ed25519_public"] == host_keys.keys[0].public_openssh


def test_extra_mapping_is_merged(user_key: keys.KeyPair, host_keys: keys.HostKeys) -> None:
    cfg = _cloud_config(cloudinit.render_seed(
        _spec(user_key, host_keys, extra_user_data={"ssh": {"emit_keys_to_console": True}, "timezone": "UTC"})
    ).user_data)
    assert cfg["ssh"] == {"emit_keys_to_console": True}
    assert cfg["timezone"] == "UTC"


def test_extra_script_becomes_multipart(tmp_path: Path, user_key: keys.KeyPair,
                                        host_keys: keys.HostKeys) -> None:
    script = "#!/bin/sh\necho hello > /tmp/hello\n"
    cloudinit.make_seed_iso(tmp_path / "s.iso", _spec(user_key, host_keys, extra_user_data=script))
    raw = cloudinit.read_seed_iso(tmp_path / "s.iso")["user-data"].decode()
    msg = email.message_from_string(raw)
    assert msg.is_multipart()
    parts = [p for p in msg.walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/x-shellscript"]
    cfg = _cloud_config(parts[0].get_payload(decode=True).decode())
    assert cfg["users"][0]["name"] == "vmkit"
    assert parts[1].get_payload(decode=True).decode() == script


@pytest.mark.parametrize("extra,match", [
    ("#cloud-config\n- a list\n", "must be a YAML mapping"),
    ("#cloud-config\nkey: [unclosed\n", "not valid YAML"),
    ("just text\n", "unsupported user-data"),
])
def test_bad_extra_user_data(user_key: keys.KeyPair, host_keys: keys.HostKeys, extra: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        cloudinit.render_seed(_spec(user_key, host_keys, extra_user_data=extra))


def test_empty_extra_cloud_config(user_key: keys.KeyPair, host_keys: keys.HostKeys) -> None:
    plain = cloudinit.render_seed(_spec(user_key, host_keys)).user_data
    assert cloudinit.render_seed(_spec(user_key, host_keys, extra_user_data="#cloud-config\n")).user_data == plain


def test_validation_reports_every_problem(user_key: keys.KeyPair) -> None:
    spec = cloudinit.SeedSpec(instance_id="has space", hostname="bad_name", authorized_keys=("nokey",),
                              user="Root", mac="52:54:00:zz:00:00")
    with pytest.raises(ConfigError) as info:
        cloudinit.render_seed(spec)
    fields = {p.field for p in info.value.problems}
    assert fields == {"hostname", "user", "instance_id", "mac", "authorized_keys[0]"}


def test_write_is_atomic_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "seed.iso"
    target.write_bytes(b"old")
    with pytest.raises(ConfigError):
        cloudinit.write_seed_iso(target, {"meta-data": "x", "user-data": "y", "bogus": "z"})
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]
    with pytest.raises(ConfigError, match="at least meta-data and user-data"):
        cloudinit.write_seed_iso(target, {"meta-data": "x"})


def test_instance_ids_are_unique() -> None:
    ids = {cloudinit.new_instance_id() for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("i-") for i in ids)
