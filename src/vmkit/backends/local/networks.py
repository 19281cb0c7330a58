"""``vmkit network ...``: vmkit networks in the home (see :mod:`vmkit.net.store`), and a machine's
place on them (joining at create and start, leaving at delete)."""

from __future__ import annotations

import os
from collections.abc import Callable

from vmkit.api import models
from vmkit.config import MachineConfig
from vmkit.errors import ConfigError, StateError, VmkitError
from vmkit.host.instance import Instance
from vmkit.net.store import NetworkStore


def store() -> NetworkStore:
    return NetworkStore()


def create(name: str, *, subnet: str | None = None, mode: str = "nat", domain: str | None = None) -> models.NetworkView:
    s = store()
    s.create(name, subnet=subnet, mode=mode, domain=domain)
    return s.info(name)


def list_networks() -> list[models.NetworkView]:
    s = store()
    return [s.info(n.name) for n in s.all()]


def inspect(name: str) -> models.NetworkView:
    return store().info(name)


def machines_on(name: str) -> list[tuple[Instance, bool]]:
    """The machines of this home on network ``name``, and whether each runs."""
    out = []
    for inst in Instance.all():
        try:
            config = inst.load_config()
        except VmkitError:  # a broken vm.yaml: `vmkit list` shows it; it cannot be on a network we can tell
            config = None
        if config is not None and any(n.network == name for n in config.networks):
            out.append((inst, inst.is_supervised()))
    return out


def delete(name: str, *, force: bool = False, stop: Callable[[str], object] | None = None) -> list[str]:
    """Take the network down and remove it. Refused while machines on it run, unless ``force``
    (then ``stop`` stops each hard first). Returns what was removed from the host."""
    s = store()
    s.get(name)
    running = [inst.name for inst, live in machines_on(name) if live]
    if running and not force:
        exc = StateError(f"delete network {name}", "in use", ["unused"])
        exc.message = f"cannot delete network {name}: machines on it are running ({', '.join(running)})"
        exc.hint = f"stop them first (vmkit stop NAME), or use vmkit network delete {name} --force (stops them hard)"
        raise exc
    for machine in running:
        if stop is None:
            raise StateError(f"delete network {name}", f"in use by running machine {machine}", ["stopped"])
        stop(machine)
    return s.delete(name)


def sweep() -> list[str]:
    """Remove what vmkit left on the host for networks that no longer exist (and say what)."""
    return store().sweep()


def join_all(config: MachineConfig) -> MachineConfig:
    """Give each NIC of ``config`` on a vmkit network its MAC and address (recorded in the network's
    members and returned in the configuration; idempotent)."""
    if not config.networks:
        return config
    s = store()
    nics = []
    for i, iface in enumerate(config.networks):
        try:
            nics.append(s.join(iface.network, config.name, model=iface.model, mac=iface.mac, address=iface.address,
                               field=f"networks[{i}]"))
        except BaseException:
            for done in nics:
                s.leave(done.network, config.name)
            raise
    return config.model_copy(update={"networks": tuple(nics)})


def leave_all(config: MachineConfig) -> None:
    s = store()
    for iface in config.networks:
        s.leave(iface.network, config.name)


def check_can_start(config: MachineConfig) -> None:
    """Refuse early (before a supervisor starts) what would fail there: a network that does not exist,
    a bridged network without root."""
    s = store()
    for i, iface in enumerate(config.networks):
        net = s.get(iface.network, field=f"networks[{i}].network")
        if net.bridged and os.geteuid() != 0:
            raise ConfigError.single(f"networks[{i}].network",
                                     f"network {net.name!r} is {net.mode}: a machine on it needs root (a tap on its "
                                     "bridge); run vmkit as root, or put the machine on a rootless network")


def resolv_conf(config: MachineConfig) -> str | None:
    """The guest's /etc/resolv.conf on its vmkit networks (:meth:`NetworkStore.resolv_conf`)."""
    return store().resolv_conf(config) if config.networks else None
