"""vmkit networks in the vmkit home: ``$VMKIT_HOME/networks/NAME/`` (0700) holds ``network.json``
(the definition), ``members.json`` (each machine's MAC and static address), and while the network
is up ``dnsmasq.conf``, ``dnsmasq.pid`` and ``leases`` (bridged modes) or ``switch.sock`` and
``switch.pid`` (rootless).

A network is *defined* from ``create`` to ``delete`` and *up* while its bridge, nftables table and
dnsmasq (or, rootless, its switch) exist: ``create`` brings it up, and so does every machine start on
it (after a host reboot, say); ``delete`` takes it down. Changes hold ``networks/.lock``.

Another vmkit home (another host, for migration) can hold a network of the same name and subnet: a
machine's MAC and address live in its vm.yaml, and a start re-registers them (``join`` is idempotent).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from vmkit.config import MachineConfig, NetworkInterface, NicModel, check_network_name, validate_model
from vmkit.errors import AlreadyExistsError, ConfigError, HostError, NotFoundError
from vmkit.fsutil import atomic_write
from vmkit.host import paths
from vmkit.net import system
from vmkit.net.definition import (
    DEFAULT_POOL,
    Member,
    Members,
    NetworkDef,
    NetworkMode,
    derive_mac,
    parse_subnet,
    tap_name,
)
from vmkit.net.render import dnsmasq_conf, nft_replace
from vmkit.runtime.qemu.cmdline import NicBackend

DEF_FILE = "network.json"
MEMBERS_FILE = "members.json"


SLIRP_DNS = "10.0.2.3"
"""QEMU user-mode NAT's DNS forwarder."""


class NetworkMember(BaseModel):
    """A machine on a vmkit network: its NIC's MAC and its static address."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    machine: str
    mac: str
    address: str


class NetworkView(BaseModel):
    """A vmkit network as ``vmkit network list|inspect`` shows it (and the API's model of it, which
    :mod:`vmkit.api.models` re-exports). ``up``: its bridge, nftables table and dnsmasq (rootless:
    its switch) exist on the host."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    name: str
    mode: NetworkMode
    subnet: str
    gateway: str
    domain: str
    bridge: str | None
    up: bool
    dnsmasq_pid: int | None = None
    switch_pid: int | None = None
    directory: str
    machines: list[NetworkMember] = Field(default_factory=list)


class NetworkStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else paths.networks_dir()

    # -- files --------------------------------------------------------------------------------------
    def dir(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.dir(name) / DEF_FILE).is_file()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        paths.ensure_private_dir(self.root)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def get(self, name: str, *, field: str = "NAME") -> NetworkDef:
        try:
            check_network_name(name)
        except ValueError as exc:
            raise ConfigError.single(field, str(exc)) from None
        path = self.dir(name) / DEF_FILE
        if not path.is_file():
            raise NotFoundError("network", name, hint="see `vmkit network list`, or create it with "
                                f"`vmkit network create {name}`")
        return validate_model(NetworkDef, _read_json(path), context=str(path))

    def members(self, name: str) -> Members:
        path = self.dir(name) / MEMBERS_FILE
        if not path.is_file():
            return Members()
        return validate_model(Members, _read_json(path), context=str(path))

    def _save_members(self, name: str, members: Members) -> None:
        atomic_write(self.dir(name) / MEMBERS_FILE, members.model_dump_json(indent=2) + "\n", 0o600)

    def all(self) -> list[NetworkDef]:
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if (d / DEF_FILE).is_file():
                with contextlib.suppress(Exception):
                    out.append(self.get(d.name))
        return out

    # -- create and delete ----------------------------------------------------------------------------
    def create(self, name: str, *, subnet: str | None = None, mode: str = "nat", domain: str | None = None,
               up: bool = True) -> NetworkDef:
        """Define the network and bring it up. All or nothing: a failure leaves no definition and
        nothing on the host."""
        try:
            check_network_name(name)
        except ValueError as exc:
            raise ConfigError.single("NAME", str(exc)) from None
        if mode not in ("nat", "isolated", "routed", "rootless"):
            raise ConfigError.single("--mode", f"{mode!r} is not a network mode: use nat, isolated, routed "
                                     "or rootless")
        if mode != "rootless":
            system.require_root(f"a {mode} network")
        with self.locked():
            if self.exists(name):
                raise AlreadyExistsError("network", name, hint=f"see `vmkit network inspect {name}`, or delete it "
                                         f"first: vmkit network delete {name}")
            others = self.all()
            if subnet is None:
                net_subnet = self._pick_subnet(others, mode)
            else:
                try:
                    net_subnet = parse_subnet(subnet)
                except ValueError as exc:
                    raise ConfigError.single("--subnet", str(exc)) from None
                self._check_subnet(net_subnet, others, mode, name)
            net = validate_model(NetworkDef, {"name": name, "mode": mode, "subnet": str(net_subnet),
                                              "domain": domain or name}, context="--dns-domain")
            d = self.dir(name)
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{name}.creating."))
            try:
                staging.chmod(0o700)
                atomic_write(staging / DEF_FILE, net.model_dump_json(indent=2) + "\n", 0o600)
                atomic_write(staging / MEMBERS_FILE, Members().model_dump_json(indent=2) + "\n", 0o600)
                staging.rename(d)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            if up:
                try:
                    self._ensure_up(net)
                except BaseException:
                    self._teardown(net)
                    shutil.rmtree(d, ignore_errors=True)
                    raise
        return net

    def _pick_subnet(self, others: list[NetworkDef], mode: str) -> ipaddress.IPv4Network:
        for candidate in DEFAULT_POOL.subnets(new_prefix=24):
            if not any(candidate.overlaps(o.network) for o in others) and (
                    mode == "rootless" or not any(candidate.overlaps(r) for r, _ in system.host_routes())):
                return candidate
        raise ConfigError.single("--subnet", f"every /24 in {DEFAULT_POOL} is taken: give one with --subnet")

    def _check_subnet(self, subnet: ipaddress.IPv4Network, others: list[NetworkDef], mode: str, name: str) -> None:
        for o in others:
            if subnet.overlaps(o.network):
                raise ConfigError.single("--subnet", f"{subnet} overlaps network {o.name!r} ({o.subnet}): "
                                         "pick another subnet (or leave --subnet out to get a free one)")
        if mode == "rootless":
            return  # nothing of it reaches the host's routing table
        for route, dev in system.host_routes():
            if subnet.overlaps(route) and dev != NetworkDef(name=name, subnet=str(subnet), domain=name).bridge:
                raise ConfigError.single("--subnet", f"{subnet} clashes with the host's route to {route} "
                                         f"(dev {dev}): pick another subnet (or leave --subnet out)")

    def delete(self, name: str) -> list[str]:
        """Take the network down and remove its definition (the caller checks for running machines)."""
        with self.locked():
            net = self.get(name)
            removed = self._teardown(net)
            shutil.rmtree(self.dir(name), ignore_errors=True)
        return removed

    # -- up and down ----------------------------------------------------------------------------------
    def ensure_up(self, name: str) -> NetworkDef:
        with self.locked():
            net = self.get(name)
            self._ensure_up(net)
            return net

    def _ensure_up(self, net: NetworkDef) -> None:
        d = self.dir(net.name)
        if not net.bridged:
            if switch_pid(d) is None:
                start_switch(d)
            return
        system.require_root(f"bringing up network {net.name}")
        system.create_bridge(net, d)
        system.nft_apply(nft_replace(net))
        if net.mode in ("nat", "routed"):
            system.enable_forwarding()
        self._write_dnsmasq(net, restart=system.dnsmasq_pid(d) is None)

    def _write_dnsmasq(self, net: NetworkDef, *, restart: bool) -> None:
        d = self.dir(net.name)
        members = self.members(net.name)
        text = dnsmasq_conf(net, members, d)
        conf = d / "dnsmasq.conf"
        changed = not conf.is_file() or conf.read_text() != text
        if changed:
            atomic_write(conf, text, 0o600)
        if restart or changed:
            system.start_dnsmasq(d, {m.address: m.mac for m in members.machines.values()})

    def _teardown(self, net: NetworkDef) -> list[str]:
        d = self.dir(net.name)
        removed = []
        if not net.bridged:
            pid = switch_pid(d)
            if pid is not None:
                system.kill_and_wait(pid)
                removed.append(f"switch pid {pid}")
            return removed
        if system.stop_dnsmasq(d):
            removed.append("dnsmasq")
        if system.nft_delete(net.table):
            removed.append(f"nftables table inet {net.table}")
        if system.delete_link(net.bridge):
            removed.append(f"bridge {net.bridge}")
        return removed

    def is_up(self, net: NetworkDef) -> bool:
        d = self.dir(net.name)
        if not net.bridged:
            return switch_pid(d) is not None
        return system.link_exists(net.bridge) and system.dnsmasq_pid(d) is not None

    def sweep(self) -> list[str]:
        """Remove vmkit's leftovers on the host (see :func:`vmkit.net.system.sweep`)."""
        with self.locked():
            return system.sweep(self.dir(n.name) for n in self.all())

    # -- members --------------------------------------------------------------------------------------
    def join(self, name: str, machine: str, *, model: NicModel = "virtio", mac: str | None = None,
             address: str | None = None, field: str = "--network") -> NetworkInterface:
        """Give ``machine`` its place on the network (idempotent): a MAC (derived from the names unless
        given) and a static address (the next free one unless given). Returns the NIC for vm.yaml."""
        with self.locked():
            net = self.get(name, field=field)
            members = self.members(name)
            have = members.machines.get(machine)
            mac = mac or (have.mac if have else derive_mac(machine, name))
            if address is None:
                if have is not None:
                    address = have.address
                else:
                    free = members.free_address(net)
                    if free is None:
                        raise ConfigError.single(field, f"network {name!r} ({net.subnet}) has no free address "
                                                 "left: delete a machine on it, or use a larger network")
                    address = str(free)
            else:
                if ipaddress.IPv4Address(address) not in net.network:
                    raise ConfigError.single(field, f"{address} is not in network {name!r} ({net.subnet})")
                owner = members.owner_of(address)
                if owner is not None and owner != machine:
                    raise ConfigError.single(field, f"{address} on network {name!r} belongs to machine {owner!r}")
            for other, m in members.machines.items():
                if other != machine and m.mac == mac:
                    raise ConfigError.single(field, f"MAC {mac} on network {name!r} belongs to machine {other!r}")
            new = Member(mac=mac, address=address)
            if have != new:
                machines = {**members.machines, machine: new}
                self._save_members(name, Members(machines=machines))
                if net.bridged and self.is_up(net):
                    self._write_dnsmasq(net, restart=False)
        return NetworkInterface(network=name, model=model, mac=mac, address=address)

    def leave(self, name: str, machine: str) -> bool:
        with self.locked():
            if not self.exists(name):
                return False
            net = self.get(name)
            members = self.members(name)
            if machine not in members.machines:
                return False
            machines = {k: v for k, v in members.machines.items() if k != machine}
            self._save_members(name, Members(machines=machines))
            if net.bridged and self.is_up(net):
                self._write_dnsmasq(net, restart=False)
        return True

    def info(self, name: str) -> NetworkView:
        net = self.get(name)
        d = self.dir(name)
        members = self.members(name)
        up = self.is_up(net)
        return NetworkView(
            name=net.name, mode=net.mode, subnet=net.subnet, gateway=str(net.gateway), domain=net.domain,
            bridge=net.bridge if net.bridged else None, up=up,
            dnsmasq_pid=system.dnsmasq_pid(d) if net.bridged else None,
            switch_pid=None if net.bridged else switch_pid(d), directory=str(d),
            machines=list(NetworkMember(machine=k, mac=v.mac, address=v.address)
                           for k, v in sorted(members.machines.items())),
        )

    # -- a machine's NICs (the supervisor) --------------------------------------------------------------
    def resolv_conf(self, config: MachineConfig) -> str | None:
        """The guest's /etc/resolv.conf on its vmkit networks: each bridged network's dnsmasq (its gateway)
        and domain, then QEMU's user-mode DNS if the machine also has that NIC. None: nothing to change."""
        servers, domains = [], []
        for iface in config.networks:
            net = self.get(iface.network)
            if net.bridged:
                servers.append(str(net.gateway))
                domains.append(net.domain)
        if config.user_nic is not None:
            servers.append(SLIRP_DNS)
        if not servers:
            return None
        text = f"search {' '.join(domains)}\n" if domains else ""
        return text + "".join(f"nameserver {x}\n" for x in servers[:3])

    def attach(self, instance_dir: Path, machine: str, ifaces: tuple[NetworkInterface, ...]) -> tuple[NicBackend, ...]:
        """Bring each network up, (re)register the machine, and open its NICs' host ends: a tap on the
        bridge (an open descriptor for QEMU) or, rootless, a datagram socket path beside the switch's.
        The caller closes the tap descriptors once QEMU has its own (:func:`close_nics`)."""
        backends: list[NicBackend] = []
        try:
            for i, iface in enumerate(ifaces):
                field = f"networks[{i}].network"
                got = self.join(iface.network, machine, model=iface.model, mac=iface.mac, address=iface.address,
                                field=field)
                net = self.ensure_up(iface.network)
                if got.mac != iface.mac or got.address != iface.address:
                    raise ConfigError.single(field, f"the machine's NIC on {iface.network!r} has no MAC or address "
                                             "in vm.yaml: leave the network and join it again")
                if net.bridged:
                    system.require_root(f"a machine on network {net.name}")
                    backends.append(NicBackend(tap_fd=system.open_tap(tap_name(instance_dir, i), net.bridge)))
                else:
                    local = instance_dir / f"vnet{i}.sock"
                    with contextlib.suppress(FileNotFoundError):
                        local.unlink()
                    backends.append(NicBackend(local=local, remote=self.dir(net.name) / "switch.sock"))
        except BaseException:
            close_nics(tuple(backends))
            raise
        return tuple(backends)


def close_nics(backends: tuple[NicBackend, ...], *, sockets: bool = True) -> None:
    """Close the tap descriptors (QEMU has its own once started) and, unless ``sockets`` is false,
    remove the rootless NICs' sockets (only when QEMU does not use them: it bound them)."""
    for b in backends:
        if b.tap_fd is not None:
            with contextlib.suppress(OSError):
                os.close(b.tap_fd)
        if sockets and b.local is not None:
            with contextlib.suppress(OSError):
                b.local.unlink()


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError.single(str(path), f"cannot be read: {exc}") from None


# -- the rootless switch ----------------------------------------------------------------------------------
def switch_pid(netdir: Path) -> int | None:
    try:
        pid = int((netdir / "switch.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return pid if b"vmkit.net.switch" in argv and str(netdir).encode() in argv else None


def start_switch(netdir: Path) -> int:
    """Start the rootless network's switch (``python -m vmkit.net.switch DIR``), detached: it lives
    until the network is deleted."""
    log = (netdir / "switch.log").open("ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "vmkit.net.switch", str(netdir)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, cwd=netdir)
    finally:
        log.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (netdir / "switch.sock").exists() and switch_pid(netdir) == proc.pid:
            return proc.pid
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    raise HostError(f"the switch of network {netdir.name} did not start", hint=f"see {netdir / 'switch.log'}")

