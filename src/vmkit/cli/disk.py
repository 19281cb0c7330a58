"""``vmkit disk ...``: disks of a running machine (hot attach and detach)."""

from __future__ import annotations

import typer

from vmkit.cli import groups
from vmkit.cli.output import machine, out, print_json

app = typer.Typer(help=groups.help_of("disk"), no_args_is_help=True)


@app.command()
def attach(
    name: str,
    spec: str = typer.Argument(..., help="PATH[:ro][:format=F][:kind=K] or nbd://HOST:PORT/EXPORT[,ro][,kind=K]"),
    disk_id: str | None = typer.Option(None, "--id", help="device id (default: the next free diskN)"),
) -> None:
    """Attach a disk to a running machine (until it stops: vm.yaml is not changed)."""
    result = machine(name).attach_disk(spec, disk_id=disk_id)
    out.print(f"attached [bold]{result.id}[/] to {name} (live only; add it to vm.yaml to keep it)")


@app.command()
def detach(
    name: str,
    disk_id: str = typer.Argument(..., metavar="ID", help="the id `vmkit disk list` shows"),
    timeout: float = typer.Option(30.0, "--timeout", help="seconds the guest gets to release the disk"),
) -> None:
    """Detach a hot-plugged disk; the guest is asked to release it first."""
    machine(name).detach_disk(disk_id, timeout=timeout)
    out.print(f"detached [bold]{disk_id}[/] from {name}")


@app.command("list")
def list_(name: str, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """The disks of a running machine, with NBD connection state."""
    from rich.table import Table

    rows = machine(name).disks
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table("id", "kind", "attachment", "target", "mode", "origin", "state")
    for r in rows:
        table.add_row(r.id, r.kind, r.attachment, r.target, "ro" if r.read_only else "rw", r.origin, r.state)
    out.print(table)
