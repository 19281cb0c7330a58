"""A local machine in another tool's terms: ``vmkit export NAME --libvirt`` (its libvirt domain XML).

The files stay where vmkit keeps them (kernel, initrd, disks, shares), so the XML suits the
system libvirtd of this host (``virsh -c qemu:///system define``); the serial console is logged
to libvirt's log directory. NICs on bridged vmkit networks plug into the network's bridge
(``vmkbr-NAME``); a rootless network has no bridge libvirt could use and is refused by name. The
domain type follows vmkit's own choice of accelerator on this host (``qemu`` under TCG).
"""

from __future__ import annotations

from vmkit.config import MachineConfig
from vmkit.errors import ConfigError, NotFoundError, Problem
from vmkit.host.instance import Instance
from vmkit.libvirt import domain
from vmkit.libvirt.domain import DomainType, NicTarget, domain_xml
from vmkit.net.store import NetworkStore
from vmkit.runtime.qemu import accel as accel_mod


def nic_targets(config: MachineConfig, store: NetworkStore | None = None) -> dict[str, NicTarget]:
    """Where each of the machine's vmkit-network NICs plugs in under libvirt: its network's bridge."""
    store = store or NetworkStore()
    out: dict[str, NicTarget] = {}
    problems: list[Problem] = []
    for i, iface in enumerate(config.networks):
        try:
            net = store.get(iface.network, field=f"networks[{i}].network")
        except NotFoundError:
            problems.append(Problem(f"networks[{i}].network", f"vmkit network {iface.network!r} does not exist "
                                    "any more: create it again, or leave it (vmkit network leave)"))
            continue
        if not net.bridged:
            problems.append(Problem(f"networks[{i}].network", f"{iface.network!r} is a rootless network (a "
                                    "userspace switch vmkit's supervisor connects to): libvirt can only plug into "
                                    "bridged networks (nat, isolated, routed)"))
            continue
        out[iface.network] = NicTarget("bridge", net.bridge)
    if problems:
        raise ConfigError(problems, context="libvirt domain")
    return out


def libvirt_xml(name: str, *, hostfwd: bool = False) -> str:
    """The libvirt domain XML of machine ``name`` (raises ConfigError naming what libvirt cannot express).
    ``hostfwd``: leave the user-mode port forwards out, for :func:`hostfwd_commands` to add them to the
    running domain (libvirt 9.0 has no element for them)."""
    inst = Instance(name).require()
    config = inst.load_config()
    domain_type: DomainType | None = None  # accel: kvm or tcg name the type themselves
    if config.accel == "auto":
        domain_type = "kvm" if accel_mod.choose("auto").name == "kvm" else "qemu"
    return domain_xml(config, domain_type=domain_type, nics=nic_targets(config),
                      forwards="hostfwd" if hostfwd else "refuse")


def hostfwd_commands(name: str) -> list[list[str]]:
    """The ``virsh`` commands that add machine ``name``'s port forwards to its running domain."""
    config = Instance(name).require().load_config()
    return [["virsh", "qemu-monitor-command", "--hmp", name, cmd] for cmd in domain.hostfwd_commands(config)]
