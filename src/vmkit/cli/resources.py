"""A running machine's resources: ``vmkit set`` (change them live) and ``vmkit stats`` (see them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from vmkit.cli.output import machine, out, print_json
from vmkit.errors import ConfigError, Problem


def register(app: typer.Typer) -> None:
    app.command("set")(set_)
    app.command()(stats)


def set_(
    name: str,
    cpus: int | None = typer.Option(
        None, "--cpus", help="give it this many vCPUs (1 to its max_cpus), live; vm.yaml follows (a stopped "
                             "machine gets them at its next start)"),
    memory: str | None = typer.Option(
        None, "--memory", help="give it this much memory (e.g. 3G: its boot memory up to its max_memory) through "
                               "its virtio-mem region, live; vm.yaml follows"),
    balloon: str | None = typer.Option(
        None, "--balloon", help="move the guest's usable memory to SIZE (e.g. 256M; at most its memory, at least "
                                "64M) with the memory balloon, live; lasts until the machine stops"),
    timeout: float | None = typer.Option(None, "--timeout", help="seconds to wait for the guest to get there "
                                         "(default: 30 for --cpus, 10 for --memory and --balloon)"),
) -> None:
    """Change a machine's resources: live while it runs."""
    if cpus is None and memory is None and balloon is None:
        raise ConfigError.single("--cpus", "say what to change, e.g. --cpus 2, --memory 2G or --balloon 256M")
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
            what = (f", added vCPU {', '.join(map(str, c.added))}" if c.added else
                    f", removed vCPU {', '.join(map(str, c.removed))}" if c.removed else "")
            out.print(f"[bold]{name}[/]: {c.vcpus_online} vCPUs (of at most {c.max_cpus}){what}")
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


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.0f} MiB"


def stats(name: str, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Memory and CPU use of a running machine now (KSM's savings are host-wide)."""
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
    table.add_row("KSM saved (whole host)", _mib(s.ksm_shared_bytes))
    table.add_row("memory plugged (virtio-mem)", "-" if s.max_memory_bytes is None else
                  f"{_mib(s.memory_plugged_bytes)} (at most {_mib(s.max_memory_bytes)} in all)")
    table.add_row("vCPUs", f"{s.vcpus_online} (at most {s.max_cpus})")
    table.add_row("CPU", f"{s.cpu_percent:.1f} %")
    out.print(table)
