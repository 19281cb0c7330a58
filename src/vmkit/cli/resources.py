"""A running machine's resources: ``vmkit set`` (change them live) and ``vmkit stats`` (see them)."""

from __future__ import annotations

import typer

from vmkit.cli.output import machine, out, print_json
from vmkit.errors import ConfigError, Problem


def register(app: typer.Typer) -> None:
    app.command("set")(set_)
    app.command()(stats)


def set_(
    name: str,
    balloon: str | None = typer.Option(
        None, "--balloon", help="move the guest's usable memory to SIZE (e.g. 256M; at most its memory, at least "
                                "64M) with the memory balloon, live; lasts until the machine stops"),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds to wait for the guest to get there"),
    cpu_weight: str | None = typer.Option(None, "--cpu-weight", help="CPU weight 1-10000 against other machines "
                                                                     "(default 100; none removes it)"),
    cpu_max: str | None = typer.Option(None, "--cpu-max", help="CPU cap in percent of one host core (e.g. 50)"),
    cpu_pin: str | None = typer.Option(None, "--cpu-pin", help="host CPUs to run on, e.g. 0-1,3 (each vCPU "
                                                               "pinned to one of them in turn)"),
    memory_min: str | None = typer.Option(None, "--memory-min", help="memory reservation (v2 memory.min; v1: "
                                                                     "soft limit)"),
    memory_high: str | None = typer.Option(None, "--memory-high", help="reclaim and throttle above this"),
    memory_max: str | None = typer.Option(None, "--memory-max", help="hard limit of QEMU and its helpers "
                                                                     "(at least memory + 128M)"),
    swap_max: str | None = typer.Option(None, "--swap-max", help="host swap the machine may use"),
) -> None:
    """Change a machine's resources: live while it runs (limits are also kept in vm.yaml; on a stopped
    machine they apply at its next start). Give `none` to remove a limit."""
    limits = {k: v for k, v in {"cpu_weight": cpu_weight, "cpu_max": cpu_max, "cpu_pin": cpu_pin,
                                "memory_min": memory_min, "memory_high": memory_high, "memory_max": memory_max,
                                "swap_max": swap_max}.items() if v is not None}
    if balloon is None and not limits:
        raise ConfigError.single("--balloon", "say what to change, e.g. --balloon 256M or --cpu-max 50")
    if limits:
        _set_limits(name, limits)
    if balloon is None:
        return
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
    table.add_row("KSM saved (whole host)", _mib(s.ksm_shared_bytes))
    table.add_row("vCPUs", str(s.vcpus))
    table.add_row("CPU", f"{s.cpu_percent:.1f} %")
    table.add_row("steal (vCPUs waiting)", "-" if s.steal_percent is None else f"{s.steal_percent:.1f} %")
    from vmkit.host.cgroups import summary

    table.add_row("limits", summary(s.limits))
    table.add_row("cgroup", f"{s.cgroup} (v{s.cgroup_version})" if s.cgroup else "none")
    out.print(table)
