"""A vmkit network's definition and its members: pure data, names and address arithmetic.

Everything vmkit creates on the host for a network or a machine on it is named from here, so it
can always be found and removed again:

* the bridge ``vmkbr-NAME`` (or ``vmkbr-`` and 9 hex digits of a hash for names longer than 8),
* the nftables table ``inet vmkit-NAME``,
* a machine's tap ``vmkt-`` and 10 hex digits of a hash of its instance directory and NIC index
  (IFNAMSIZ: an interface name has at most 15 characters),
* the network's dnsmasq, run with ``--conf-file=<network dir>/dnsmasq.conf``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vmkit.config import check_network_name

NetworkMode = Literal["nat", "isolated", "routed", "rootless"]
MODES: tuple[NetworkMode, ...] = ("nat", "isolated", "routed", "rootless")
BRIDGE_PREFIX = "vmkbr-"
TAP_PREFIX = "vmkt-"
TABLE_PREFIX = "vmkit-"
IFNAMSIZ = 15
MIN_PREFIX, MAX_PREFIX = 16, 28
DEFAULT_POOL = ipaddress.IPv4Network("10.117.0.0/16")
"""Where networks created without ``--subnet`` get their /24."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NetworkDef(_Model):
    """One network (``$VMKIT_HOME/networks/NAME/network.json``)."""

    name: str
    mode: NetworkMode = "nat"
    subnet: str = Field(description="IPv4 CIDR; the first address is the host's (the gateway)")
    domain: str = Field(description="DNS domain the machines are found under (NAME.DOMAIN)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_network_name(v)

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        return str(parse_subnet(v))

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        return check_domain(v)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def bridge(self) -> str:
        return bridge_name(self.name)

    @property
    def table(self) -> str:
        return TABLE_PREFIX + self.name

    @property
    def bridged(self) -> bool:
        """A kernel bridge with taps (needs root); rootless networks use a userspace switch."""
        return self.mode != "rootless"

    def static_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        """Addresses given to machines as they join (the lower half after the gateway)."""
        first = self.gateway + 1
        last = self.network.network_address + self.network.num_addresses // 2 - 1
        return first, last

    def dynamic_range(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        """DHCP for guests vmkit did not place (the upper half)."""
        return (self.network.network_address + self.network.num_addresses // 2,
                self.network.broadcast_address - 1)


class Member(_Model):
    """A machine on the network: its NIC's MAC and its static address."""

    mac: str
    address: str


class Members(_Model):
    """Every machine on one network (``members.json``), by machine name."""

    machines: dict[str, Member] = {}

    def taken(self) -> set[ipaddress.IPv4Address]:
        return {ipaddress.IPv4Address(m.address) for m in self.machines.values()}

    def free_address(self, net: NetworkDef) -> ipaddress.IPv4Address | None:
        first, last = net.static_range()
        taken = self.taken()
        addr = first
        while addr <= last:
            if addr not in taken:
                return addr
            addr += 1
        return None

    def owner_of(self, address: str) -> str | None:
        return next((n for n, m in self.machines.items() if m.address == address), None)


def parse_subnet(v: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(v, strict=False)
    except ValueError:
        raise ValueError(f"{v!r} is not an IPv4 subnet: use CIDR notation, e.g. 10.117.3.0/24") from None
    if "/" not in v:
        raise ValueError(f"{v!r} has no prefix length: use CIDR notation, e.g. {v}/24")
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
        raise ValueError(f"{v!r}: give a prefix length from /{MIN_PREFIX} to /{MAX_PREFIX}")
    if str(net) != v:
        raise ValueError(f"{v!r} has host bits set: did you mean {net}?")
    if not net.is_private or net.is_loopback or net.is_link_local or net.is_multicast:
        raise ValueError(f"{v!r} is not a private subnet: use one in 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16")
    return net


def check_domain(v: str) -> str:
    labels = v.split(".") if isinstance(v, str) else []
    if not labels or len(v) > 200 or not all(check_label(x) for x in labels):
        raise ValueError(f"{v!r} is not a DNS domain: use dot-separated labels of lower-case letters, digits "
                         "and '-', e.g. lab or lab.internal")
    return v


def check_label(label: str) -> bool:
    return (0 < len(label) <= 63 and label[0].isalnum() and label[-1].isalnum()
            and all(c.isdigit() or ("a" <= c <= "z") or c == "-" for c in label))


def bridge_name(network: str) -> str:
    if len(BRIDGE_PREFIX) + len(network) <= IFNAMSIZ - 1:  # readable names stay 1 short of a hashed one
        return BRIDGE_PREFIX + network
    return BRIDGE_PREFIX + hashlib.sha256(network.encode()).hexdigest()[:IFNAMSIZ - len(BRIDGE_PREFIX)]


def tap_name(instance_dir: Path, index: int) -> str:
    digest = hashlib.sha256(f"{instance_dir}\0{index}".encode()).hexdigest()
    return TAP_PREFIX + digest[:IFNAMSIZ - len(TAP_PREFIX)]


def derive_mac(machine: str, network: str) -> str:
    """The machine's MAC on ``network``: stable (a hash of both names), unicast, locally administered
    (``52:54``, QEMU's prefix)."""
    digest = hashlib.sha256(f"{machine}\0{network}".encode()).digest()
    return "52:54:" + ":".join(f"{b:02x}" for b in digest[:4])


def bridge_mac(network: str) -> str:
    """The bridge's own MAC (fixed, so the gateway's MAC does not change as taps come and go)."""
    digest = hashlib.sha256(f"bridge\0{network}".encode()).digest()
    return "52:54:" + ":".join(f"{b:02x}" for b in digest[:4])


def dns_name_ok(machine: str) -> bool:
    """Whether a machine name can be a DNS name (machine names may hold '.', '_' and upper case)."""
    return check_label(machine.lower()) and machine == machine.lower()
