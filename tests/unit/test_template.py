"""Warm templates without QEMU: what a template depends on (layout, image, QEMU), why a machine cannot
use one, the shell script that gives a clone its identity, and the one-use reference."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import vmkit
from vmkit.config import MachineConfig
from vmkit.errors import ImageError
from vmkit.host import provision
from vmkit.host import sshkeys as keys
from vmkit.host.cloudinit import SeedSpec, make_seed_iso
from vmkit.host.images.store import Image, ImageManifest
from vmkit.runtime.qemu.accel import AccelChoice
from vmkit.runtime.qemu.cmdline import Runtime, build_argv
from vmkit.state import template

TCG = AccelChoice("tcg", "test")


def config(name: str = "web", **fields: object) -> MachineConfig:
    base: dict[str, object] = {
        "name": name, "memory": 1 << 30, "cpus": 1, "image": "debian-12", "agent": True,
        "boot": {"kind": "linux", "kernel": "/img/vmlinuz", "initrd": "/img/initrd.img"},
        "storage": [{"kind": "virtio-blk", "id": "root",
                     "attachment": {"type": "disk-image", "path": f"/h/{name}/disk.qcow2", "format": "qcow2"}}],
        "network": {"mode": "user", "mac": "52:54:00:12:34:56",
                    "forwards": [{"host_addr": "127.0.0.1", "host_port": 2222, "guest_port": 22}]},
    }
    base.update(fields)
    return MachineConfig.model_validate(base)


def manifest(**fields: object) -> template.TemplateManifest:
    base: dict[str, object] = {
        "image": "debian-12", "image_created": 100.0, "image_recipe": "debian/4", "qemu_version": "7.2.22",
        "machine_type": "pc-q35-7.2", "memory": 1 << 30, "cpus": 1, "layout": template.layout_digest(config(), TCG),
        "has_disk": False, "created": 200.0, "boot_seconds": 30.0}
    base.update(fields)
    return template.TemplateManifest.model_validate(base)


def image(created: float = 100.0, recipe: str | None = "debian/4") -> Image:
    return Image(Path("/img"), ImageManifest(name="debian-12", kind="disk", created=created, recipe=recipe))


@pytest.fixture
def tpl(tmp_path: Path) -> template.Template:
    for f in (template.RAM, template.DEVICES):
        (tmp_path / f).write_bytes(b"x")
    return template.Template(tmp_path, manifest())


def test_layout_ignores_what_differs_between_clones() -> None:
    a = config("web", network={"mode": "user", "mac": "52:54:00:aa:bb:cc",
                               "forwards": [{"host_addr": "127.0.0.1", "host_port": 4022, "guest_port": 22}]},
               tcg_cache=128 << 20)
    assert template.layout_digest(a, TCG) == template.layout_digest(config("db"), TCG)


@pytest.mark.parametrize("change", [{"memory": 2 << 30}, {"cpus": 2}, {"balloon": False}, {"max_memory": 4 << 30},
                                    {"display": {"type": "virtio-vga"}}, {"machine": "pc"}])
def test_layout_follows_devices_memory_and_cpus(change: dict[str, object]) -> None:
    assert template.layout_digest(config(**change), TCG) != template.layout_digest(config(), TCG)


def test_layout_lists_the_ram_file_backend_and_vmgenid() -> None:
    from vmkit.runtime.qemu import cmdline, dirtysync

    lines = template.layout(config(), TCG)
    size = cmdline.ram_size(config(), dirtysync.config_ram_pad(config(), "tcg"))  # 1048584K on QEMU < 9.0
    assert f"-object memory-backend-file,id=mem,size={size}" in lines
    assert "-device vmgenid,id=vmgenid0" in lines
    assert not any("mac=" in ln or "hostfwd" in ln for ln in lines)


def test_templates_and_clones_report_no_free_pages() -> None:
    """QEMU 7.2 gives a reported free page back by punching a hole in the RAM's file, even a clone's
    copy-on-write mapping of the template's: every other clone would read zeros there."""
    assert "-device virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=off" in \
        template.layout(config(), TCG)
    plain = build_argv(config(), TCG, Runtime(qmp_fd=3, serial_fd=4))
    assert "virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on" in plain


def test_a_fitting_machine_can_use_a_current_template(tpl: template.Template) -> None:
    assert template.unusable_reasons(tpl, config(), TCG, image=image(), qemu_version=(7, 2, 22)) == []


def test_stale_templates_say_why(tpl: template.Template) -> None:
    reasons = template.stale_reasons(tpl, image(created=101.0, recipe="debian/5"), (8, 0, 0))
    assert any("rebuilt" in r and "debian/5" in r for r in reasons)
    assert any("QEMU 7.2.22" in r and "8.0.0" in r for r in reasons)
    assert any("gone" in r for r in template.stale_reasons(tpl, None, (7, 2, 22)))
    (tpl.directory / template.RAM).unlink()
    assert any("ram is missing" in r for r in template.stale_reasons(tpl, image(), (7, 2, 22)))


def test_machines_that_do_not_fit_are_told_how_to_get_a_template(tpl: template.Template) -> None:
    reasons = template.unusable_reasons(tpl, config(memory=2 << 30), TCG, image=image(), qemu_version=(7, 2, 22))
    assert any("vmkit image warm debian-12 --memory 2048M --cpus 1" in r for r in reasons)
    assert template.unusable_reasons(tpl, config(balloon=False), TCG, image=image(), qemu_version=(7, 2, 22))
    nets = config(networks=[{"network": "lan"}])  # user-mode NAT and a vmkit network: two NICs
    assert any("this machine has 2 NICs" in r for r in template.unusable_reasons(tpl, nets, TCG, image=image(),
                                                                               qemu_version=(7, 2, 22)))


def on_lan(name: str = "web", **fields: object) -> MachineConfig:
    """A machine whose one NIC is on the vmkit network ``lan`` (``vmkit create --network lan``)."""
    nic = {"network": "lan", "mac": "52:54:00:77:00:01", "address": "10.1.2.5", **fields}
    return config(name, network={"mode": "none", "mac": "52:54:00:12:34:56"}, networks=[nic])


def test_a_machine_on_one_vmkit_network_runs_the_templates_nic_there(tpl: template.Template) -> None:
    fits = on_lan()
    assert template.moves_nic(fits) and template.nic_mac(fits) == "52:54:00:77:00:01"
    assert template.layout_digest(template.clone_nic_config(fits), TCG) == tpl.manifest.layout
    assert template.unusable_reasons(tpl, fits, TCG, image=image(), qemu_version=(7, 2, 22)) == []
    e1000 = template.unusable_reasons(tpl, on_lan(model="e1000"), TCG, image=image(), qemu_version=(7, 2, 22))
    assert any("devices differ" in r for r in e1000)
    two = config(network={"mode": "none"}, networks=[{"network": "lan"}, {"network": "wan"}])
    assert any("2 NICs" in r for r in template.unusable_reasons(tpl, two, TCG, image=image(), qemu_version=(7, 2, 22)))
    blind = on_lan().model_copy(update={"agent": False})
    assert any("guest agent" in r for r in template.unusable_reasons(tpl, blind, TCG, image=image(),
                                                                     qemu_version=(7, 2, 22)))
    # the template's NAT state goes into a spare user-mode netdev, and the NIC is the network's (a tap)
    from vmkit.runtime.qemu.cmdline import NicBackend
    argv = build_argv(fits, TCG, Runtime(qmp_fd=3, serial_fd=4, nics=(NicBackend(tap_fd=9),),
                                         spare_netdev=template.SPARE_NETDEV))
    assert f"user,id={template.SPARE_NETDEV},restrict=on" in argv and "tap,id=vnet0,fd=9" in argv
    assert not any(a.startswith("user,id=net0") for a in argv)


def test_clones_with_an_agent_keep_their_own_mac(tpl: template.Template) -> None:
    t = template.Template(tpl.directory, manifest(mac="52:54:00:00:00:01"))
    assert template.clone_config(config(), t) == config()
    agentless = template.clone_config(config(agent=False), t)  # it cannot change its guest's interface
    assert agentless.network is not None and agentless.network.mac == "52:54:00:00:00:01"
    assert template.layout_digest(agentless, TCG) == template.layout_digest(config(agent=False), TCG)


def test_the_device_state_carries_the_clones_mac(tmp_path: Path) -> None:
    (tmp_path / template.RAM).write_bytes(b"")
    state = b"QEVM..virtio-net" + bytes.fromhex("525400000001") + b"..slirp" + bytes.fromhex("525400000001") + b"."
    (tmp_path / template.DEVICES).write_bytes(state)
    t = template.Template(tmp_path, manifest(mac="52:54:00:00:00:01"))
    fd = template.device_state(t, config())  # its MAC: 52:54:00:12:34:56
    with open(fd, "rb") as f:
        patched = f.read()
    assert patched == state.replace(bytes.fromhex("525400000001"), bytes.fromhex("525400123456"))
    assert len(patched) == len(state)
    (tmp_path / template.DEVICES).write_bytes(b"QEVM without the MAC")
    with pytest.raises(ImageError, match="no NIC with its MAC"):
        template.device_state(t, config())


def test_the_reference_is_used_once(tmp_path: Path, tpl: template.Template) -> None:
    template.write_reference(tmp_path, tpl)
    assert template.reference(tmp_path) == template.TemplateReference(path=str(tpl.directory))
    template.consume_reference(tmp_path)
    assert template.reference(tmp_path) is None and (tmp_path / template.USED_REFERENCE).exists()
    template.consume_reference(tmp_path)  # again: nothing to do


def test_identity_script_quotes_everything_and_parses(tmp_path: Path) -> None:
    cfg = config("web-1")
    (tmp_path / "ssh").mkdir()
    host = keys.generate_host_keys(comment="root@web-1")
    host.write(tmp_path / "ssh" / "host")
    user = keys.generate_keypair(comment="vmkit@web-1")
    user.write(tmp_path / "ssh" / "id_ed25519")
    make_seed_iso(tmp_path / provision.SEED, SeedSpec(instance_id="i-abc", hostname="web-1",
                                                      authorized_keys=(user.public_openssh,), host_keys=host,
                                                      user=provision.USER))
    script = template.identity_script(cfg, tmp_path, entropy=b"\x01" * 64, machine_id="f" * 32)
    assert subprocess.run(["sh", "-n"], input=script, text=True, check=False).returncode == 0
    assert "echo web-1 > /proc/sys/kernel/hostname\n" in script and "ffffffff" in script and "i-abc" in script
    assert host.keys[0].public_openssh in script and user.public_openssh in script
    assert "ip link" not in script and script.endswith(" 227 - - 0 -\n" + template._step("end") + "\n")  # no MAC to set
    with_mac = template.identity_script(cfg, tmp_path, entropy=b"", machine_id="0" * 32,
                                        template_mac="52:54:00:00:00:01")
    assert '"$nic" 525400123456 0 -\n' in with_mac and "s/52:54:00:00:00:01/52:54:00:12:34:56/gI" in with_mac
    assert subprocess.run(["sh", "-n"], input=with_mac, text=True, check=False).returncode == 0
    assert "networkctl" not in with_mac  # user-mode NAT: the lease moves with the MAC
    # the clock: the host's time (ns) and the clock_settime system call, in the RNG's perl
    timed = template.identity_script(cfg, tmp_path, entropy=b"\x02", machine_id="0" * 32, host_time_ns=123456789)
    assert ' 02 123456789 "$started" 227 - - 0 -' in timed
    assert ' 02 - "$started"' in template.identity_script(cfg, tmp_path, entropy=b"\x02", machine_id="0" * 32)
    # a clone on a vmkit network: its DNS, DHCP again with its MAC as client id, up, until its address is there
    lan = template.identity_script(on_lan(name="web-1"), tmp_path, entropy=b"", machine_id="0" * 32,
                                   template_mac="52:54:00:00:00:01",
                                   nic=template.CloneNic(address="10.1.2.5", resolv_conf="nameserver 10.1.2.1\n"))
    assert '"$nic" 525400770001 1 10.1.2.5\n' in lan and "ClientIdentifier=mac" in lan and "networkctl reload" in lan
    assert "nameserver 10.1.2.1" in lan
    assert lan.index('ip link set dev "$nic" down address 52:54:00:77:00:01') < lan.index("perl -e")
    assert subprocess.run(["sh", "-n"], input=lan, text=True, check=False).returncode == 0
    assert subprocess.run(["sh", "-n"], input=template.TEMPLATE_SETTLE, text=True, check=False).returncode == 0
    assert "cloud-init clean" not in script  # no user-data of its own: cloud-init does not run again
    # a root disk made larger than the template's: wait for the kernel to see 3 GiB, then grow the filesystem
    assert "grow-root" not in script
    grown = template.identity_script(cfg, tmp_path, entropy=b"", machine_id="0" * 32, root_grown_to=3 << 30)
    assert f"{template.STEP} grow-root" in grown and '-lt 6291456 ]' in grown and 'resize2fs "/dev/$part"' in grown
    assert grown.index("grow-root") > grown.index("perl -e")  # after the RNG's reseed and the clock
    assert subprocess.run(["sh", "-n"], input=grown, text=True, check=False).returncode == 0
    (tmp_path / provision.EXTRA_USER_DATA).write_text("#cloud-config\nruncmd: [[touch, /x]]\n")
    assert "cloud-init clean" in template.identity_script(cfg, tmp_path, entropy=b"", machine_id="0" * 32)


def test_identity_steps_are_timed_from_their_marks() -> None:
    err = (f"{template.STEP} hostname 10.00\n{template.STEP} mac 10.25\nip: oops\n"
           f"{template.STEP} rng-and-clock 10.75\n{template.STEP} end 11.00\n")
    assert template.step_seconds(err) == ({"hostname": 0.25, "mac": 0.5, "rng-and-clock": 0.25}, "ip: oops")


def test_the_script_finds_a_mac_in_any_case_and_its_marks_run(tmp_path: Path) -> None:
    """The MAC search and the step marks with dash (the guest's /bin/sh), on files in ``tmp_path``."""
    (tmp_path / "a.network").write_text("[Match]\nMACAddress=52:54:00:AB:CD:0E\n")
    (tmp_path / "b.network").write_text("[Match]\nName=en*\n")
    lines = template.mac_lines(config(network={"mode": "user", "mac": "52:54:00:12:34:56"}), "52:54:00:ab:cd:0e")
    search = [ln.replace("/etc/systemd/network/*", f"{tmp_path}/*") for ln in lines[3:]]
    script = "\n".join(["set -e", template._step("mac"), *search, template._step("end")]) + "\n"
    done = subprocess.run(["dash", "-s"], input=script, text=True, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.network").read_text() == "[Match]\nMACAddress=52:54:00:12:34:56\n"
    assert (tmp_path / "b.network").read_text() == "[Match]\nName=en*\n"
    steps, rest = template.step_seconds(done.stderr)
    assert list(steps) == ["mac"] and rest == ""


def test_hosts_gets_the_name_word_by_word(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n127.0.1.1 vmkit-template.local vmkit-template\n"
                     "# vmkit-templates  stay\n::1 ip6-localhost\tip6-loopback")
    script = "set -e\n" + "\n".join(template.hosts_lines("web-1", str(hosts))) + "\n"
    assert subprocess.run(["sh", "-c", script], check=False).returncode == 0
    assert hosts.read_text() == ("127.0.0.1\tlocalhost\n127.0.1.1 web-1.local web-1\n"
                                 "# vmkit-templates stay\n::1 ip6-localhost\tip6-loopback\n")


def test_seeds_are_padded_to_whole_mib(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    seed.write_bytes(b"x" * 5000)
    provision.pad_seed(seed)
    assert seed.stat().st_size == provision.SEED_PADDING


def test_warm_refuses_bad_input_naming_it(vmkit_home: Path, micro_image: Image) -> None:
    missing = vmkit("image", "warm", "no-such-image", check=False)
    assert missing.returncode == 3 and "vmkit image build" in missing.stderr
    bad = vmkit("image", "warm", "micro", "--memory", "lots", check=False)
    assert bad.returncode == 2 and "--memory" in bad.stderr
