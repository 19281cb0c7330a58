"""The host side of bridged networks: links (``ip``), the nftables table (``nft``), dnsmasq, taps.

Argument lists only, never a shell; every name passed here was validated (see
:mod:`vmkit.net.definition`). Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vmkit.errors import HostError
from vmkit.fsutil import atomic_write
from vmkit.net.definition import BRIDGE_PREFIX, TABLE_PREFIX, TAP_PREFIX, NetworkDef, bridge_mac, bridge_name

ALIAS_PREFIX = "vmkit:"
"""A vmkit bridge's alias: ``vmkit:<network dir>``, so a leftover can be traced to its definition."""

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


def _run(argv: list[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    tool = argv[0]
    if shutil.which(tool) is None:
        package = {"nft": "nftables", "dnsmasq": "dnsmasq-base", "ip": "iproute2"}.get(tool, tool)
        raise HostError(f"{tool} is not installed (vmkit networks need it)", hint=f"apt-get install {package}")
    res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise HostError(f"{' '.join(argv[:4])} failed: {res.stderr.strip() or res.stdout.strip()}",
                        hint="vmkit networks need root (CAP_NET_ADMIN); see `vmkit network inspect`")
    return res


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise HostError(f"{what} needs root: vmkit creates a bridge, taps and an nftables table",
                        hint="run vmkit as root (sudo), or use a rootless network: "
                             "vmkit network create NAME --mode rootless")


# -- links -------------------------------------------------------------------------------------------
def links() -> list[dict[str, Any]]:
    res = _run(["ip", "-j", "link", "show"])
    out: list[dict[str, Any]] = json.loads(res.stdout or "[]")
    return out


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def bridge_alias(name: str) -> str | None:
    try:
        text = Path("/sys/class/net", name, "ifalias").read_text().strip()
    except OSError:
        return None
    return text or None


def create_bridge(net: NetworkDef, netdir: Path) -> None:
    """The network's bridge with the gateway address (idempotent: an existing one is kept)."""
    br = net.bridge
    if not link_exists(br):
        _run(["ip", "link", "add", "name", br, "address", bridge_mac(net.name), "type", "bridge"])
    _run(["ip", "link", "set", "dev", br, "alias", f"{ALIAS_PREFIX}{netdir}"])
    cidr = f"{net.gateway}/{net.network.prefixlen}"
    have = _run(["ip", "-j", "-4", "addr", "show", "dev", br]).stdout
    if cidr not in {f"{a['local']}/{a['prefixlen']}" for i in json.loads(have or "[]") for a in i.get("addr_info", [])}:
        _run(["ip", "addr", "add", cidr, "dev", br])
    _run(["ip", "link", "set", "dev", br, "up"])


def delete_link(name: str) -> bool:
    if not link_exists(name):
        return False
    _run(["ip", "link", "delete", "dev", name], check=False)
    return True


def open_tap(name: str, bridge: str) -> int:
    """A tap named ``name`` on ``bridge``, returned as an open file descriptor (close-on-exec; pass
    it to QEMU). Not persistent: the kernel removes the tap when the last descriptor closes, so a
    crash of the supervisor and QEMU leaves no tap behind."""
    if link_exists(name):  # a persistent tap of that name, made by hand or by an old vmkit
        _run(["ip", "link", "delete", "dev", name], check=False)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        _run(["ip", "link", "set", "dev", name, "master", bridge])
        _run(["ip", "link", "set", "dev", name, "up"])
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- routes --------------------------------------------------------------------------------------------
def host_routes() -> list[tuple[ipaddress.IPv4Network, str]]:
    """The host's IPv4 routes (main table) other than the default route: (destination, device)."""
    res = _run(["ip", "-j", "-4", "route", "show"], check=False)
    out = []
    for r in json.loads(res.stdout or "[]"):
        dst = r.get("dst", "")
        if dst in ("default", ""):
            continue
        with contextlib.suppress(ValueError):
            out.append((ipaddress.IPv4Network(dst, strict=False), str(r.get("dev", ""))))
    return out


def enable_forwarding() -> None:
    path = Path("/proc/sys/net/ipv4/ip_forward")
    if path.read_text().strip() != "1":
        path.write_text("1\n")


# -- nftables ------------------------------------------------------------------------------------------
def nft_apply(ruleset: str) -> None:
    _run(["nft", "-f", "-"], input=ruleset)


def nft_tables() -> list[str]:
    """The names of vmkit's tables (family inet)."""
    if shutil.which("nft") is None:
        return []
    res = _run(["nft", "-j", "list", "tables"], check=False)
    names = []
    for item in json.loads(res.stdout or "{}").get("nftables", []):
        t = item.get("table")
        if t and t.get("family") == "inet" and str(t.get("name", "")).startswith(TABLE_PREFIX):
            names.append(str(t["name"]))
    return names


def nft_delete(table: str) -> bool:
    if table not in nft_tables():
        return False
    _run(["nft", "delete", "table", "inet", table], check=False)
    return True


def nft_counters(table: str) -> dict[str, int]:
    """Packets counted by the table's named counters."""
    res = _run(["nft", "-j", "list", "counters", "table", "inet", table], check=False)
    out = {}
    for item in json.loads(res.stdout or "{}").get("nftables", []):
        c = item.get("counter")
        if c:
            out[str(c["name"])] = int(c.get("packets", 0))
    return out


# -- dnsmasq -------------------------------------------------------------------------------------------
def dnsmasq_pid(netdir: Path) -> int | None:
    """The network's running dnsmasq (its pidfile, checked against the process's command line)."""
    try:
        pid = int((netdir / "dnsmasq.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_our_dnsmasq(pid, netdir / "dnsmasq.conf") else None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_our_dnsmasq(pid: int, conf: Path) -> bool:
    argv = _cmdline(pid)
    return bool(argv) and Path(argv[0]).name == "dnsmasq" and f"--conf-file={conf}" in argv


def dnsmasq_processes() -> list[tuple[int, Path]]:
    """Every dnsmasq vmkit started: (pid, its config file)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _cmdline(int(entry.name))
        if argv and Path(argv[0]).name == "dnsmasq":
            for a in argv:
                if a.startswith("--conf-file=") and "/networks/" in a and a.endswith("/dnsmasq.conf"):
                    out.append((int(entry.name), Path(a.removeprefix("--conf-file="))))
    return out


def drop_stale_leases(leases: Path, reserved: dict[str, str]) -> list[str]:
    """Remove from dnsmasq's lease file (``leases``, dnsmasq stopped) every lease of an address ``reserved``
    (address: MAC) for another MAC: a machine that left the network, whose address went to a new machine.
    dnsmasq would keep it until it expires, and give the new machine another address than its static one
    ("not using configured address ... because it is leased to ..."). Returns the lines removed."""
    try:
        lines = leases.read_text().splitlines()
    except FileNotFoundError:
        return []
    kept, dropped = [], []
    for line in lines:
        f = line.split()  # expiry MAC address hostname client-id
        if len(f) >= 3 and f[2] in reserved and f[1].lower() != reserved[f[2]].lower():
            dropped.append(line)
        else:
            kept.append(line)
    if dropped:
        atomic_write(leases, "".join(f"{ln}\n" for ln in kept))
    return dropped


def start_dnsmasq(netdir: Path, reserved: dict[str, str] | None = None) -> int:
    """Start (or restart) the network's dnsmasq on ``netdir/dnsmasq.conf``; it runs on its own
    (daemon) until :func:`stop_dnsmasq`. ``reserved`` (address: MAC, the static leases): leases of those
    addresses held by other MACs are dropped first (:func:`drop_stale_leases`)."""
    stop_dnsmasq(netdir)
    if reserved:
        drop_stale_leases(netdir / "leases", reserved)
    conf = netdir / "dnsmasq.conf"
    _run(["dnsmasq", f"--conf-file={conf}"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pid = dnsmasq_pid(netdir)
        if pid is not None:
            return pid
        time.sleep(0.02)
    raise HostError(f"dnsmasq for {netdir.name} did not start", hint=f"run dnsmasq --test --conf-file={conf}")


def stop_dnsmasq(netdir: Path) -> bool:
    pid = dnsmasq_pid(netdir)
    if pid is None:
        return False
    return kill_and_wait(pid)


def kill_and_wait(pid: int, timeout: float = 5.0) -> bool:
    """SIGTERM ``pid`` (SIGKILL after ``timeout``) and return once it has exited.

    Exited, not reaped: the kernel says so through a pidfd (nothing polls). A daemon's parent is
    PID 1, and a PID 1 that reaps seldom (this host's reaps about once a second) would otherwise
    keep ``/proc/PID`` of the dead process there that long: a dnsmasq restart waited 1 to 2 s."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
            if select.select([fd], [], [], timeout)[0]:
                break
    finally:
        os.close(fd)
    return True


# -- leftovers -----------------------------------------------------------------------------------------
def sweep(known_dirs: Iterable[Path] = ()) -> list[str]:
    """Remove what vmkit left on the host for networks whose definition no longer exists (its
    directory was removed, say with the whole vmkit home): bridges whose alias names a missing
    directory, tables without their bridge, dnsmasq processes whose config file is gone. Returns
    what was removed, for the user. Things of other homes whose definitions exist are kept."""
    if os.geteuid() != 0:
        return []
    known = {str(d) for d in known_dirs}
    cleaned = []
    bridges = set()
    for name in sorted(p.name for p in Path("/sys/class/net").iterdir()):
        if not name.startswith(BRIDGE_PREFIX):
            continue
        alias = bridge_alias(name) or ""
        netdir = alias.removeprefix(ALIAS_PREFIX) if alias.startswith(ALIAS_PREFIX) else ""
        if netdir and netdir not in known and not (Path(netdir) / "network.json").exists():
            delete_link(name)
            cleaned.append(f"bridge {name} (its network {netdir} is gone)")
        else:
            bridges.add(name)
    for pid, conf in dnsmasq_processes():
        if not conf.exists():
            kill_and_wait(pid)
            cleaned.append(f"dnsmasq pid {pid} (its network {conf.parent} is gone)")
    for table in nft_tables():
        network = table.removeprefix(TABLE_PREFIX)
        if bridge_name(network) not in bridges and not link_exists(bridge_name(network)):
            nft_delete(table)
            cleaned.append(f"nftables table inet {table} (its bridge is gone)")
    for name in (p.name for p in Path("/sys/class/net").iterdir()):
        if name.startswith(TAP_PREFIX) and _tap_is_persistent_orphan(name):
            delete_link(name)
            cleaned.append(f"tap {name} (no machine holds it)")
    return cleaned


def _tap_is_persistent_orphan(name: str) -> bool:
    """A tap nobody has open (vmkit's taps vanish with their last descriptor; a persistent one is left
    over from something else): its carrier is down and no process has it attached."""
    try:
        flags = int(Path("/sys/class/net", name, "tun_flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return False
    persistent = 0x0800  # IFF_PERSIST
    if not flags & persistent:
        return False
    try:
        carrier = Path("/sys/class/net", name, "carrier").read_text().strip()
    except OSError:  # reading carrier of a down link fails: nothing attached
        return True
    return carrier != "1"
