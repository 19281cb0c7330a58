"""``vmkit key ...``: the state-file key that encrypts saved machine states."""

from __future__ import annotations

from pathlib import Path

import typer

from vmkit.cli import groups
from vmkit.cli.output import client, out, print_json

app = typer.Typer(help=groups.help_of("key"), no_args_is_help=True)


@app.command()
def rotate(
    files: list[Path] | None = typer.Argument(
        None, help="more state files to re-encrypt, besides every instance's saved state"),
) -> None:
    """Create a new key and re-encrypt every instance's saved state (and FILES) with it; the old key is deleted.

    Machines must not run. State files it is not given stay under the old key and can no longer be read.
    """
    from rich.markup import escape

    outcome = client().rotate_key(files or [])
    out.print(f"new state-file key {outcome.new_key_id} in {escape(outcome.path)} "
              f"(was {outcome.old_key_id}); re-encrypted {len(outcome.reencrypted)} state file(s)", highlight=False)
    for path in outcome.reencrypted:
        out.print(f"  {escape(path)}", highlight=False)
    for skipped in outcome.skipped:
        out.print(f"[yellow]left as it was (cannot be read anyway):[/] {escape(skipped.path)}: "
                  f"{escape(skipped.reason)}", highlight=False)


@app.command()
def show(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Where the key is, its fingerprint (state files record it), and keys kept by an unfinished rotation."""
    from rich.markup import escape

    info = client().key_info()
    if as_json:
        print_json(info.model_dump(mode="json"))
        return
    out.print(f"{escape(info.path)}: " + (f"key {info.key_id}" if info.key_id
                                          else "no key yet (the first save creates it)"), highlight=False)
    if info.retired_key_ids:
        out.print(f"[yellow]retired keys kept by an unfinished rotation:[/] {', '.join(info.retired_key_ids)} "
                  "(run `vmkit key rotate` again to finish it)", highlight=False)
