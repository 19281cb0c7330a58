"""Unit tests (no QEMU): clone and port add on stopped instances."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmkit.backends.local import control
from vmkit.config import parse_config
from vmkit.errors import ConfigError


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMKIT_HOME", str(tmp_path / "home"))
    return tmp_path


def make(home: Path, name: str, **extra: object) -> None:
    kernel = home / "vmlinuz"
    kernel.write_bytes(b"k")
    control.create(parse_config({"name": name, "boot": {"kernel": str(kernel)},
                                 "network": {"mac": "52:54:00:00:00:01"}, **extra}))


def test_port_add_on_a_stopped_machine_is_recorded(home: Path) -> None:
    make(home, "a")
    fwd = control.port_add("a", "127.0.0.1:18080:80")
    assert (fwd.host_port, fwd.guest_port) == (18080, 80)
    assert [f.host_port for f in control.port_list("a")] == [18080]
    with pytest.raises(ConfigError, match="already forwarded"):
        control.port_add("a", "18080:81")
    with pytest.raises(ConfigError, match="not a port forward"):
        control.port_add("a", "eighty")


def test_clone_copies_instance_disks_and_refuses_shared_writable_ones(home: Path) -> None:
    outside = home / "outside.raw"
    outside.write_bytes(b"\0" * 4096)
    make(home, "ext", storage=[{"attachment": {"type": "disk-image", "path": str(outside)}}])
    with pytest.raises(ConfigError, match="outside"):
        control.clone("ext", "ext2")
    assert not (home / "home" / "instances" / "ext2").exists()  # nothing half-made

    make(home, "src")
    inner = home / "home" / "instances" / "src" / "data.raw"
    inner.write_bytes(b"DATA" + b"\0" * 4092)
    control.port_add("src", "18081:80")
    cfg = control.get("src").load_config()
    control.get("src").save_config(cfg.model_copy(update={"storage": parse_config({
        "name": "x", "boot": {"kernel": str(home / "vmlinuz")},
        "storage": [{"attachment": {"type": "disk-image", "path": str(inner)}}]}).storage}))
    inst, notes = control.clone("src", "dst")
    new = inst.load_config()
    assert new.name == "dst"
    assert new.network is not None and new.network.mac != "52:54:00:00:00:01" and new.network.forwards == ()
    assert any("18081" in n for n in notes)
    copied = new.storage[0].attachment.path  # type: ignore[union-attr]
    assert copied == inst.dir / "data.raw" and copied.read_bytes()[:4] == b"DATA"


def test_a_taken_ssh_port_moves_at_start(tmp_path: Path) -> None:
    """The SSH forward is chosen at create: a program that takes the port before the start must not
    make the start fail; the forward moves to a free port and ssh_config follows."""
    import socket as sk

    from vmkit.config import parse_config
    from vmkit.host.provision import SEED, claim_ssh_port, ssh_port, write_ssh_config

    inst = tmp_path / "web"
    inst.mkdir()
    (inst / SEED).write_bytes(b"seed")
    with sk.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        taken = squatter.getsockname()[1]
        cfg = parse_config({"name": "web", "boot": {"kernel": "/boot/vmlinuz"},
                            "network": {"forwards": [{"host_port": taken, "guest_port": 22},
                                                     {"host_port": 8080, "guest_port": 80}]}})
        write_ssh_config(inst, "web", taken)
        new, note = claim_ssh_port(inst, cfg)
        assert note is not None and str(taken) in note
        port = ssh_port(new)
        assert port != taken and f"Port {port}" in (inst / "ssh_config").read_text()
        assert [f.host_port for f in new.network.forwards if f.guest_port == 80] == [8080]  # others untouched
    same, nothing = claim_ssh_port(inst, new)  # a free port stays as it is
    assert nothing is None and same == new
