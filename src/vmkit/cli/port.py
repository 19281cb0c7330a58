"""``vmkit port ...``: host ports forwarded into the guest (user-mode NAT)."""

from __future__ import annotations

import typer

from vmkit.cli import groups
from vmkit.cli.output import machine, out, print_json

app = typer.Typer(help=groups.help_of("port"), no_args_is_help=True)


@app.command()
def add(name: str, spec: str = typer.Argument(..., help="[ADDR:]HOST:GUEST\\[/udp], e.g. 8080:80")) -> None:
    """Forward a host port to the guest, now if it runs and from then on (vm.yaml)."""
    fwd = machine(name).add_port(spec)
    out.print(f"forwarding {fwd} for [bold]{name}[/]")


@app.command("list")
def list_(name: str, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """The port forwards of a machine."""
    from rich.table import Table

    rows = machine(name).ports
    if as_json:
        print_json([f.model_dump(mode="json") for f in rows])
        return
    table = Table("protocol", "host", "guest port")
    for f in rows:
        table.add_row(f.protocol, f"{f.host_addr}:{f.host_port}", str(f.guest_port))
    out.print(table)
