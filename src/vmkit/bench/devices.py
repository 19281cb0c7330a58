"""``vmkit bench devices``: paravirtualized against emulated disks, fio from inside the guest.

One guest, one scratch disk per device model, each a sparse raw file on the host behind the same
QEMU block layer (cache ``writeback``: the host's page cache serves them alike, so what differs is
the device the guest drives, not the host's storage):

- ``virtio-blk`` (``virtio-blk-pci``): paravirtualized, the baseline every ratio is to;
- ``nvme``: QEMU's emulated NVMe controller (a real device's register interface, but queues in
  memory, so few exits);
- ``sata``: an emulated AHCI controller (``ich9-ahci``) with an ``ide-hd`` disk;
- ``ide``: an emulated PIIX3 IDE controller: port I/O for every command, one request at a time.

fio runs on the raw block device in the guest (``direct=1``, libaio, iodepth 16, time-based):
sequential read and write with 1 MiB blocks (MB/s) and random read and write with 4 KiB blocks
(IOPS). The disks are found in the guest by their serial numbers (``vmkit-bench-<kind>``); a
machine given with ``--machine`` must have such disks, and their contents are overwritten.
Pure parts (fio arguments, lsblk parsing, ratios, rendering, the plot) are separate from the run.

Network devices, the same contrast for NICs: ``virtio`` (virtio-net, paravirtualized: the baseline)
against the emulated ``e1000`` (an Intel 82540EM) and, with ``--nic rtl8139``, a Realtek 8139. Each NIC is on a
vmkit ``nat`` network of its own (a bridge on the host; the throw-away guest gets networks
``vmkit-bench-<model>-<hex>``, removed afterwards; this needs root), and iperf3 measures TCP, one
stream, between the guest and an iperf3 server on the host at that network's gateway, both ways
(guest to host, and host to guest with ``-R``): Mbit/s as received. With ``--machine``, its NICs on
vmkit networks are measured, one per model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vmkit.backends.local import control, networks
from vmkit.bench import guests
from vmkit.bench.fs import Measurement, parse_fio_json
from vmkit.config import format_size, parse_size
from vmkit.errors import ConfigError, Problem, VmkitError, VmTimeoutError
from vmkit.host.images.store import ImageStore
from vmkit.host.provision import free_port
from vmkit.net.probes import iperf3_client_argv, parse_iperf3

KINDS: tuple[str, ...] = ("virtio-blk", "nvme", "sata", "ide")
BASELINE = "virtio-blk"
SERIALS = {"virtio-blk": "vmkit-bench-virtio", "nvme": "vmkit-bench-nvme", "sata": "vmkit-bench-sata",
           "ide": "vmkit-bench-ide"}
"""The serial number of each benchmark disk: how the bench finds it in the guest (at most 20 characters)."""
TITLES = {"virtio-blk": "virtio-blk", "nvme": "NVMe", "sata": "SATA (AHCI)", "ide": "IDE (PIIX3)"}
IMAGE = "debian-12"
FORMAT_VERSION = 1
# the guest modules of the emulated controllers (ahci is blacklisted in the debian-12 image: q35's own
# AHCI is unused when every disk is virtio)
GUEST_MODULES = ("ahci", "ata_piix", "nvme")


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    block_size: int

    @property
    def sequential(self) -> bool:
        return not self.rw.startswith("rand")


WORKLOADS: tuple[Workload, ...] = (Workload("seqread", "read", 1 << 20), Workload("seqwrite", "write", 1 << 20),
                                   Workload("randread", "randread", 4096), Workload("randwrite", "randwrite", 4096))


@dataclass(frozen=True)
class Settings:
    size: int = 512 << 20     # each scratch disk, and the span fio works over
    runtime: int = 10         # seconds per measurement (time-based)
    iodepth: int = 16

    def __post_init__(self) -> None:
        problems = []
        if self.size < 16 << 20:
            problems.append(Problem("--size", f"{format_size(self.size)} is too small: use at least 16M"))
        if not 1 <= self.runtime <= 3600:
            problems.append(Problem("--runtime", f"{self.runtime}: use 1 to 3600 seconds"))
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "runtime": self.runtime, "iodepth": self.iodepth, "ioengine": "libaio",
                "direct": True}


def settings_for(*, quick: bool = False, size: str | None = None, runtime: int | None = None) -> Settings:
    """Full: 512M disks, 10 s per cell; ``quick``: 64M, 1 s."""
    base = Settings(size=64 << 20, runtime=1) if quick else Settings()
    size_bytes = base.size
    if size is not None:
        try:
            size_bytes = parse_size(size)
        except ValueError as exc:
            raise ConfigError.single("--size", str(exc)) from None
    return Settings(size=size_bytes, runtime=base.runtime if runtime is None else runtime)


def fio_argv(work: Workload, device: str, settings: Settings) -> list[str]:
    """fio on the raw block device ``/dev/<device>`` (a list, never a shell string)."""
    return ["fio", f"--name={work.name}", f"--filename=/dev/{device}", f"--rw={work.rw}", f"--bs={work.block_size}",
            "--ioengine=libaio", f"--iodepth={settings.iodepth}", "--direct=1", f"--size={settings.size}",
            f"--runtime={settings.runtime}", "--time_based=1", "--output-format=json"]


_DEVICE_RE = re.compile(r"[a-z][a-z0-9]{1,31}")


def parse_lsblk(output: str) -> dict[str, str]:
    """``lsblk -J -d -o NAME,SERIAL`` -> serial -> device name (``sda``, ``nvme0n1``)."""
    data = json.loads(output)
    found: dict[str, str] = {}
    for dev in data.get("blockdevices", []):
        name, serial = dev.get("name"), dev.get("serial")
        if isinstance(name, str) and isinstance(serial, str) and _DEVICE_RE.fullmatch(name):
            found.setdefault(serial.strip(), name)
    return found


@dataclass(frozen=True)
class Disk:
    """One column: a benchmark disk, and the name the guest gave it."""

    kind: str
    device: str

    @property
    def title(self) -> str:
        return TITLES.get(self.kind, self.kind)


@dataclass
class Row:
    workload: Workload
    results: dict[str, Measurement] = field(default_factory=dict)


NIC_MODELS: tuple[str, ...] = ("virtio", "e1000", "rtl8139")
NIC_BASELINE = "virtio"
DEFAULT_NICS: tuple[str, ...] = ("virtio", "e1000")
"""What runs unless ``--nic`` says otherwise: RTL8139 only when asked (in its first run, a 1 s one on a
loaded TCG host, it carried nothing from the guest to the host)."""
NET_MIN_SECONDS = 3
NET_REPEAT = 2
"""iperf3 runs per cell; the best counts (a 3 s stream in a TCG guest on a loaded host varied 50-fold)."""
"""iperf3 runs at least this long (``--runtime`` if longer): a 1 s TCP stream is mostly its handshake
and slow start."""
NIC_TITLES = {"virtio": "virtio-net", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "RTL8139"}
NETWORK_PREFIX = "vmkit-bench-"


@dataclass(frozen=True)
class Flow:
    """One direction of an iperf3 TCP stream between the guest and the host."""

    name: str
    reverse: bool  # iperf3 -R: the host sends

    @property
    def title(self) -> str:
        return "TCP host to guest" if self.reverse else "TCP guest to host"


FLOWS: tuple[Flow, ...] = (Flow("tcp-send", False), Flow("tcp-receive", True))


@dataclass(frozen=True)
class Nic:
    """One network column: a NIC model on its vmkit network, whose gateway is the host's address there."""

    model: str
    network: str
    gateway: str

    @property
    def title(self) -> str:
        return NIC_TITLES.get(self.model, self.model)


@dataclass(frozen=True)
class NetResult(guests.BestOf):
    KEY: ClassVar[str] = "bits_per_s"
    bits_per_s: float = 0.0
    error: str | None = None
    samples: tuple[float, ...] = ()
    """Every run's bits/s (the best counts: a loaded host only ever slows a stream down)."""


@dataclass
class NetRow:
    flow: Flow
    results: dict[str, NetResult] = field(default_factory=dict)


@dataclass
class Report:
    settings: Settings
    disks: list[Disk]
    rows: list[Row]
    machine: str = ""
    fio: str = ""
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    nics: list[Nic] = field(default_factory=list)
    net_rows: list[NetRow] = field(default_factory=list)
    net_skipped: str | None = None
    """Why there are no network results (None: there are, or none were asked for)."""

    def ratio(self, kind: str, work: Workload) -> float | None:
        """Bandwidth of ``kind`` over virtio-blk's for one workload (None: no pair)."""
        row = next(r for r in self.rows if r.workload == work)
        return ratio_to(row.results.get(kind), row.results.get(BASELINE))

    def net_ratio(self, model: str, flow: Flow) -> float | None:
        """Throughput of NIC ``model`` over virtio-net's in one direction (None: no pair)."""
        row = next(r for r in self.net_rows if r.flow == flow)
        a, b = row.results.get(model), row.results.get(NIC_BASELINE)
        if a is None or b is None or not a.ok or not b.ok or b.bits_per_s <= 0:
            return None
        return a.bits_per_s / b.bits_per_s

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "benchmark": "devices", "machine": self.machine, "fio": self.fio,
                "settings": self.settings.to_dict(),
                "disks": [{"kind": d.kind, "device": d.device} for d in self.disks],
                "rows": [{"workload": r.workload.name, "rw": r.workload.rw, "block_size": r.workload.block_size,
                          "results": {k: m.to_dict() for k, m in r.results.items()},
                          "ratio_to_virtio": {d.kind: _round(self.ratio(d.kind, r.workload)) for d in self.disks}}
                         for r in self.rows],
                "network": {"skipped": self.net_skipped,
                            "nics": [{"model": n.model, "network": n.network, "gateway": n.gateway}
                                     for n in self.nics],
                            "rows": [{"flow": r.flow.name, "reverse": r.flow.reverse,
                                      "results": {m: x.to_dict() for m, x in r.results.items()},
                                      "ratio_to_virtio": {n.model: _round(self.net_ratio(n.model, r.flow))
                                                          for n in self.nics}}
                                     for r in self.net_rows]},
                "notes": self.notes, "started": self.started, "finished": self.finished}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def ratio_to(m: Measurement | None, base: Measurement | None) -> float | None:
    if m is None or base is None or not m.ok or not base.ok or base.bw <= 0:
        return None
    return m.bw / base.bw


def cell_text(m: Measurement | None, work: Workload) -> str:
    if m is None:
        return "not run"
    if not m.ok:
        return f"failed: {m.error}"
    return f"{m.bw / 1e6:,.1f} MB/s" if work.sequential else f"{m.iops:,.0f} IOPS"


def table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["workload", *[d.title for d in report.disks]]
    rows = []
    for r in report.rows:
        cells = [f"{r.workload.name} ({format_size(r.workload.block_size)})"]
        for d in report.disks:
            text = cell_text(r.results.get(d.kind), r.workload)
            ratio = report.ratio(d.kind, r.workload)
            if d.kind != BASELINE and ratio is not None:
                text += f" ({guests.format_ratio(ratio)})"
            cells.append(text)
        rows.append(cells)
    return header, rows


def net_cell_text(r: NetResult | None) -> str:
    if r is None:
        return "not run"
    return f"{r.bits_per_s / 1e6:,.0f} Mbit/s" if r.ok else f"failed: {r.error}"


def net_table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the network table (empty rows: no network results)."""
    header = ["iperf3", *[n.title for n in report.nics]]
    rows = []
    for r in report.net_rows:
        cells = [r.flow.title]
        for n in report.nics:
            text = net_cell_text(r.results.get(n.model))
            ratio = report.net_ratio(n.model, r.flow)
            if n.model != NIC_BASELINE and ratio is not None:
                text += f" ({guests.format_ratio(ratio)})"
            cells.append(text)
        rows.append(cells)
    return header, rows


def footer_lines(report: Report) -> list[str]:
    s = report.settings
    lines = [f"fio {report.fio} in {report.machine or 'the guest'} on the raw block device: libaio, iodepth "
             f"{s.iodepth}, direct=1, {s.runtime} s per cell over {format_size(s.size)}; ratios are to virtio-blk "
             "(same bandwidth: 1.00x)",
             "disks: " + ", ".join(f"{d.title} = /dev/{d.device}" for d in report.disks)]
    if report.net_skipped is not None:
        lines.append(f"network: skipped: {report.net_skipped}")
    elif report.net_rows:
        lines.append(f"network: iperf3 TCP, one stream, {net_seconds(s)} s per cell, to and from an iperf3 server "
                     f"on the host at the gateway of each NIC's own vmkit nat network (Mbit/s received, best of "
                     f"{NET_REPEAT}); ratios are to "
                     "virtio-net; NICs: " + ", ".join(f"{n.title} on {n.network}" for n in report.nics))
    lines += [f"note: {n}" for n in report.notes]
    return lines


def render_markdown(report: Report) -> str:
    header, rows = table_rows(report)
    text = guests.markdown("vmkit bench devices", header, rows, footer_lines(report))
    if report.net_rows:
        nheader, nrows = net_table_rows(report)
        text += "\n" + guests.markdown("network devices", nheader, nrows, [])
    return text


def plot(report: Report, path: Path) -> Path:
    """Bars (PNG): each workload's throughput relative to virtio-blk, one bar per device model."""
    plt = guests.pyplot()
    net = bool(report.net_rows and report.nics)
    fig, axes = plt.subplots(1, 2 if net else 1, figsize=(13 if net else 8, 4.5), dpi=100, squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]} if net else None)
    ax = axes[0][0]
    width = 0.8 / max(1, len(report.disks))
    for k, d in enumerate(report.disks):
        xs = [i + (k - (len(report.disks) - 1) / 2) * width for i in range(len(report.rows))]
        ys = [report.ratio(d.kind, r.workload) or 0.0 for r in report.rows]
        bars = ax.bar(xs, ys, width, label=d.title)
        for bar, r in zip(bars, report.rows, strict=True):
            m = r.results.get(d.kind)
            if m is not None and m.ok:
                label = f"{m.bw / 1e6:.0f}" if r.workload.sequential else f"{m.iops / 1000:.1f}k"
                ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(report.rows)), [r.workload.name for r in report.rows])
    ax.set_ylabel("throughput relative to virtio-blk")
    ax.set_title(f"fio {report.fio}, libaio iodepth {report.settings.iodepth} (MB/s or IOPS above the bars)",
                 fontsize=10)
    ax.legend(fontsize=8)
    if net:
        _plot_network(axes[0][1], report)
    fig.tight_layout()
    return guests.save_plot(plt, fig, path)


def _plot_network(ax: Any, report: Report) -> None:
    width = 0.8 / len(report.nics)
    for k, n in enumerate(report.nics):
        xs = [i + (k - (len(report.nics) - 1) / 2) * width for i in range(len(report.net_rows))]
        ys = [report.net_ratio(n.model, r.flow) or 0.0 for r in report.net_rows]
        bars = ax.bar(xs, ys, width, label=n.title)
        for bar, r in zip(bars, report.net_rows, strict=True):
            res = r.results.get(n.model)
            if res is not None and res.ok:
                ax.annotate(f"{res.bits_per_s / 1e6:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(report.net_rows)), [r.flow.title.replace("TCP ", "") for r in report.net_rows])
    ax.set_ylabel("throughput relative to virtio-net")
    ax.set_title("iperf3 TCP (Mbit/s above the bars)", fontsize=10)
    ax.legend(fontsize=8)


def write_json(report: Report, path: Path) -> Path:
    return guests.write_json(report.to_json(), path)


# --------------------------------------------------------------------------- running


def bench_disk_specs(directory: Path, settings: Settings, kinds: Sequence[str] = KINDS) -> list[str]:
    """``--disk`` values of the scratch disks (sparse raw files made here)."""
    specs = []
    for kind in kinds:
        path = directory / f"{kind}.raw"
        with path.open("wb") as f:
            f.truncate(settings.size)
        specs.append(f"{path}:format=raw:kind={kind}:serial={SERIALS[kind]}")
    return specs


def find_disks(exec_: guests.Exec, kinds: Sequence[str], *, timeout: float = 60.0) -> list[Disk]:
    """Load the controllers' modules and wait until every kind's serial shows in ``lsblk``."""
    exec_(["modprobe", "-a", *GUEST_MODULES], 60.0)
    deadline = time.monotonic() + timeout
    while True:
        res = exec_(["lsblk", "-J", "-d", "-o", "NAME,SERIAL"], 30.0)
        found = parse_lsblk(guests.text(res.stdout)) if res.exit_code == 0 else {}
        missing = [k for k in kinds if SERIALS[k] not in found]
        if not missing:
            return [Disk(k, found[SERIALS[k]]) for k in kinds]
        if time.monotonic() > deadline:
            raise VmkitError(f"the guest shows no disk with serial {', '.join(SERIALS[k] for k in missing)}",
                             hint="is the controller's driver in the guest kernel? (lsblk -o NAME,SERIAL)")
        time.sleep(1.0)


def machine_kinds(name: str) -> list[str]:
    """The benchmark disks of a running machine given with ``--machine`` (by serial), in :data:`KINDS` order."""
    config, _accel = guests.running_config(name, "benchmark the disk devices")
    have = {d.serial: d.kind for d in config.storage if d.serial is not None}
    kinds: list[str] = [k for k in KINDS if have.get(SERIALS[k]) == k]
    if BASELINE not in kinds or len(kinds) < 2:
        raise ConfigError.single("--machine", f"{name} needs scratch disks with the serial vmkit-bench-<kind> "
                                 "(virtio-blk and at least one other; their contents are overwritten), e.g. "
                                 "--disk /var/tmp/b-sata.raw:kind=sata:serial=vmkit-bench-sata; "
                                 f"serials: {', '.join(f'{k}={s}' for k, s in SERIALS.items())}")
    return kinds


def guest_fio_version(exec_: guests.Exec) -> str:
    res = exec_(["fio", "--version"], 30.0)
    if res.exit_code != 0:
        raise VmkitError("fio is not installed in the guest",
                         hint="use a machine made from the debian-12 image (it has fio)")
    return guests.text(res.stdout).strip()


def measure(name: str, kinds: Sequence[str], settings: Settings, workloads: Sequence[Workload] = WORKLOADS, *,
            progress: Callable[[str], None] | None = None) -> Report:
    """Every workload on every disk of the running machine ``name`` (row by row, so the host's load
    changes hit every column alike)."""
    say = progress or (lambda _m: None)
    exec_ = guests.guest_exec(name)
    say("finding the benchmark disks in the guest")
    disks = find_disks(exec_, kinds)
    report = Report(settings, disks, [Row(w) for w in workloads], machine=name, fio=guest_fio_version(exec_))
    limit = settings.runtime * 3 + 120.0
    for row in report.rows:
        for d in disks:
            say(f"{row.workload.name} on {d.title} (/dev/{d.device})")
            try:
                res = exec_(fio_argv(row.workload, d.device, settings), limit)
            except VmTimeoutError:
                row.results[d.kind] = Measurement(error=f"no result within {limit:.0f} s")
                continue
            row.results[d.kind] = parse_fio_json(guests.text(res.stdout), guests.text(res.stderr), res.exit_code)
    report.finished = time.time()
    return report


def net_seconds(settings: Settings) -> int:
    return max(settings.runtime, NET_MIN_SECONDS)


def check_nic_models(nics: Sequence[str]) -> list[str]:
    """``--nic`` values in :data:`NIC_MODELS` order, virtio-net first (the baseline always runs)."""
    bad = [m for m in nics if m not in NIC_MODELS]
    if bad:
        raise ConfigError.single("--nic", f"{', '.join(bad)}: pick from {', '.join(NIC_MODELS)} "
                                 "(virtio, the baseline, always runs)")
    return [m for m in NIC_MODELS if m == NIC_BASELINE or m in nics]


def machine_nics(name: str, models: Sequence[str]) -> list[Nic]:
    """The NICs of machine ``name`` on vmkit networks, the first of each model in ``models``."""
    config = control.get(name).load_config()
    found: dict[str, Nic] = {}
    for iface in config.networks:
        if iface.model in models and iface.model not in found:
            found[iface.model] = Nic(iface.model, iface.network, networks.inspect(iface.network).gateway)
    return [found[m] for m in models if m in found]


def network_skip() -> str | None:
    """Why this host cannot give a throw-away guest NICs on networks of their own (None: it can)."""
    if os.geteuid() != 0:
        return "vmkit nat networks need root: run as root, or give --machine a machine with NICs on vmkit networks"
    if shutil.which("iperf3") is None:
        return "iperf3 is not installed on the host (apt-get install iperf3)"
    return None


@contextlib.contextmanager
def _iperf3_servers(nics: Sequence[Nic]) -> Any:
    """An iperf3 server on the host at each NIC's gateway (a free port each), stopped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    ports: dict[str, int] = {}
    try:
        for n in nics:
            port = free_port(n.gateway)
            procs.append(subprocess.Popen(["iperf3", "-s", "-B", n.gateway, "-p", str(port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports[n.model] = port
        for n in nics:
            _wait_listening(n.gateway, ports[n.model], procs)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_listening(address: str, port: int, procs: Sequence[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.connect((address, port))
            return
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise VmkitError(f"no iperf3 server listening on the host at {address}:{port}",
                             hint="is iperf3 installed and the network up? (vmkit network list)")
        time.sleep(0.2)


def measure_network(name: str, nics: Sequence[Nic], settings: Settings, *,
                    progress: Callable[[str], None] | None = None) -> list[NetRow]:
    """iperf3 in the guest ``name`` to and from the host, through each NIC (row by row)."""
    say = progress or (lambda _m: None)
    exec_ = guests.guest_exec(name)
    if exec_(["sh", "-c", "command -v iperf3"], 30.0).exit_code != 0:
        raise VmkitError("iperf3 is not installed in the guest", hint="use a machine made from the debian-12 image")
    rows = [NetRow(f) for f in FLOWS]
    seconds = net_seconds(settings)
    limit = seconds * 3 + 60.0
    with _iperf3_servers(nics) as ports:
        for row in rows:
            for n in nics:
                samples: list[float] = []
                for i in range(NET_REPEAT):
                    say(f"iperf3 {row.flow.title} through {n.title} ({n.network}), run {i + 1} of {NET_REPEAT}")
                    try:
                        res = exec_(iperf3_client_argv(n.gateway, ports[n.model], seconds,
                                                       reverse=row.flow.reverse), limit)
                        samples.append(parse_iperf3(guests.text(res.stdout)))
                    except VmTimeoutError:
                        row.results[n.model] = NetResult(error=f"no result within {limit:.0f} s")
                        break
                    except ValueError as exc:
                        row.results[n.model] = NetResult(error=str(exc))
                        break
                else:
                    row.results[n.model] = NetResult(max(samples), samples=tuple(samples))
    return rows


def run(settings: Settings, *, machine: str | None = None, kinds: Sequence[str] = KINDS,
        nics: Sequence[str] = DEFAULT_NICS, progress: Callable[[str], None] | None = None) -> Report:
    """``vmkit bench devices``: on ``machine`` (its vmkit-bench disks and its NICs on vmkit networks), or
    on a throw-away debian-12 guest with one scratch disk per kind and one NIC per model in ``nics``,
    each on a network of its own (all deleted afterwards, also when interrupted). ``nics`` empty: no
    network part."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or BASELINE not in kinds:
        raise ConfigError.single("--kind", f"{', '.join(bad) or 'no virtio-blk'}: pick from {', '.join(KINDS)} "
                                 "(virtio-blk is the baseline and always runs)")
    models = check_nic_models(nics) if nics else []
    if machine is not None:
        report = measure(machine, [k for k in machine_kinds(machine) if k in kinds], settings, progress=progress)
        if models:
            found = machine_nics(machine, models)
            if NIC_BASELINE not in {n.model for n in found}:
                report.net_skipped = (f"{machine} has no virtio NIC on a vmkit network to compare with: create it "
                                      "with e.g. --network NET --network NET2,model=e1000 (vmkit network create)")
            elif shutil.which("iperf3") is None:
                report.net_skipped = "iperf3 is not installed on the host (apt-get install iperf3)"
            else:
                report.nics = found
                report.net_rows = measure_network(machine, found, settings, progress=progress)
        report.finished = time.time()
        return report
    if not ImageStore().exists(IMAGE):
        raise VmkitError(f"no {IMAGE} image", hint=f"build it: vmkit image build {IMAGE}")
    net_skipped = network_skip() if models else None
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="vmkit-benchdev-") as tmp:
        made: list[Nic] = []
        if models and net_skipped is None:
            stack.callback(_delete_networks, made)
            for m in models:
                net = f"{NETWORK_PREFIX}{m}-{secrets.token_hex(3)}"
                view = networks.create(net, mode="nat")
                made.append(Nic(m, net, view.gateway))
        specs = bench_disk_specs(Path(tmp), settings, kinds)
        nic_specs = ["user", *[n.network if n.model == NIC_BASELINE else f"{n.network},model={n.model}"
                               for n in made]] if made else []
        with guests.throwaway("dev", image=IMAGE, cpus=2, disks=specs, networks=nic_specs,
                              progress=progress) as name:
            report = measure(name, kinds, settings, progress=progress)
            if made:
                report.nics = made
                report.net_rows = measure_network(name, made, settings, progress=progress)
            report.net_skipped = net_skipped
            with contextlib.suppress(VmkitError):
                uname = guests.guest_exec(name)(["uname", "-r"], 30.0)
                report.notes.append(f"guest kernel {guests.text(uname.stdout).strip()}")
            report.machine = f"a throw-away {IMAGE} guest"
    report.finished = time.time()
    return report


def _delete_networks(made: Sequence[Nic]) -> None:
    for n in made:
        with contextlib.suppress(VmkitError):
            control.delete_network(n.network, force=True)
