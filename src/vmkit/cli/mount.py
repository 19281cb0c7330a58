"""``vmkit mount ...``: the host folders shared into a machine."""

from __future__ import annotations

import typer

from vmkit.cli import groups
from vmkit.cli.output import machine, out, print_json

app = typer.Typer(help=groups.help_of("mount"), no_args_is_help=True)


@app.command("list")
def list_(name: str, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """The shares of a machine: type, host folder, guest mount point, mode and tag."""
    from rich.table import Table

    rows = machine(name).mounts
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table("tag", "type", "host folder", "guest path", "mode", "state")
    for r in rows:
        table.add_row(r.tag, r.type, r.host_path, r.guest_path, "ro" if r.read_only else "rw", r.state)
    out.print(table)
