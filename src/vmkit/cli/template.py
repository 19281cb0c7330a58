"""``vmkit template ...``: list, show and the JSON schema of templates."""

from __future__ import annotations

import json

import typer

from vmkit.cli import groups
from vmkit.cli.output import out, print_json

app = typer.Typer(help=groups.help_of("template"), no_args_is_help=True)


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Templates found by name: your own ($VMKIT_HOME/config/templates/NAME.yaml), then vmkit's."""
    import vmkit

    rows = vmkit.Client().templates()
    if as_json:
        print_json([{"name": n, "where": w, "description": d} for n, w, d in rows])
        return
    from rich.table import Table

    table = Table("name", "where", "description")
    for n, w, d in rows:
        table.add_row(n, w, d)
    out.print(table)


@app.command()
def show(
    ref: str = typer.Argument(..., help="a template name, a YAML file or an http(s) URL"),
    as_json: bool = typer.Option(False, "--json", help="the merged template as JSON"),
    raw: bool = typer.Option(False, "--raw", help="the file as written (without its bases merged)"),
) -> None:
    """Show a template with its bases merged (what `vmkit create --template` uses)."""
    import vmkit

    if raw:
        text = vmkit.Client().template_text(ref)
        out.print(text, markup=False, highlight=False, soft_wrap=True, end="")
        return
    t = vmkit.Client().template(ref)
    merged = {**t.fields.model_dump(exclude_defaults=True, exclude={"base"}), **t.vm}
    if as_json:
        print_json({"name": t.name, "source": t.source, "chain": t.chain, "template": merged})
        return
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:  # scripts as literal blocks, as written
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    out.print(f"# template {t.name}: {t.source}", markup=False, highlight=False, soft_wrap=True)
    if len(t.chain) > 1:
        out.print(f"# merged from: {' <- '.join(t.chain)}", markup=False, highlight=False, soft_wrap=True)
    text = yaml.dump(merged, Dumper=_Dumper, sort_keys=False, width=100)
    out.print(text, markup=False, highlight=False, soft_wrap=True, end="")


@app.command()
def schema() -> None:
    """Print the JSON schema of template files (for editors and validation)."""
    import vmkit

    out.print(json.dumps(vmkit.Client().template_schema(), indent=2), markup=False, highlight=False, soft_wrap=True)
