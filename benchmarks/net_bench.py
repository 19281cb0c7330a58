"""Network throughput and latency: virtio-net on a vmkit network against QEMU's user-mode NAT and an
emulated e1000, between two Debian guests and from a guest to the host; and the time from
``vmkit start`` until a guest resolves and reaches another by name.

One pair of ``debian-12`` guests (``s`` serves, ``c`` measures), each with three NICs:

  virtio  on vmkit network ``nbv`` (nat; virtio-net-pci, the default)
  e1000   on vmkit network ``nbe`` (nat; ``--network nbe,model=e1000``: the emulated Intel card)
  user    QEMU's user-mode NAT (slirp; virtio-net-pci). Two guests cannot reach each other there: ``c``
          goes to the host (10.0.2.2) and through ``s``'s host port forward to its iperf3.

Per path, iperf3 (``-t SECONDS``, TCP, one stream, ``c`` sends) gives Mbit/s as received, and an
ICMP echo (20, 0.2 s apart; from Python, the image has no ping) the average round trip (user-mode
NAT: only its own gateway answers ICMP, so guest to guest is n/a there). Guest to host: an iperf3
server on the host (port 5301, all local addresses; the guests reach it at their network's gateway,
or at 10.0.2.2 through the NAT).

The start-to-name time: ``s`` runs; ``vmkit start c`` is launched, and as soon as it returns the
guest pings ``s`` by name (one ICMP echo, again every 0.2 s) until it answers.

Everything runs under TCG on a shared host: figures are noisy; the load average is printed.

    .venv/bin/python benchmarks/net_bench.py [--seconds 5] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import contextlib

import vmkit
from _table import print_table
from vmkit.errors import VmkitError
from vmkit.host.provision import free_port
from vmkit.net.probes import PING, iperf3_client_argv, parse_iperf3

HOST_PORT = 5301


def guest(inst: vmkit.Instance, argv: list[str], timeout: float = 120) -> str:
    res = inst.exec(argv, timeout=timeout)
    if res.exit_code != 0:
        raise RuntimeError(f"{inst.name}: {' '.join(argv)} failed ({res.exit_code}): {res.stderr.decode()}")
    return res.stdout.decode()


def iperf(c: vmkit.Instance, addr: str, port: int, seconds: int) -> float:
    out = guest(c, iperf3_client_argv(addr, port, seconds), timeout=seconds + 60)
    return parse_iperf3(out) / 1e6


def ping_ms(c: vmkit.Instance, addr: str) -> float:
    out = guest(c, ["python3", "-c", PING, addr, "20"], timeout=60)
    m = re.search(r"avg_ms=([\d.]+)", out)
    if not m:
        raise RuntimeError(f"no ping summary: {out}")
    return float(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("vmkit nat networks need root: run as root", file=sys.stderr)
        return 2
    home = Path(tempfile.mkdtemp(prefix="vmkit-netbench-"))
    client = vmkit.Client(home=home)
    host_iperf = subprocess.Popen(["iperf3", "-s", "-p", str(HOST_PORT)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    fwd = free_port()
    try:
        nv = client.create_network("nbv", mode="nat")
        ne = client.create_network("nbe", mode="nat")
        nics = ["user", "nbv", "nbe,model=e1000"]
        s = client.create("s", image="debian-12", networks=nics, ports=[f"127.0.0.1:{fwd}:5201"])
        c = client.create("c", image="debian-12", networks=nics)
        for inst in (s, c):  # a loaded TCG host boots slowly: give the readiness check more time
            vm_yaml = inst.directory / "vm.yaml"
            config = yaml.safe_load(vm_yaml.read_text())
            config["readiness"]["timeout"] = 1200
            vm_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
        t0 = time.monotonic()
        s.start()
        print(f"s up in {time.monotonic() - t0:.0f} s", flush=True)
        t0 = time.monotonic()
        c.start()
        started = time.monotonic() - t0
        while True:
            res = c.exec(["python3", "-c", PING, "s", "1"], timeout=30)
            if res.exit_code == 0:
                break
            time.sleep(0.2)
        by_name = time.monotonic() - t0
        guest(s, ["iperf3", "-s", "-D"])
        time.sleep(1)
        addr = {n: a for n, a in s.row().addresses.items()}
        paths: list[tuple[str, str, str, int, str | None]] = [
            # (label, kind, iperf address, port, ping address)
            ("guest-guest", "virtio (vmkit nat)", addr["nbv"], 5201, addr["nbv"]),
            ("guest-guest", "e1000 (vmkit nat)", addr["nbe"], 5201, addr["nbe"]),
            ("guest-guest", "user-mode NAT", "10.0.2.2", fwd, None),
            ("guest-host", "virtio (vmkit nat)", nv.gateway, HOST_PORT, nv.gateway),
            ("guest-host", "e1000 (vmkit nat)", ne.gateway, HOST_PORT, ne.gateway),
            ("guest-host", "user-mode NAT", "10.0.2.2", HOST_PORT, "10.0.2.2"),
        ]
        results: dict[tuple[str, str], dict[str, Any]] = {}
        for _ in range(args.repeat):
            for label, kind, a, port, _p in paths:
                r = results.setdefault((label, kind), {"mbit": [], "ping": None})
                r["mbit"].append(iperf(c, a, port, args.seconds))
        for label, kind, _a, _port, p in paths:
            results[(label, kind)]["ping"] = ping_ms(c, p) if p else None
        rows = []
        for label in ("guest-guest", "guest-host"):
            base = statistics.median(results[(label, "user-mode NAT")]["mbit"])
            e1000 = statistics.median(results[(label, "e1000 (vmkit nat)")]["mbit"])
            for kind in ("virtio (vmkit nat)", "e1000 (vmkit nat)", "user-mode NAT"):
                r = results[(label, kind)]
                med = statistics.median(r["mbit"])
                rows.append([label, kind, f"{med:.0f}", f"{max(r['mbit']):.0f}",
                             f"{r['ping']:.2f}" if r["ping"] is not None else "n/a",
                             f"{med / base:.2f}x", f"{med / e1000:.2f}x"])
        print()
        print(f"iperf3 TCP, {args.seconds} s x {args.repeat}, one stream (Mbit/s received); ping: average of 20")
        print_table(["path", "NIC / network", "Mbit/s med", "best", "ping ms", "vs NAT", "vs e1000"], rows, left=2)
        print()
        print_table(["start-to-name", "seconds"], [["`vmkit start c` returned", f"{started:.1f}"],
                                                   ["c pinged s by name", f"{by_name:.1f}"]])
        print()
        print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    finally:
        for name in ("c", "s"):
            with contextlib.suppress(VmkitError):
                client.delete(name, force=True)
        for net in ("nbv", "nbe"):
            with contextlib.suppress(VmkitError):
                client.delete_network(net, force=True)
        host_iperf.kill()
        host_iperf.wait()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
