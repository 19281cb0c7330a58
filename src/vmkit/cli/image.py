"""``vmkit image ...``: build, list and remove guest images."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vmkit.cli import groups
from vmkit.cli.output import client, err, out, print_json, spinner
from vmkit.host.images import catalogue

if TYPE_CHECKING:
    from vmkit.api.models import ImageInfo

app = typer.Typer(help=groups.help_of("image"), no_args_is_help=True)


def _note(image: ImageInfo) -> None:
    from rich.markup import escape

    if image.note is not None:
        out.print(f"[yellow]note:[/] {escape(image.note)}", highlight=False)


@app.command()
def build(
    name: str = typer.Argument(..., help=f"image to build: {', '.join(catalogue.BUILDABLE)}"),
    force: bool = typer.Option(False, "--force", help="rebuild even if the image exists"),
    arch: str = typer.Option("x86_64", "--arch", help="the guest architecture: x86_64 or aarch64 (stored as "
                             "NAME-aarch64; Debian's arm64 packages, `dpkg --add-architecture arm64` first)"),
) -> None:
    """Build a guest image from Debian packages into the image cache."""
    started = time.monotonic()
    with spinner(f"building image {name}") as update:
        image = client().build_image(name, force=force, arch=arch, progress=update)
    out.print(f"image [bold]{image.name}[/] ready in {image.directory} ({time.monotonic() - started:.1f} s)")
    _note(image)


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List images in the cache."""
    from rich.table import Table

    images = client().images()
    if as_json:
        print_json([{"name": i.name, "kind": i.kind, "directory": i.directory, "kernel": i.kernel, "initrd": i.initrd,
                     "disk": i.disk, "created": i.created, "recipe": i.recipe, "outdated": i.outdated}
                    for i in images])
        return
    table = Table("name", "kind", "kernel", "size", "created", "recipe")
    for i in images:
        recipe = "[yellow]outdated[/]" if i.outdated else (i.recipe or "-")
        table.add_row(i.name, i.kind, i.kernel_version or "-", f"{i.size / 2**20:.1f} MiB",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created)), recipe)
    out.print(table)
    for i in images:
        _note(i)


@app.command()
def warm(
    name: str = typer.Argument(..., help="the image (e.g. debian-12)"),
    memory: str | None = typer.Option(None, "--memory", "-m", help="memory of the machines that will start from "
                                      "it (as vmkit create --memory; default: the image's default)"),
    cpus: int | None = typer.Option(None, "--cpus", help="vCPUs of the machines that will start from it"),
    rebuild: bool = typer.Option(False, "--rebuild", help="make a new template even if a current one exists"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Boot IMAGE once with a generic identity and save its running state as a warm template: machines
    created from the image with the same memory and vCPUs then start from it in seconds."""
    from rich.markup import escape

    started = time.monotonic()
    with spinner(f"warming image {name}") as update:
        tpl, made = client().warm_image(name, memory=memory, cpus=cpus, rebuild=rebuild, progress=update)
    if as_json:
        print_json({**tpl.model_dump(mode="json"), "made": made})
        return
    what = f"made in {time.monotonic() - started:.1f} s" if made else "already current (--rebuild makes a new one)"
    out.print(f"warm template of [bold]{escape(name)}[/] ({tpl.memory >> 20} MiB, {tpl.cpus} vCPUs, "
              f"{tpl.machine_type}, QEMU {tpl.qemu_version}): {what}\n  {escape(tpl.path)}", highlight=False)


@app.command("rm")
def rm(name: str) -> None:
    """Remove an image from the cache."""
    client().delete_image(name)
    out.print(f"removed image {name}")


@app.command()
def pull(
    source: str = typer.Argument(..., help=f"a catalogue name ({', '.join(catalogue.CATALOGUE)}) or an http(s) URL"),
    sums_url: str | None = typer.Option(
        None, "--sums-url", help="checksum file for a URL (default: SHA256SUMS beside it)"),
    name: str | None = typer.Option(None, "--name", help="store the image under this name"),
    force: bool = typer.Option(False, "--force", help="download again / replace an image of the same name"),
    mirror: str | None = typer.Option(None, "--mirror", help="a catalogue name's directory on a mirror (holding "
                                      "the image and its checksum file); default $VMKIT_PULL_BASE_URL or the "
                                      "publisher's"),
) -> None:
    """Download an official cloud image, verify it against the publisher's checksums, and cache it.

    An interrupted download resumes; a wrong checksum leaves nothing in the cache.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from vmkit.host.images.pull import PullProgress

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task(f"pulling {source}", total=None)

        def show(p: PullProgress) -> None:
            bar.update(task, description=f"{p.stage}: {p.message}"[:60], completed=p.done, total=p.total)

        image = client().pull_image(source, sums_url=sums_url, name=name, force=force, mirror=mirror, progress=show)
    out.print(f"image [bold]{image.name}[/] ready in {image.directory}")


@app.command("export")
def export(
    name: str = typer.Argument(..., help="the image to export (`vmkit image list`)"),
    file: Path = typer.Argument(..., help="the archive to write: NAME.tar (or .tar.gz, compressed)"),
) -> None:
    """Write an image and its manifest to a tar archive (for `vmkit image import` on another host)."""
    with spinner(f"exporting image {name}") as update:
        done = client().export_image(name, file, progress=update)
    out.print(f"exported image [bold]{name}[/] to {done.path} ({done.size / 2**20:.1f} MiB)")


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="an archive made by `vmkit image export`"),
    name: str | None = typer.Option(None, "--name", help="store it under this name (default: its own)"),
    force: bool = typer.Option(False, "--force", help="replace an image of the same name"),
) -> None:
    """Add an exported image to the cache; every file is checked against its manifest first."""
    with spinner(f"importing {file}") as update:
        image = client().import_image(file, name=name, force=force, progress=update)
    out.print(f"image [bold]{image.name}[/] ready in {image.directory} (verified against its manifest)")
