"""``vmkit nbd ...``: serve a file or a RAM disk over the Network Block Device protocol."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from vmkit import config
from vmkit.cli.output import err, out
from vmkit.errors import ConfigError, Problem
from vmkit.nbd import Export, NbdAddress, create_backend, registered_backends, serve

app = typer.Typer(
    help="Serve disks over NBD with vmkit's own server (QEMU, qemu-img, nbdinfo, nbdcopy connect to it).",
    no_args_is_help=True,
)


def parse_size(text: str, field: str = "--memory") -> int:
    """``"512M"``, ``"1G"``, ``"1GiB"``, ``"4096"`` -> bytes (binary units), as in vm.yaml."""
    try:
        return config.parse_size(text)
    except ValueError as exc:
        raise ConfigError.single(field, str(exc)) from None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError  # pragma: no cover


@app.callback()
def main() -> None:
    """Serve disks over the Network Block Device protocol."""


@app.command("serve")
def serve_command(
    file: Path | None = typer.Argument(None, help="file or block device to export", show_default=False),
    memory: str | None = typer.Option(None, "--memory", "-m", help="export a sparse RAM disk of this size (1G)"),
    export: str = typer.Option("", "--export", "-x", help="export name (the empty name is the default)"),
    socket_path: Path | None = typer.Option(None, "--socket", "-k", help="listen on this unix socket"),
    port: int | None = typer.Option(None, "--port", "-p", help="listen on this TCP port (0: any free port)"),
    host: str = typer.Option("127.0.0.1", "--host", help="TCP address to listen on (with --port)"),
    read_only: bool = typer.Option(False, "--read-only", "-r", help="refuse writes"),
    backend: str | None = typer.Option(
        None,
        "--backend",
        "-b",
        help="storage backend: file, memory, cow (writes kept in RAM, the file is untouched), "
        "dedup (content-addressed chunks), or a registered one",
    ),
    description: str = typer.Option("", "--description", help="export description shown to clients"),
) -> None:
    """Serve FILE (or a RAM disk with --memory) until interrupted.

    Without --socket or --port it listens on TCP 127.0.0.1:10809. The first line on stdout is the
    NBD URI to connect to, e.g. ``qemu-img info "$(vmkit nbd serve disk.img -k s.sock | head -1)"``.
    """
    problems: list[Problem] = []
    if (file is None) == (memory is None):
        problems.append(Problem("FILE", "give a FILE or --memory SIZE (exactly one)"))
    if socket_path is not None and port is not None:
        problems.append(Problem("--socket", "give --socket or --port, not both"))
    if port is not None and not 0 <= port <= 65535:
        problems.append(Problem("--port", f"{port} is not a TCP port"))
    size: int | None = None
    if memory is not None:
        try:
            size = parse_size(memory)
        except ConfigError as exc:
            problems.extend(exc.problems)
    kind = backend or ("file" if file is not None else "memory")
    if kind not in registered_backends():
        problems.append(
            Problem("--backend", f"unknown backend {kind!r}; choose from {', '.join(registered_backends())}")
        )
    if problems:
        raise ConfigError(problems, context="arguments")
    store = create_backend(kind, path=file, size=size, read_only=read_only)
    try:
        exp = Export(export, store, read_only=read_only, description=description)
        mode = "read-only" if not exp.writable else "read-write"

        def ready(address: NbdAddress) -> None:
            out.print(address.uri(export), highlight=False, soft_wrap=True)
            sys.stdout.flush()
            what = str(file) if file is not None else "RAM disk"
            err.print(
                f"serving {what} as export {export!r} ({_human(store.size)}, {mode}, backend {kind}) "
                f"on {address}; Ctrl-C to stop",
                highlight=False,
            )

        if socket_path is not None:
            serve(exp, unix_path=socket_path, on_ready=ready)
        else:
            serve(exp, host=host, port=10809 if port is None else port, on_ready=ready)
        stats = store.stats()
        if stats:
            err.print("backend: " + ", ".join(f"{k}={v}" for k, v in stats.items()), highlight=False)
    finally:
        store.close()


@app.command("backends")
def backends_command() -> None:
    """List the storage backends --backend accepts (built-in and registered)."""
    for name in registered_backends():
        out.print(name, highlight=False)
