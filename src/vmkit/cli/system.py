"""``vmkit doctor`` and ``vmkit schema``."""

from __future__ import annotations

import json

import typer

from vmkit.cli.output import out
from vmkit.errors import ExitCode


def register(app: typer.Typer) -> None:
    app.command()(doctor)
    app.command()(schema)


def doctor() -> None:
    """Check the host: tools vmkit needs (with install hints) and which accelerator it will use, and why."""
    from rich.table import Table

    from vmkit.host import doctor as host

    table = Table("check", "status", "detail", "fix")
    missing_required = False
    for c in host.checks():
        status = "[green]ok[/]" if c.ok else ("[red]missing[/]" if c.required else "[yellow]optional[/]")
        missing_required |= c.required and not c.ok
        table.add_row(c.name, status, c.detail, c.hint or "")
    out.print(table)
    if missing_required:
        raise typer.Exit(ExitCode.HOST_MISSING)


def schema() -> None:
    """Print the JSON schema of vm.yaml (for editors and validation)."""
    from vmkit import config

    out.print(json.dumps(config.json_schema(), indent=2), markup=False, highlight=False, soft_wrap=True)
