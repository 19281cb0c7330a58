"""``vmkit key ...``: the state-file key that encrypts saved machine states."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from vmkit import keys, statectl
from vmkit.cli.output import out, print_json

app = typer.Typer(help="The state-file key (it encrypts and authenticates saved machine states).",
                  no_args_is_help=True)


@app.command()
def rotate(
    files: list[Path] | None = typer.Argument(
        None, help="more state files to re-encrypt, besides every instance's saved state"),
) -> None:
    """Create a new key and re-encrypt every instance's saved state (and FILES) with it; the old key is deleted.

    Machines must not run. State files it is not given stay under the old key and can no longer be read.
    """
    outcome = statectl.rotate_key(files or [])
    out.print(f"new state-file key {outcome.new_key_id} in {escape(str(keys.key_path()))} "
              f"(was {outcome.old_key_id}); re-encrypted {len(outcome.reencrypted)} state file(s)", highlight=False)
    for path in outcome.reencrypted:
        out.print(f"  {escape(str(path))}", highlight=False)
    for path, why in outcome.skipped:
        out.print(f"[yellow]left as it was (cannot be read anyway):[/] {escape(str(path))}: {escape(why)}",
                  highlight=False)


@app.command()
def show(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Where the key is, its fingerprint (state files record it), and keys kept by an unfinished rotation."""
    path = keys.key_path()
    key_id = keys.key_id(keys.load_key()) if path.exists() else None
    retired = [keys.key_id(k) for k in keys.load_retired_keys()]
    if as_json:
        print_json({"path": str(path), "key_id": key_id, "retired_key_ids": retired})
        return
    out.print(f"{escape(str(path))}: " + (f"key {key_id}" if key_id else "no key yet (the first save creates it)"),
              highlight=False)
    if retired:
        out.print(f"[yellow]retired keys kept by an unfinished rotation:[/] {', '.join(retired)} "
                  "(run `vmkit key rotate` again to finish it)", highlight=False)
