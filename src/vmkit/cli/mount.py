"""``vmkit mount ...``: the host folders shared into a machine."""

from __future__ import annotations

import typer
from rich.table import Table

from vmkit import control
from vmkit.cli.output import out, print_json

app = typer.Typer(help="Host folders shared into a machine (set with `vmkit create --mount`).", no_args_is_help=True)


@app.command("list")
def list_(name: str, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """The shares of a machine: type, host folder, guest mount point, mode and tag."""
    rows = control.list_mounts(name)
    if as_json:
        print_json(rows)
        return
    table = Table("tag", "type", "host folder", "guest path", "mode", "state")
    for r in rows:
        table.add_row(str(r["tag"]), str(r["type"]), str(r["host_path"]), str(r["guest_path"]),
                      "ro" if r["read_only"] else "rw", str(r["state"]))
    out.print(table)
