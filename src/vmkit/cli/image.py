"""``vmkit image ...``: build, list and remove guest images."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import typer

from vmkit.cli import groups
from vmkit.cli.output import err, out, print_json, spinner
from vmkit.errors import ConfigError
from vmkit.host.images import catalogue

if TYPE_CHECKING:
    from vmkit.host.images.store import Image, ImageStore

app = typer.Typer(help=groups.help_of("image"), no_args_is_help=True)


def _build_debian(store: ImageStore, *, force: bool, progress: Callable[[str], None], arch: str) -> Image:
    from vmkit.host.images import debian

    def show(p: debian.BuildProgress) -> None:
        progress(f"[{p.elapsed:5.0f} s] {p.stage}: {p.message}")

    return debian.build_debian(store, force=force, progress=show, arch=arch)


def _build_micro_full(store: ImageStore, *, force: bool, progress: Callable[[str], None], arch: str) -> Image:
    from vmkit.host.images import micro

    if arch != "x86_64":
        raise ConfigError.single("--arch", f"micro-full is built for x86_64 only: use micro --arch {arch}")
    return micro.build_micro_full(store, force=force, progress=progress)


def _builders() -> dict[str, Callable[..., Image]]:
    from vmkit.host.images import micro

    return {catalogue.MICRO: micro.build_micro, catalogue.MICRO_FULL: _build_micro_full,
            catalogue.DEBIAN_12: _build_debian}


@app.command()
def build(
    name: str = typer.Argument(..., help=f"image to build: {', '.join(catalogue.BUILDABLE)}"),
    force: bool = typer.Option(False, "--force", help="rebuild even if the image exists"),
    arch: str = typer.Option("x86_64", "--arch", help="the guest architecture: x86_64 or aarch64 (stored as "
                             "NAME-aarch64; Debian's arm64 packages, `dpkg --add-architecture arm64` first)"),
) -> None:
    """Build a guest image from Debian packages into the image cache."""
    from rich.markup import escape

    from vmkit.host.images import debian
    from vmkit.host.images.store import ImageStore

    builder = _builders().get(name)
    if builder is None:
        raise ConfigError.single("NAME", f"no builder for {name!r}: choose one of {', '.join(catalogue.BUILDABLE)}")
    started = time.monotonic()
    with spinner(f"building image {name}") as update:
        image = builder(ImageStore(), force=force, progress=update, arch=arch)
    out.print(f"image [bold]{image.name}[/] ready in {image.directory} ({time.monotonic() - started:.1f} s)")
    if (note := debian.outdated_note(image)) is not None:
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List images in the cache."""
    from rich.markup import escape
    from rich.table import Table

    from vmkit.host.images import debian
    from vmkit.host.images.store import ImageStore

    images = ImageStore().list()
    if as_json:
        print_json([{"name": i.name, "kind": i.manifest.kind, "directory": str(i.directory),
                     "kernel": str(i.kernel) if i.kernel else None, "initrd": str(i.initrd) if i.initrd else None,
                     "disk": str(i.disk) if i.disk else None, "created": i.manifest.created,
                     "recipe": i.manifest.recipe, "outdated": debian.is_outdated(i)} for i in images])
        return
    table = Table("name", "kind", "kernel", "size", "created", "recipe")
    for i in images:
        size = sum(f.size for f in i.manifest.files.values())
        recipe = "[yellow]outdated[/]" if debian.is_outdated(i) else (i.manifest.recipe or "-")
        table.add_row(i.name, i.manifest.kind, i.manifest.kernel_version or "-", f"{size / 2**20:.1f} MiB",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(i.manifest.created)), recipe)
    out.print(table)
    for i in images:
        if (note := debian.outdated_note(i)) is not None:
            out.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


@app.command("rm")
def rm(name: str) -> None:
    """Remove an image from the cache."""
    from vmkit.host.images.store import ImageStore

    ImageStore().remove(name)
    out.print(f"removed image {name}")


@app.command()
def pull(
    source: str = typer.Argument(..., help=f"a catalogue name ({', '.join(catalogue.CATALOGUE)}) or an http(s) URL"),
    sums_url: str | None = typer.Option(
        None, "--sums-url", help="checksum file for a URL (default: SHA256SUMS beside it)"),
    name: str | None = typer.Option(None, "--name", help="store the image under this name"),
    force: bool = typer.Option(False, "--force", help="download again / replace an image of the same name"),
) -> None:
    """Download an official cloud image, verify it against the publisher's checksums, and cache it.

    An interrupted download resumes; a wrong checksum leaves nothing in the cache.
    Set VMKIT_PULL_BASE_URL to use a mirror.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from vmkit.host.images import pull as pull_mod
    from vmkit.host.images.store import ImageStore

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task(f"pulling {source}", total=None)

        def show(p: pull_mod.PullProgress) -> None:
            bar.update(task, description=f"{p.stage}: {p.message}"[:60], completed=p.done, total=p.total)

        image = pull_mod.pull(source, ImageStore(), progress=show, sums_url=sums_url, name=name, force=force)
    out.print(f"image [bold]{image.name}[/] ready in {image.directory}")
