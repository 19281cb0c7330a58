"""A running machine's resources: ``vmkit set`` (change them live), ``vmkit stats`` (see them) and
``vmkit top`` (every running machine, live)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer

from vmkit.cli.output import client, machine, out, print_json
from vmkit.errors import ConfigError, Problem


def register(app: typer.Typer) -> None:
    app.command("set")(set_)
    app.command()(stats)
    app.command()(top)


def set_(
    name: str,
    cpus: int | None = typer.Option(
        None, "--cpus", help="give it this many vCPUs (1 to its max_cpus), live; vm.yaml follows (a stopped "
                             "machine gets them at its next start). Lower under TCG: offlined in the guest "
                             "through its agent, unplugged at the next boot"),
    memory: str | None = typer.Option(
        None, "--memory", help="give it this much memory (e.g. 3G: its boot memory up to its max_memory) through "
                               "its virtio-mem region, live; vm.yaml follows"),
    balloon: str | None = typer.Option(
        None, "--balloon", help="move the guest's usable memory to SIZE (e.g. 256M; at most its memory, at least "
                                "64M) with the memory balloon, live; lasts until the machine stops"),
    balloon_min: str | None = typer.Option(
        None, "--balloon-min", help="automatic ballooning leaves the guest at least SIZE (vm.yaml; holds at once)"),
    balloon_shares: int | None = typer.Option(
        None, "--balloon-shares", help="automatic ballooning: its share of the host's memory (default 1000; 0: "
                                       "leave its balloon alone; vm.yaml; holds at once)"),
    timeout: float | None = typer.Option(None, "--timeout", help="seconds to wait for the guest to get there "
                                         "(default: 30 for --cpus, 10 for --memory and --balloon)"),
    cpu_weight: str | None = typer.Option(None, "--cpu-weight", help="CPU weight 1-10000 against other machines "
                                                                     "(default 100; none removes it)"),
    cpu_max: str | None = typer.Option(None, "--cpu-max", help="CPU cap in percent of one host core (e.g. 50)"),
    cpu_pin: str | None = typer.Option(None, "--cpu-pin", help="host CPUs to run on, e.g. 0-1,3 (each running vCPU "
                                                               "pinned to one of them in turn)"),
    memory_min: str | None = typer.Option(None, "--memory-min", help="memory reservation (v2 memory.min; v1: "
                                                                     "soft limit)"),
    memory_high: str | None = typer.Option(None, "--memory-high", help="reclaim and throttle above this"),
    memory_max: str | None = typer.Option(None, "--memory-max", help="hard limit of QEMU and its helpers "
                                                                     "(at least memory + 128M)"),
    swap_max: str | None = typer.Option(None, "--swap-max", help="host swap the machine may use"),
) -> None:
    """Change a machine's resources: live while it runs (everything is also kept in vm.yaml; on a stopped
    machine it applies at its next start). Give `none` to remove a limit."""
    limits = {k: v for k, v in {"cpu_weight": cpu_weight, "cpu_max": cpu_max, "cpu_pin": cpu_pin,
                                "memory_min": memory_min, "memory_high": memory_high, "memory_max": memory_max,
                                "swap_max": swap_max}.items() if v is not None}
    if cpus is None and memory is None and balloon is None and not limits and balloon_min is None \
            and balloon_shares is None:
        raise ConfigError.single("--cpus", "say what to change, e.g. --cpus 2, --memory 2G, --balloon 256M "
                                 "or --cpu-max 50")
    if limits:
        _set_limits(name, limits)
    if balloon_min is not None or balloon_shares is not None:
        _set_balloon_policy(name, balloon_min, balloon_shares)
    _set_hotplug(name, cpus, memory, timeout)
    if balloon is not None:
        _set_balloon(name, balloon, 10.0 if timeout is None else timeout)


def _set_hotplug(name: str, cpus: int | None, memory: str | None, timeout: float | None) -> None:
    """``--cpus`` and ``--memory``: vCPU hot-plug and virtio-mem (see vmkit.runtime.vcpus and .hotmem)."""
    inst = machine(name)
    if cpus is not None:
        with _option("cpus", "--cpus"):
            c = inst.set_cpus(cpus, timeout=30.0 if timeout is None else timeout)
        if c.vcpus_online is None:
            out.print(f"[bold]{name}[/] is stopped: vm.yaml now says cpus: {c.cpus} (from its next start)")
        else:
            def ids(xs: list[int]) -> str:
                return f"vCPU {', '.join(map(str, xs))}"

            what = [f"added {ids(c.added)}" if c.added else "", f"removed {ids(c.removed)}" if c.removed else "",
                    f"{ids(c.offlined)} offlined in the guest; unplugged at the next boot" if c.offlined else "",
                    f"{ids(c.onlined)} back online in the guest" if c.onlined else ""]
            shown = "; ".join(w for w in what if w)
            out.print(f"[bold]{name}[/]: {c.vcpus_online} vCPUs (of at most {c.max_cpus})"
                      + (f", {shown}" if shown else ""))
    if memory is not None:
        with _option("memory", "--memory"):
            m = inst.set_memory(memory, timeout=10.0 if timeout is None else timeout)
        booted = _mib(m.boot_memory_bytes)
        if m.plugged_bytes is None:
            out.print(f"[bold]{name}[/] is stopped: vm.yaml now plugs {_mib(m.memory_bytes - m.boot_memory_bytes)} "
                      f"on top of its {booted} (from its next start)")
        elif m.reached:
            out.print(f"[bold]{name}[/]: {_mib(m.memory_bytes)} of memory ({booted} booted + "
                      f"{_mib(m.plugged_bytes)} plugged; at most {_mib(m.max_memory_bytes)})")
        else:
            out.print(f"[bold]{name}[/]: {_mib(m.boot_memory_bytes + m.plugged_bytes)} of memory so far "
                      f"({_mib(m.plugged_bytes)} plugged; asked for {_mib(m.memory_bytes)}): the guest goes on "
                      "trying (a guest keeps memory it cannot move off)")


@contextlib.contextmanager
def _option(field: str, option: str) -> Iterator[None]:
    """Problems with ``field`` (as the API names it) are the command-line option's."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError([Problem(option, p.message) if p.field == field else p for p in exc.problems]) from None


def _set_balloon_policy(name: str, balloon_min: str | None, balloon_shares: int | None) -> None:
    config = machine(name).set_balloon_policy(balloon_min=balloon_min, balloon_shares=balloon_shares)
    shares = "leaves its balloon alone" if config.balloon_shares == 0 else f"shares {config.balloon_shares}"
    out.print(f"[bold]{name}[/]: automatic ballooning keeps at least {_mib(config.balloon_floor)} usable, "
              f"{shares} (in vm.yaml)")


def _set_balloon(name: str, balloon: str, timeout: float) -> None:
    try:
        result = machine(name).set_balloon(balloon, timeout=timeout)
    except ConfigError as exc:  # the size's problems are the option's
        raise ConfigError([Problem("--balloon", p.message) if p.field == "size" else p
                           for p in exc.problems]) from None
    size = _mib(result.actual_bytes)
    if result.reached:
        out.print(f"[bold]{name}[/]: the guest now has {size} usable")
    else:
        out.print(f"[bold]{name}[/]: the guest has {size} usable so far (target {_mib(result.target_bytes)}; "
                  "it goes on moving towards it)")


def _set_limits(name: str, limits: dict[str, str]) -> None:
    from vmkit.host.cgroups import option_name, summary

    try:
        result = machine(name).set_limits(**limits)
    except ConfigError as exc:  # the fields' problems are the options'
        raise ConfigError([Problem(option_name(p.field), p.message) for p in exc.problems]) from None
    where = f"live in {result.cgroup}" if result.cgroup else "at its next start"
    out.print(f"[bold]{name}[/]: limits {summary(result.limits)} ({where})", highlight=False)
    if result.pinned:
        out.print("vCPU threads pinned to host CPUs " + ", ".join(f"vCPU{i}->{c}" for i, c in enumerate(result.pinned)),
                  highlight=False)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.0f} MiB"


def stats(name: str, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Memory and CPU use of a running machine now, its steal and the limits in force (KSM's savings are
    host-wide)."""
    from rich.table import Table

    s = machine(name).stats()
    if as_json:
        print_json(s.model_dump(mode="json"))
        return
    table = Table("", "", show_header=False, box=None)
    table.add_row("memory (configured)", _mib(s.memory_bytes))
    table.add_row("balloon (usable)", _mib(s.balloon_bytes))
    table.add_row("guest total", _mib(s.guest_mem_total_bytes))
    table.add_row("guest available", _mib(s.guest_mem_available_bytes))
    table.add_row("QEMU resident (host)", _mib(s.host_rss_bytes))
    table.add_row("KSM merged (this machine)", _mib(s.ksm_merged_bytes))
    table.add_row("KSM saved (whole host)", _mib(s.ksm_shared_bytes))
    table.add_row("memory plugged (virtio-mem)", "-" if s.max_memory_bytes is None else
                  f"{_mib(s.memory_plugged_bytes)} (at most {_mib(s.max_memory_bytes)} in all)")
    parked = f"; {s.vcpus_offlined} more offlined in the guest, until the next boot" if s.vcpus_offlined else ""
    table.add_row("vCPUs", f"{s.vcpus_online} (at most {s.max_cpus}{parked})")
    table.add_row("CPU", f"{s.cpu_percent:.1f} %")
    table.add_row("steal (vCPUs waiting)", "-" if s.steal_percent is None else f"{s.steal_percent:.1f} %")
    from vmkit.host.cgroups import summary

    table.add_row("limits", summary(s.limits))
    table.add_row("cgroup", f"{s.cgroup} (v{s.cgroup_version})" if s.cgroup else "none")
    out.print(table)


# -- vmkit top ------------------------------------------------------------------------------------------
# Every field of MachineStats becomes a column, in this order first, then any other (newer) field
# in the model's order; a header and a unit come from here or from the field's name (`_bytes`: MiB,
# `_percent`: %). Host-wide fields go in the caption, once.
_TOP_ORDER = ("vcpus", "vcpus_online", "cpu_percent", "steal_percent", "memory_bytes", "balloon_bytes",
              "guest_mem_total_bytes", "guest_mem_available_bytes", "host_rss_bytes")
_TOP_HEADERS = {"vcpus": "vCPUs", "vcpus_online": "online", "cpu_percent": "CPU %", "steal_percent": "steal %",
                "memory_bytes": "memory", "balloon_bytes": "usable", "guest_mem_total_bytes": "guest total",
                "guest_mem_available_bytes": "guest avail", "host_rss_bytes": "host RSS"}
_HOST_WIDE = {"ksm_shared_bytes": "KSM saves {} on this host"}
# Details `vmkit stats NAME` shows, too wide or too static for a live table of every machine.
_TOP_HIDDEN = frozenset({"max_cpus", "vcpus_offlined", "max_memory_bytes", "cgroup", "cgroup_version", "cgroup_files"})


def _top_fields() -> list[str]:
    from vmkit.api.models import MachineStats

    names = [n for n in MachineStats.model_fields if n not in _HOST_WIDE and n not in _TOP_HIDDEN]
    return [n for n in _TOP_ORDER if n in names] + [n for n in names if n not in _TOP_ORDER]


def _top_header(field: str) -> str:
    if field in _TOP_HEADERS:
        return _TOP_HEADERS[field]
    return field.removesuffix("_bytes").replace("_percent", " %").replace("_", " ")


def _top_cell(field: str, value: object) -> str:
    from pydantic import BaseModel

    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if field.endswith("_bytes") and isinstance(value, int):
        return _mib(value)
    if field.endswith("_percent") and isinstance(value, int | float):
        return f"{value:.1f}"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, dict):
        return " ".join(f"{k}={_top_cell(str(k), v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ",".join(_top_cell(field, v) for v in value) or "-"
    return str(value)


def top_table(machines: list[Any], *, footer: str = "") -> Any:
    """One frame of ``vmkit top``: a row per machine (:class:`vmkit.api.models.MachineTop`)."""
    import time

    from rich.markup import escape
    from rich.table import Table

    fields = _top_fields()
    caption = []
    for m in machines:
        if m.stats is not None:
            caption += [text.format(_top_cell(f, getattr(m.stats, f))) for f, text in _HOST_WIDE.items()]
            break
    caption += [time.strftime("%H:%M:%S"), *([footer] if footer else [])]
    table = Table("name", "state", *(_top_header(f) for f in fields), caption=" · ".join(caption),
                  title=f"{len(machines)} running machine{'s' if len(machines) != 1 else ''}")
    for col in table.columns[2:]:
        col.justify = "right"
    for m in machines:
        state = f"[green]{m.state}[/]" if m.state == "running" else f"[yellow]{escape(m.state)}[/]"
        if m.stats is None:
            table.add_row(escape(m.name), state, f"[red]{escape(m.error or 'no statistics')}[/]",
                          *([""] * (len(fields) - 1)))
        else:
            table.add_row(escape(m.name), state, *(escape(_top_cell(f, getattr(m.stats, f))) for f in fields))
    return table


@contextlib.contextmanager
def _keypresses() -> Iterator[Callable[[float], str | None]]:
    """Yields wait(seconds) -> the key pressed meanwhile, or None. The terminal is in cbreak mode
    (keys arrive unbuffered, unechoed) until the block ends; without a terminal on stdin it just waits."""
    import select
    import time

    if not sys.stdin.isatty():
        def sleep(seconds: float) -> str | None:
            time.sleep(seconds)
            return None

        yield sleep
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait(seconds: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], seconds)
        return os.read(fd, 1).decode(errors="replace") if ready else None

    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def top(
    once: bool = typer.Option(False, "--once", help="print one frame and exit (also when not on a terminal)"),
    as_json: bool = typer.Option(False, "--json", help="one snapshot, machine-readable"),
    interval: float = typer.Option(1.0, "--interval", help="seconds between refreshes"),
) -> None:
    """A live table of every running machine: CPU, vCPUs and memory (balloon, guest, host). q quits."""
    if not interval > 0:
        raise ConfigError.single("--interval", f"{interval} is not a positive number of seconds, e.g. 1 or 0.5")
    c = client()
    if as_json:
        print_json([m.model_dump(mode="json") for m in c.top()])
        return
    if once or not out.is_terminal:
        out.print(top_table(c.top()))
        return
    from rich.live import Live

    def frame() -> Any:
        return top_table(c.top(), footer="q quits")

    try:
        with _keypresses() as wait, Live(frame(), console=out, screen=True, auto_refresh=False) as live:
            while wait(interval) not in ("q", "Q"):
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves top, not an interruption
