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
    balloon_min: str | None = typer.Option(
        None, "--balloon-min", help="automatic ballooning leaves the guest at least SIZE (vm.yaml; holds at once)"),
    balloon_shares: int | None = typer.Option(
        None, "--balloon-shares", help="automatic ballooning: its share of the host's memory (default 1000; 0: "
                                       "leave its balloon alone; vm.yaml; holds at once)"),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds to wait for the guest to get there"),
) -> None:
    """Change a running machine's resources live."""
    if balloon is None and balloon_min is None and balloon_shares is None:
        raise ConfigError.single("--balloon", "say what to change, e.g. --balloon 256M")
    if balloon_min is not None or balloon_shares is not None:
        _set_balloon_policy(name, balloon_min, balloon_shares)
    if balloon is not None:
        _set_balloon(name, balloon, timeout)


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
    table.add_row("KSM merged (this machine)", _mib(s.ksm_merged_bytes))
    table.add_row("KSM saved (whole host)", _mib(s.ksm_shared_bytes))
    table.add_row("vCPUs", str(s.vcpus))
    table.add_row("CPU", f"{s.cpu_percent:.1f} %")
    out.print(table)
